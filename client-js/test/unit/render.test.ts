import assert from "node:assert/strict";
import { test } from "node:test";
import { ansiToHtml, markdownToHtml, pickMime, render } from "../../src/render";

test("the richest mime type wins", () => {
  assert.equal(pickMime({ "text/plain": "x", "image/png": "AA==" }), "image/png");
  assert.equal(pickMime({ "text/plain": "x", "text/html": "<b>x</b>" }), "text/html");
  assert.equal(pickMime({ "text/plain": "x", "text/latex": "$x$" }), "text/latex");
  assert.equal(pickMime({ "application/x-unknown": 1 }), undefined);
});

test("ANSI colours become classes and text stays text", () => {
  const html = ansiToHtml("\x1b[31mred\x1b[0m <b>&");
  assert.match(html, /<span class="ansi-red-fg">red<\/span>/);
  assert.match(html, /&lt;b&gt;&amp;/);
  assert.doesNotMatch(html, /\x1b/);
});

test("a traceback is shown with its colours, not escape codes", () => {
  const r = render({
    type: "error",
    ename: "ValueError",
    evalue: "bad",
    traceback: ["\x1b[0;31mValueError\x1b[0m: bad"],
  });
  assert.equal(r.kind, "error");
  assert.match(r.html, /ansi-red-fg">ValueError<\/span>: bad/);
});

test("plain text is escaped; images are data URLs of base64 only", () => {
  assert.match(render({ type: "display", data: { "text/plain": "<script>x</script>" }, metadata: {} }).html, /&lt;script&gt;/);
  const png = render({ type: "display", data: { "image/png": "iVBORw0KGgo=\n" }, metadata: { "image/png": { width: 40 } } });
  assert.equal(png.html, '<img alt="" src="data:image/png;base64,iVBORw0KGgo=" width="40">');
  const forged = render({ type: "display", data: { "image/png": '" onerror="alert(1)' }, metadata: {} });
  assert.equal(forged.html, '<img alt="" src="data:image/png;base64,">');
});

test("markdown, JSON and LaTeX", () => {
  assert.match(markdownToHtml("# Title\n\n*x*"), /<h1>Title<\/h1>\s*<p><em>x<\/em><\/p>/);
  const json = render({ type: "display", data: { "application/json": { a: [1, "<"] } }, metadata: {} });
  assert.match(json.html, /&#34;a&#34;: \[/);
  assert.match(json.html, /&#60;/);
  const tex = render({ type: "display", data: { "text/latex": "$x<y$", "text/plain": "x<y" }, metadata: {} });
  assert.equal(tex.latex, true);
  assert.equal(tex.html, '<div class="tex">$x&#60;y$</div>');
});

test("HTML and SVG are passed through for the sandboxed frame", () => {
  const html = render({ type: "display", data: { "text/html": ["<b>", "bold</b>"] }, metadata: {} });
  assert.deepEqual(html, { kind: "html", html: "<b>bold</b>" });
  assert.equal(render({ type: "display", data: { "image/svg+xml": "<svg></svg>" }, metadata: {} }).kind, "html");
});
