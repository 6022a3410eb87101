/**
 * The page's side of widgets: which of a session's kernel messages each output frame
 * gets, and which execution outputs an Output widget has taken (so the cell does not
 * show them too). One per session, shared by the cells on it.
 */
import type { KernelMessage } from "./protocol";
import type { Session } from "./session";

export interface WidgetFrame {
  /** Deliver one kernel message to the frame. */
  post(msg: KernelMessage): void;
  /** Whether the message belongs to this frame: it sent the request, or its cell ran it. */
  owns(parentMsgId: string): boolean;
}

/** The comm messages a frame's widgets may send and get; nothing else a frame posts is sent on. */
export const COMM_TYPES = new Set(["comm_open", "comm_msg", "comm_close"]);
export const OUTPUT_TYPES = new Set(["stream", "display_data", "execute_result", "error", "clear_output"]);

/** A request a frame's widgets sent (their msg_ids start so; the page's own do not). */
export function fromWidget(msgId: string): boolean {
  return msgId.startsWith("w-");
}

const bridges = new WeakMap<Session, WidgetBridge>();

export class WidgetBridge {
  private frames = new Set<WidgetFrame>();
  /** Output widgets (comm id) capturing the outputs of a request (msg id). */
  private captures = new Map<string, string>();

  static of(session: Session): WidgetBridge {
    let bridge = bridges.get(session);
    if (!bridge) {
      bridge = new WidgetBridge(session);
      bridges.set(session, bridge);
    }
    return bridge;
  }

  private constructor(session: Session) {
    session.on("iopub", (msg) => this.route(msg));
  }

  add(frame: WidgetFrame): () => void {
    this.frames.add(frame);
    return () => this.frames.delete(frame);
  }

  /** True if an Output widget shows this request's outputs instead of its cell. */
  captured(parentMsgId: string | undefined): boolean {
    if (!parentMsgId) return false;
    for (const id of this.captures.values()) if (id === parentMsgId) return true;
    return false;
  }

  private route(msg: KernelMessage): void {
    const type = msg.header.msg_type;
    const c = msg.content;
    if (type === "comm_open" || type === "comm_msg") {
      // An Output widget says which request it captures by its msg_id state, and says
      // it before the kernel sends that request's output: IOPub keeps the order.
      const state = c.data?.state;
      if (state && typeof state === "object" && "msg_id" in state) {
        if (state.msg_id) this.captures.set(c.comm_id, String(state.msg_id));
        else this.captures.delete(c.comm_id);
      }
    } else if (type === "comm_close") {
      this.captures.delete(c.comm_id);
    }
    // A frame gets every comm message, the status and replies of what its widgets
    // sent (throttling counts on them), and the output an Output widget captures.
    const parent = msg.parent_header.msg_id ?? "";
    const wanted =
      COMM_TYPES.has(type) ||
      (parent && fromWidget(parent) && !OUTPUT_TYPES.has(type)) ||
      (parent && OUTPUT_TYPES.has(type) && this.captured(parent));
    if (!wanted) return;
    for (const frame of this.frames) {
      if (COMM_TYPES.has(type) || frame.owns(parent)) frame.post(msg);
    }
  }
}
