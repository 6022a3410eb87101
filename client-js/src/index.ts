/** The public API: `connect` for apps, `makeCell` and `[data-cellgate]` for pages. */
import { Cell, type CellOptions, type Part } from "./cell";
import type { FrameFiles } from "./outputframe";
import { CELL_CSS } from "./style";
import { type ConnectOptions, Session, type Transport } from "./session";

export { Cell, type CellOptions } from "./cell";
export { CellgateError, type FileEntry, type KernelMessage, type KernelState } from "./protocol";
export { type ConnectOptions, type ExecuteResult, Execution, Session } from "./session";

declare const __FRAME_FILE__: string;
declare const __WIDGETS_FILES__: { js?: string; css?: string };

/** Page-wide defaults for cells made from markup; set them before DOMContentLoaded. */
export const defaults: Omit<CellOptions, "code" | "output"> = {};

let scriptUrl = typeof location !== "undefined" ? location.href : "http://localhost/";

/** @internal Called by the entry point with the URL the bundle was loaded from. */
export function setScriptUrl(url: string): void {
  scriptUrl = url;
  defaults.server ??= new URL("..", url).href.replace(/\/$/, ""); // …/static/cellgate.js → the server
}

function frameFiles(): FrameFiles {
  const url = (name: string) => new URL(name, scriptUrl).href;
  const { js, css } = __WIDGETS_FILES__;
  return { frame: url(__FRAME_FILE__), widgets: js ? { js: url(js), css: css && url(css) } : undefined };
}

/** Open a session on a Cellgate server (default: where this script came from). */
export function connect(url?: string, options: ConnectOptions = {}): Promise<Session> {
  return Session.connect(url ?? defaults.server!, options);
}

const shared = new Map<string, Promise<Session>>();

/** One session per group of linked cells; a closed one is replaced at the next run. */
function sessionFor(o: ConnectOptions & { server: string; link: string }): Promise<Session> {
  const key = [o.server, o.kernel ?? "", (o.transports ?? []).join(","), o.link].join("\n");
  const known = shared.get(key);
  if (known) {
    return known.then((s) => (s.state === "closed" ? (shared.delete(key), sessionFor(o)) : s));
  }
  const opening = Session.connect(o.server, { kernel: o.kernel, transports: o.transports });
  shared.set(key, opening);
  opening.catch(() => shared.delete(key));
  return opening;
}

function injectStyle(): void {
  if (document.getElementById("cellgate-style")) return;
  const style = document.createElement("style");
  style.id = "cellgate-style";
  style.textContent = CELL_CSS;
  document.head.prepend(style); // first, so the page's own rules win
}

/** Turn an element (or the first match of a selector) into a live cell. */
export function makeCell(target: HTMLElement | string, options: CellOptions = {}): Cell {
  const host = typeof target === "string" ? document.querySelector<HTMLElement>(target) : target;
  if (!host) throw new Error(`cellgate: no element matches ${String(target)}`);
  injectStyle();
  const merged = { ...defaults, ...options, server: (options.server ?? defaults.server)! };
  // Unlinked cells each get their own session: a key made per cell keeps them apart.
  const link = merged.link !== undefined ? `link:${merged.link}` : `cell:${cellId(host)}`;
  const cell = new Cell(host, merged, (o) => sessionFor({ ...o, link }), frameFiles());
  host.dataset.cellgateReady = "";
  return cell;
}

const ids = new WeakMap<HTMLElement, number>();
let nextId = 0;
function cellId(host: HTMLElement): number {
  if (!ids.has(host)) ids.set(host, nextId++);
  return ids.get(host)!;
}

function words(value: string | undefined): string[] | undefined {
  return value ? value.split(/[\s,]+/).filter(Boolean) : undefined;
}

/** Options given as data-cellgate-* attributes. */
function fromMarkup(host: HTMLElement): CellOptions {
  const d = host.dataset;
  const options: CellOptions = {};
  if (d.cellgateServer) options.server = d.cellgateServer;
  if (d.cellgateLink) options.link = d.cellgateLink;
  if (d.cellgateKernel) options.kernel = d.cellgateKernel;
  if (d.cellgateOutput) options.output = d.cellgateOutput;
  if (d.cellgateAutorun !== undefined) options.autorun = d.cellgateAutorun !== "false";
  const transports = words(d.cellgateTransports);
  if (transports) options.transports = transports as Transport[];
  const hide = words(d.cellgateHide);
  if (hide) options.hide = hide as Part[];
  return options;
}

/** Make a cell of every `[data-cellgate]` element not made yet. */
export function init(root: ParentNode = document): Cell[] {
  return [...root.querySelectorAll<HTMLElement>("[data-cellgate]:not([data-cellgate-ready])")].map((host) =>
    makeCell(host, fromMarkup(host)),
  );
}

/** Run `init` once the document is parsed. */
export function autoInit(): void {
  if (typeof document === "undefined") return;
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", () => init());
  else queueMicrotask(() => init());
}
