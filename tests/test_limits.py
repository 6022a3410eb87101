"""Time limits, kernels per node, sessions per address, and the pool's queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway.client import Client, Refused
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from tests.conftest import GatewayFactory


async def test_idle_timeout_ends_the_session(start_gateway: GatewayFactory, transport: list[str]) -> None:
    gw = await start_gateway(idle_timeout=1.0)
    c = Client(gw.url, transports=transport)
    await c.connect()
    await c.execute("1")
    ended = await c.wait_event("kernel", state="timed_out", timeout=10)
    assert ended["reason"] == "idle"
    assert await gw.wait_sessions(0) == 0


async def test_busy_kernel_is_not_idle(start_gateway: GatewayFactory, transport: list[str]) -> None:
    gw = await start_gateway(idle_timeout=1.0)
    c = Client(gw.url, transports=transport)
    await c.connect()
    run = await c.execute("import time\ntime.sleep(2.5)\n'slept'", timeout=10)
    assert run.result == {"text/plain": "'slept'"}
    await c.drop()
    await gw.end_sessions()


async def test_lifespan_is_a_hard_limit(start_gateway: GatewayFactory, transport: list[str]) -> None:
    gw = await start_gateway(lifespan=2.0)
    c = Client(gw.url, transports=transport)
    await c.connect()
    await c.execute("import time", timeout=10)
    await c.execute("time.sleep(10)", wait=False)
    ended = await c.wait_event("kernel", state="timed_out", timeout=10)
    assert ended["reason"] == "lifespan"


async def test_sessions_per_client_address(start_gateway: GatewayFactory, transport: list[str]) -> None:
    gw = await start_gateway(sessions_per_client=2)
    clients = [Client(gw.url, transports=transport) for _ in range(3)]
    await clients[0].connect()
    await clients[1].connect()
    with pytest.raises(Refused) as err:
        await clients[2].connect()
    assert err.value.code == "capacity_client"
    await clients[0].shutdown()
    await asyncio.sleep(0.2)
    await clients[2].connect()  # a freed place can be taken
    for c in clients:
        await c.drop()
    await gw.end_sessions()


async def test_forwarded_for_is_believed_only_from_trusted_proxies(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(sessions_per_client=1, trusted_proxies="127.0.0.1")
    a = Client(gw.url, headers={"X-Forwarded-For": "203.0.113.1"})
    b = Client(gw.url, headers={"X-Forwarded-For": "203.0.113.2"})
    a2 = Client(gw.url, headers={"X-Forwarded-For": "203.0.113.1"})
    await a.connect()
    await b.connect()  # another user behind the same proxy
    with pytest.raises(Refused):
        await a2.connect()
    b2 = Client(gw.url, headers={"X-Forwarded-For": "203.0.113.2"})
    with pytest.raises(Refused):
        await b2.connect()  # each forwarded address has its own count, of one
    for c in (a, b, a2, b2):
        await c.drop()
    await gw.end_sessions()
    # Untrusted: the header is ignored and the peer address counts.
    gw2 = await start_gateway(sessions_per_client=1)
    a = Client(gw2.url, headers={"X-Forwarded-For": "203.0.113.1"})
    b = Client(gw2.url, headers={"X-Forwarded-For": "203.0.113.2"})
    await a.connect()
    with pytest.raises(Refused):
        await b.connect()
    await a.drop()
    await gw2.end_sessions()


@pytest_asyncio.fixture
async def tiny_pool(kernel_root: str) -> AsyncIterator[KernelPool]:
    pool = KernelPool({"python3": KernelSpec(workdir_root=kernel_root)}, size=0, max_kernels=1)
    pool.start()
    yield pool
    await pool.close()


async def test_on_demand_start_and_capacity_node(start_gateway: GatewayFactory, tiny_pool: KernelPool) -> None:
    gw = await start_gateway(kernel_pool=tiny_pool, queue_timeout=1.0)
    first, second = Client(gw.url), Client(gw.url)
    await first.connect()
    assert tiny_pool.counts() == {"warm": 0, "starting": 0, "attached": 0}  # pool size 0: nothing waits
    run = await first.execute("'on demand'", timeout=60)
    assert run.result == {"text/plain": "'on demand'"}
    assert any(e == "kernel" and d["state"] == "starting" for e, d in first.events)
    await second.connect()
    with pytest.raises(Refused) as err:
        await second.execute("1")
    assert err.value.code == "capacity_node"
    # The node keeps serving the session it has.
    assert (await first.execute("2")).result == {"text/plain": "2"}
    # Once the kernel is freed, the waiting kind of request gets one.
    await first.shutdown()
    assert (await second.execute("3", timeout=60)).result == {"text/plain": "3"}
    await second.drop()
    await gw.end_sessions()


async def test_pool_refills_in_the_background(pool: KernelPool, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    c = Client(gw.url)
    await c.connect()
    await c.execute("1", timeout=60)
    for _ in range(200):
        if pool.counts()["warm"] >= pool.size:
            break
        await asyncio.sleep(0.1)
    assert pool.counts()["warm"] == pool.size, (pool.counts(), pool.last_error)
    await c.drop()
    await gw.end_sessions()


async def test_a_session_over_its_message_rate_is_told_to_slow_down(
    start_gateway: GatewayFactory, transport: list[str]
) -> None:
    gw = await start_gateway(message_rate=5, message_burst=10)
    async with Client(gw.url, transports=transport) as c:
        codes = []
        for _ in range(20):  # at once: the burst goes through, the rest is refused
            try:
                await c.request("shell", "kernel_info_request", {})
                codes.append("ok")
            except Refused as exc:
                codes.append(exc.code)
        assert codes.count("ok") in (10, 11) and set(codes[12:]) == {"rate_limited"}
        await asyncio.sleep(1.0)  # the bucket refills at 5 a second
        assert (await c.execute("1 + 1")).result == {"text/plain": "2"}
        await c.shutdown()
