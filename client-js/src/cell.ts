/** A live cell on the host page: editor, Run, status, stdin, files, and an output frame. */
import type { EditorView } from "@codemirror/view";
import stripAnsi from "strip-ansi";
import { createEditor } from "./editor";
import { type FrameFiles, OutputFrame, type Typesetters, findTypesetters } from "./outputframe";
import { OutputModel } from "./outputs";
import { CellgateError, type FileEntry, type KernelState } from "./protocol";
import type { ConnectOptions, Execution, Session, Transport } from "./session";
import { OUTPUT_TYPES, WidgetBridge, fromWidget } from "./widgetbridge";

export type Part = "editor" | "run" | "permalink" | "files" | "status";

export interface CellOptions {
  /** The Cellgate server (default: where cellgate.js was loaded from). */
  server?: string;
  /** The code (default: the element's text, or a `<script type="text/x-python">` in it). */
  code?: string;
  /** Run as soon as the cell is made. */
  autorun?: boolean;
  /** Cells with the same key share one session, and so one kernel. */
  link?: string;
  kernel?: string;
  transports?: Transport[];
  /** Where the output goes (an element or a selector; default: under the editor). */
  output?: HTMLElement | string;
  hide?: Part[];
  /** The typesetter the output frame loads for LaTeX (default: the page's MathJax or KaTeX). */
  typesetters?: Typesetters;
}

/** Gives a cell its session; cells with the same link share one. */
export type SessionSource = (options: ConnectOptions & { server: string; link?: string }) => Promise<Session>;

type Look = "idle" | "busy" | "error" | "off";

function el<K extends keyof HTMLElementTagNameMap>(tag: K, cls?: string, text?: string): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A server URL (relative to the server) made absolute; anything but http(s) is refused. */
export function absolute(url: string, server: string): string | null {
  try {
    const full = new URL(url, server.replace(/\/?$/, "/"));
    return full.protocol === "http:" || full.protocol === "https:" ? full.href : null;
  } catch {
    return null;
  }
}

export function dedent(text: string): string {
  const lines = text.replace(/\t/g, "    ").split("\n");
  while (lines.length && !lines[0].trim()) lines.shift();
  while (lines.length && !lines[lines.length - 1].trim()) lines.pop();
  const indent = Math.min(...lines.filter((l) => l.trim()).map((l) => l.match(/^ */)![0].length));
  return lines.map((l) => l.slice(Number.isFinite(indent) ? indent : 0)).join("\n");
}

function sizeText(n: number): string {
  return n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
}

export class Cell {
  readonly root: HTMLElement;
  readonly editor: EditorView;
  private session: Session | undefined;
  private current: Execution | undefined;
  private model = new OutputModel();
  private frame: OutputFrame;
  private runButton = el("button", "cg-run", "Run");
  private stopButton = el("button", "cg-interrupt", "Interrupt");
  private status = el("span", "cg-status", "Ready");
  private permalink = el("a", "cg-permalink", "Share link");
  private notice = el("p", "cg-notice");
  private tip = el("pre", "cg-tip");
  private stdin = el("form", "cg-stdin");
  private files = el("ul", "cg-files");
  private unsubscribe: (() => void)[] = [];
  /** Requests this cell's frame sent (widget comms) and this cell ran: their messages are its own. */
  private mine = new Set<string>();

  constructor(
    host: HTMLElement,
    private options: CellOptions & { server: string },
    private sessions: SessionSource,
    files: FrameFiles,
  ) {
    const code = options.code ?? codeOf(host);
    host.replaceChildren();
    host.classList.add("cellgate");
    this.root = host;
    const editorBox = el("div", "cg-editor");
    this.editor = createEditor(
      editorBox,
      code,
      {
        run: () => void this.run(),
        complete: (c, p) => this.complete(c, p),
        inspect: (c, p) => void this.inspect(c, p),
        closeTip: () => (this.tip.hidden = true),
      },
      "Code (Shift+Enter runs, Tab completes, Shift+Tab shows help, Escape then Tab leaves)",
    );
    const bar = el("div", "cg-bar");
    this.runButton.type = this.stopButton.type = "button";
    this.runButton.title = "Run (Shift+Enter)";
    this.runButton.onclick = () => void this.run();
    this.stopButton.onclick = () => void this.session?.interrupt().catch((e) => this.tell(e.message, true));
    this.stopButton.hidden = true;
    this.status.setAttribute("role", "status");
    this.status.setAttribute("aria-live", "polite");
    this.permalink.hidden = true;
    this.permalink.target = "_blank";
    this.permalink.rel = "noopener";
    bar.append(this.runButton, this.stopButton, this.status, this.permalink);
    this.notice.hidden = this.tip.hidden = this.stdin.hidden = this.files.hidden = true;
    this.notice.setAttribute("role", "alert");
    const out = typeof options.output === "string" ? document.querySelector<HTMLElement>(options.output) : options.output;
    const outputBox = out ?? host;
    host.append(editorBox, this.tip, bar);
    outputBox.append(this.notice, this.stdin);
    this.frame = new OutputFrame(outputBox, files, options.typesetters ?? findTypesetters(), {
      comm: (msg) => {
        this.remember(msg.header.msg_id);
        this.session?.sendMessage("shell", { ...msg, parent_header: {} }).catch((e) => this.tell(describe(e), true));
      },
      request: async (type, content) => (this.session ? this.session.request(type, content) : { comms: {} }),
    });
    outputBox.append(this.files);
    const hide = new Set(options.hide ?? []);
    editorBox.hidden = hide.has("editor");
    this.runButton.hidden = hide.has("run");
    this.status.hidden = hide.has("status");
    if (hide.has("permalink")) this.permalink.remove();
    if (hide.has("files")) this.files.remove();
    this.look("off", "Ready");
    this.acceptDrops();
    if (options.autorun) void this.run();
  }

  get code(): string {
    return this.editor.state.doc.toString();
  }

  /** Replace the editor's code. */
  setCode(code: string): void {
    this.editor.dispatch({ changes: { from: 0, to: this.editor.state.doc.length, insert: code } });
  }

  private look(state: Look, text: string): void {
    this.root.dataset.state = state;
    this.status.textContent = text;
  }

  private tell(text: string, bad = false): void {
    this.notice.textContent = text;
    this.notice.classList.toggle("cg-bad", bad);
    this.notice.hidden = !text;
  }

  /** The cell's session, opened on first use: a page of cells opens nothing until one runs. */
  private async connect(): Promise<Session> {
    if (this.session && this.session.state !== "closed") return this.session;
    this.look("busy", "Connecting…");
    const { server, link, kernel, transports } = this.options;
    const session = await this.sessions({ server, link, kernel, transports });
    if (session !== this.session) {
      this.unsubscribe.forEach((off) => off());
      this.session = session;
      this.unsubscribe = [
        session.on("kernel", (k) => this.onKernel(k)),
        session.on("connection", ({ state, error }) => {
          if (state === "reconnecting") this.tell("The connection dropped; reconnecting…");
          else if (state === "connected" && /reconnecting/.test(this.notice.textContent ?? "")) this.tell("");
          else if (state === "closed" && error && error.code !== "closed") this.tell(describe(error), true);
        }),
        session.on("gap", () => this.tell("Some output could not be recovered after the reconnection.", true)),
        this.joinWidgets(session),
        session.on("iopub", (msg) => {
          const parent = msg.parent_header.msg_id ?? "";
          const type = msg.header.msg_type;
          if (type === "update_display_data" && parent !== this.current?.msgId) {
            // A display another cell's code updates (update_display_data by display_id).
            this.frame.push(this.model.update(msg.content.transient?.display_id, msg.content.data, msg.content.metadata));
          } else if (OUTPUT_TYPES.has(type) && fromWidget(parent) && this.mine.has(parent)) {
            // What a widget callback printed (a button's on_click), unless an Output widget took it.
            if (!WidgetBridge.of(session).captured(parent)) this.frame.push(this.model.apply(msg));
          }
        }),
      ];
    }
    return session;
  }

  /** Give this cell's frame the session's widget traffic. */
  private joinWidgets(session: Session): () => void {
    return WidgetBridge.of(session).add({
      post: (msg) => this.frame.postKernel(msg),
      owns: (parent) => this.mine.has(parent),
    });
  }

  private remember(msgId: string): void {
    this.mine.add(msgId);
    if (this.mine.size > 256) this.mine.delete(this.mine.values().next().value!);
  }

  private onKernel(k: KernelState): void {
    if (k.state === "starting") this.look("busy", "Starting a kernel…");
    else if (k.state === "dead") this.tell(`The kernel died: ${k.reason ?? "no reason given"}. Run again for a new one.`, true);
    else if (k.state === "timed_out") this.tell(`The session ended (${k.reason ?? "timed out"}). Run again for a new one.`, true);
    else if (k.state === "restarting") this.tell("The kernel is restarting.");
    else if (k.state === "ready" && k.reason === "restarted") this.tell("The kernel restarted: its variables are gone.");
  }

  /** Run the editor's code; resolves when it has finished (or failed). */
  async run(): Promise<void> {
    if (this.current && !this.current.done) return;
    this.frame.push(this.model.reset());
    this.files.replaceChildren();
    this.files.hidden = true;
    this.tell("");
    this.tip.hidden = true;
    let session: Session;
    try {
      session = await this.connect();
    } catch (err) {
      this.look("error", "Not connected");
      this.tell(describe(err), true);
      return;
    }
    const run = session.execute(this.code);
    this.current = run;
    this.remember(run.msgId);
    const widgets = WidgetBridge.of(session);
    this.look("busy", "Running…");
    this.stopButton.hidden = false;
    run.on("output", (msg) => {
      if (!widgets.captured(run.msgId)) this.frame.push(this.model.apply(msg)); // else an Output widget shows it
    });
    run.on("input", ({ prompt, password }) => this.ask(session, prompt, password));
    run.on("permalink", ({ url }) => {
      const href = absolute(url, this.options.server);
      if (href) {
        this.permalink.href = href;
        this.permalink.hidden = false;
      }
    });
    run.on("files", (entries) => this.showFiles(entries));
    run.on("error", (e) => this.tell(e.code === "output_capped" ? `Output was capped: ${e.message}` : e.message, true));
    try {
      const result = await run;
      this.look(result.status === "ok" ? "idle" : "error", result.status === "ok" ? "Done" : `Failed: ${result.error?.ename ?? result.status}`);
    } catch (err) {
      this.look("error", "Stopped");
      if (!(err instanceof CellgateError && err.code === "kernel_dead" && !this.notice.hidden)) this.tell(describe(err), true);
    } finally {
      this.stopButton.hidden = true;
      this.stdin.hidden = true;
    }
  }

  private ask(session: Session, prompt: string, password: boolean): void {
    const label = el("label", undefined, prompt);
    const input = el("input");
    input.type = password ? "password" : "text";
    input.autocomplete = "off";
    input.id = `cg-in-${Math.random().toString(36).slice(2)}`;
    label.htmlFor = input.id;
    const send = el("button", undefined, "Send");
    send.type = "submit";
    this.stdin.replaceChildren(label, input, send);
    this.stdin.hidden = false;
    this.stdin.onsubmit = (event) => {
      event.preventDefault();
      this.stdin.hidden = true;
      session.inputReply(input.value).catch((e) => this.tell(describe(e), true));
    };
    input.focus();
  }

  private showFiles(entries: FileEntry[]): void {
    for (const file of entries) {
      const item = el("li");
      item.dataset.name = file.name;
      const href = file.url ? absolute(file.url, this.options.server) : null;
      if (href) {
        const a = el("a", undefined, file.name);
        a.href = href;
        a.download = file.name;
        item.append(a, ` (${sizeText(file.size)})`);
        if (/^image\/(png|jpeg|gif|webp|svg\+xml)$/.test(file.mime)) {
          const img = el("img");
          img.src = href; // an <img> never runs what an image file holds
          img.alt = file.name;
          item.append(img);
        }
      } else {
        item.append(`${file.name}: ${file.error?.message ?? "not stored yet"}`);
      }
      this.files.querySelector(`li[data-name="${CSS.escape(file.name)}"]`)?.remove();
      this.files.append(item);
    }
    this.files.hidden = !this.files.children.length;
  }

  private async complete(code: string, pos: number): Promise<{ matches: string[]; start: number; end: number } | null> {
    try {
      const reply = await (await this.connect()).complete(code, pos);
      this.look("idle", "Ready");
      if (reply.status !== "ok") return null;
      return { matches: reply.matches ?? [], start: reply.cursor_start ?? pos, end: reply.cursor_end ?? pos };
    } catch (err) {
      this.tell(describe(err), true);
      return null;
    }
  }

  private async inspect(code: string, pos: number): Promise<void> {
    try {
      const reply = await (await this.connect()).inspect(code, pos);
      this.look("idle", "Ready");
      const text = reply.found ? stripAnsi(String(reply.data?.["text/plain"] ?? "")) : "Nothing found here.";
      this.tip.textContent = text;
      this.tip.hidden = false;
    } catch (err) {
      this.tell(describe(err), true);
    }
  }

  private acceptDrops(): void {
    const root = this.root;
    root.addEventListener("dragover", (event) => {
      if (!event.dataTransfer?.types.includes("Files")) return;
      event.preventDefault();
      root.classList.add("cg-drop");
    });
    root.addEventListener("dragleave", () => root.classList.remove("cg-drop"));
    root.addEventListener("drop", (event) => {
      const files = [...(event.dataTransfer?.files ?? [])];
      if (!files.length) return;
      event.preventDefault();
      root.classList.remove("cg-drop");
      void this.upload(files);
    });
  }

  /** Put files in the kernel's working directory (what a drop does). */
  async upload(files: File[]): Promise<void> {
    try {
      const session = await this.connect();
      const done: string[] = [];
      for (const file of files) {
        const stored = await session.upload(file);
        done.push(`${stored.name} (${sizeText(stored.size)})`);
      }
      this.look("idle", "Ready");
      this.tell(`Uploaded ${done.join(", ")}.`);
    } catch (err) {
      this.look("error", "Upload failed");
      this.tell(describe(err), true);
    }
  }
}

function codeOf(host: HTMLElement): string {
  const script = host.querySelector('script[type="text/x-python"], script[type="text/x-sage"], script[type="text/plain"]');
  return dedent((script ?? host).textContent ?? "");
}

/** Words for a user, by the contract's error codes. */
export function describe(err: unknown): string {
  if (!(err instanceof CellgateError)) return `Something went wrong: ${String((err as Error)?.message ?? err)}`;
  switch (err.code) {
    case "unreachable":
      return `${err.message}. Check your connection and try again.`;
    case "capacity_node":
      return "The server is busy: no kernel is free right now. Try again in a moment.";
    case "capacity_client":
      return "Too many sessions are open from your address. Close another page and try again.";
    case "rate_limited":
      return "Too many messages at once: slow down and try again.";
    case "too_large":
      return `Too large: ${err.message}`;
    case "token_invalid":
    case "timed_out":
    case "shutdown":
    case "closed":
      return `The session ended (${err.message}). Run again for a new one.`;
    default:
      return err.message;
  }
}
