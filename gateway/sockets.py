"""The Socket.IO side: connect and resume, the client's channels, acks."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import engineio
import engineio.payload
import socketio
from aiohttp import web

from gateway.addresses import client_address
from gateway.config import Config
from gateway.errors import CellgateError
from gateway.messages import check_filename, validate
from gateway.registry.base import RegistryUnavailable
from gateway.remote import RemoteSession, RemoteSessionManager
from gateway.session import Session
from gateway.sessions import SessionManager, unreachable

log = logging.getLogger(__name__)

# engine.io refuses a polling payload of more than 16 packets and drops the connection.
# A busy session queues more than 16 events between two polls, and a browser batches
# every queued emit into one POST; the payload's size is already bounded by
# max_http_buffer_size, so the count limit only breaks honest clients.
engineio.payload.Payload.max_decode_packets = 100_000


class ByteQueue(asyncio.Queue):  # type: ignore[type-arg]
    """engine.io's per-socket send queue, counting the bytes it holds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bytes = 0

    def _put(self, item: Any) -> None:
        self.bytes += _packet_size(item)
        super()._put(item)  # type: ignore[misc]

    def _get(self) -> Any:
        item = super()._get()  # type: ignore[misc]
        self.bytes -= _packet_size(item)
        return item


def _packet_size(pkt: Any) -> int:
    data = getattr(pkt, "data", None)
    return len(data) if isinstance(data, str | bytes) else 16


class _EngineIO(engineio.AsyncServer):
    """Byte-counted send queues, and a quiet end to a close.

    A request for a sid this node does not hold is logged by engine.io as an ERROR. It
    is the client's doing, and normal: a polling client answers the server's close
    with one last request for a sid this node has just forgotten, and behind a
    balancer a node that died or drained sends its clients' next polls to another
    node. So it is logged at DEBUG for a sid this node closed and at INFO for any
    other (a balancer that lost stickiness shows as many of these; so does
    HAProxy's log); the client gets its 400 and reconnects either way.
    """

    CLOSED_REMEMBERED = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._closed: OrderedDict[str, None] = OrderedDict()

    def create_queue(self, *args: Any, **kwargs: Any) -> ByteQueue:
        return ByteQueue(*args, **kwargs)

    async def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "disconnect" and args:
            self._closed[args[0]] = None
            while len(self._closed) > self.CLOSED_REMEMBERED:
                self._closed.popitem(last=False)
        return await super()._trigger_event(event, *args, **kwargs)

    def _log_error_once(self, message: str, message_key: str) -> None:
        if message_key == "bad-sid":
            closed = message.rsplit(" ", 1)[-1] in self._closed
            self.logger.log(logging.DEBUG if closed else logging.INFO, "%s", message)
            return
        super()._log_error_once(message, message_key)


class Server(socketio.AsyncServer):
    """An AsyncServer with two fixes for our needs.

    A `connected` event runs once a connection is fully accepted: events emitted from
    inside the connect handler would reach the client before the CONNECT packet, so
    the `session` greeting and any replay are sent from there.

    When a polling client closes, engine.io marks the socket closed but leaves the
    client's pending long-poll GET waiting until its ping timeout (45 s), which holds
    the client's disconnect and the server's shutdown that long. We answer it at once.
    """

    def _engineio_server_class(self) -> type[engineio.AsyncServer]:
        return _EngineIO

    async def send_event(self, sid: str, event: str, data: dict[str, Any]) -> int:
        """Emit to one client; the bytes now waiting for it. `emit(to=sid)` spawns and
        awaits a task per recipient; on the hot path of every kernel message we send
        the packet directly."""
        eio_sid = self.manager.eio_sid_from_sid(sid, "/")
        if eio_sid is None:
            return 0
        await self._send_packet(eio_sid, self.packet_class(socketio.packet.EVENT, namespace="/", data=[event, data]))
        sock = self.eio.sockets.get(eio_sid)
        return sock.queue.bytes if sock is not None else 0

    async def drop_slow(self, sid: str, notice: dict[str, Any]) -> None:
        """Throw away what waits for a client that does not keep up (the replay log
        holds all of it), tell it why, and disconnect it."""
        eio_sid = self.manager.eio_sid_from_sid(sid, "/")
        sock = self.eio.sockets.get(eio_sid) if eio_sid is not None else None
        if sock is None:
            return
        while not sock.queue.empty():
            sock.queue.get_nowait()
            sock.queue.task_done()
        await self.send_event(sid, "error", notice)
        await self.disconnect(sid)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any) -> None:
        await super()._handle_eio_disconnect(eio_sid, reason)
        sock = self.eio.sockets.get(eio_sid)
        if sock is not None and not sock.upgraded:
            sock.queue.put_nowait(None)  # wakes the pending poll, which returns empty

    async def _handle_connect(self, eio_sid: str, namespace: str | None, data: Any) -> None:
        await super()._handle_connect(eio_sid, namespace, data)
        namespace = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is not None and self.manager.is_connected(sid, namespace):
            await self._trigger_event("connected", namespace, sid)


class _WholeBody:
    """engine.io's aiohttp driver reads a polling POST with `content.read(length)`,
    which returns only what has arrived so far: a large message would be cut and fail
    to parse. This reads the whole body (bounded by the app's client_max_size)."""

    def __init__(self, request: web.Request) -> None:
        self._request = request

    async def read(self, length: int = -1) -> bytes:
        return await self._request.read()


def _read_whole_bodies(sio: socketio.AsyncServer) -> None:
    driver = dict(sio.eio._async)  # a copy: the module's dict is shared by every server
    translate = driver["translate_request"]

    def translate_request(request: web.Request) -> dict[str, Any]:
        environ = translate(request)
        environ["wsgi.input"] = _WholeBody(request)
        return environ

    driver["translate_request"] = translate_request
    sio.eio._async = driver


class _QuietOutage(logging.LoggerAdapter):  # type: ignore[type-arg]
    """python-socketio's Redis manager logs a Redis outage as ERROR on every retry; the
    node reports the same outage once, in /health and a WARNING, so these are warnings."""

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.warning(msg, *args, **kwargs)


class SocketSink:
    def __init__(self, sio: Server, sid: str, manager: SessionManager | RemoteSessionManager) -> None:
        self.sio = sio
        self.sid = sid
        self.manager = manager
        self.dropped = False

    async def send(self, event: str, data: dict[str, Any]) -> None:
        if self.dropped:
            return
        waiting = await self.sio.send_event(self.sid, event, data)
        limit = self.manager.config.client_buffer
        if waiting > limit:
            self.dropped = True
            self.manager.metrics.slow_clients.inc()
            notice = CellgateError(
                "slow_client",
                f"over {limit} bytes were waiting for this connection; resume to get the rest from the replay log",
            )
            await self.sio.drop_slow(self.sid, notice.as_dict())

    async def close(self, reason: str) -> None:
        await self.sio.disconnect(self.sid)


class Connection:
    """What one socket is bound to, between its connect and its disconnect."""

    def __init__(
        self,
        session: Session | RemoteSession,
        sink: SocketSink,
        token: str,
        resumed: bool,
        seq: int | None,
        epoch: str | None,
        origin: str,
    ) -> None:
        self.session = session
        self.sink = sink
        self.token = token
        self.resumed = resumed
        self.seq = seq
        self.epoch = epoch
        self.origin = origin  # the page's Origin, as a metrics label


def create_server(config: Config, manager: SessionManager | RemoteSessionManager) -> Server:
    # Nodes that share sessions reach each other's sockets through Redis (the newest
    # resume closing an older socket on another node); kernel output never goes there.
    client_manager = None
    if config.remote_kernels:
        options = {"ssl_ca_certs": config.redis_ca_file} if config.redis_ca_file else {}
        channel = f"{config.redis_prefix}:socketio"
        client_manager = socketio.AsyncRedisManager(
            config.redis, channel=channel, redis_options=options, logger=_QuietOutage(log)
        )
    sio = Server(
        client_manager=client_manager,
        async_mode="aiohttp",
        cors_allowed_origins=config.cors,
        max_http_buffer_size=config.transport_limit,
        # Tokens and payloads must never reach the logs.
        logger=False,
        engineio_logger=False,
    )
    _read_whole_bodies(sio)
    connections: dict[str, Connection] = {}

    def fail(exc: CellgateError, data: Any = None) -> dict[str, Any]:
        # Name the message the error is about, when the client gave it an id.
        if "msg_id" not in exc.extra and isinstance(data, dict) and isinstance(data.get("header"), dict):
            msg_id = data["header"].get("msg_id")
            if isinstance(msg_id, str):
                exc.extra["msg_id"] = msg_id
        manager.metrics.errors.labels(exc.code).inc()
        return exc.ack()

    @sio.event
    async def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        try:
            connections[sid] = await _open(sid, environ, auth)
        except CellgateError as exc:
            manager.metrics.errors.labels(exc.code).inc()
            # Socket.IO clients see this as connect_error with err.message and err.data.
            raise socketio.exceptions.ConnectionRefusedError(exc.message, exc.as_dict()) from None

    async def _open(sid: str, environ: dict[str, Any], auth: Any) -> Connection:
        auth = auth if auth is not None else {}
        origin = environ.get("HTTP_ORIGIN", "")
        label = manager.metrics.origins.label(origin)
        if not isinstance(auth, dict):
            raise CellgateError("bad_message", "auth must be an object")
        sink = SocketSink(sio, sid, manager)
        if "resume" in auth:
            seq, epoch = auth.get("seq"), auth.get("epoch")
            if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 0):
                raise CellgateError("bad_message", "seq must be a non-negative integer")
            if epoch is not None and not isinstance(epoch, str):
                raise CellgateError("bad_message", "epoch must be a string")
            session = await manager.resume(auth["resume"])
            return Connection(session, sink, auth["resume"], True, seq, epoch, label)
        request: web.Request = environ["aiohttp.request"]
        client = client_address(request, config.proxies)
        session, token = await manager.open(client, auth.get("kernel"), origin=origin)
        return Connection(session, sink, token, False, None, None, label)

    @sio.on("connected")
    async def connected(sid: str) -> None:
        conn = connections.get(sid)
        if conn is None:
            return
        # Without a seq nothing is replayed: the client said it needs nothing.
        try:
            await conn.session.attach(conn.sink, conn.token, conn.resumed, conn.seq, conn.epoch)
        except RegistryUnavailable:
            # The log cannot be read now: the client is told, and resumes again later.
            await sio.emit("error", unreachable().as_dict(), to=sid)
            await sio.disconnect(sid)

    @sio.event
    async def disconnect(sid: str, reason: Any = None) -> None:
        conn = connections.pop(sid, None)
        if conn is not None:
            conn.session.detach(conn.sink)

    async def relay(channel: str, sid: str, data: Any) -> dict[str, Any]:
        conn = connections.get(sid)
        if conn is None:
            return fail(CellgateError("token_invalid", "this socket has no session"))
        try:
            msg = validate(channel, data, config.message_limit, conn.session.id)
            if channel != "control":  # an interrupt or a shutdown always gets through
                conn.session.admit(msg["header"]["msg_id"])
            await conn.session.to_kernel(channel, msg)
        except CellgateError as exc:
            return fail(exc, data)
        if msg["header"]["msg_type"] == "execute_request":
            manager.metrics.executions.labels(conn.origin).inc()
        return {"ok": True, "msg_id": msg["header"]["msg_id"]}

    @sio.on("shell")
    async def shell(sid: str, data: Any = None) -> dict[str, Any]:
        return await relay("shell", sid, data)

    @sio.on("stdin")
    async def stdin(sid: str, data: Any = None) -> dict[str, Any]:
        return await relay("stdin", sid, data)

    @sio.on("control")
    async def control(sid: str, data: Any = None) -> dict[str, Any]:
        return await relay("control", sid, data)

    @sio.on("upload")
    async def upload(sid: str, data: Any = None) -> dict[str, Any]:
        conn = connections.get(sid)
        if conn is None:
            return fail(CellgateError("token_invalid", "this socket has no session"))
        try:
            if not isinstance(data, dict) or not isinstance(data.get("data"), bytes | bytearray):
                raise CellgateError("bad_message", "upload takes {name, data: <binary>}")
            name = check_filename(data.get("name"))
            conn.session.admit()
            if len(data["data"]) > config.message_limit:
                raise CellgateError("too_large", f"uploads over {config.message_limit} bytes go to POST /upload")
            result = await conn.session.upload(name, bytes(data["data"]))
        except CellgateError as exc:
            return fail(exc)
        return {"ok": True, **result}

    @sio.on("*")
    async def other(event: str, sid: str, data: Any = None) -> dict[str, Any]:
        return fail(CellgateError("bad_channel", f"no event {event!r}; send shell, stdin, control or upload"), data)

    return sio
