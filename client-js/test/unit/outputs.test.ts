import assert from "node:assert/strict";
import { test } from "node:test";
import { OutputModel, carriageReturns } from "../../src/outputs";
import type { KernelMessage } from "../../src/protocol";

function msg(type: string, content: Record<string, unknown>): KernelMessage {
  return { header: { msg_id: "m", msg_type: type }, parent_header: { msg_id: "p" }, metadata: {}, content };
}

test("consecutive stream chunks of one stream grow one output", () => {
  const m = new OutputModel();
  assert.deepEqual(m.apply(msg("stream", { name: "stdout", text: "a\n" })), [
    { op: "add", output: { type: "stream", name: "stdout", text: "a\n" } },
  ]);
  assert.deepEqual(m.apply(msg("stream", { name: "stdout", text: "b\n" })), [{ op: "text", index: 0, text: "b\n" }]);
  m.apply(msg("stream", { name: "stderr", text: "oops\n" }));
  assert.deepEqual(
    m.outputs.map((o) => (o.type === "stream" ? [o.name, o.text] : o.type)),
    [
      ["stdout", "a\nb\n"],
      ["stderr", "oops\n"],
    ],
  );
});

test("an operation keeps what it said when the model changes after it (ops wait to be sent)", () => {
  const m = new OutputModel();
  const first = m.apply(msg("stream", { name: "stdout", text: "line 0\n" }));
  m.apply(msg("stream", { name: "stdout", text: "line 1\n" }));
  m.apply(msg("stream", { name: "stdout", text: "\rline 2\n" }));
  assert.deepEqual(first, [{ op: "add", output: { type: "stream", name: "stdout", text: "line 0\n" } }]);
});

test("a carriage return rewrites its line, as a progress bar expects", () => {
  assert.equal(carriageReturns("10%\r50%\r100%\ndone"), "100%\ndone");
  assert.equal(carriageReturns("abcdef\rxy"), "xycdef");
  const m = new OutputModel();
  m.apply(msg("stream", { name: "stdout", text: "1/3" }));
  const ops = m.apply(msg("stream", { name: "stdout", text: "\r2/3" }));
  assert.equal(ops[0].op, "set");
  assert.deepEqual(m.outputs[0], { type: "stream", name: "stdout", text: "2/3" });
});

test("clear_output with wait clears only when the next output comes", () => {
  const m = new OutputModel();
  m.apply(msg("stream", { name: "stdout", text: "old" }));
  assert.deepEqual(m.apply(msg("clear_output", { wait: true })), []);
  assert.equal(m.outputs.length, 1, "nothing cleared yet: no flicker");
  const ops = m.apply(msg("stream", { name: "stdout", text: "new" }));
  assert.deepEqual(ops.map((o) => o.op), ["clear", "add"]);
  assert.deepEqual(m.outputs, [{ type: "stream", name: "stdout", text: "new" }]);
  assert.deepEqual(m.apply(msg("clear_output", { wait: false })), [{ op: "clear" }]);
  assert.equal(m.outputs.length, 0);
});

test("update_display_data replaces every output with that display_id", () => {
  const m = new OutputModel();
  m.apply(msg("display_data", { data: { "text/plain": "0%" }, metadata: {}, transient: { display_id: "bar" } }));
  m.apply(msg("execute_result", { data: { "text/plain": "2" }, metadata: {}, execution_count: 1 }));
  m.apply(msg("display_data", { data: { "text/plain": "0%" }, metadata: {}, transient: { display_id: "bar" } }));
  const ops = m.apply(msg("update_display_data", { data: { "text/plain": "100%" }, metadata: {}, transient: { display_id: "bar" } }));
  assert.deepEqual(ops.map((o) => (o.op === "set" ? o.index : -1)), [0, 2]);
  assert.deepEqual(
    m.outputs.map((o) => (o.type === "display" ? o.data["text/plain"] : "")),
    ["100%", "2", "100%"],
  );
  assert.deepEqual(m.update("unknown", { "text/plain": "x" }), []);
});

test("an error keeps its traceback", () => {
  const m = new OutputModel();
  m.apply(msg("error", { ename: "ZeroDivisionError", evalue: "division by zero", traceback: ["line 1", "line 2"] }));
  assert.deepEqual(m.outputs[0], {
    type: "error",
    ename: "ZeroDivisionError",
    evalue: "division by zero",
    traceback: ["line 1", "line 2"],
  });
});
