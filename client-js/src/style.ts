/** Styles: the cell's on the host page (scoped under .cellgate), the output frame's own. */

export const CELL_CSS = `
.cellgate { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; border: 1px solid #d0d7de;
  border-radius: 6px; margin: 1em 0; background: #fff; color: #1f2328; max-width: 100%; box-sizing: border-box; }
.cellgate * { box-sizing: border-box; }
.cellgate .cg-editor .cm-editor { font-size: 14px; max-height: 60vh; }
.cellgate .cg-editor .cm-editor.cm-focused { outline: 2px solid #0969da; outline-offset: -2px; }
.cellgate .cg-editor .cm-scroller { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.cellgate .cg-bar { display: flex; flex-wrap: wrap; gap: .5em; align-items: center; padding: .4em .5em;
  border-top: 1px solid #d0d7de; background: #f6f8fa; }
.cellgate button { font: inherit; min-height: 2.25em; padding: .2em 1em; border-radius: 6px; border: 1px solid #8c959f;
  background: #fff; color: inherit; cursor: pointer; touch-action: manipulation; }
.cellgate button.cg-run { background: #1f883d; border-color: #1a7f37; color: #fff; font-weight: 600; }
.cellgate button:focus-visible, .cellgate a:focus-visible, .cellgate input:focus-visible { outline: 2px solid #0969da; outline-offset: 2px; }
.cellgate button:disabled { opacity: .6; cursor: default; }
.cellgate .cg-status { display: inline-flex; align-items: center; gap: .35em; color: #59636e; font-size: .9em; }
.cellgate .cg-status::before { content: ""; width: .7em; height: .7em; border-radius: 50%; background: #8c959f; }
.cellgate[data-state=busy] .cg-status::before { background: #bf8700; animation: cg-pulse 1s infinite alternate; }
.cellgate[data-state=idle] .cg-status::before { background: #1f883d; }
.cellgate[data-state=error] .cg-status::before { background: #cf222e; }
@keyframes cg-pulse { to { opacity: .3; } }
.cellgate .cg-permalink { margin-left: auto; font-size: .9em; }
.cellgate .cg-notice { margin: 0; padding: .5em .75em; background: #fff8c5; border-top: 1px solid #d4a72c; font-size: .9em; }
.cellgate .cg-notice.cg-bad { background: #ffebe9; border-color: #cf222e; }
.cellgate .cg-stdin { display: flex; flex-wrap: wrap; gap: .5em; align-items: center; padding: .5em; border-top: 1px solid #d0d7de; }
.cellgate .cg-stdin label { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.cellgate .cg-stdin input { flex: 1 1 10em; font: inherit; min-height: 2.25em; padding: .2em .5em; }
.cellgate .cg-output { display: block; width: 100%; border: 0; border-top: 1px solid #d0d7de; height: 0; }
.cellgate .cg-files { list-style: none; margin: 0; padding: .5em .75em; border-top: 1px solid #d0d7de; }
.cellgate .cg-files img { display: block; max-width: 100%; margin: .25em 0; }
.cellgate .cg-tip { margin: 0; padding: .5em .75em; max-height: 16em; overflow: auto; white-space: pre-wrap;
  font: 13px/1.4 ui-monospace, monospace; background: #f6f8fa; border-top: 1px solid #d0d7de; }
.cellgate.cg-drop { outline: 3px dashed #0969da; }
.cellgate [hidden] { display: none !important; }
`;

export const FRAME_CSS = `
html, body { margin: 0; padding: 0; background: transparent; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; overflow-x: auto; }
.outputs { padding: .25em .75em; }
.output { margin: .25em 0; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.stderr { background: #fff5f5; }
.error pre { color: #82071e; }
img, svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; } td, th { border: 1px solid #d0d7de; padding: .2em .5em; }
.ansi-black-fg { color: #3e424d; } .ansi-red-fg { color: #e75c58; } .ansi-green-fg { color: #00a250; }
.ansi-yellow-fg { color: #b8860b; } .ansi-blue-fg { color: #208ffb; } .ansi-magenta-fg { color: #d160c4; }
.ansi-cyan-fg { color: #60c6c8; } .ansi-white-fg { color: #c5c1b4; }
.ansi-bright-black-fg { color: #282c36; } .ansi-bright-red-fg { color: #b22b31; } .ansi-bright-green-fg { color: #007427; }
.ansi-bright-yellow-fg { color: #b27d12; } .ansi-bright-blue-fg { color: #0065ca; } .ansi-bright-magenta-fg { color: #a03196; }
.ansi-bright-cyan-fg { color: #258f8f; } .ansi-bright-white-fg { color: #a1a6b2; }
.ansi-black-bg { background: #3e424d; } .ansi-red-bg { background: #e75c58; } .ansi-green-bg { background: #00a250; }
.ansi-yellow-bg { background: #ddb62b; } .ansi-blue-bg { background: #208ffb; } .ansi-magenta-bg { background: #d160c4; }
.ansi-cyan-bg { background: #60c6c8; } .ansi-white-bg { background: #c5c1b4; }
.ansi-bold { font-weight: bold; }
`;
