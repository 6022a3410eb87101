/** The parts of the Cellgate wire contract (`cellgate/1`) that need no browser. */

export interface Header {
  msg_id: string;
  msg_type: string;
  [key: string]: unknown;
}

export interface KernelMessage {
  header: Header;
  parent_header: Partial<Header>;
  metadata: Record<string, unknown>;
  content: Record<string, any>;
  buffers?: ArrayBuffer[];
  seq?: number;
}

export interface FileEntry {
  name: string;
  url: string | null;
  size: number;
  mime: string;
  error?: { code: string; message: string };
}

export interface KernelState {
  state: "starting" | "ready" | "restarting" | "dead" | "timed_out" | "shutdown";
  id?: string;
  name?: string;
  reason?: string;
}

export interface ServerError {
  code: string;
  message: string;
  msg_id?: string;
  [key: string]: unknown;
}

/** An error with one of the contract's codes (plus `unreachable` and `closed`, the client's own). */
export class CellgateError extends Error {
  constructor(
    readonly code: string,
    message: string,
    readonly details: Record<string, unknown> = {},
  ) {
    super(message);
    this.name = "CellgateError";
  }
}

let counter = 0;

/** A msg_id unique on this page: random, so that two tabs never collide. */
export function newMsgId(): string {
  const random = Math.random().toString(36).slice(2, 10);
  return `cg-${Date.now().toString(36)}-${(counter++).toString(36)}-${random}`;
}

export function makeMessage(msgType: string, content: Record<string, unknown>): KernelMessage {
  return {
    header: { msg_id: newMsgId(), msg_type: msgType },
    parent_header: {},
    metadata: {},
    content,
  };
}

/**
 * Where the client is in the session's event log. Events carry a seq per session,
 * named by an epoch; a resume asks for everything after `last`, and anything at or
 * below it (a replay racing live delivery) is dropped, so each event is seen once.
 */
export class SeqTracker {
  epoch: string | undefined;
  last = 0;

  /** The `session` event: a new epoch means a new log, counted from zero. */
  session(epoch: string): void {
    if (epoch !== this.epoch) {
      this.epoch = epoch;
      this.last = 0;
    }
  }

  /** A `replay_gap` notice: the server's log starts over or has lost events. */
  gap(epoch: string): void {
    this.session(epoch);
  }

  /** True if the event is new and should be handled. */
  accept(seq: number | undefined): boolean {
    if (typeof seq !== "number") return true; // a notice to this connection, not logged
    if (seq <= this.last) return false;
    this.last = seq;
    return true;
  }
}

/** The msg_id an event belongs to: its parent's for a kernel message, else its own field. */
export function parentOf(event: string, data: Record<string, any>): string | undefined {
  if (event === "iopub" || event === "shell" || event === "stdin" || event === "control") {
    return data.parent_header?.msg_id;
  }
  return data.msg_id;
}
