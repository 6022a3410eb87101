/**
 * The runtime of a cell's output frame: a sandboxed iframe without allow-same-origin,
 * so what runs here has an opaque origin and no way into the host page. The page
 * sends render operations by postMessage; this side answers only with its height.
 */
import type { Op } from "./outputs";
import { ansiToHtml, render } from "./render";
import { FRAME_CSS } from "./style";
import type { Bridge, BridgeManager, WireMessage } from "./widgets";

interface Typesetters {
  mathjax?: string;
  katex?: { js: string; css?: string };
}

declare global {
  interface Window {
    MathJax?: { typesetPromise?: (els: Element[]) => Promise<void> };
    katex?: { render: (tex: string, el: Element, opts: Record<string, unknown>) => void };
  }
}

const style = document.createElement("style");
style.textContent = FRAME_CSS;
document.head.append(style);
const root = document.createElement("div");
root.className = "outputs";
document.body.append(root);

let typesetters: Typesetters = {};
let widgetFiles: { js: string; css?: string } | undefined;
let loading: Promise<void> | undefined;

function loadScript(src: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = src;
    script.onload = () => resolve();
    script.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.append(script);
  });
}

/** Load the page's own typesetter into this frame the first time LaTeX shows up. */
function typesetter(): Promise<void> {
  if (!loading) {
    if (typesetters.mathjax) {
      loading = loadScript(typesetters.mathjax);
    } else if (typesetters.katex) {
      const { js, css } = typesetters.katex;
      if (css) {
        const link = document.createElement("link");
        link.rel = "stylesheet";
        link.href = css;
        document.head.append(link);
      }
      loading = loadScript(js);
    } else {
      loading = Promise.resolve();
    }
  }
  return loading;
}

async function typeset(el: HTMLElement): Promise<void> {
  await typesetter().catch(() => undefined);
  const tex = el.querySelector(".tex");
  if (!tex) return;
  if (window.MathJax?.typesetPromise) {
    await window.MathJax.typesetPromise([tex]).catch(() => undefined);
  } else if (window.katex) {
    const source = (tex.textContent ?? "").trim().replace(/^\$\$?|\$\$?$/g, "");
    try {
      window.katex.render(source, tex, { displayMode: true, throwOnError: false });
    } catch {
      // the source stays shown as text
    }
  }
}

function fill(el: HTMLElement, html: string): void {
  // A contextual fragment runs the scripts of kernel HTML (innerHTML would not):
  // what a plotting library's output needs, and harmless in this frame.
  el.replaceChildren(document.createRange().createContextualFragment(html));
}

// -- widgets: the manager loads on the first widget; until then the page's comm
// traffic is kept, then replayed to it after it has caught up with the kernel.
let manager: Promise<BridgeManager> | undefined;
let live: BridgeManager | undefined; // the manager, as soon as it exists
// Comm traffic comes from the session's start; it is kept until a widget is shown
// (and the manager loads), at most EARLY_MAX messages: past that, the manager's
// catching up with the kernel's widget states stands in for what was dropped.
let early: WireMessage[] | undefined = [];
const EARLY_MAX = 10_000;
let nextRequest = 0;
const requests = new Map<number, (content: Record<string, any>) => void>();

const bridge: Bridge = {
  send(msgType, content, metadata = {}, buffers = []) {
    const msgId = `w-${crypto.randomUUID()}`;
    const msg = { header: { msg_id: msgId, msg_type: msgType }, parent_header: {}, metadata, content, buffers };
    parent.postMessage({ cellgate: "comm", msg }, "*", buffers);
    return msgId;
  },
  request(msgType, content) {
    const id = nextRequest++;
    parent.postMessage({ cellgate: "request", id, msg_type: msgType, content }, "*");
    return new Promise((resolve) => requests.set(id, resolve));
  },
};

function widgetManager(): Promise<BridgeManager> {
  if (!manager) {
    if (!widgetFiles) return Promise.reject(new Error("no widget support was given to this frame"));
    const { js, css } = widgetFiles;
    if (css) {
      const link = document.createElement("link");
      link.rel = "stylesheet";
      link.href = css;
      document.head.append(link);
    }
    manager = loadScript(js).then(async () => {
      const m = window.cellgateWidgets!.start(bridge);
      live = m;
      const waiting = early ?? [];
      early = undefined;
      for (const msg of waiting) m.handle(msg);
      await m.settled();
      await m.catchUp(); // the states of widgets made before this frame listened
      return m;
    });
  }
  return manager;
}

async function mountWidget(el: HTMLElement, modelId: string): Promise<void> {
  try {
    const m = await widgetManager();
    const fallback = [...el.childNodes];
    const box = document.createElement("div");
    el.replaceChildren(box); // a widget attaches only to an element in the document
    if (!(await m.show(modelId, box))) el.replaceChildren(...fallback);
  } catch (err) {
    console.warn("cellgate: widget not shown", err);
  }
}

function onKernelMessage(msg: WireMessage): void {
  if (live) {
    live.handle(msg);
  } else if (early) {
    early.push(msg);
    if (early.length > EARLY_MAX) early.shift();
  }
}

declare global {
  interface Window {
    cellgateWidgets?: { start(bridge: Bridge): BridgeManager };
  }
}

function build(output: Parameters<typeof render>[0]): HTMLElement {
  const rendered = render(output);
  const el = document.createElement("div");
  el.className = `output ${rendered.kind}`;
  fill(el, rendered.html);
  if (rendered.latex) void typeset(el);
  if (rendered.widget) void mountWidget(el, rendered.widget);
  return el;
}

function apply(op: Op): void {
  if (op.op === "clear") {
    root.replaceChildren();
  } else if (op.op === "add") {
    root.append(build(op.output));
  } else if (op.op === "set") {
    const old = root.children[op.index];
    if (old) old.replaceWith(build(op.output));
  } else if (op.op === "text") {
    const pre = root.children[op.index]?.querySelector("pre");
    pre?.insertAdjacentHTML("beforeend", ansiToHtml(op.text));
  }
}

// The outputs' own height: the document's would never drop below the frame's current
// height, so a frame could grow but never shrink when output is cleared.
let lastHeight = -1;
function reportHeight(): void {
  const height = Math.ceil(root.offsetTop + root.offsetHeight);
  if (height !== lastHeight) {
    lastHeight = height;
    parent.postMessage({ cellgate: "height", height }, "*");
  }
}

window.addEventListener("message", (event) => {
  if (event.source !== parent) return; // only the page that made this frame gives orders
  const data = event.data;
  if (data?.cellgate === "init") {
    typesetters = data.typesetters ?? {};
    widgetFiles = data.widgets;
  } else if (data?.cellgate === "reply" && requests.has(data.id)) {
    requests.get(data.id)!(data.content ?? {});
    requests.delete(data.id);
  } else if (data?.cellgate === "ops" && Array.isArray(data.ops)) {
    for (const op of data.ops) {
      if (op.op === "kernel") onKernelMessage(op.msg);
      else apply(op);
    }
  }
});
new ResizeObserver(reportHeight).observe(root); // whatever changed it: ops, a widget, typesetting
parent.postMessage({ cellgate: "ready" }, "*");
