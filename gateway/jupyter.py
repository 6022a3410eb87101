"""Jupyter Server's kernels API, as Jupyter Kernel Gateway serves it, so that JupyterLab,
VS Code, Thebe, nbclient and jupyter_server's gateway client use Cellgate kernels.

A kernel here is a Cellgate session of kind "jupyter": the same warm pool, fork
server, isolation, output bounds and cluster-wide reach, with Jupyter's time limits
(`--jupyter-api-cull-idle-timeout`, `--jupyter-api-lifespan`). Its kernel id is the
session id written as a UUID. A token (`Authorization: token <t>`, or `?token=`)
owns the kernels it made: the session's client is `token:<digest>`, so the
per-client limit counts kernels per token. Anonymous callers, where allowed, are
their address, under the public per-address limit.

The channels WebSocket speaks Jupyter's JSON messages (binary frames for messages
with buffers) and, when asked for, the `v1.kernel.websocket.jupyter.org` subprotocol.
It is one more sink of the session's event stream: a client that reconnects with the
same `session_id` gets what it missed from the replay log, on any node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import struct
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

from gateway.addresses import client_address
from gateway.config import Config
from gateway.errors import CellgateError
from gateway.messages import validate
from gateway.registry import SessionRecord
from gateway.remote import RemoteSession, RemoteSessionManager
from kernels.kernel import PROTOCOL_VERSION, now_iso

log = logging.getLogger(__name__)

V1 = "v1.kernel.websocket.jupyter.org"
KIND = "jupyter"
CHANNELS = ("shell", "iopub", "stdin", "control")
# Kernel states as Jupyter clients know them: a Cellgate kernel that died is replaced at
# the next request (autorestarting); a session that ended has no kernel any more (dead).
STATUS = {"starting": "starting", "restarting": "restarting", "dead": "autorestarting"}
ENDED = ("timed_out", "shutdown")


# -- who is asking ---------------------------------------------------------------------


def load_tokens(config: Config) -> list[str]:
    tokens = [t.strip() for t in config.jupyter_api_tokens.split(",") if t.strip()]
    if config.jupyter_api_tokens_file:
        with open(config.jupyter_api_tokens_file) as f:
            tokens += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    return tokens


def owner(request: web.Request) -> str:
    """The client a request acts for: its token's owner, or (anonymous mode) its address."""
    config: Config = request.app["config"]
    given = request.query.get("token", "")
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        given = value.strip()
    if given:
        for token in request.app["jupyter_tokens"]:
            if hmac.compare_digest(given.encode(), token.encode()):
                return "token:" + hashlib.sha256(token.encode()).hexdigest()[:24]
        raise CellgateError("token_invalid", "this token is not accepted")
    if config.jupyter_api_anonymous:
        return client_address(request, config.proxies)
    raise CellgateError("token_invalid", "send Authorization: token <token>, or ?token=")


def kernel_id(session_id: str) -> str:
    return str(uuid.UUID(hex=session_id))


def session_id(kernel: str) -> str:
    try:
        return uuid.UUID(kernel).hex
    except ValueError:
        raise CellgateError("not_found", f"Kernel does not exist: {kernel}") from None


def _credentials(request: web.Request) -> bool:
    return "token" in request.query or "Authorization" in request.headers


async def owned(request: web.Request, by_id: bool = False) -> SessionRecord:
    """The kernel in the URL, if this caller owns it (else 404, as if it did not exist).
    `by_id`: a caller with no credentials at all may name any kernel by its id."""
    who = None if by_id and not _credentials(request) else owner(request)
    kernel = request.match_info["kernel_id"]
    record = await request.app["manager"].registry.get(session_id(kernel))
    if record is None or record.kind != KIND or (who is not None and record.client != who):
        raise CellgateError("not_found", f"Kernel does not exist: {kernel}")
    return record


def handle(manager: Any, record: SessionRecord) -> Any:
    """What a request acts on: a remote session anywhere, or this node's own."""
    if isinstance(manager, RemoteSessionManager):
        return RemoteSession(manager, record)
    session = manager.sessions.get(record.id)
    if session is None or session.ended:
        raise CellgateError("not_found", f"Kernel does not exist here: {kernel_id(record.id)}")
    return session


def message(msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None = None) -> dict[str, Any]:
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": "cellgate",
        "username": "cellgate",
        "date": now_iso(),
        "version": PROTOCOL_VERSION,
    }
    return {"header": header, "parent_header": parent or {}, "metadata": {}, "content": content, "buffers": []}


async def ask(session: Any, channel: str, msg_type: str, content: dict[str, Any]) -> None:
    """A request of the server's own making, through the same validation as a client's."""
    await session.to_kernel(channel, validate(channel, message(msg_type, content), 1 << 16, session.id))


# -- REST ------------------------------------------------------------------------------


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


async def model(manager: Any, record: SessionRecord) -> dict[str, Any]:
    connected = (await manager.client_state(record))["state"] == "connected"
    return {
        "id": kernel_id(record.id),
        "name": record.kernel_name,
        "last_activity": _iso(time.time() if connected else record.created),
        "execution_state": "idle" if record.kernel_id else "starting",
        "connections": 1 if connected else 0,
    }


def jupyter_errors(handler: Any) -> Any:
    """Jupyter's error body, {"message", "reason"}, next to ours, {"error": {...}}."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except CellgateError as exc:
            request.app["manager"].metrics.errors.labels(exc.code).inc()
            body = {"message": exc.message, "reason": exc.code, "error": exc.as_dict()}
            return web.json_response(body, status=exc.http_status)

    return wrapped


async def api(request: web.Request) -> web.Response:
    return web.json_response({"version": "2.0.0", "server": "cellgate"})


def _spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "spec": {
            "argv": [],
            "display_name": "Python 3 (Cellgate)" if name == "python3" else f"{name} (Cellgate)",
            "language": "python",
            "interrupt_mode": "signal",
            "env": {},
            "metadata": {"cellgate": True},
        },
        "resources": {},
    }


async def kernelspecs(request: web.Request) -> web.Response:
    owner(request)
    config: Config = request.app["config"]
    specs = {name: _spec(name) for name in config.allowed_kernels}
    return web.json_response({"default": config.default_kernel, "kernelspecs": specs})


async def kernelspec(request: web.Request) -> web.Response:
    owner(request)
    config: Config = request.app["config"]
    name = request.match_info["name"]
    if name not in config.allowed_kernels:
        raise CellgateError("not_found", f"Kernel spec {name} not found")
    return web.json_response(_spec(name))


async def list_kernels(request: web.Request) -> web.Response:
    who = owner(request)
    manager = request.app["manager"]
    records = [r for r in await manager.registry.list_client(who) if r.kind == KIND]
    return web.json_response([await model(manager, r) for r in records])


async def start_kernel(request: web.Request) -> web.Response:
    who = owner(request)
    manager = request.app["manager"]
    config: Config = request.app["config"]
    body: Any = {}
    if request.can_read_body:
        raw = await request.content.read(64 * 1024 + 1)
        if len(raw) > 64 * 1024:
            raise CellgateError("too_large", "the body is over 64 KiB")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise CellgateError("bad_message", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise CellgateError("bad_message", "the body must be a JSON object")
    name = body.get("name") or config.default_kernel
    if not isinstance(name, str) or name not in config.allowed_kernels:
        raise CellgateError("not_found", f"No such kernel named {name}")
    # `env` and `path` are accepted and ignored: a kernel's environment is allow-listed.
    limit = config.jupyter_api_kernels_per_token if who.startswith("token:") else None
    origin = request.headers.get("Origin", "")
    session, _ = await manager.open(who, name, origin=origin, kind=KIND, limit=limit)
    await ask(session, "shell", "kernel_info_request", {})  # its kernel starts now, as Jupyter clients expect
    record = await manager.registry.get(session.id) or session.record
    location = f"{config.jupyter_api_base}/api/kernels/{kernel_id(record.id)}"
    return web.json_response(await model(manager, record), status=201, headers={"Location": location})


async def get_kernel(request: web.Request) -> web.Response:
    record = await owned(request)
    return web.json_response(await model(request.app["manager"], record))


async def delete_kernel(request: web.Request) -> web.Response:
    record = await owned(request)
    if not await request.app["manager"].end_session(record.id, "requested"):
        raise CellgateError("not_found", f"Kernel does not exist here: {kernel_id(record.id)}")
    return web.Response(status=204)


async def interrupt_kernel(request: web.Request) -> web.Response:
    record = await owned(request)
    await ask(handle(request.app["manager"], record), "control", "interrupt_request", {})
    return web.Response(status=204)


async def restart_kernel(request: web.Request) -> web.Response:
    """Restart, keeping the kernel id (the session goes on with a fresh kernel)."""
    record = await owned(request)
    manager = request.app["manager"]
    await ask(handle(manager, record), "control", "shutdown_request", {"restart": True})
    return web.json_response({**await model(manager, record), "execution_state": "restarting"})


# -- the channels WebSocket ------------------------------------------------------------


def _frame(msg: dict[str, Any], channel: str, v1: bool) -> str | bytes:
    """One message as a WebSocket frame, in the protocol the client chose."""
    buffers = [bytes(b) for b in msg.get("buffers") or []]
    if v1:
        parts = [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata", "content")]
        parts += buffers
        name = channel.encode()
        offsets = [8 * (1 + 1 + len(parts) + 1)]
        offsets.append(offsets[-1] + len(name))
        for part in parts:
            offsets.append(offsets[-1] + len(part))
        head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
        return head + name + b"".join(parts)
    header = msg["header"]
    body = {
        "channel": channel,
        "header": header,
        "parent_header": msg.get("parent_header") or {},
        "metadata": msg.get("metadata") or {},
        "content": msg.get("content") or {},
        "msg_id": header.get("msg_id"),
        "msg_type": header.get("msg_type"),
        "buffers": [],
    }
    if not buffers:
        return json.dumps(body)
    del body["buffers"]
    blobs = [json.dumps(body).encode(), *buffers]
    offsets = [4 * (len(blobs) + 1)]
    for blob in blobs[:-1]:
        offsets.append(offsets[-1] + len(blob))
    return struct.pack("!" + "I" * (len(blobs) + 1), len(blobs), *offsets) + b"".join(blobs)


MAX_PARTS = 1024  # buffers of one client message, past which it is refused


def _parse(data: str | bytes, v1: bool) -> tuple[Any, dict[str, Any]]:
    """(channel, message) from a client frame; CellgateError bad_message if malformed.
    The frame is already bounded by the WebSocket's size limit."""
    try:
        if isinstance(data, str):
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise ValueError
            # A message without a channel goes to shell, as jupyter_server does it
            # (its own GatewayKernelClient sends none).
            return msg.pop("channel", None) or "shell", msg
        if v1:
            count = int.from_bytes(data[:8], "little")
            if not 3 <= count <= MAX_PARTS:
                raise ValueError
            offsets = [int.from_bytes(data[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
            if offsets != sorted(offsets) or offsets[-1] > len(data):
                raise ValueError
            channel = data[offsets[0] : offsets[1]].decode()
            parts = [data[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]
            if len(parts) < 4:
                raise ValueError
            names = ("header", "parent_header", "metadata", "content")
            msg = {name: json.loads(part) for name, part in zip(names, parts[:4], strict=True)}
            msg["buffers"] = parts[4:]
            return channel, msg
        count = struct.unpack("!I", data[:4])[0]
        if not 1 <= count <= MAX_PARTS:
            raise ValueError
        offsets = list(struct.unpack("!" + "I" * count, data[4 : 4 * (count + 1)]))
        if offsets != sorted(offsets) or offsets[-1] > len(data):
            raise ValueError
        offsets.append(len(data))
        blobs = [data[a:b] for a, b in itertools.pairwise(offsets)]
        msg = json.loads(blobs[0])
        if not isinstance(msg, dict):
            raise ValueError
        msg["buffers"] = blobs[1:]
        return msg.pop("channel", None), msg
    except (ValueError, struct.error, UnicodeDecodeError, IndexError, TypeError):
        raise CellgateError("bad_message", "not a Jupyter message frame") from None


class Sink:
    """A session's events to one channels WebSocket. Frames wait in a queue bounded in
    bytes, so a slow client holds up nobody (past the bound it is disconnected, and
    gets the rest from the replay log when it reconnects with its session_id)."""

    def __init__(self, ws: web.WebSocketResponse, v1: bool, limit: int, metrics: Any) -> None:
        self.ws = ws
        self.v1 = v1
        self.limit = limit
        self.metrics = metrics
        self.sid = "jws-" + uuid.uuid4().hex[:16]
        self.epoch: str | None = None
        self.last_seq = 0  # the newest seq written to the socket: a reconnect replays after it
        self.waiting = 0
        self._queue: asyncio.Queue[tuple[str | bytes, int] | None] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write())

    async def send(self, event: str, data: dict[str, Any]) -> None:
        if event == "session":
            self.epoch = data.get("epoch")
            return
        seq = data.get("seq")
        seq = seq if isinstance(seq, int) else 0
        for msg, channel in translate(event, data):
            self.put(_frame(msg, channel, self.v1), seq)

    def put(self, frame: str | bytes, seq: int = 0) -> None:
        if self.waiting < 0:
            return  # dropped as too slow
        self.waiting += len(frame)
        if self.waiting > self.limit:
            self.waiting = -1
            self.metrics.slow_clients.inc()
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait((frame, seq))

    async def _write(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while (item := await self._queue.get()) is not None:
                frame, seq = item
                if self.ws.closed:
                    break
                if isinstance(frame, str):
                    await self.ws.send_str(frame)
                else:
                    await self.ws.send_bytes(frame)
                self.last_seq = max(self.last_seq, seq)
                if self.waiting >= 0:
                    self.waiting -= len(frame)
        await self.ws.close()

    async def close(self, reason: str = "") -> None:
        self._queue.put_nowait(None)

    async def finish(self) -> None:
        self._queue.put_nowait(None)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer, 5)


def translate(event: str, data: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """A Cellgate event as the Jupyter messages a Jupyter client understands."""
    if event in CHANNELS:
        return [(data, event)]
    if event == "kernel":
        state = data.get("state")
        if state in ENDED:
            return [(message("status", {"execution_state": "dead"}), "iopub")]
        out = []
        if state == "dead":
            note = f"Cellgate: the kernel stopped ({data.get('reason')}); the next request starts a fresh one\n"
            out.append((message("stream", {"name": "stderr", "text": note}), "iopub"))
        if state in STATUS:
            out.append((message("status", {"execution_state": STATUS[state]}), "iopub"))
        return out
    if event == "error" and "code" in data:
        parent = {"msg_id": data["msg_id"]} if data.get("msg_id") else {}
        text = f"Cellgate: {data['code']}: {data.get('message', '')}\n"
        return [(message("stream", {"name": "stderr", "text": text}, parent), "iopub")]
    return []  # files and permalinks are the embed's


def refusal(channel: str, msg: Any, exc: CellgateError) -> tuple[dict[str, Any], str]:
    """What a Jupyter client understands as a refused message: an error reply to a
    request, an error on stderr for anything else."""
    header = msg.get("header") if isinstance(msg, dict) else None
    header = header if isinstance(header, dict) else {}
    msg_type = header.get("msg_type")
    if isinstance(msg_type, str) and msg_type.endswith("_request") and channel in ("shell", "control"):
        content = {"status": "error", "ename": exc.code, "evalue": exc.message, "traceback": []}
        return message(msg_type[: -len("_request")] + "_reply", content, header), channel
    text = f"Cellgate: {exc.code}: {exc.message}\n"
    return message("stream", {"name": "stderr", "text": text}, header), "iopub"


def allowed_extra(config: Config) -> dict[str, frozenset[str]]:
    """Message types Jupyter clients send beyond the embed's."""
    control = frozenset({"debug_request"}) if config.jupyter_api_debug else frozenset()
    return {"shell": frozenset({"history_request"}), "stdin": frozenset(), "control": control}


async def channels(request: web.Request) -> web.StreamResponse:
    config: Config = request.app["config"]
    manager = request.app["manager"]
    origin = request.headers.get("Origin")
    if origin and not _origin_ok(config, origin, request):
        raise CellgateError("token_invalid", f"origin {origin} may not open kernel channels")
    record = await owned(request, by_id=config.jupyter_api_open_channels)
    session = handle(manager, record)
    asked = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    v1 = V1 in asked
    ws = web.WebSocketResponse(protocols=(V1,) if v1 else (), max_msg_size=config.transport_limit, heartbeat=30)
    await ws.prepare(request)
    sink = Sink(ws, v1, config.client_buffer, manager.metrics)
    client_session = request.query.get("session_id", "")[:128]
    after = epoch = None
    if client_session:  # a reconnect of the same client session: what it missed, then live
        saved = (await manager.registry.notes(record.id)).get("jws", "").split(" ")
        if len(saved) == 3 and saved[0] == client_session and saved[2].isdigit():
            epoch, after = saved[1], int(saved[2])
    label = manager.metrics.origins.label(origin)
    extra = allowed_extra(config)
    try:
        await session.attach(sink, "", after is not None, after, epoch)
        async for frame in ws:
            if frame.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            channel: Any = None
            msg: Any = None
            try:
                channel, msg = _parse(frame.data, v1)
                if channel not in ("shell", "stdin", "control"):
                    raise CellgateError("bad_channel", f"no channel {channel!r}; send shell, stdin or control")
                msg = validate(channel, msg, config.message_limit, record.id, extra[channel])
                if channel != "control":
                    session.admit(msg["header"]["msg_id"])
                await session.to_kernel(channel, msg)
            except CellgateError as exc:
                manager.metrics.errors.labels(exc.code).inc()
                reply, on = refusal(channel if isinstance(channel, str) else "shell", msg, exc)
                sink.put(_frame(reply, on, v1))
                continue
            if msg["header"]["msg_type"] == "execute_request":
                manager.metrics.executions.labels(label).inc()
    finally:
        session.detach(sink)
        await sink.finish()
        if client_session and sink.epoch:
            with contextlib.suppress(Exception):
                await manager.registry.note(record.id, "jws", f"{client_session} {sink.epoch} {sink.last_seq}")
    return ws


def _origin_ok(config: Config, origin: str, request: web.Request) -> bool:
    allowed = config.jupyter_cors
    return allowed == "*" or origin in allowed or origin.split("://", 1)[-1] == request.host


# -- wiring ----------------------------------------------------------------------------


def add_routes(app: web.Application, config: Config) -> None:
    """The API under `--jupyter-api-base-url`, when tokens (or anonymous mode) are set."""
    if not config.jupyter_api:
        return
    app["jupyter_tokens"] = load_tokens(config)
    base = config.jupyter_api_base
    kernel = base + r"/api/kernels/{kernel_id}"
    routes = [
        ("GET", base + "/api", api),
        ("GET", base + "/api/kernelspecs", kernelspecs),
        ("GET", base + "/api/kernelspecs/{name}", kernelspec),
        ("GET", base + "/api/kernels", list_kernels),
        ("POST", base + "/api/kernels", start_kernel),
        ("GET", kernel, get_kernel),
        ("DELETE", kernel, delete_kernel),
        ("POST", kernel + "/interrupt", interrupt_kernel),
        ("POST", kernel + "/restart", restart_kernel),
        ("GET", kernel + "/channels", channels),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, jupyter_errors(handler))
