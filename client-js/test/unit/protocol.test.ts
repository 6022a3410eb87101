import assert from "node:assert/strict";
import { test } from "node:test";
import { SeqTracker, makeMessage, parentOf } from "../../src/protocol";
import { Execution } from "../../src/session";

test("each event is handled once across a resume, and a new epoch starts over", () => {
  const t = new SeqTracker();
  t.session("e1");
  assert.deepEqual([1, 2, 3].map((s) => t.accept(s)), [true, true, true]);
  // The replay after a resume may overlap what already arrived.
  assert.deepEqual([2, 3, 4].map((s) => t.accept(s)), [false, false, true]);
  assert.equal(t.accept(undefined), true, "notices have no seq and are always handled");
  t.session("e1");
  assert.equal(t.last, 4, "the same epoch keeps its place");
  t.gap("e2");
  assert.equal(t.accept(1), true, "a new log counts from one");
});

test("events find their execution by parent or msg_id", () => {
  assert.equal(parentOf("iopub", { parent_header: { msg_id: "a" } }), "a");
  assert.equal(parentOf("files", { msg_id: "b", files: [] }), "b");
  assert.equal(parentOf("error", { code: "x" }), undefined);
  const m = makeMessage("execute_request", { code: "1" });
  assert.equal(m.header.msg_type, "execute_request");
  assert.notEqual(m.header.msg_id, makeMessage("execute_request", {}).header.msg_id);
});

function kmsg(type: string, content: Record<string, unknown>) {
  return { header: { msg_id: "k", msg_type: type }, parent_header: { msg_id: "run" }, metadata: {}, content };
}

test("an execution resolves once both its reply and its idle status arrived", async () => {
  const run = new Execution("run");
  const seen: string[] = [];
  run.on("output", (m) => seen.push(m.header.msg_type));
  run.on("status", (s) => seen.push(s));
  run.on("input", (i) => seen.push(`input:${i.prompt}`));
  run.handle("iopub", kmsg("status", { execution_state: "busy" }));
  run.handle("iopub", kmsg("stream", { name: "stdout", text: "hi" }));
  run.handle("stdin", kmsg("input_request", { prompt: "name? ", password: false }));
  run.handle("permalink", { msg_id: "run", id: "abc", url: "/p/abc" });
  run.handle("shell", kmsg("execute_reply", { status: "error", ename: "E", evalue: "v", traceback: ["t"], execution_count: 3 }));
  assert.equal(run.done, false, "the idle status is still to come");
  run.handle("iopub", kmsg("status", { execution_state: "idle" }));
  const result = await run;
  assert.deepEqual(seen, ["busy", "stream", "input:name? ", "idle"]);
  assert.equal(result.status, "error");
  assert.equal(result.executionCount, 3);
  assert.deepEqual(result.error, { ename: "E", evalue: "v", traceback: ["t"] });
  assert.deepEqual(result.permalink, { id: "abc", url: "/p/abc" });
});

test("an execution whose kernel died rejects with the reason", async () => {
  const { CellgateError } = await import("../../src/protocol");
  const run = new Execution("run");
  run.fail(new CellgateError("kernel_dead", "the kernel died: out of memory"));
  await assert.rejects(Promise.resolve(run), { code: "kernel_dead", message: /out of memory/ });
});
