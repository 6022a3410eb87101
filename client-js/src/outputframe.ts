/** The host page's side of a cell's sandboxed output frame. */
import type { Op } from "./outputs";
import { COMM_TYPES } from "./widgetbridge";

/**
 * allow-scripts: kernel HTML may carry the scripts of plotting libraries.
 * allow-popups(-to-escape-sandbox): links in output open in a new, ordinary tab.
 * Never allow-same-origin: with it, the frame's scripts could reach the page.
 */
export const SANDBOX = "allow-scripts allow-popups allow-popups-to-escape-sandbox";
const MAX_HEIGHT = 4000; // past it the frame scrolls, so output cannot push the page away
const FLUSH_MS = 16;

export interface Typesetters {
  mathjax?: string;
  katex?: { js: string; css?: string };
}

/** What the frame asks of the page for widgets; the page decides what reaches the kernel. */
export interface FrameRequests {
  comm(msg: { header: { msg_id: string; msg_type: string }; content: Record<string, unknown>; metadata: Record<string, unknown>; buffers: ArrayBuffer[] }): void;
  request(msgType: string, content: Record<string, unknown>): Promise<Record<string, unknown>>;
}

export interface FrameFiles {
  frame: string;
  widgets?: { js: string; css?: string };
}

/** The page's MathJax or KaTeX, if it has one, for the frame to load in its turn. */
export function findTypesetters(): Typesetters {
  const src = (pattern: RegExp): string | undefined =>
    [...document.querySelectorAll<HTMLScriptElement>("script[src]")].map((s) => s.src).find((s) => pattern.test(s));
  const w = window as unknown as Record<string, unknown>;
  const found: Typesetters = {};
  const mathjax = w.MathJax ? src(/mathjax/i) : undefined;
  if (mathjax) found.mathjax = mathjax;
  const katex = w.katex ? src(/katex/i) : undefined;
  if (katex) {
    const css = [...document.querySelectorAll<HTMLLinkElement>("link[rel=stylesheet]")]
      .map((l) => l.href)
      .find((h) => /katex/i.test(h));
    found.katex = { js: katex, css };
  }
  return found;
}

export class OutputFrame {
  readonly iframe: HTMLIFrameElement;
  private ready = false;
  private queue: (Op | { op: "kernel"; msg: unknown })[] = [];
  private timer: ReturnType<typeof setTimeout> | undefined;
  private count = 0;

  constructor(
    container: HTMLElement,
    private files: FrameFiles,
    private typesetters: Typesetters,
    private requests?: FrameRequests,
  ) {
    const frameScript = files.frame;
    const iframe = document.createElement("iframe");
    iframe.className = "cg-output";
    iframe.setAttribute("sandbox", SANDBOX);
    iframe.title = "Output";
    iframe.hidden = true;
    const src = frameScript.replace(/"/g, "&quot;");
    iframe.srcdoc =
      `<!doctype html><html><head><meta charset="utf-8">` +
      `<meta name="viewport" content="width=device-width, initial-scale=1"><base target="_blank">` +
      `</head><body><script src="${src}"></script></body></html>`;
    this.iframe = iframe;
    window.addEventListener("message", this.onMessage);
    container.append(iframe);
  }

  push(ops: Op[]): void {
    if (!ops.length) return;
    for (const op of ops) {
      if (op.op === "clear") this.count = 0;
      else if (op.op === "add") this.count++;
    }
    this.iframe.hidden = this.count === 0;
    this.queue.push(...ops);
    this.timer ??= setTimeout(() => this.flush(), FLUSH_MS);
  }

  private flush(): void {
    this.timer = undefined;
    if (!this.ready || !this.queue.length) return;
    const ops = this.queue;
    this.queue = [];
    this.iframe.contentWindow?.postMessage({ cellgate: "ops", ops }, "*");
  }

  private onMessage = (event: MessageEvent): void => {
    // Only this frame's messages, and only a number is believed from them.
    if (event.source !== this.iframe.contentWindow || typeof event.data !== "object" || !event.data) return;
    if (event.data.cellgate === "ready" && !this.ready) {
      this.ready = true;
      const init = { cellgate: "init", typesetters: this.typesetters, widgets: this.files.widgets };
      this.iframe.contentWindow?.postMessage(init, "*");
      this.flush();
    } else if (event.data.cellgate === "height" && Number.isFinite(event.data.height)) {
      this.iframe.style.height = `${Math.min(Math.max(0, event.data.height), MAX_HEIGHT)}px`;
    } else if (this.requests) {
      this.fromWidgets(event.data, this.requests);
    }
  };

  /** Widget traffic from the frame: checked here, since the frame runs kernel code. */
  private fromWidgets(data: Record<string, any>, requests: FrameRequests): void {
    if (data.cellgate === "comm") {
      const msg = data.msg;
      const id = msg?.header?.msg_id;
      const type = msg?.header?.msg_type;
      const buffers = Array.isArray(msg?.buffers) ? msg.buffers : [];
      if (
        typeof id === "string" && /^w-[\w-]{1,64}$/.test(id) && typeof type === "string" &&
        COMM_TYPES.has(type) &&
        typeof msg.content === "object" && msg.content !== null &&
        buffers.every((b: unknown) => b instanceof ArrayBuffer)
      ) {
        requests.comm({ header: { msg_id: id, msg_type: type }, content: msg.content, metadata: msg.metadata ?? {}, buffers });
      }
    } else if (data.cellgate === "request" && Number.isInteger(data.id) && data.msg_type === "comm_info_request") {
      const target = typeof data.content?.target_name === "string" ? data.content.target_name : undefined;
      requests
        .request("comm_info_request", target ? { target_name: target } : {})
        .catch(() => ({ comms: {} }))
        .then((content) => this.iframe.contentWindow?.postMessage({ cellgate: "reply", id: data.id, content }, "*"));
    }
  }

  /** A kernel message for the frame's widgets, in order with the render operations. */
  postKernel(msg: unknown): void {
    this.queue.push({ op: "kernel", msg });
    this.timer ??= setTimeout(() => this.flush(), FLUSH_MS);
  }

  destroy(): void {
    window.removeEventListener("message", this.onMessage);
    this.iframe.remove();
  }
}
