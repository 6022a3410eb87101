// Builds the embed where the gateway serves it (gateway/static/):
//   cellgate.js          classic script, stable name (short cache + ETag)
//   cellgate.mjs         ES module, stable name
//   cellgate-frame-H.js  the output frame's runtime, content-hashed (cached forever)
// `node build.mjs --tests` bundles the unit tests for node's test runner instead.
import { readdirSync, rmSync, readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const here = new URL(".", import.meta.url).pathname;
const out = join(here, "../gateway/static");
const target = ["es2022", "chrome100", "firefox100", "safari15.4"];

if (process.argv.includes("--tests")) {
  const dir = join(here, "test/unit");
  rmSync(join(here, ".test-build"), { recursive: true, force: true });
  await esbuild.build({
    entryPoints: readdirSync(dir).filter((f) => f.endsWith(".test.ts")).map((f) => join(dir, f)),
    outdir: join(here, ".test-build"),
    outExtension: { ".js": ".mjs" },
    bundle: true,
    platform: "node",
    format: "esm",
    packages: "external",
    logLevel: "warning",
  });
  process.exit(0);
}

for (const f of readdirSync(out)) {
  if (f.startsWith("cellgate")) rmSync(join(out, f)); // the last build's, hashed names included
}
const common = { bundle: true, minify: true, sourcemap: "linked", target, logLevel: "warning", legalComments: "linked" };
const frame = await esbuild.build({
  ...common,
  entryPoints: { "cellgate-frame": join(here, "src/frame.ts") },
  entryNames: "[name]-[hash]",
  outdir: out,
  format: "iife",
  metafile: true,
});
const frameFile = basename(Object.keys(frame.metafile.outputs).find((f) => f.endsWith(".js")));
// The widget manager: loaded into a frame the first time it shows a widget. Only
// ipywidgets 8 is served, so html-manager's copies for ipywidgets 7 are left out.
const widgets = await esbuild.build({
  ...common,
  entryPoints: { "cellgate-widgets": join(here, "src/widgets.ts") },
  entryNames: "[name]-[hash]",
  assetNames: "cellgate-asset-[hash]",
  outdir: out,
  format: "iife",
  metafile: true,
  alias: { "@jupyter-widgets/base7": "@jupyter-widgets/base", "@jupyter-widgets/controls7": "@jupyter-widgets/controls" },
  loader: { ".woff": "file", ".woff2": "file", ".ttf": "file", ".eot": "file", ".svg": "file" },
});
const widgetFiles = Object.keys(widgets.metafile.outputs).map((f) => basename(f));
const define = {
  __FRAME_FILE__: JSON.stringify(frameFile),
  __WIDGETS_FILES__: JSON.stringify({
    js: widgetFiles.find((f) => f.endsWith(".js")),
    css: widgetFiles.find((f) => f.endsWith(".css")),
  }),
};
await esbuild.build({
  ...common,
  entryPoints: [join(here, "src/entry-script.ts")],
  outfile: join(out, "cellgate.js"),
  format: "iife",
  globalName: "cellgate",
  define,
});
await esbuild.build({
  ...common,
  entryPoints: [join(here, "src/entry-module.ts")],
  outfile: join(out, "cellgate.mjs"),
  format: "esm",
  define,
});

const kib = (n) => `${(n / 1024).toFixed(1)} KiB`;
for (const name of ["cellgate.js", "cellgate.mjs", frameFile, ...widgetFiles.filter((f) => /\.(js|css)$/.test(f))]) {
  const bytes = readFileSync(join(out, name));
  console.log(`${name.padEnd(34)} ${kib(bytes.length).padStart(10)}  gzip ${kib(gzipSync(bytes, { level: 9 }).length).padStart(9)}`);
}
