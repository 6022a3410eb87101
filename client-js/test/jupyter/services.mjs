// JupyterLab's own client library against Cellgate: `node services.mjs <baseUrl> <wsUrl> <token>`.
// Starts a kernel with @jupyterlab/services' KernelManager, runs a cell that displays
// HTML, prints what came back as one JSON line, and shuts the kernel down.
import { KernelManager, ServerConnection } from "@jupyterlab/services";
import WebSocket from "ws";

const [baseUrl, wsUrl, token] = process.argv.slice(2);
const serverSettings = ServerConnection.makeSettings({ baseUrl, wsUrl, token, WebSocket, appendToken: true });
const manager = new KernelManager({ serverSettings });
await manager.ready;
const kernel = await manager.startNew({ name: "python3" });
const future = kernel.requestExecute({
  code: "from IPython.display import HTML, display\ndisplay(HTML('<b>from Cellgate</b>'))\n6 * 7",
});
const seen = { display: null, result: null };
future.onIOPub = (msg) => {
  if (msg.header.msg_type === "display_data") seen.display = msg.content.data;
  if (msg.header.msg_type === "execute_result") seen.result = msg.content.data;
};
const reply = await future.done;
await manager.refreshRunning();
const listed = [...manager.running()].map((k) => k.id);
console.log(JSON.stringify({ id: kernel.id, status: reply.content.status, listed, ...seen }));
await kernel.shutdown();
manager.dispose();
