/**
 * ipywidgets in a cell's output frame: @jupyter-widgets/html-manager, extended only
 * by the bridge that carries its comm messages over the cell's session (through the
 * page, by postMessage). Built as its own bundle, loaded the first time a frame shows
 * a widget, so pages without widgets never fetch it.
 */
import { HTMLManager } from "@jupyter-widgets/html-manager/lib/htmlmanager";
import { OutputModel, OutputView } from "@jupyter-widgets/html-manager/lib/output";
// The styles html-manager's own embedding bundle loads: icons, Lumino's layout (its
// hidden tabs), the controls.
import "@fortawesome/fontawesome-free/css/all.min.css";
import "@fortawesome/fontawesome-free/css/v4-shims.min.css";
import "@lumino/widgets/style/index.css";
import "@jupyter-widgets/controls/css/widgets.css";
import { OUTPUT_TYPES } from "./widgetbridge";

export interface WireMessage {
  header: { msg_id: string; msg_type: string };
  parent_header: { msg_id?: string };
  metadata: Record<string, any>;
  content: Record<string, any>;
  buffers?: (ArrayBuffer | DataView)[];
}

/** What the frame gives the manager: a way to the kernel, through the page. */
export interface Bridge {
  send(msgType: string, content: Record<string, any>, metadata?: Record<string, any>, buffers?: ArrayBuffer[]): string;
  request(msgType: string, content: Record<string, any>): Promise<Record<string, any>>;
}

type Callbacks = {
  iopub?: { status?: (msg: WireMessage) => void; output?: (msg: WireMessage) => void; clear_output?: (msg: WireMessage) => void };
  shell?: { reply?: (msg: WireMessage) => void };
};


function toArrayBuffers(buffers?: (ArrayBuffer | ArrayBufferView)[]): ArrayBuffer[] | undefined {
  return buffers?.map((b) =>
    b instanceof ArrayBuffer ? b : (b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer),
  );
}

/** One comm, in the shape ipywidgets' classic comm interface has. */
class Comm {
  private onMsg: ((msg: WireMessage) => void) | undefined;
  private onClose: ((msg: WireMessage) => void) | undefined;

  constructor(
    readonly comm_id: string,
    readonly target_name: string,
    private manager: BridgeManager,
  ) {}

  open(data: any, callbacks?: Callbacks, metadata?: any, buffers?: ArrayBuffer[]): string {
    const id = this.manager.bridge.send(
      "comm_open",
      { comm_id: this.comm_id, target_name: this.target_name, data },
      metadata,
      toArrayBuffers(buffers),
    );
    this.manager.expect(id, callbacks);
    return id;
  }

  send(data: any, callbacks?: Callbacks, metadata?: any, buffers?: ArrayBuffer[]): string {
    const id = this.manager.bridge.send("comm_msg", { comm_id: this.comm_id, data }, metadata, toArrayBuffers(buffers));
    this.manager.expect(id, callbacks);
    return id;
  }

  close(data?: any, callbacks?: Callbacks, metadata?: any, buffers?: ArrayBuffer[]): string {
    const id = this.manager.bridge.send("comm_close", { comm_id: this.comm_id, data: data ?? {} }, metadata, toArrayBuffers(buffers));
    this.manager.expect(id, callbacks);
    this.manager.comms.delete(this.comm_id);
    return id;
  }

  on_msg(callback: (msg: WireMessage) => void): void {
    this.onMsg = callback;
  }

  on_close(callback: (msg: WireMessage) => void): void {
    this.onClose = callback;
  }

  handle(msg: WireMessage): unknown {
    return msg.header.msg_type === "comm_close" ? this.onClose?.(msg) : this.onMsg?.(msg);
  }
}

/**
 * The Output widget, capturing what the kernel sends under its `msg_id`, as Jupyter's
 * own front ends do (html-manager alone only shows an `outputs` state).
 */
class CaptureOutputModel extends OutputModel {
  initialize(attributes: any, options: any): void {
    super.initialize(attributes, options);
    (this.widget_manager as unknown as BridgeManager).outputModels.add(this);
  }

  capture(msg: WireMessage): void {
    const type = msg.header.msg_type;
    const c = msg.content;
    if (type === "clear_output") {
      this.clear_output(!!c.wait);
      return;
    }
    const output =
      type === "stream"
        ? { output_type: type, name: c.name, text: c.text }
        : type === "error"
          ? { output_type: type, ename: c.ename, evalue: c.evalue, traceback: c.traceback }
          : { output_type: type, data: c.data, metadata: c.metadata ?? {}, execution_count: c.execution_count };
    this.outputs.add(output as any);
  }
}

export class BridgeManager extends HTMLManager {
  readonly comms = new Map<string, Comm>();
  readonly outputModels = new Set<CaptureOutputModel>();
  private pendingCallbacks = new Map<string, Callbacks>();
  /** Messages are handled one after another, each after what the last one started
   * (a model's creation, a state change): as Jupyter's own kernel connection does. */
  private chain: Promise<unknown> = Promise.resolve();

  constructor(readonly bridge: Bridge) {
    super();
  }

  /** Note the callbacks a widget gave with a message, for its replies and status. */
  expect(msgId: string, callbacks?: Callbacks): void {
    if (callbacks && Object.keys(callbacks).length) this.pendingCallbacks.set(msgId, callbacks);
  }

  async _create_comm(target: string, modelId?: string, data?: any, metadata?: any, buffers?: ArrayBuffer[]): Promise<any> {
    const comm = new Comm(modelId ?? crypto.randomUUID().replace(/-/g, ""), target, this);
    this.comms.set(comm.comm_id, comm);
    if (data !== undefined) comm.open(data, {}, metadata, buffers);
    return comm;
  }

  async _get_comm_info(): Promise<Record<string, any>> {
    const reply = await this.bridge.request("comm_info_request", { target_name: this.comm_target_name });
    return reply.comms ?? {};
  }

  loadClass(className: string, moduleName: string, moduleVersion: string): Promise<any> {
    if (moduleName === "@jupyter-widgets/output") {
      const classes: Record<string, unknown> = { OutputModel: CaptureOutputModel, OutputView };
      return classes[className] ? Promise.resolve(classes[className]) : Promise.reject(`no ${className}`);
    }
    return super.loadClass(className, moduleName, moduleVersion);
  }

  /** A message of the kernel's IOPub, as the page forwards it. */
  handle(msg: WireMessage): void {
    this.chain = this.chain.then(() => this.process(msg)).catch((err) => console.warn("cellgate: widget message", err));
  }

  /** Resolves once every message handed over so far has been handled. */
  settled(): Promise<unknown> {
    return this.chain;
  }

  private async process(msg: WireMessage): Promise<void> {
    const type = msg.header.msg_type;
    const c = msg.content;
    if (type === "comm_open") {
      if (this.comms.has(c.comm_id) || c.target_name !== this.comm_target_name) return;
      const comm = new Comm(c.comm_id, c.target_name, this);
      this.comms.set(comm.comm_id, comm);
      await this.handle_comm_open(comm as any, msg as any);
      return;
    }
    if (type === "comm_msg" || type === "comm_close") {
      await this.comms.get(c.comm_id)?.handle(msg);
      if (type === "comm_close") this.comms.delete(c.comm_id);
      return;
    }
    const parent = msg.parent_header.msg_id ?? "";
    const callbacks = this.pendingCallbacks.get(parent);
    if (callbacks) {
      if (type === "status") {
        callbacks.iopub?.status?.(msg);
        if (c.execution_state === "idle") this.pendingCallbacks.delete(parent);
      } else if (type === "clear_output") {
        callbacks.iopub?.clear_output?.(msg);
      } else if (OUTPUT_TYPES.has(type)) {
        callbacks.iopub?.output?.(msg);
      }
    }
    if (OUTPUT_TYPES.has(type) && parent) {
      for (const model of this.outputModels) if (model.get("msg_id") === parent) model.capture(msg);
    }
  }

  /** Show a widget's view in an element; false if the model is not known. */
  async show(modelId: string, el: HTMLElement): Promise<boolean> {
    if (!this.has_model(modelId)) return false;
    const model = await this.get_model(modelId);
    const view = await this.create_view(model);
    await this.display_view(view, el);
    return true;
  }

  /** Catch up on the kernel's widgets, for a frame that starts after they were made. */
  async catchUp(): Promise<void> {
    await this._loadFromKernel();
  }
}

window.cellgateWidgets = { start: (bridge) => new BridgeManager(bridge) };
