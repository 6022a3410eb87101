"""The wire to a kernel, against real libzmq sockets bound as ipykernel binds them."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import psutil
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from kernels import wire

MiB = 1 << 20


class Peer:
    """What our side of a channel saw."""

    def __init__(self) -> None:
        self.received: list[wire.Received] = []
        self.lost: list[str] = []
        self.changed = asyncio.Event()

    def on_message(self, r: wire.Received) -> None:
        self.received.append(r)
        self.changed.set()

    def on_lost(self, why: str) -> None:
        self.lost.append(why)
        self.changed.set()

    async def wait(self, test, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while not test():
                self.changed.clear()
                await self.changed.wait()


@pytest_asyncio.fixture
async def router(tmp_path) -> AsyncIterator[tuple[zmq.asyncio.Socket, str]]:
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    path = f"{tmp_path}/shell"
    sock.bind(f"ipc://{path}")
    yield sock, path
    sock.close(linger=0)


async def connect(path: str, peer: Peer, socket_type: str = "DEALER", limit: int = 4 * MiB) -> wire.Connection:
    return await asyncio.wait_for(wire.connect(path, socket_type, b"me", limit, peer.on_message, peer.on_lost), 10)


async def introduce(sock: zmq.asyncio.Socket, conn: wire.Connection) -> None:
    """A ROUTER drops what it sends to a peer it has not heard from yet, as a kernel
    answers only requests: send one first, as the gateway would."""
    conn.send([b"request"])
    assert (await asyncio.wait_for(sock.recv_multipart(), 10))[1:] == [b"request"]


async def test_a_dealer_talks_to_a_router_both_ways(router) -> None:
    sock, path = router
    peer = Peer()
    conn = await connect(path, peer)
    conn.send([b"<IDS|MSG>", b"sig", b"x" * 300, b""])  # a long frame and an empty one
    identity, *frames = await asyncio.wait_for(sock.recv_multipart(), 10)
    assert identity == b"me" and frames == [b"<IDS|MSG>", b"sig", b"x" * 300, b""]
    await sock.send_multipart([b"me", b"a", b"b" * 70000])
    await peer.wait(lambda: peer.received)
    assert peer.received[0].frames == [b"a", b"b" * 70000] and not peer.received[0].oversized
    conn.close()


async def test_connecting_before_the_kernel_binds_and_a_stalled_loop(tmp_path) -> None:
    # The gateway connects while a forked kernel is still binding, and a loaded gateway
    # may not run again until the kernel has long answered: both must still connect.
    path = f"{tmp_path}/late"
    peer = Peer()
    connecting = asyncio.ensure_future(connect(path, peer))
    await asyncio.sleep(0.05)
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    try:
        sock.bind(f"ipc://{path}")
        time.sleep(0.3)  # noqa: ASYNC251 (the point: a stalled loop while the kernel answers)
        conn = await asyncio.wait_for(connecting, 10)
        conn.send([b"hello"])
        assert (await asyncio.wait_for(sock.recv_multipart(), 10))[1:] == [b"hello"]
        conn.close()
    finally:
        sock.close(linger=0)


async def test_an_oversized_message_is_skipped_not_kept_and_the_channel_goes_on(router) -> None:
    sock, path = router
    peer = Peer()
    await introduce(sock, await connect(path, peer, limit=4 * MiB))
    me = psutil.Process(os.getpid())
    before = me.memory_info().rss
    # 40 MiB in one message, sent zero-copy from one 1 MiB buffer: libzmq's own reader
    # would hold all of it before anyone saw the first frame.
    chunk = b"z" * MiB
    await sock.send_multipart([b"me", b"header", b"parent", *([chunk] * 40)], copy=False)
    await sock.send_multipart([b"me", b"next"])
    await peer.wait(lambda: len(peer.received) == 2, timeout=60)
    big, after = peer.received
    assert big.oversized and big.size == 40 * MiB + 12
    assert big.frames[:2] == [b"header", b"parent"] and sum(map(len, big.frames)) <= 4 * MiB
    assert after.frames == [b"next"] and not after.oversized and peer.lost == []
    assert me.memory_info().rss - before < 20 * MiB


async def test_a_message_far_past_the_limit_closes_the_channel(router) -> None:
    sock, path = router
    peer = Peer()
    await introduce(sock, await connect(path, peer, limit=64 * 1024))
    chunk = b"z" * (64 * 1024)
    await sock.send_multipart([b"me", *([chunk] * (wire.SKIP_FACTOR + 2))], copy=False)
    await peer.wait(lambda: peer.lost)
    assert peer.received == []


async def test_a_sub_gets_everything_an_xpub_publishes(tmp_path) -> None:
    pub = zmq.asyncio.Context.instance().socket(zmq.XPUB)
    path = f"{tmp_path}/iopub"
    pub.bind(f"ipc://{path}")
    try:
        peer = Peer()
        await connect(path, peer, socket_type="SUB")
        assert await asyncio.wait_for(pub.recv(), 10) == b"\x01"  # subscribed to everything
        await pub.send_multipart([b"topic", b"<IDS|MSG>", b"out"])
        await peer.wait(lambda: peer.received)
        assert peer.received[0].frames == [b"topic", b"<IDS|MSG>", b"out"]
    finally:
        pub.close(linger=0)


async def test_a_peer_that_is_not_zmtp_is_refused(tmp_path) -> None:
    path = f"{tmp_path}/fake"

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n" + b" " * 64)
        await writer.drain()
        await reader.read()

    server = await asyncio.start_unix_server(impostor, path)
    try:
        with pytest.raises(wire.WireError):
            await connect(path, Peer())
    finally:
        server.close()
