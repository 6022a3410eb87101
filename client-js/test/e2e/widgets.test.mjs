// ipywidgets in embedded cells, in a real Chromium against a real gateway.
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { launchBrowser, openCells, runCell, pageHtml, startGateway, startPages, startProxy, waitForOutput, waitForState } from "./harness.mjs";

const SHOTS = new URL("../../test-results/", import.meta.url).pathname;
let gw, proxy, pages, browser;

const cell = (id, code, attrs = "") =>
  `<div id="${id}" data-cellgate ${attrs}><script type="text/x-python">\n${code}\n</script></div>`;

const INTERACT = `from ipywidgets import interact
calls = []
@interact(x=(0, 10))
def f(x=5):
    calls.append(x)
    print("x is", x)`;

const BUTTON = `from ipywidgets import Button, Output, VBox
out = Output()
button = Button(description="Press me")
def pressed(_):
    with out:
        print("pressed!")
button.on_click(pressed)
VBox([button, out])`;

const LINKED = `from ipywidgets import IntSlider, HBox, VBox, jslink, link
a = IntSlider(value=1, description="a")
b = IntSlider(value=1, description="b")
jslink((a, "value"), (b, "value"))
c = IntSlider(value=1, description="c")
d = IntSlider(value=1, description="d")
link((c, "value"), (d, "value"))  # kept together by the kernel
VBox([HBox([a, b]), HBox([c, d])])`;

const MORE = `from ipywidgets import Checkbox, Dropdown, Text, Play, Tab, VBox, HBox, Output, interact, interact_manual
import matplotlib.pyplot as plt
tab = Tab(children=[VBox([Checkbox(description="check"), Dropdown(options=["one", "two"])]), HBox([Text(value="text"), Play()])])
tab.titles = ["first", "second"]
display(tab)
@interact_manual(n=(1, 5))
def g(n=2):
    print("manual", n)
@interact(word=["apple", "pear"], flag=True, note="hi")
def h(word, flag, note):
    print("chose", word, flag, note)
plot = Output()
display(plot)
with plot:
    plt.plot([1, 3, 2])
    plt.show()`;

before(async () => {
  gw = await startGateway(["--pool-size", "2", "--sessions-per-client", "200", "--resume-grace", "20"]);
  proxy = await startProxy(gw.port);
  pages = await startPages({
    "/interact": pageHtml(gw.url, cell("i", INTERACT, 'data-cellgate-link="k"') + cell("count", "print(calls)", 'data-cellgate-link="k"')),
    "/button": pageHtml(gw.url, cell("b", BUTTON)),
    "/linked": pageHtml(gw.url, cell("l", LINKED)),
    "/more": pageHtml(gw.url, cell("m", MORE)),
    "/drop": pageHtml(
      proxy.url,
      cell("d", INTERACT, 'data-cellgate-link="drop"') +
        cell(
          "later",
          "import threading\nslider = f.widget.children[0]\nthreading.Timer(1.0, lambda: setattr(slider, 'value', 8)).start()",
          'data-cellgate-link="drop"',
        ),
    ),
    "/plain": pageHtml(gw.url, cell("p", "print('no widgets here')")),
    "/hostile": pageHtml(
      gw.url,
      `<p id="secret">host content</p>` +
        cell(
          "h",
          `from ipywidgets import HTML, Output
from IPython.display import display, HTML as RawHTML
attack = "try { parent.document.getElementById('secret').textContent = 'pwned'; document.body.dataset.dom = 'reached' } catch (e) { document.body.dataset.dom = 'blocked' }" \\
         "; try { document.body.dataset.cookie = parent.document.cookie } catch (e) { document.body.dataset.cookie = 'blocked' }" \\
         "; document.body.dataset.ran = (document.body.dataset.ran || '') + '|' + RUN"
import base64
run = "eval(atob('" + base64.b64encode(attack.encode()).decode() + "'))"
display(HTML(value="<img src='data:x' onerror=\\"var RUN='html-widget';" + run + "\\">"))
out = Output()
display(out)
with out:
    display(RawHTML("<img src='data:x' onerror=\\"var RUN='output-widget';" + run + "\\">"))
print("sent")`,
        ),
      { script: `document.cookie = "session=host-secret";` },
    ),
  });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await pages?.stop();
  await proxy?.stop();
  await gw?.stop();
});

const open = (path, options = {}) => openCells(browser, pages.origin + path, options);

const run = runCell;

/** What a cell's output frame fetched (its requests are its own, apart from the page's). */
async function loadedBy(page, sel) {
  return (await frameOf(page, sel)).evaluate(() => performance.getEntriesByType("resource").map((e) => e.name));
}

async function frameOf(page, sel) {
  return (await page.$(`${sel} iframe.cg-output`)).contentFrame();
}

test("an interact slider re-runs the function and replaces its output", async () => {
  const { page, context, requests } = await open("/interact");
  await run(page, "#i");
  await waitForOutput(page, "#i", /x is 5/);
  const frame = await frameOf(page, "#i");
  const handle = frame.locator(".noUi-handle").first();
  await handle.focus();
  for (let i = 0; i < 5; i++) await handle.press("ArrowRight"); // quicker than the kernel answers
  const text = await waitForOutput(page, "#i", /x is 10/);
  assert.doesNotMatch(text, /x is 5/, "the interact's output is replaced, not appended");
  await waitForState(page, "#i", ["idle"]);
  await run(page, "#count");
  const calls = await waitForOutput(page, "#count", /\[5.*10\]/);
  assert.ok(calls.trim().endsWith("10]"), `the last run saw the last value: ${calls}`);
  assert.ok((await loadedBy(page, "#i")).some((u) => /cellgate-widgets-\w+\.js$/.test(u)), "the widget code was loaded");
  await context.close();
});

test("a page without widgets never loads the widget code", async () => {
  const { page, context, requests } = await open("/plain");
  await run(page, "#p");
  await waitForOutput(page, "#p", /no widgets here/);
  const loaded = await loadedBy(page, "#p");
  assert.ok(loaded.some((u) => /cellgate-frame-\w+\.js$/.test(u)), loaded.join());
  assert.deepEqual([...requests, ...loaded].filter((u) => /cellgate-widgets/.test(u)), []);
  await context.close();
});

test("a Button callback prints into an Output widget", async () => {
  const { page, context } = await open("/button");
  await run(page, "#b");
  const frame = await frameOf(page, "#b");
  const button = frame.locator("button", { hasText: "Press me" });
  await button.waitFor({ timeout: 30_000 });
  await button.click();
  await frame.locator(".widget-output", { hasText: "pressed!" }).waitFor({ timeout: 30_000 });
  await button.click();
  await frame.waitForFunction(() => (document.querySelector(".widget-output")?.textContent.match(/pressed!/g) ?? []).length === 2);
  await context.close();
});

test("jslink keeps two sliders together in the browser, link through the kernel", async () => {
  const { page, context } = await open("/linked");
  await run(page, "#l");
  const frame = await frameOf(page, "#l");
  const handles = frame.locator(".noUi-handle");
  await handles.first().waitFor({ timeout: 30_000 });
  await handles.first().focus();
  await handles.first().press("ArrowRight");
  await handles.first().press("ArrowRight");
  const readouts = frame.locator(".widget-readout");
  await frame.waitForFunction(() => [...document.querySelectorAll(".widget-readout")].map((r) => r.textContent).join() === "3,3,1,1");
  assert.deepEqual(await readouts.allTextContents(), ["3", "3", "1", "1"]);
  await handles.nth(2).focus();
  await handles.nth(2).press("ArrowRight"); // c moves; the kernel moves d
  await frame.waitForFunction(() => [...document.querySelectorAll(".widget-readout")].map((r) => r.textContent).join() === "3,3,2,2");
  await context.close();
});

test("interact with dropdowns, checkboxes and text; interact_manual; Play; Tab; a plot in an Output widget", async () => {
  const { page, context } = await open("/more", { viewport: { width: 1000, height: 800 } });
  await run(page, "#m");
  const frame = await frameOf(page, "#m");
  await frame.locator(".lm-TabBar-tab", { hasText: "first" }).waitFor({ timeout: 30_000 });
  assert.equal(await frame.locator("select").first().locator("option").count(), 2);
  await frame.locator("button", { hasText: "Run Interact" }).click();
  await frame.locator(".widget-output", { hasText: "manual 2" }).waitFor({ timeout: 30_000 });
  // interact with a dropdown, a checkbox and a text box
  await frame.locator(".widget-output", { hasText: "chose apple True hi" }).waitFor();
  await frame.locator("select").nth(1).selectOption("pear");
  await frame.locator(".widget-output", { hasText: "chose pear True hi" }).waitFor({ timeout: 30_000 });
  await frame.locator(".widget-checkbox input").nth(1).click();
  await frame.locator(".widget-output", { hasText: "chose pear False hi" }).waitFor({ timeout: 30_000 });
  await frame.locator("input[type=text]").nth(1).fill("typed");
  await frame.locator(".widget-output", { hasText: "chose pear False typed" }).waitFor({ timeout: 30_000 });
  // a plot drawn into an Output widget
  await frame.locator(".widget-output img").waitFor({ timeout: 30_000 });
  await frame.locator(".lm-TabBar-tab", { hasText: "second" }).click();
  await frame.locator("input[type=text]").first().waitFor({ state: "visible" });
  await frame.locator("input[type=checkbox]").first().waitFor({ state: "hidden" }); // the first tab is hidden
  assert.equal(await frame.locator("input[type=text]").first().inputValue(), "text");
  await page.screenshot({ path: join(SHOTS, "widgets.png"), fullPage: true });
  await context.close();
});

test("a widget keeps working after the connection drops, and gets what changed meanwhile", async () => {
  const { page, context } = await open("/drop");
  await run(page, "#d");
  await waitForOutput(page, "#d", /x is 5/);
  // The kernel moves the slider while the page is cut off; the replay brings it back.
  await run(page, "#later");
  await waitForState(page, "#later", ["idle"]);
  proxy.state.offline = true;
  assert.ok(proxy.drop() > 0);
  await page.locator("#d .cg-notice", { hasText: "reconnecting" }).waitFor({ timeout: 10_000 });
  await page.waitForTimeout(2500); // away while the timer fires
  proxy.state.offline = false;
  await page.locator("#d .cg-notice").waitFor({ state: "hidden", timeout: 30_000 });
  const frame = await frameOf(page, "#d");
  await frame.waitForFunction(() => document.querySelector(".widget-readout")?.textContent === "8", null, { timeout: 30_000 });
  const handle = frame.locator(".noUi-handle").first();
  await handle.focus();
  await handle.press("ArrowLeft");
  await waitForOutput(page, "#d", /x is 7/);
  await context.close();
});

test("HTML and Output widgets are as fenced as other output", async () => {
  const { page, context } = await open("/hostile");
  await run(page, "#h");
  await waitForOutput(page, "#h", /sent/);
  const frame = await frameOf(page, "#h");
  await frame.waitForFunction(() => (document.body.dataset.ran ?? "").split("|").length === 3, null, { timeout: 30_000 });
  const inside = await frame.evaluate(() => ({ ...document.body.dataset }));
  assert.deepEqual(inside.ran.split("|").slice(1).sort(), ["html-widget", "output-widget"]);
  assert.equal(inside.dom, "blocked");
  assert.equal(inside.cookie, "blocked");
  assert.equal(await page.locator("#secret").textContent(), "host content");
  assert.equal(await page.evaluate(() => document.cookie), "session=host-secret");
  await context.close();
});

test("on a phone-sized touch screen, buttons tap and sliders drag", async () => {
  const { page, context } = await open("/button", { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  await page.locator("#b button.cg-run").tap();
  const frame = await frameOf(page, "#b");
  const button = frame.locator("button", { hasText: "Press me" });
  await button.waitFor({ timeout: 30_000 });
  await button.tap();
  await frame.locator(".widget-output", { hasText: "pressed!" }).waitFor({ timeout: 30_000 });

  const slider = await open("/interact", { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  await slider.page.locator("#i button.cg-run").tap();
  await waitForOutput(slider.page, "#i", /x is 5/);
  const handle = await (await frameOf(slider.page, "#i")).locator(".noUi-handle").first().boundingBox();
  const track = await (await frameOf(slider.page, "#i")).locator(".noUi-target").first().boundingBox();
  const cdp = await slider.context.newCDPSession(slider.page);
  const at = (x) => [{ x, y: handle.y + handle.height / 2 }];
  const start = handle.x + handle.width / 2;
  const end = track.x + track.width - 1;
  await cdp.send("Input.dispatchTouchEvent", { type: "touchStart", touchPoints: at(start) });
  for (let i = 1; i <= 10; i++) {
    await cdp.send("Input.dispatchTouchEvent", { type: "touchMove", touchPoints: at(start + ((end - start) * i) / 10) });
  }
  await cdp.send("Input.dispatchTouchEvent", { type: "touchEnd", touchPoints: [] });
  await waitForOutput(slider.page, "#i", /x is 10/);
  await slider.context.close();
  await context.close();
});
