/** The classic-script bundle: `<script src=".../static/cellgate.js">` defines window.cellgate. */
import { autoInit, setScriptUrl } from "./index";

export * from "./index";

const current = document.currentScript as HTMLScriptElement | null;
setScriptUrl(current?.src || location.href);
autoInit();
