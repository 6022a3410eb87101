"""The wire to a kernel: ZMTP 3.0 over its ipc sockets, bounded before anything is kept.

libzmq assembles a whole multipart message before a reader sees any of it, and its
`MAXMSGSIZE` bounds one frame, not a message: a kernel that sends one message of a
thousand 16 MiB frames would make a libzmq reader hold 16 GiB. So the trusted side
speaks the client half of ZMTP itself (a DEALER for shell, control and stdin, a SUB for
IOPub, NULL security, as jupyter_client's sockets would) and counts every message's
bytes as they arrive. A message over the limit is not kept: the frames that had arrived
before it went over (its header, usually) are handed on with `oversized` set, and the
rest of it is read and thrown away. Only a message that keeps going far past the limit
closes the connection.

The kernel's side is ipykernel's own libzmq sockets, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

# Signature, version 3.0, the NULL mechanism, not a server, padding.
GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
MORE, LONG, COMMAND = 0x01, 0x02, 0x04
COMMAND_MAX = 4096  # READY and PING are a few dozen bytes
SKIP_FACTOR = 16  # a message running past SKIP_FACTOR x the limit closes the connection
PEERS = {"DEALER": {b"ROUTER"}, "SUB": {b"PUB", b"XPUB"}}


class WireError(ConnectionError):
    """The kernel broke the protocol or the connection went away."""


@dataclass
class Received:
    frames: list[bytes]
    size: int  # bytes of the whole message, frames thrown away included
    oversized: bool = False


def _frame(body: bytes, flags: int) -> bytes:
    if len(body) < 256:
        return bytes((flags, len(body))) + body
    return struct.pack(">BQ", flags | LONG, len(body)) + body


def _ready(socket_type: str, identity: bytes) -> bytes:
    props = b""
    for name, value in ((b"Socket-Type", socket_type.encode()), (b"Identity", identity)):
        props += bytes((len(name),)) + name + struct.pack(">I", len(value)) + value
    return _frame(b"\x05READY" + props, COMMAND)


def _properties(body: bytes) -> dict[bytes, bytes]:
    props: dict[bytes, bytes] = {}
    i = 0
    while i < len(body):
        n = body[i]
        name = body[i + 1 : i + 1 + n]
        (size,) = struct.unpack_from(">I", body, i + 1 + n)
        start = i + 5 + n
        props[name.lower()] = body[start : start + size]
        i = start + size
    return props


class Connection(asyncio.Protocol):
    """One channel to one kernel. `on_message` gets each complete message in order."""

    def __init__(
        self,
        socket_type: str,
        identity: bytes,
        limit: int,
        on_message: Callable[[Received], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.socket_type = socket_type
        self.limit = limit
        self._identity = identity
        self._on_message = on_message
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._greeted = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gone = asyncio.Event()  # the connection has ended, everything before it read
        self._frames: list[bytes] = []
        self._size = 0
        self._skip = 0  # bytes of the current frame still to throw away
        self._skipping = False  # the current message went over the limit
        self._skip_more = False  # ...and more of its frames follow the one being skipped
        self._closed = False

    # -- asyncio ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.gone.set()
        if not self.ready.done():
            self.ready.set_exception(WireError(f"the kernel closed the connection ({exc or 'EOF'})"))
        self._on_lost("the connection was closed" if exc is None else str(exc))

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._buf += data
        try:
            self._parse()
        except WireError as exc:
            self.close(str(exc))

    # -- sending ----------------------------------------------------------------

    def send(self, frames: list[bytes]) -> None:
        if self._transport is None or self._closed:
            raise WireError("the channel is closed")
        last = len(frames) - 1
        self._transport.write(b"".join(_frame(f, MORE if i < last else 0) for i, f in enumerate(frames)))

    @property
    def backlog(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def close(self, reason: str = "closed") -> None:
        if not self._closed and self._transport is not None:
            if not self.ready.done():
                self.ready.set_exception(WireError(reason))
            self._transport.abort()

    # -- parsing ----------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        try:
            if not self._greeted:
                if len(buf) < len(GREETING):
                    return
                if buf[0] != 0xFF or buf[9] != 0x7F or buf[10] < 3 or bytes(buf[12:16]) != b"NULL":
                    raise WireError("not a ZMTP 3 peer with the NULL mechanism")
                self._greeted = True
                pos = len(GREETING)
                self._transport.write(_ready(self.socket_type, self._identity))  # type: ignore[union-attr]
            while True:
                if self._skip:
                    take = min(self._skip, len(buf) - pos)
                    pos += take
                    self._skip -= take
                    if self._skip:
                        return
                    if not self._skip_more:
                        self._finish()
                    continue
                if len(buf) - pos < 2:
                    return
                flags = buf[pos]
                if flags & LONG:
                    if len(buf) - pos < 9:
                        return
                    (size,) = struct.unpack_from(">Q", buf, pos + 1)
                    head = 9
                else:
                    size, head = buf[pos + 1], 2
                if flags & COMMAND:
                    if size > COMMAND_MAX:
                        raise WireError(f"a {size}-byte command")
                    if len(buf) - pos < head + size:
                        return
                    self._command(bytes(buf[pos + head : pos + head + size]))
                    pos += head + size
                    continue
                if not self.ready.done():
                    raise WireError("a message before the handshake")
                self._size += size
                if self._skipping or self._size > self.limit:
                    if self._size > self.limit * SKIP_FACTOR:
                        raise WireError(f"a message of more than {self._size} bytes")
                    self._skipping = True
                    self._skip_more = bool(flags & MORE)
                    pos += head
                    self._skip = size
                    if not size and not self._skip_more:
                        self._finish()
                    continue
                if len(buf) - pos < head + size:
                    self._size -= size  # counted again once the whole frame is here
                    return
                self._frames.append(bytes(buf[pos + head : pos + head + size]))
                pos += head + size
                if not flags & MORE:
                    self._finish()
        finally:
            if pos:
                del buf[:pos]

    def _finish(self) -> None:
        received = Received(self._frames, self._size, self._skipping)
        self._frames, self._size, self._skipping, self._skip_more = [], 0, False, False
        self._on_message(received)

    def _command(self, body: bytes) -> None:
        if not body:
            raise WireError("an empty command")
        name = body[1 : 1 + body[0]]
        if name == b"READY" and not self.ready.done():
            try:
                peer = _properties(body[1 + body[0] :]).get(b"socket-type", b"")
            except (struct.error, IndexError):
                raise WireError("a malformed READY") from None
            if peer not in PEERS[self.socket_type]:
                raise WireError(f"a {peer!r} peer for a {self.socket_type}")
            if self.socket_type == "SUB":  # ZMTP 3.0: subscribe to everything
                self._transport.write(_frame(b"\x01", 0))  # type: ignore[union-attr]
            self.ready.set_result(None)
        elif name == b"ERROR":
            raise WireError("the kernel refused the handshake")
        # PING (heartbeats) are not switched on by ipykernel; anything else is ignored.


async def connect(
    path: str,
    socket_type: str,
    identity: bytes,
    limit: int,
    on_message: Callable[[Received], None],
    on_lost: Callable[[str], None],
    retry: float = 0.005,
) -> Connection:
    """Connect to a kernel's ipc socket, retrying while the kernel binds it, and finish
    the handshake. The caller bounds the time (the kernel's start timeout)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            _, conn = await loop.create_unix_connection(
                lambda: Connection(socket_type, identity, limit, on_message, on_lost), path
            )
        except (FileNotFoundError, ConnectionRefusedError):
            await asyncio.sleep(retry)
            continue
        try:
            await conn.ready
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        return conn
