/**
 * Kernel output to HTML. This runs inside the cell's sandboxed output frame: the
 * frame, not escaping, is what keeps kernel HTML away from the host page, so HTML
 * and SVG are shown as the kernel sent them (scripts included, as Jupyter does).
 */
import { AnsiUp } from "ansi_up";
import { marked } from "marked";
import type { Output } from "./outputs";

export const WIDGET_MIME = "application/vnd.jupyter.widget-view+json";

/** Richest first, as JupyterLab orders them. */
export const MIME_ORDER = [
  WIDGET_MIME,
  "text/html",
  "image/svg+xml",
  "image/png",
  "image/jpeg",
  "text/markdown",
  "text/latex",
  "application/json",
  "text/plain",
];

export function pickMime(data: Record<string, unknown>): string | undefined {
  return MIME_ORDER.find((m) => m in data);
}

export function ansiToHtml(text: string): string {
  const ansi = new AnsiUp();
  ansi.use_classes = true; // colours come from the frame's stylesheet
  return ansi.ansi_to_html(text);
}

export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

export function markdownToHtml(text: string): string {
  return marked.parse(text, { async: false, gfm: true }) as string;
}

function joined(value: unknown): string {
  return Array.isArray(value) ? value.join("") : String(value ?? "");
}

/** Base64 only: anything else in an image's data is not put in a URL. */
function base64(value: unknown): string {
  const text = joined(value).replace(/\s+/g, "");
  return /^[A-Za-z0-9+/]*={0,2}$/.test(text) ? text : "";
}

export interface Rendered {
  /** The class of the output's container. */
  kind: string;
  /** HTML for the container; scripts in it run (in the frame). */
  html: string;
  /** The LaTeX source, to typeset when a typesetter is loaded. */
  latex?: boolean;
  /** The model of a widget to show in the container (its text stands in until then). */
  widget?: string;
}

export function render(output: Output): Rendered {
  if (output.type === "stream") {
    return { kind: `stream ${output.name === "stderr" ? "stderr" : "stdout"}`, html: `<pre>${ansiToHtml(output.text)}</pre>` };
  }
  if (output.type === "error") {
    const text = output.traceback.length ? output.traceback.join("\n") : `${output.ename}: ${output.evalue}`;
    return { kind: "error", html: `<pre>${ansiToHtml(text)}</pre>` };
  }
  const mime = pickMime(output.data);
  const value = mime ? output.data[mime] : "";
  const meta = (mime && output.metadata[mime]) || {};
  switch (mime) {
    case WIDGET_MIME: {
      const fallback = escapeHtml(joined(output.data["text/plain"] ?? "a widget"));
      const modelId = String((value as { model_id?: unknown })?.model_id ?? "");
      return { kind: "widget", html: `<pre class="widget-fallback">${fallback}</pre>`, widget: modelId };
    }
    case "text/html":
    case "image/svg+xml":
      return { kind: "html", html: joined(value) };
    case "image/png":
    case "image/jpeg": {
      const size = ["width", "height"]
        .filter((k) => Number.isFinite(meta[k]))
        .map((k) => ` ${k}="${Number(meta[k])}"`)
        .join("");
      return { kind: "image", html: `<img alt="" src="data:${mime};base64,${base64(value)}"${size}>` };
    }
    case "text/markdown":
      return { kind: "markdown", html: markdownToHtml(joined(value)) };
    case "text/latex":
      return { kind: "latex", html: `<div class="tex">${escapeHtml(joined(value))}</div>`, latex: true };
    case "application/json":
      return { kind: "json", html: `<pre>${escapeHtml(JSON.stringify(value, null, 2))}</pre>` };
    case "text/plain":
      return { kind: "text", html: `<pre>${ansiToHtml(joined(value))}</pre>` };
    default:
      return { kind: "text", html: "" };
  }
}
