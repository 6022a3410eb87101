/** A connection to a Cellgate server: one session, one kernel, resumed across drops. */
import { io, type Socket } from "socket.io-client";
import { Emitter } from "./emitter";
import {
  CellgateError,
  type FileEntry,
  type KernelMessage,
  type KernelState,
  type ServerError,
  SeqTracker,
  makeMessage,
  parentOf,
} from "./protocol";

export type Transport = "websocket" | "polling";

export interface ConnectOptions {
  /** Kernel name the server offers (default: the server's first, `python3`). */
  kernel?: string;
  /** Transports in the order tried (default: WebSocket, falling back to polling). */
  transports?: Transport[];
  /** Give up the first connection after this many milliseconds (default 20 000). */
  timeout?: number;
}

export type ConnectionState = "connecting" | "connected" | "reconnecting" | "closed";

export interface SessionEvents {
  /** The connection's state; `closed` carries why, when it was not asked for. */
  connection: { state: ConnectionState; error?: CellgateError };
  /** The kernel's lifecycle: starting, ready, restarting, dead, timed_out, shutdown. */
  kernel: KernelState;
  /** Every IOPub message of the kernel (display updates and comms go to whoever needs them). */
  iopub: KernelMessage;
  /** An `error` the server sent that belongs to no execution of this client. */
  error: ServerError;
  /** The server could not replay everything missed while away (`replay_gap`). */
  gap: ServerError;
}

export interface ExecuteResult {
  status: "ok" | "error" | "aborted";
  executionCount: number | null;
  /** For status `error`: the exception the code raised. */
  error?: { ename: string; evalue: string; traceback: string[] };
  /** Files reported so far (more may follow as `files` events). */
  files: FileEntry[];
  permalink?: { id: string; url: string };
}

export interface ExecutionEvents {
  /** An output message: stream, display_data, execute_result, error, clear_output, update_display_data. */
  output: KernelMessage;
  status: "busy" | "idle";
  /** The kernel asks for input (`input()`); answer with `session.inputReply`. */
  input: { prompt: string; password: boolean };
  permalink: { id: string; url: string };
  files: FileEntry[];
  /** A server error for this execution: output_capped, timeout, too_large, store_failed … */
  error: ServerError;
  reply: Record<string, any>;
}

const OUTPUT_TYPES = new Set([
  "stream",
  "display_data",
  "execute_result",
  "error",
  "clear_output",
  "update_display_data",
]);

/** One `execute_request`: await it for the result, or subscribe to what it sends. */
export class Execution extends Emitter<ExecutionEvents> implements PromiseLike<ExecuteResult> {
  readonly result: Promise<ExecuteResult>;
  private resolve!: (r: ExecuteResult) => void;
  private reject!: (e: CellgateError) => void;
  private reply: Record<string, any> | undefined;
  private idle = false;
  private settled = false;
  private files: FileEntry[] = [];
  private permalink: { id: string; url: string } | undefined;

  constructor(readonly msgId: string) {
    super();
    this.result = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.result.catch(() => undefined); // awaited or not, a failure is not an unhandled rejection
  }

  then<A = ExecuteResult, B = never>(
    onfulfilled?: ((value: ExecuteResult) => A | PromiseLike<A>) | null,
    onrejected?: ((reason: any) => B | PromiseLike<B>) | null,
  ): Promise<A | B> {
    return this.result.then(onfulfilled, onrejected);
  }

  get done(): boolean {
    return this.settled;
  }

  /** @internal Route one event of this execution. */
  handle(event: string, data: any): void {
    if (event === "iopub") {
      const type = data.header.msg_type;
      if (type === "status") {
        const state = data.content.execution_state;
        if (state === "busy" || state === "idle") this.emit("status", state);
        if (state === "idle") {
          this.idle = true;
          this.finish();
        }
      } else if (OUTPUT_TYPES.has(type)) {
        this.emit("output", data);
      }
    } else if (event === "shell" && data.header.msg_type === "execute_reply") {
      this.reply = data.content;
      this.emit("reply", data.content);
      this.finish();
    } else if (event === "stdin" && data.header.msg_type === "input_request") {
      this.emit("input", { prompt: String(data.content.prompt ?? ""), password: !!data.content.password });
    } else if (event === "permalink") {
      this.permalink = { id: data.id, url: data.url };
      this.emit("permalink", this.permalink);
    } else if (event === "files") {
      const entries: FileEntry[] = data.files ?? [];
      this.files = [...this.files.filter((f) => !entries.some((e) => e.name === f.name)), ...entries];
      this.emit("files", entries);
    } else if (event === "error") {
      this.emit("error", data);
    }
  }

  /** @internal The execution cannot finish: its kernel or session is gone. */
  fail(error: CellgateError): void {
    if (this.settled) return;
    this.settled = true;
    this.reject(error);
  }

  private finish(): void {
    if (this.settled || !this.idle || !this.reply) return;
    this.settled = true;
    const reply = this.reply;
    const result: ExecuteResult = {
      status: reply.status ?? "error",
      executionCount: reply.execution_count ?? null,
      files: this.files,
      permalink: this.permalink,
    };
    if (reply.status === "error") {
      result.error = { ename: reply.ename, evalue: reply.evalue, traceback: reply.traceback ?? [] };
    }
    this.resolve(result);
  }
}

interface Pending {
  handle(event: string, data: any): void;
  fail(error: CellgateError): void;
  readonly done: boolean;
}

/** A request whose answer is its shell reply (complete, inspect, kernel_info …). */
class Request implements Pending {
  done = false;
  constructor(
    private resolve: (content: Record<string, any>) => void,
    private reject: (e: CellgateError) => void,
  ) {}
  handle(event: string, data: any): void {
    if (event === "shell" && data.header.msg_type.endsWith("_reply")) {
      this.done = true;
      this.resolve(data.content);
    } else if (event === "error") {
      this.fail(new CellgateError(data.code, data.message, data));
    }
  }
  fail(error: CellgateError): void {
    if (this.done) return;
    this.done = true;
    this.reject(error);
  }
}

/** Inline uploads go over the socket; larger ones over HTTP, which has no message limit. */
const INLINE_UPLOAD = 512 * 1024;
/** Finished executions that still route late `files` events to their subscribers. */
const KEEP_FINISHED = 32;

export class Session extends Emitter<SessionEvents> {
  /** The session's id, and the kernel's latest state. */
  id: string | undefined;
  kernel: KernelState | null = null;
  state: ConnectionState = "connecting";
  private token: string | undefined;
  private seq = new SeqTracker();
  private pending = new Map<string, Pending>();
  private socket: Socket;

  private constructor(
    readonly url: string,
    private options: ConnectOptions,
  ) {
    super();
    const server = new URL(url);
    this.socket = io(server.origin, {
      path: server.pathname.replace(/\/?$/, "/") + "socket.io/",
      transports: options.transports ?? ["websocket", "polling"],
      tryAllTransports: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 5000,
      auth: (cb) => cb(this.auth()),
    });
  }

  /** Open a session; rejects with a CellgateError if the server refuses or cannot be reached. */
  static connect(url: string, options: ConnectOptions = {}): Promise<Session> {
    const session = new Session(url, options);
    return session.opened(options.timeout ?? 20_000);
  }

  private auth(): Record<string, unknown> {
    if (this.token) return { resume: this.token, epoch: this.seq.epoch, seq: this.seq.last };
    return this.options.kernel ? { kernel: this.options.kernel } : {};
  }

  private opened(timeout: number): Promise<Session> {
    const socket = this.socket;
    return new Promise((resolve, reject) => {
      const fail = (error: CellgateError) => {
        clearTimeout(timer);
        socket.disconnect();
        this.setState("closed", error);
        reject(error);
      };
      const timer = setTimeout(
        () => fail(new CellgateError("unreachable", `no answer from the Cellgate server at ${this.url}`)),
        timeout,
      );
      socket.once("session", () => {
        clearTimeout(timer);
        resolve(this);
      });
      socket.on("connect_error", (err: Error & { data?: ServerError }) => {
        const refused = err.data?.code ? new CellgateError(err.data.code, err.data.message, err.data) : undefined;
        if (!this.token) {
          fail(refused ?? new CellgateError("unreachable", `cannot reach the Cellgate server at ${this.url}`));
        } else if (refused) {
          this.end(refused); // the session is over (token_invalid) or the node is full
        }
        // A transport failure while resuming: socket.io keeps trying.
      });
      this.listen();
    });
  }

  private listen(): void {
    const socket = this.socket;
    socket.on("session", (info: { session: string; resume: string; epoch: string; kernel: KernelState | null }) => {
      this.id = info.session;
      this.token = info.resume;
      this.seq.session(info.epoch);
      if (info.kernel) this.setKernel(info.kernel);
      this.setState("connected");
    });
    socket.on("disconnect", (reason) => {
      if (this.state === "closed") return;
      if (reason === "io server disconnect" || reason === "io client disconnect") {
        this.end(new CellgateError("closed", "the server ended the session"));
      } else {
        this.setState("reconnecting");
      }
    });
    for (const event of ["iopub", "shell", "stdin", "control", "permalink", "files", "kernel", "error"]) {
      socket.on(event, (data: any) => this.receive(event, data));
    }
  }

  private receive(event: string, data: any): void {
    if (!this.seq.accept(data?.seq)) return;
    if (event === "error" && data.seq === undefined) {
      // Notices to this connection: replay_gap, session_taken, slow_client.
      if (data.code === "replay_gap") {
        this.seq.gap(data.epoch);
        this.emit("gap", data);
      } else if (data.code === "session_taken") {
        this.end(new CellgateError(data.code, data.message, data));
      } else {
        this.emit("error", data);
      }
      return;
    }
    if (event === "kernel") {
      this.setKernel(data);
      return;
    }
    if (event === "iopub") this.emit("iopub", data);
    const parent = parentOf(event, data);
    const owner = parent ? this.pending.get(parent) : undefined;
    if (owner) {
      owner.handle(event, data);
      // A finished execution still hears of its files and permalink, which come later.
      if (owner.done && !(owner instanceof Execution)) this.pending.delete(parent!);
    } else if (event === "error") {
      this.emit("error", data);
    }
  }

  private setKernel(kernel: KernelState): void {
    this.kernel = kernel;
    this.emit("kernel", kernel);
    if (kernel.state === "dead" || kernel.state === "restarting") {
      const why = kernel.state === "dead" ? `the kernel died: ${kernel.reason ?? "unknown"}` : "the kernel restarted";
      this.failPending(new CellgateError("kernel_dead", why));
    } else if (kernel.state === "timed_out" || kernel.state === "shutdown") {
      this.end(new CellgateError(kernel.state, `the session ended (${kernel.reason ?? kernel.state})`));
    }
  }

  private setState(state: ConnectionState, error?: CellgateError): void {
    if (this.state === state) return;
    this.state = state;
    this.emit("connection", { state, error });
  }

  private end(error: CellgateError): void {
    if (this.state === "closed") return;
    this.socket.disconnect();
    this.failPending(error);
    this.setState("closed", error);
  }

  private failPending(error: CellgateError): void {
    for (const [id, p] of this.pending) {
      if (p instanceof Execution && p.done) continue; // its files and permalink may still come
      p.fail(error);
      this.pending.delete(id);
    }
  }

  /** Send a message the caller built (widget comms); resolves with the server's ack. */
  sendMessage(channel: "shell" | "stdin" | "control", msg: KernelMessage): Promise<any> {
    return this.send(channel, msg);
  }

  private async send(channel: string, msg: KernelMessage | Record<string, unknown>): Promise<any> {
    if (this.state === "closed") throw new CellgateError("closed", "the session has ended");
    const ack = await this.socket.emitWithAck(channel, msg);
    if (!ack?.ok) {
      const err = ack?.error ?? { code: "bad_message", message: "no ack" };
      throw new CellgateError(err.code, err.message, err);
    }
    return ack;
  }

  /** Run code. The Execution can be awaited (the result) and subscribed to (each output). */
  execute(code: string, options: { allowStdin?: boolean; silent?: boolean } = {}): Execution {
    const msg = makeMessage("execute_request", {
      code,
      silent: options.silent ?? false,
      store_history: true,
      user_expressions: {},
      allow_stdin: options.allowStdin ?? true,
      stop_on_error: true,
    });
    const run = new Execution(msg.header.msg_id);
    this.pending.set(run.msgId, run);
    this.forgetOld();
    this.send("shell", msg).catch((err: CellgateError) => {
      this.pending.delete(run.msgId);
      run.fail(err);
    });
    return run;
  }

  /** Keep the newest finished executions only (Maps iterate oldest first). */
  private forgetOld(): void {
    let finished = 0;
    for (const p of this.pending.values()) if (p.done) finished++;
    for (const [id, p] of this.pending) {
      if (finished <= KEEP_FINISHED) break;
      if (p.done) {
        this.pending.delete(id);
        finished--;
      }
    }
  }

  /** Send a shell request and resolve with its reply's content. */
  request(msgType: string, content: Record<string, unknown>): Promise<Record<string, any>> {
    const msg = makeMessage(msgType, content);
    return new Promise((resolve, reject) => {
      this.pending.set(msg.header.msg_id, new Request(resolve, reject));
      this.send("shell", msg).catch((err) => {
        this.pending.delete(msg.header.msg_id);
        reject(err);
      });
    });
  }

  complete(code: string, cursorPos: number): Promise<Record<string, any>> {
    return this.request("complete_request", { code, cursor_pos: cursorPos });
  }

  inspect(code: string, cursorPos: number, detailLevel = 0): Promise<Record<string, any>> {
    return this.request("inspect_request", { code, cursor_pos: cursorPos, detail_level: detailLevel });
  }

  /** Answer the kernel's pending `input()`. */
  async inputReply(value: string): Promise<void> {
    await this.send("stdin", makeMessage("input_reply", { value }));
  }

  async interrupt(): Promise<void> {
    await this.send("control", makeMessage("interrupt_request", {}));
  }

  /** Restart the kernel: its state is lost, the session goes on. Resolves once the new kernel is ready. */
  async restart(): Promise<KernelState> {
    const ready = new Promise<KernelState>((resolve) => {
      const off = this.on("kernel", (k) => {
        if (k.state === "ready" || k.state === "dead") {
          off();
          resolve(k);
        }
      });
    });
    await this.send("control", makeMessage("shutdown_request", { restart: true }));
    return ready;
  }

  /** Put a file in the kernel's working directory. */
  async upload(file: Blob & { name: string }): Promise<{ name: string; size: number }> {
    if (file.size <= INLINE_UPLOAD) {
      const ack = await this.send("upload", { name: file.name, data: await file.arrayBuffer() });
      return { name: ack.name, size: ack.size };
    }
    if (!this.token) throw new CellgateError("closed", "not connected");
    const body = new FormData();
    body.append("file", file, file.name);
    const response = await fetch(new URL("upload", this.url.replace(/\/?$/, "/")), {
      method: "POST",
      headers: { Authorization: `Bearer ${this.token}` },
      body,
    });
    const answer = await response.json();
    if (!response.ok) throw new CellgateError(answer.error.code, answer.error.message, answer.error);
    return answer.files[0];
  }

  /** End the session and its kernel. */
  async close(): Promise<void> {
    if (this.state === "closed") return;
    const ended = new Promise<void>((resolve) => {
      const off = this.on("connection", (c) => {
        if (c.state === "closed") {
          off();
          resolve();
        }
      });
    });
    try {
      await this.send("control", makeMessage("shutdown_request", { restart: false }));
      await Promise.race([ended, new Promise((r) => setTimeout(r, 5000))]);
    } finally {
      this.end(new CellgateError("closed", "closed by the client"));
    }
  }
}
