/** The ES module: `import { makeCell, connect } from ".../static/cellgate.mjs"`. */
import { autoInit, setScriptUrl } from "./index";

export * from "./index";

setScriptUrl(import.meta.url);
autoInit();
