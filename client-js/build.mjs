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
  if (/^cellgate(-frame-\w+)?\.(js|mjs)(\.map)?$/.test(f)) rmSync(join(out, f));
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
const define = { __FRAME_FILE__: JSON.stringify(frameFile) };
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
for (const name of ["cellgate.js", "cellgate.mjs", frameFile]) {
  const bytes = readFileSync(join(out, name));
  console.log(`${name.padEnd(34)} ${kib(bytes.length).padStart(10)}  gzip ${kib(gzipSync(bytes, { level: 9 }).length).padStart(9)}`);
}
