"""Runaway output is capped and told; nothing under the cap is lost; others keep going."""

from __future__ import annotations

import asyncio

from gateway.client import Client
from tests.conftest import ClientFactory, GatewayFactory


async def test_flood_under_the_cap_arrives_whole(connect: ClientFactory) -> None:
    c = await connect()
    run = await c.execute("for i in range(20000): print(i)", timeout=60)
    assert run.stdout == "".join(f"{i}\n" for i in range(20000))
    assert run.errors == []


async def test_runaway_output_is_capped_with_notice(start_gateway: GatewayFactory, transport: list[str]) -> None:
    gw = await start_gateway(output_cap=100_000)
    c = Client(gw.url, transports=transport)
    await c.connect()
    # Bounded: 5 MB of output at most, so a broken cap fails the test, not the machine.
    run = await c.execute("for i in range(50000): print('y' * 100)\nprint('done')\n'result'", timeout=90)
    capped = [e for e in run.errors if e["code"] == "output_capped"]
    assert len(capped) == 1 and capped[0]["msg_id"] == run.msg_id
    assert len(run.stdout) <= 100_000 + 64 * 1024
    # Every type of output counts against the cap, the result too; the reply and the
    # statuses that finish the execution are never dropped.
    assert run.result is None
    assert run.reply["status"] == "ok"
    # The cap is per execution: the next one prints again.
    assert (await c.execute("print('fresh')")).stdout == "fresh\n"
    await c.drop()
    await gw.end_sessions()


async def test_flood_does_not_starve_another_session(start_gateway: GatewayFactory, transport: list[str]) -> None:
    gw = await start_gateway(output_cap=200_000)
    flood, calm = Client(gw.url, transports=transport), Client(gw.url, transports=transport)
    await flood.connect()
    await calm.connect()
    await calm.execute("0")
    run = await flood.execute("import time\nt = time.time()\nwhile time.time() - t < 4: print('x' * 50)", wait=False)
    await asyncio.sleep(0.5)
    for i in range(10):
        # Liveness, not speed: a starved session would miss this generous deadline.
        assert (await calm.execute(f"{i} + 1", timeout=5)).result == {"text/plain": str(i + 1)}
    await flood.finish(run, timeout=30)
    await flood.drop()
    await calm.drop()
    await gw.end_sessions()


async def test_interrupt_works_during_a_flood(connect: ClientFactory) -> None:
    c = await connect()
    run = await c.execute("import time\nt = time.time()\nwhile time.time() - t < 30: print('x')", wait=False)
    await c.wait_for(lambda e, d: e == "iopub" and d["header"]["msg_type"] == "stream", timeout=10)
    await c.interrupt()
    await c.finish(run, timeout=20)
    assert run.error["ename"] == "KeyboardInterrupt"
    assert (await c.execute("'alive'")).result == {"text/plain": "'alive'"}
