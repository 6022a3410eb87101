// The embed in a real Chromium against a real gateway, the page on another origin.
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import {
  launchBrowser,
  openCells,
  runCell,
  pageHtml,
  startGateway,
  startPages,
  startProxy,
  waitForOutput,
  waitForState,
} from "./harness.mjs";

const SHOTS = new URL("../../test-results/", import.meta.url).pathname;
let gw, proxy, pages, browser;

const CELLS = `
<div id="text" data-cellgate><script type="text/x-python">
from IPython.display import HTML, display
print("hello from the kernel")
display(HTML("<b id='bold'>bold HTML</b>"))
</script></div>
<div id="error" data-cellgate>
def inverse(x):
    return 1 / x
inverse(0)
</div>
<div id="plot" data-cellgate>
import matplotlib.pyplot as plt
plt.plot([1, 3, 2, 4])
plt.show()
</div>
<div id="set" data-cellgate data-cellgate-link="pair">secret = 6 * 7</div>
<div id="get" data-cellgate data-cellgate-link="pair">print("secret is", secret)</div>
<div id="ask" data-cellgate>name = input("Your name? ")
print(f"Hello, {name}!")</div>
`;

const HOSTILE = `
<div id="hostile" data-cellgate><script type="text/x-python">
from IPython.display import HTML, SVG, display
attack = """
try { parent.document.body.innerHTML = "pwned"; document.body.dataset.dom = "reached"; }
catch (e) { document.body.dataset.dom = "blocked"; }
try { document.body.dataset.cookie = "read:" + parent.document.cookie; }
catch (e) { document.body.dataset.cookie = "blocked"; }
try { parent.localStorage.setItem("owned", "1"); document.body.dataset.storage = "reached"; }
catch (e) { document.body.dataset.storage = "blocked"; }
try { localStorage.getItem("x"); document.body.dataset.ownStorage = "open"; }
catch (e) { document.body.dataset.ownStorage = "blocked"; }
try { top.pwned = true; } catch (e) {}
parent.postMessage({cellgate: "height", height: 1e9}, "*");
parent.postMessage({cellgate: "ready"}, "*");
document.body.dataset.ran = (document.body.dataset.ran || "") + "|" + RUN;
"""
import base64
run = "eval(atob('" + base64.b64encode(attack.encode()).decode() + "'))"
display(HTML("<script>var RUN='script';" + run + "</scr" + "ipt>"))
display(HTML("<img src='data:x' onerror=\\"var RUN='img';" + run + "\\">"))
# Chromium fires no load event for an SVG put in place by script, so its onload may
# never run; the onerror of an image inside the SVG does.
svg = "<svg xmlns='http://www.w3.org/2000/svg' onload=\\"var RUN='svg-onload';" + run + "\\">"
display(SVG(svg + "<image href='data:x' onerror=\\"var RUN='svg';" + run + "\\"/></svg>"))
print("attacks sent")
</script></div>`;

before(async () => {
  gw = await startGateway([
    "--pool-size", "3",
    "--sessions-per-client", "200",
    "--resume-grace", "20",
    "--output-cap", "300000",
  ]);
  proxy = await startProxy(gw.port);
  const via = proxy.url;
  pages = await startPages({
    "/cells": pageHtml(gw.url, CELLS),
    "/hostile": pageHtml(gw.url, `<p id="secret">host content</p>${HOSTILE}`, {
      script: `document.cookie = "session=host-secret"; localStorage.setItem("key", "host-value");`,
    }),
    "/polling": pageHtml(gw.url, `<div id="p" data-cellgate data-cellgate-transports="polling">print(sum(range(10)))</div>`),
    "/fallback": pageHtml(via, `<div id="f" data-cellgate>print("via", "fallback")</div>`),
    "/drop": pageHtml(
      via,
      `<div id="count" data-cellgate>
import time
for i in range(80):
    print(f"line {i}", flush=True)
    time.sleep(0.05)
print("finished")
</div>`,
    ),
    "/shrink": pageHtml(gw.url, `<div id="s" data-cellgate>for i in range(60): print(i)</div>`),
    "/unreachable": pageHtml(gw.url, `<div id="u" data-cellgate data-cellgate-server="http://127.0.0.1:9">1</div>`),
    "/trouble": pageHtml(
      gw.url,
      `<div id="die" data-cellgate>import os; os._exit(3)</div>
<div id="flood" data-cellgate>print("x" * 1000000)</div>
<div id="sleep" data-cellgate>import time; time.sleep(60)</div>`,
    ),
    "/extras": pageHtml(
      gw.url,
      `<div id="files" data-cellgate>
import matplotlib.pyplot as plt
plt.plot([1, 2]); plt.savefig("chart.png")
open("notes.txt", "w").write("some notes")
</div>
<div id="up" data-cellgate>print(open("dropped.txt").read())</div>`,
    ),
  });
  browser = await launchBrowser();
  mkdirSync(SHOTS, { recursive: true });
});

after(async () => {
  await browser?.close();
  await pages?.stop();
  await proxy?.stop();
  await gw?.stop();
});

const open = (path, options = {}) => openCells(browser, pages.origin + path, options);

const run = runCell;

test("cells on a page open no session until one runs; text, an error, a plot and HTML appear", async () => {
  const { page, context, problems } = await open("/cells");
  const before = (await gw.health()).sessions;
  assert.equal(await page.locator(".cellgate").count(), 6);
  assert.equal((await gw.health()).sessions, before, "loading a page of cells opens no session");

  await run(page, "#text");
  await waitForOutput(page, "#text", /hello from the kernel[\s\S]*bold HTML/);
  const frame = await (await page.$("#text iframe.cg-output")).contentFrame();
  assert.equal(await frame.locator("#bold").textContent(), "bold HTML");

  await run(page, "#error");
  const tb = await waitForOutput(page, "#error", /ZeroDivisionError/);
  assert.match(tb, /inverse\(0\)[\s\S]*return 1 \/ x/, "the traceback shows the failing lines");
  await waitForState(page, "#error", ["error"]);

  await run(page, "#plot");
  const plot = await (await page.$("#plot iframe.cg-output")).contentFrame();
  await plot.waitForSelector("img[src^='data:image/png;base64,']", { timeout: 30_000 });
  const width = await plot.$eval("img", (img) => img.naturalWidth);
  assert.ok(width > 100, `the plot is an image (${width} px wide)`);
  await waitForState(page, "#plot", ["idle"]);
  // The frame grows to the plot's height: let the page settle before the next click.
  await page.waitForFunction(() => document.querySelector("#plot iframe").getBoundingClientRect().height > 200);

  // Linked cells share one kernel: a variable set in one is read in the other.
  await run(page, "#set");
  await waitForState(page, "#set", ["idle"]);
  await run(page, "#get");
  await waitForOutput(page, "#get", /secret is 42/);
  // Three unlinked cells and one linked pair: four sessions.
  assert.equal((await gw.health()).sessions - before, 4);
  assert.equal(await page.locator("#text .cg-permalink").isVisible(), true, "the share link is shown");
  assert.match(await page.locator("#text .cg-permalink").getAttribute("href"), /^http:\/\/127\.0\.0\.1:\d+\/p\//);
  assert.deepEqual(problems, []);
  await context.close();
});

test("input() shows a prompt on the page and sends the answer", async () => {
  const { page, context } = await open("/cells");
  await run(page, "#ask");
  const input = page.locator("#ask .cg-stdin input");
  await input.waitFor({ timeout: 30_000 });
  assert.equal(await page.locator("#ask .cg-stdin label").textContent(), "Your name? ");
  assert.equal(await page.evaluate(() => document.activeElement?.closest(".cg-stdin") !== null), true);
  await input.fill("Ada");
  await input.press("Enter");
  await waitForOutput(page, "#ask", /Hello, Ada!/);
  await page.locator("#ask .cg-stdin").waitFor({ state: "hidden" });
  await context.close();
});

test("kernel HTML, SVG and scripts cannot read or change the host page", async () => {
  const { page, context } = await open("/hostile");
  await run(page, "#hostile");
  await waitForOutput(page, "#hostile", /attacks sent/);
  const frame = await (await page.$("#hostile iframe.cg-output")).contentFrame();
  await frame.waitForFunction(() => (document.body.dataset.ran ?? "").split("|").length === 4, null, { timeout: 10_000 });
  const inside = await frame.evaluate(() => ({ ...document.body.dataset }));
  // The attacks ran (the test is not vacuous) and every reach for the page failed.
  const ran = inside.ran.split("|").slice(1).filter((r) => r !== "svg-onload").sort();
  assert.deepEqual(ran, ["img", "script", "svg"]);
  assert.equal(inside.dom, "blocked");
  assert.equal(inside.cookie, "blocked");
  assert.equal(inside.storage, "blocked");
  assert.equal(inside.ownStorage, "blocked", "the frame has an opaque origin: no storage of its own either");
  const host = await page.evaluate(() => ({
    cookie: document.cookie,
    key: localStorage.getItem("key"),
    owned: localStorage.getItem("owned"),
    secret: document.getElementById("secret")?.textContent,
    pwned: "pwned" in window,
    cells: document.querySelectorAll(".cellgate").length,
  }));
  assert.deepEqual(host, {
    cookie: "session=host-secret",
    key: "host-value",
    owned: null,
    secret: "host content",
    pwned: false,
    cells: 1,
  });
  const height = await page.$eval("#hostile iframe.cg-output", (f) => f.getBoundingClientRect().height);
  assert.ok(height <= 4000, `a forged height is capped (${height})`);
  assert.equal(await page.$eval("#hostile iframe.cg-output", (f) => f.getAttribute("sandbox")), "allow-scripts allow-popups allow-popups-to-escape-sandbox");
  await context.close();
});

test("a cell forced to long-polling never opens a WebSocket", async () => {
  const { page, context } = await open("/polling");
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  await run(page, "#p");
  await waitForOutput(page, "#p", /^45/m);
  assert.deepEqual(sockets, []);
  await context.close();
});

test("where WebSockets are refused, a cell falls back to long-polling by itself", async () => {
  proxy.state.blockWebSocket = true;
  try {
    const { page, context } = await open("/fallback");
    await run(page, "#f");
    await waitForOutput(page, "#f", /via fallback/);
    assert.ok(proxy.state.websocketsRefused >= 1, "a WebSocket was tried and refused");
    await context.close();
  } finally {
    proxy.state.blockWebSocket = false;
  }
});

test("after the connection drops mid-run, the cell resumes with every line exactly once", async () => {
  const { page, context } = await open("/drop");
  await run(page, "#count");
  await waitForOutput(page, "#count", /line 20/);
  assert.ok(proxy.drop() > 0, "connections were cut");
  await page.locator("#count .cg-notice", { hasText: "reconnecting" }).waitFor({ timeout: 10_000 });
  await waitForOutput(page, "#count", /line 50/);
  proxy.drop(); // and once more
  const text = await waitForOutput(page, "#count", /finished/, 60_000);
  const lines = text.split("\n").filter((l) => l.startsWith("line "));
  assert.deepEqual(lines, Array.from({ length: 80 }, (_, i) => `line ${i}`));
  await waitForState(page, "#count", ["idle"]);
  assert.equal(await page.locator("#count .cg-notice").isHidden(), true, "the reconnecting notice is gone");
  await context.close();
});

test("clear messages: server unreachable, kernel died, output capped, interrupted", async () => {
  const down = await open("/unreachable");
  await run(down.page, "#u");
  await down.page.locator("#u .cg-notice", { hasText: "cannot reach the Cellgate server" }).waitFor({ timeout: 30_000 });
  await down.context.close();

  const { page, context } = await open("/trouble");
  await run(page, "#die");
  await page.locator("#die .cg-notice", { hasText: "The kernel died" }).waitFor({ timeout: 30_000 });
  await run(page, "#flood");
  await page.locator("#flood .cg-notice", { hasText: "Output was capped" }).waitFor({ timeout: 30_000 });
  await run(page, "#sleep");
  await waitForState(page, "#sleep", ["busy"]);
  await page.locator("#sleep button.cg-interrupt").click();
  await waitForOutput(page, "#sleep", /KeyboardInterrupt/);
  await page.locator("#sleep button.cg-interrupt").waitFor({ state: "hidden" });
  await context.close();
});

test("keyboard: Shift+Enter runs, Tab completes, Shift+Tab shows the docstring", async () => {
  const { page, context } = await open("/cells");
  const editor = page.locator("#set .cm-content");
  await editor.click();
  await page.keyboard.press("Control+a");
  await page.keyboard.type("import math");
  await page.keyboard.press("Shift+Enter");
  await waitForState(page, "#set", ["idle"]);
  await page.keyboard.press("Control+a");
  await page.keyboard.type("math.sq");
  await page.keyboard.press("Tab");
  const option = page.locator(".cm-tooltip-autocomplete li", { hasText: "sqrt" });
  await option.waitFor({ timeout: 30_000 });
  await page.waitForTimeout(200); // CodeMirror ignores keys for 75 ms after a completion list opens
  await page.keyboard.press("Enter");
  assert.equal(await editor.textContent(), "math.sqrt");
  await page.keyboard.type("(");
  await page.keyboard.press("Shift+Tab");
  await page.locator("#set .cg-tip", { hasText: "Return the square root of x" }).waitFor({ timeout: 30_000 });
  await page.keyboard.press("Escape");
  await page.locator("#set .cg-tip").waitFor({ state: "hidden" });
  await page.keyboard.press("Control+a");
  await page.keyboard.type("print('ran by keyboard')");
  await page.keyboard.press("Shift+Enter");
  await waitForOutput(page, "#set", /ran by keyboard/);
  // Escape then Tab leaves the editor, so the keyboard is never trapped in it.
  await page.keyboard.press("Escape");
  await page.keyboard.press("Tab");
  assert.equal(await page.evaluate(() => document.activeElement?.className), "cg-run");
  await context.close();
});

test("files are listed as links, images inline; a dropped file reaches the kernel", async () => {
  const { page, context } = await open("/extras");
  await run(page, "#files");
  const png = page.locator("#files .cg-files li[data-name='chart.png'] img");
  await png.waitFor({ timeout: 30_000 });
  await page.waitForFunction(() => document.querySelector("#files .cg-files img")?.naturalWidth > 0);
  const link = page.locator("#files .cg-files li[data-name='notes.txt'] a");
  const href = await link.getAttribute("href");
  assert.equal(await (await fetch(href)).text(), "some notes");

  await page.evaluate(() => {
    const data = new DataTransfer();
    data.items.add(new File(["dropped here"], "dropped.txt", { type: "text/plain" }));
    const target = document.getElementById("up");
    target.dispatchEvent(new DragEvent("dragover", { dataTransfer: data, bubbles: true, cancelable: true }));
    target.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
  });
  await page.locator("#up .cg-notice", { hasText: "Uploaded dropped.txt" }).waitFor({ timeout: 30_000 });
  await run(page, "#up");
  await waitForOutput(page, "#up", /dropped here/);
  await context.close();
});

test("the same page works on a phone-sized screen with touch", async () => {
  const { page, context } = await open("/cells", { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  await page.locator("#text button.cg-run").tap();
  await waitForOutput(page, "#text", /hello from the kernel/);
  const widths = await page.evaluate(() => ({
    page: document.documentElement.scrollWidth,
    cell: document.getElementById("text").getBoundingClientRect().width,
  }));
  assert.ok(widths.page <= 390 && widths.cell <= 390, `nothing is wider than the screen: ${JSON.stringify(widths)}`);
  const button = await page.locator("#text button.cg-run").boundingBox();
  assert.ok(button.height >= 32, "the Run button is big enough to tap");
  await context.close();
});

test("the demo page runs through the bundle; screenshots at desktop and phone size", async () => {
  for (const [name, viewport] of [
    ["desktop", { width: 1280, height: 900 }],
    ["phone", { width: 390, height: 844 }],
  ]) {
    const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
    const page = await context.newPage();
    await page.goto(gw.url + "/");
    await page.waitForSelector("#cell .cm-editor");
    await page.selectOption("#examples", "A plot");
    const frame = await (await page.$("#cell iframe.cg-output")).contentFrame();
    await frame.waitForSelector("img", { timeout: 30_000 });
    await waitForState(page, "#cell", ["idle"]);
    await page.screenshot({ path: join(SHOTS, `demo-${name}.png`), fullPage: true });
    await context.close();
  }
  // A permalink page opens the code, ready to run.
  const made = await (await fetch(`${gw.url}/permalink`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ code: "print('from a permalink </script>')" }),
  })).json();
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(made.url.startsWith("http") ? made.url : gw.url + made.url);
  await page.waitForSelector("#cell .cm-editor");
  assert.equal(await page.locator("#cell .cm-content").textContent(), "print('from a permalink </script>')");
  await page.click("#cell button.cg-run");
  assert.match(await waitForOutput(page, "#cell", /from a permalink/), /<\/script>/);
  await context.close();
});

test("the output frame follows its content, down as well as up", async () => {
  const { page, context } = await open("/shrink");
  const height = () => page.$eval("#s iframe.cg-output", (f) => f.getBoundingClientRect().height);
  await run(page, "#s");
  await waitForOutput(page, "#s", /^59$/m);
  await page.waitForFunction(() => document.querySelector("#s iframe.cg-output").getBoundingClientRect().height > 400);
  const tall = await height();
  await page.locator("#s .cm-content").click();
  await page.keyboard.press("Control+a");
  await page.keyboard.type("print('short')");
  await page.keyboard.press("Shift+Enter");
  await waitForOutput(page, "#s", /^short$/m);
  await waitForState(page, "#s", ["idle"]);
  await page.waitForFunction((t) => document.querySelector("#s iframe.cg-output").getBoundingClientRect().height < t / 4, tall, {
    timeout: 10_000,
  });
  await context.close();
});

test("the programmatic API: execute is awaited and subscribed to; restart, complete and close", async () => {
  const { page, context } = await open("/cells");
  const seen = await page.evaluate(async () => {
    const s = await cellgate.connect();
    const events = [];
    const run = s.execute("x = 5\nprint('out', x)\nx * 2");
    run.on("output", (m) => events.push(m.header.msg_type));
    run.on("status", (st) => events.push(st));
    run.on("permalink", () => events.push("permalink"));
    const result = await run;
    const kernels = [];
    s.on("kernel", (k) => kernels.push(k.state));
    const ready = await s.restart();
    const after = await s.execute("print('x' in dir())");
    const completion = await s.complete("import math; math.fa", 20);
    const failed = await s.execute("1/0");
    await s.close();
    return { events, result, kernels, reason: ready.reason, after: after.status, completion: completion.matches,
             failed: failed.error?.ename, state: s.state };
  });
  assert.deepEqual(seen.events.filter((e) => e !== "permalink"), ["busy", "stream", "execute_result", "idle"]);
  assert.ok(seen.events.includes("permalink"));
  assert.equal(seen.result.status, "ok");
  assert.equal(seen.result.executionCount, 1);
  assert.deepEqual(seen.kernels.slice(0, 2), ["restarting", "ready"]);
  assert.equal(seen.reason, "restarted");
  assert.ok(seen.completion.includes("factorial"));
  assert.equal(seen.failed, "ZeroDivisionError");
  assert.equal(seen.state, "closed");
  await context.close();
});
