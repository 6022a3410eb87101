"""A Python client for Cellgate, on python-socketio's AsyncClient.

    async with Client("http://127.0.0.1:8888") as c:
        run = await c.execute("1 + 1")
        print(run.result)          # {'text/plain': '2'}

Tests, benchmarks and users share it. Every server event is kept in `events` in
arrival order; `last_seq` is what a resume asks to continue after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import engineio.payload
import socketio

Event = tuple[str, dict[str, Any]]
MAX_MESSAGE = 256 * 1024 * 1024  # the largest event this client accepts
# A polling response holds every event queued since the last poll, often more than
# engine.io's default decode limit of 16 packets (see gateway/sockets.py).
engineio.payload.Payload.max_decode_packets = 100_000
_EIO_LOG = logging.getLogger("gateway.client.transport")
_EIO_LOG.setLevel(logging.ERROR)  # engine.io logs every packet at INFO, a normal close at WARNING


class _SocketIO(socketio.AsyncClient):
    """Owns its HTTP session. engine.io's client drops its own session on a reset, and a
    poll still under way then opens a fresh one that nobody closes; ours is closed once,
    after everything that could use it has ended."""

    def __init__(self, cookies: bool = True, **kwargs: Any) -> None:
        self._http = aiohttp.ClientSession(cookie_jar=None if cookies else aiohttp.DummyCookieJar())
        self._closing: asyncio.Task[None] | None = None
        super().__init__(http_session=self._http, **kwargs)

    async def disconnect(self) -> None:
        # On polling, engine.io's client waits for its pending long-poll GET, which the
        # server answers only at its next ping (25 s): wait a moment, not that long.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(super().disconnect(), 0.5)
        await self._close_http()

    async def _handle_eio_disconnect(self, reason: Any) -> None:
        await super()._handle_eio_disconnect(reason)
        # The server ended the connection: close the session once engine.io is done
        # with it. This runs inside engine.io's read loop, so not here and now.
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close_http())

    async def _close_http(self) -> None:
        loops = [getattr(self.eio, name, None) for name in ("read_loop_task", "write_loop_task")]
        running = [t for t in loops if t is not None and not t.done() and t is not asyncio.current_task()]
        if running:
            await asyncio.wait(running, timeout=0.5)
        await self._http.close()


class Refused(Exception):
    """The server refused a connection or a message; `code` is a contract error code."""

    def __init__(self, code: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data or {}


@dataclass
class Execution:
    msg_id: str
    messages: list[Event] = field(default_factory=list)  # every event tied to this msg_id
    reply: dict[str, Any] | None = None

    def _iopub(self, msg_type: str) -> list[dict[str, Any]]:
        return [d["content"] for e, d in self.messages if e == "iopub" and d["header"]["msg_type"] == msg_type]

    def _stream(self, name: str) -> str:
        return "".join(
            c["text"] for c in self._iopub("stream") if c.get("name") == name and isinstance(c.get("text"), str)
        )

    @property
    def stdout(self) -> str:
        return self._stream("stdout")

    @property
    def stderr(self) -> str:
        return self._stream("stderr")

    @property
    def result(self) -> dict[str, Any] | None:
        results = self._iopub("execute_result")
        return results[-1]["data"] if results else None

    @property
    def displays(self) -> list[dict[str, Any]]:
        return self._iopub("display_data")

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self._iopub("error")
        return errors[-1] if errors else None

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Cellgate's own `error` events about this execution (output_capped, ...)."""
        return [d for e, d in self.messages if e == "error"]

    @property
    def files(self) -> list[dict[str, Any]]:
        return [f for e, d in self.messages if e == "files" for f in d["files"]]

    @property
    def permalink(self) -> dict[str, Any] | None:
        links = [d for e, d in self.messages if e == "permalink"]
        return links[-1] if links else None


def make_message(msg_type: str, content: dict[str, Any], **header: Any) -> dict[str, Any]:
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, **header},
        "parent_header": {},
        "metadata": {},
        "content": content,
    }


def parent_id(data: dict[str, Any]) -> str | None:
    if "parent_header" in data:
        return (data.get("parent_header") or {}).get("msg_id")
    return data.get("msg_id")


class Client:
    """`reconnect=True` resumes on its own after a dropped connection (a node that
    died or drained, a network cut), retrying with backoff for up to
    `reconnect_for` seconds; `ended` then tells why it gave up, if it did.
    `cookies=False` keeps no cookies, as an app without a cookie jar."""

    def __init__(
        self,
        url: str,
        transports: list[str] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
        reconnect: bool = False,
        reconnect_for: float = 60.0,
        cookies: bool = True,
    ) -> None:
        self.url = url
        self.transports = transports
        self.headers = headers or {}
        self.timeout = timeout
        self.reconnect = reconnect
        self.reconnect_for = reconnect_for
        self.cookies = cookies
        self.resumes = 0  # connections resumed on its own
        self.ended: Refused | None = None  # why it stopped resuming
        self._resumer: asyncio.Task[None] | None = None
        self.sio: socketio.AsyncClient | None = None
        self.info: dict[str, Any] = {}
        self.token: str | None = None
        self.epoch: str | None = None
        self.last_seq = 0
        self.events: list[Event] = []
        self.on_input: Callable[[dict[str, Any]], str] | None = None
        self._changed = asyncio.Condition()
        self._session_event = asyncio.Event()
        self._refusal: dict[str, Any] | None = None
        self._pending: set[asyncio.Future[Any]] = set()

    # -- connection -------------------------------------------------------------

    async def connect(self, kernel: str | None = None) -> dict[str, Any]:
        """Start a new session."""
        return await self._connect({"kernel": kernel} if kernel else {})

    async def resume(self, token: str | None = None, epoch: str | None = None, seq: int | None = -1) -> dict[str, Any]:
        """Reconnect to a session. By default continue after the last seq seen here;
        pass seq=None to ask for no replay, or any seq to replay from there."""
        auth: dict[str, Any] = {"resume": token or self.token, "epoch": epoch or self.epoch}
        if seq == -1:
            seq = self.last_seq
        if seq is not None:
            auth["seq"] = seq
        await self.drop()
        return await self._connect(auth)

    async def _connect(self, auth: dict[str, Any]) -> dict[str, Any]:
        # aiohttp refuses WebSocket messages over 4 MiB by default and drops the
        # connection; a server relays kernel messages of up to 16 MiB (more, encoded).
        sio = _SocketIO(
            cookies=self.cookies,
            reconnection=False,
            engineio_logger=_EIO_LOG,
            websocket_extra_options={"max_msg_size": MAX_MESSAGE},
        )
        self._session_event.clear()
        self._refusal = None

        @sio.on("*")
        async def any_event(event: str, data: Any = None) -> None:
            await self._received(event, data)

        @sio.event
        async def connect_error(data: Any) -> None:
            if isinstance(data, dict) and isinstance(data.get("data"), dict):
                self._refusal = data["data"]
            else:
                self._refusal = {"code": "unknown", "message": str(data)}

        @sio.event
        async def disconnect(*reason: Any) -> None:
            # Not our own drop (which forgets the socket first): resume, if asked to.
            if self.reconnect and sio is self.sio and (self._resumer is None or self._resumer.done()):
                self._resumer = asyncio.ensure_future(self._resume_until_back())

        @sio.on("session")
        async def on_session(data: dict[str, Any]) -> None:
            self.info = data
            self.token = data["resume"]
            self.epoch = data["epoch"]
            self._session_event.set()

        try:
            await sio.connect(
                self.url,
                auth=auth,
                transports=self.transports,
                headers=self.headers,
                wait_timeout=self.timeout,
            )
        except BaseException as exc:
            await sio.disconnect()
            if not isinstance(exc, socketio.exceptions.ConnectionError):
                raise
            refusal = self._refusal or {"code": "connection_failed", "message": str(exc)}
            raise Refused(refusal.get("code", "unknown"), refusal.get("message", ""), refusal) from None
        self.sio = sio
        await asyncio.wait_for(self._session_event.wait(), self.timeout)
        return self.info

    async def _resume_until_back(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_for
        delay = 0.1
        while self.reconnect:
            try:
                await self.resume()
                self.resumes += 1
                return
            except Refused as exc:
                if exc.code in ("token_invalid", "session_taken") or loop.time() > deadline:
                    self.ended = exc
                    return
            except (OSError, TimeoutError, aiohttp.ClientError, socketio.exceptions.SocketIOError) as exc:
                if loop.time() > deadline:
                    self.ended = Refused("connection_failed", str(exc))
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _received(self, event: str, data: Any) -> None:
        if not isinstance(data, dict):
            data = {"value": data}
        seq = data.get("seq")
        if isinstance(seq, int) and seq > self.last_seq:
            self.last_seq = seq
        if event == "stdin" and data["header"]["msg_type"] == "input_request" and self.on_input:
            answer = self.on_input(data["content"])
            task = asyncio.ensure_future(self.input_reply(answer, parent=data["header"]))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        async with self._changed:
            self.events.append((event, data))
            self._changed.notify_all()

    async def drop(self) -> None:
        """Close this connection without ending the session (it can be resumed)."""
        if self.sio is not None:
            sio, self.sio = self.sio, None
            with contextlib.suppress(Exception):
                await sio.disconnect()

    async def __aenter__(self) -> Client:
        if self.sio is None:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop resuming and close the connection (the session lives on until its grace ends)."""
        self.reconnect = False
        if self._resumer is not None and not self._resumer.done() and self._resumer is not asyncio.current_task():
            self._resumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._resumer
        await self.drop()

    @property
    def connected(self) -> bool:
        return self.sio is not None and self.sio.connected

    # -- waiting ----------------------------------------------------------------

    async def wait_for(
        self, match: Callable[[str, dict[str, Any]], bool], timeout: float | None = None, start: int = 0
    ) -> Event:
        """The first event from index `start` on that matches, waiting if need be."""
        async with asyncio.timeout(timeout or self.timeout), self._changed:
            i = start
            while True:
                while i < len(self.events):
                    if match(*self.events[i]):
                        return self.events[i]
                    i += 1
                await self._changed.wait()

    async def wait_event(
        self, event: str, timeout: float | None = None, start: int = 0, **fields: Any
    ) -> dict[str, Any]:
        def match(e: str, d: dict[str, Any]) -> bool:
            return e == event and all(d.get(k) == v for k, v in fields.items())

        return (await self.wait_for(match, timeout, start))[1]

    # -- messages ---------------------------------------------------------------

    async def send(self, channel: str, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one message (or upload) and return the server's ack; Refused on ok=false."""
        if self.sio is None:
            raise Refused("not_connected", "connect first")
        ack = await self.sio.call(channel, msg, timeout=self.timeout)
        if not ack.get("ok"):
            err = ack.get("error", {})
            raise Refused(err.get("code", "unknown"), err.get("message", ""), err)
        return ack

    async def request(self, channel: str, msg_type: str, content: dict[str, Any], **extra: Any) -> str:
        msg = make_message(msg_type, content)
        msg.update(extra)
        await self.send(channel, msg)
        return msg["header"]["msg_id"]

    async def execute(
        self, code: str, timeout: float | None = None, allow_stdin: bool = False, wait: bool = True
    ) -> Execution:
        """Run code; return once its execute_reply and its idle status have arrived."""
        start = len(self.events)
        msg_id = await self.request(
            "shell",
            "execute_request",
            {"code": code, "silent": False, "store_history": True, "allow_stdin": allow_stdin},
        )
        run = Execution(msg_id)
        if wait:
            await self.finish(run, timeout, start)
        return run

    async def finish(self, run: Execution, timeout: float | None = None, start: int = 0) -> Execution:
        reply = idle = False

        def done(e: str, d: dict[str, Any]) -> bool:
            nonlocal reply, idle
            if parent_id(d) == run.msg_id:
                t = d.get("header", {}).get("msg_type")
                reply = reply or (e == "shell" and t == "execute_reply")
                idle = idle or (e == "iopub" and t == "status" and d["content"]["execution_state"] == "idle")
            return (reply and idle) or (e == "kernel" and d.get("state") in ("dead", "timed_out", "shutdown"))

        await self.wait_for(done, timeout, start)
        self.collect(run, start)
        return run

    def collect(self, run: Execution, start: int = 0) -> Execution:
        """Refresh `run` with every event about it received so far."""
        run.messages = [(e, d) for e, d in self.events[start:] if parent_id(d) == run.msg_id]
        replies = [d["content"] for e, d in run.messages if e == "shell"]
        run.reply = replies[-1] if replies else None
        return run

    async def wait_files(self, run: Execution, timeout: float | None = None) -> list[dict[str, Any]]:
        await self.wait_event("files", timeout, msg_id=run.msg_id)
        return self.collect(run).files

    async def input_reply(self, value: str, parent: dict[str, Any] | None = None) -> str:
        msg = make_message("input_reply", {"value": value})
        if parent:
            msg["parent_header"] = parent
        await self.send("stdin", msg)
        return msg["header"]["msg_id"]

    async def comm_msg(self, comm_id: str, data: dict[str, Any], buffers: list[bytes] | None = None) -> str:
        extra = {"buffers": buffers} if buffers else {}
        return await self.request("shell", "comm_msg", {"comm_id": comm_id, "data": data}, **extra)

    async def interrupt(self) -> str:
        return await self.request("control", "interrupt_request", {})

    async def shutdown(self) -> None:
        await self.request("control", "shutdown_request", {"restart": False})
        with contextlib.suppress(TimeoutError):
            await self.wait_event("kernel", state="shutdown")

    async def restart(self) -> dict[str, Any]:
        """Restart the kernel: the session goes on with a fresh one; its `ready` event."""
        start = len(self.events)
        await self.request("control", "shutdown_request", {"restart": True})
        _, ready = await self.wait_for(lambda e, d: e == "kernel" and d.get("state") == "ready", start=start)
        return ready

    async def upload(self, name: str, data: bytes) -> dict[str, Any]:
        return await self.send("upload", {"name": name, "data": data})
