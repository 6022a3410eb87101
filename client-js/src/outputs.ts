/**
 * The output area as a model: kernel messages in, render operations out. It runs on
 * the host page (it decides, the output frame only draws) and needs no DOM.
 */
import type { KernelMessage } from "./protocol";

export type Output =
  | { type: "stream"; name: string; text: string }
  | { type: "display"; data: Record<string, any>; metadata: Record<string, any>; displayId?: string; count?: number }
  | { type: "error"; ename: string; evalue: string; traceback: string[] };

export type Op =
  | { op: "add"; output: Output }
  | { op: "text"; index: number; text: string } // append to the stream at index
  | { op: "set"; index: number; output: Output }
  | { op: "clear" };

/** Apply backspace-free terminal semantics for `\r`: a carriage return rewrites its line. */
export function carriageReturns(text: string): string {
  if (!text.includes("\r")) return text;
  return text
    .replace(/\r\n/g, "\n")
    .split("\n")
    .map((line) => {
      const parts = line.split("\r");
      let out = "";
      for (const part of parts) out = part + out.slice(part.length);
      return out;
    })
    .join("\n");
}

export class OutputModel {
  outputs: Output[] = [];
  private clearPending = false;

  reset(): Op[] {
    this.outputs = [];
    this.clearPending = false;
    return [{ op: "clear" }];
  }

  /** The render operations for one IOPub message of this area's execution. */
  apply(msg: KernelMessage): Op[] {
    const type = msg.header.msg_type;
    const c = msg.content;
    if (type === "clear_output") {
      if (c.wait) {
        this.clearPending = true; // cleared when the next output arrives, so it does not flicker
        return [];
      }
      return this.reset();
    }
    if (type === "update_display_data") return this.update(c.transient?.display_id, c.data, c.metadata);
    const ops: Op[] = this.clearPending ? this.reset() : [];
    if (type === "stream") {
      const last = this.outputs.length - 1;
      const prev = this.outputs[last];
      if (prev?.type === "stream" && prev.name === c.name) {
        const joined = prev.text + c.text;
        const fixed = carriageReturns(joined);
        prev.text = fixed;
        ops.push(fixed === joined ? { op: "text", index: last, text: c.text } : { op: "set", index: last, output: { ...prev } });
      } else {
        ops.push(this.add({ type: "stream", name: c.name, text: carriageReturns(String(c.text ?? "")) }));
      }
    } else if (type === "display_data" || type === "execute_result") {
      const output: Output = { type: "display", data: c.data ?? {}, metadata: c.metadata ?? {} };
      if (c.transient?.display_id) output.displayId = c.transient.display_id;
      if (type === "execute_result") output.count = c.execution_count;
      ops.push(this.add(output));
    } else if (type === "error") {
      ops.push(this.add({ type: "error", ename: c.ename, evalue: c.evalue, traceback: c.traceback ?? [] }));
    }
    return ops;
  }

  /** update_display_data: replace every output shown with that display_id, here. */
  update(displayId: string | undefined, data: Record<string, any>, metadata: Record<string, any> = {}): Op[] {
    if (!displayId) return [];
    const ops: Op[] = [];
    this.outputs.forEach((o, index) => {
      if (o.type === "display" && o.displayId === displayId) {
        const output: Output = { ...o, data, metadata };
        this.outputs[index] = output;
        ops.push({ op: "set", index, output });
      }
    });
    return ops;
  }

  private add(output: Output): Op {
    this.clearPending = false;
    this.outputs.push(output);
    // A copy: the model keeps growing this output, and the op may wait to be sent.
    return { op: "add", output: { ...output } };
  }
}
