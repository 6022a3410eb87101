// What the end-to-end tests run against, all real and on loopback: a Cellgate
// gateway, a page server on another origin, a TCP proxy that can cut connections or
// refuse WebSockets, and Debian's Chromium driven by playwright-core.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const here = new URL(".", import.meta.url).pathname;
export const ROOT = join(here, "../../..");
const PYTHON = process.env.CELLGATE_PYTHON ?? join(ROOT, ".venv/bin/python");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

export async function freePort() {
  const server = net.createServer();
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address();
  await new Promise((r) => server.close(r));
  return port;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A gateway node on its embedded defaults, in a directory of its own. */
export async function startGateway(args = []) {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "cellgate-e2e-"));
  const proc = spawn(
    PYTHON,
    ["-m", "gateway", "--host", "127.0.0.1", "--port", String(port), "--store-dir", join(dir, "store"), ...args],
    { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, PYTHONUNBUFFERED: "1" } },
  );
  let log = "";
  proc.stdout.on("data", (d) => (log += d));
  proc.stderr.on("data", (d) => (log += d));
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    if (proc.exitCode !== null) throw new Error(`the gateway exited:\n${log}`);
    try {
      const health = await (await fetch(`${url}/health`)).json();
      if (health.kernels?.warm >= 1) break;
    } catch {
      // not listening yet
    }
    if (i > 600) throw new Error(`the gateway did not get ready:\n${log}`);
    await sleep(100);
  }
  return {
    url,
    port,
    get log() {
      return log;
    },
    async health() {
      return (await fetch(`${url}/health`)).json();
    },
    async stop() {
      proc.kill("SIGTERM");
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once("exit", r)));
      rmSync(dir, { recursive: true, force: true });
      // A clean close logs nothing alarming.
      const alarming = log.split("\n").filter((l) => /ERROR|Traceback|Unclosed/.test(l));
      if (alarming.length) throw new Error(`the gateway logged:\n${alarming.join("\n")}\n\n${log}`);
    },
  };
}

/** Serves pages from another origin than the gateway's (localhost, not 127.0.0.1). */
export async function startPages(pages) {
  const server = http.createServer((req, res) => {
    const body = pages[new URL(req.url, "http://x").pathname];
    res.writeHead(body ? 200 : 404, { "Content-Type": "text/html; charset=utf-8" });
    res.end(body ?? "not found");
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    origin: `http://localhost:${server.address().port}`,
    stop: () => new Promise((r) => server.close(r)),
  };
}

/** A TCP proxy to the gateway that can drop every connection, or refuse WebSockets. */
export async function startProxy(targetPort) {
  const sockets = new Set();
  const state = { blockWebSocket: false, websocketsRefused: 0, offline: false };
  const server = net.createServer((client) => {
    if (state.offline) {
      client.destroy(); // the network is down: nothing gets through
      return;
    }
    client.once("data", (first) => {
      if (state.blockWebSocket && /^upgrade:\s*websocket/im.test(first.toString("latin1"))) {
        state.websocketsRefused++;
        client.destroy(); // as a proxy that does not speak WebSocket would
        return;
      }
      const upstream = net.connect(targetPort, "127.0.0.1");
      sockets.add(client).add(upstream);
      upstream.write(first);
      client.pipe(upstream).pipe(client);
      const close = () => {
        client.destroy();
        upstream.destroy();
        sockets.delete(client);
        sockets.delete(upstream);
      };
      client.on("error", close).on("close", close);
      upstream.on("error", close).on("close", close);
    });
    client.on("error", () => client.destroy());
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    state,
    /** Cut every open connection, as a network drop would. */
    drop() {
      const n = sockets.size;
      for (const s of sockets) s.destroy();
      sockets.clear();
      return n;
    },
    stop() {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(r));
    },
  };
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
}

/** A page of the given markup that loads the embed from `server`. */
export function pageHtml(server, body, { head = "", script = "" } = {}) {
  return `<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">${head}</head>
<body>${body}
<script src="${server}/static/cellgate.js"></script>${script ? `<script>${script}</script>` : ""}
</body></html>`;
}

/** The text of a cell's output frame (the frame is sandboxed: read through playwright). */
export async function outputText(page, cellSelector) {
  const handle = await page.$(`${cellSelector} iframe.cg-output`);
  const frame = await handle?.contentFrame();
  if (!frame) return "";
  return frame.evaluate(() => document.body.innerText);
}

export async function waitForOutput(page, cellSelector, pattern, timeout = 30_000) {
  const deadline = Date.now() + timeout;
  let text = "";
  while (Date.now() < deadline) {
    text = await outputText(page, cellSelector);
    if (pattern.test(text)) return text;
    await sleep(100);
  }
  throw new Error(`${cellSelector}: output never matched ${pattern}; it was:\n${text}`);
}

export async function waitForState(page, cellSelector, states, timeout = 30_000) {
  try {
    await page.waitForFunction(
      ([sel, want]) => want.includes(document.querySelector(sel)?.dataset.state),
      [cellSelector, states],
      { timeout },
    );
  } catch (err) {
    const cell = await page.$eval(cellSelector, (c) => `${c.dataset.state}: ${c.innerText}`).catch(() => "?");
    throw new Error(`${cellSelector} never reached ${states}; it shows ${cell}`, { cause: err });
  }
}

/** A page of cells in a fresh browser context, once its cells are made. */
export async function openCells(browser, url, options = {}) {
  const context = await browser.newContext(options);
  const page = await context.newPage();
  const problems = [];
  const requests = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("request", (r) => requests.push(r.url()));
  await page.goto(url);
  await page.waitForSelector("[data-cellgate-ready] .cm-editor");
  return { page, context, problems, requests };
}

/** Press a cell's Run button. */
export async function runCell(page, sel) {
  // Scrolled into view first and given a moment: right after a scroll, Chromium may
  // route a click to an output frame's old position (frames are hit-tested apart).
  const button = page.locator(`${sel} button.cg-run`);
  await button.scrollIntoViewIfNeeded();
  await page.waitForTimeout(100);
  await button.click();
}
