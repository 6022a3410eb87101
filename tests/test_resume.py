"""Disconnect, resume with token + epoch + seq, replay exactly what was missed."""

from __future__ import annotations

import asyncio
import os

import pytest

from gateway.client import Client, Refused
from tests.conftest import ClientFactory, Gateway, GatewayFactory


def seqs(c: Client) -> list[int]:
    return [d["seq"] for _, d in c.events if isinstance(d.get("seq"), int)]


async def test_resume_finds_same_kernel_and_replays_missed_output(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("import time\nsecret = 41")
    # Output produced while the client is away must be replayed on resume.
    run = await c.execute("for i in range(5):\n    print('tick', i)\n    time.sleep(0.1)\nsecret += 1", wait=False)
    seen = c.last_seq
    await c.drop()
    await asyncio.sleep(1.0)
    again = await connect(connect=False)
    info = await again.resume(c.token, c.epoch, seen)
    assert info["resumed"] is True and info["session"] == c.info["session"]
    assert info["kernel"] is not None
    await again.finish(run, start=0)
    replayed = seqs(again)
    assert replayed == list(range(seen + 1, seen + 1 + len(replayed)))  # in order, once, no hole
    assert again.collect(run).stdout == "".join(f"tick {i}\n" for i in range(5))
    assert (await again.execute("secret")).result == {"text/plain": "42"}


async def test_resume_without_seq_replays_nothing(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("1")
    await c.drop()
    again = await connect(connect=False)
    await again.resume(c.token, c.epoch, seq=None)
    await asyncio.sleep(0.3)
    assert again.events == []
    run = await again.execute("2")
    assert run.result == {"text/plain": "2"}
    assert min(seqs(again)) > c.last_seq


async def test_replay_from_zero_gives_everything(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("print('a')")
    await c.drop()
    again = await connect(connect=False)
    await again.resume(c.token, c.epoch, seq=0)
    await again.wait_for(lambda e, d: d.get("seq") == c.last_seq, timeout=5)
    assert seqs(again)[: c.last_seq] == seqs(c)


async def test_wrong_epoch_announces_a_gap_then_replays(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("1")
    await c.drop()
    again = await connect(connect=False)
    await again.resume(c.token, "not-the-epoch", c.last_seq)
    gap = await again.wait_event("error", code="replay_gap", timeout=5)
    assert gap["epoch"] == c.epoch and gap["first"] == 1 and gap["last"] == c.last_seq
    assert again.events[0][0] == "error"  # the gap notice comes before anything replayed
    await again.wait_for(lambda e, d: d.get("seq") == c.last_seq, timeout=5)


async def test_seq_above_newest_is_a_gap(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("1")
    await c.drop()
    again = await connect(connect=False)
    await again.resume(c.token, c.epoch, c.last_seq + 100)
    gap = await again.wait_event("error", code="replay_gap", timeout=5)
    assert gap["last"] == c.last_seq


async def test_trimmed_log_is_a_gap(start_gateway: GatewayFactory, transport: list[str]) -> None:
    gw = await start_gateway(replay_limit=5)
    c = Client(gw.url, transports=transport)
    await c.connect()
    await c.execute("for i in range(3): print(i, flush=True)")
    await c.drop()
    again = Client(gw.url, transports=transport)
    await again.resume(c.token, c.epoch, 1)
    gap = await again.wait_event("error", code="replay_gap", timeout=5)
    newest = gap["last"]  # may be past c.last_seq: events published after the drop
    assert newest >= c.last_seq and gap["first"] == newest - 4
    await again.wait_for(lambda e, d: d.get("seq") == newest, timeout=5)
    assert seqs(again) == list(range(newest - 4, newest + 1))
    await again.drop()
    await gw.end_sessions()


async def test_bad_token_is_refused(connect: ClientFactory) -> None:
    c = await connect(connect=False)
    with pytest.raises(Refused) as err:
        await c.resume("x" * 43, "e", 0)
    assert err.value.code == "token_invalid"
    with pytest.raises(Refused) as err:
        await c._connect({"resume": 12})
    assert err.value.code == "token_invalid"
    with pytest.raises(Refused) as err:
        await c._connect({"resume": "abc", "seq": "five"})
    assert err.value.code == "bad_message"


async def test_newest_resume_takes_the_session(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("v = 'kept'")
    other = await connect(connect=False)
    await other.resume(c.token, c.epoch, c.last_seq)
    taken = await c.wait_event("error", code="session_taken", timeout=5)
    assert "seq" not in taken
    for _ in range(100):
        if not c.connected:
            break
        await asyncio.sleep(0.05)
    assert not c.connected
    assert (await other.execute("v")).result == {"text/plain": "'kept'"}


async def test_after_grace_the_kernel_is_reclaimed(start_gateway: GatewayFactory, transport: list[str]) -> None:
    gw = await start_gateway(resume_grace=1.0)
    c = Client(gw.url, transports=transport)
    await c.connect()
    home = (await c.execute("import os\nos.getcwd()")).result["text/plain"].strip("'")
    assert (await gw.health())["sessions"] == 1 and os.path.isdir(home)
    await c.drop()
    assert await gw.wait_sessions(0) == 0
    assert not os.path.exists(home)  # the kernel went, and its home with it
    again = Client(gw.url, transports=transport)
    with pytest.raises(Refused) as err:
        await again.resume(c.token, c.epoch, c.last_seq)
    assert err.value.code == "token_invalid"


async def test_crossing_transports_on_resume(gw: Gateway) -> None:
    c = Client(gw.url, transports=["websocket"])
    await c.connect()
    await c.execute("z = 3")
    await c.drop()
    again = Client(gw.url, transports=["polling"])
    await again.resume(c.token, c.epoch, c.last_seq)
    assert (await again.execute("z * 2")).result == {"text/plain": "6"}
    await again.drop()


async def test_log_over_its_byte_budget_is_trimmed_with_notice(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(replay_bytes=30_000)
    c = Client(gw.url)
    await c.connect()
    await c.execute("print('a' * 50_000)")
    await c.execute("print('b')")
    await c.drop()
    again = Client(gw.url)
    await again.resume(c.token, c.epoch, 0)
    gap = await again.wait_event("error", code="replay_gap", timeout=5)
    assert gap["first"] > 1
    await again.wait_for(lambda e, d: d.get("seq") == gap["last"], timeout=5)
    assert "a" * 1000 not in repr(again.events)  # the big output is gone from the log
    assert any(e == "iopub" and d["content"].get("text") == "b\n" for e, d in again.events)
    await again.drop()
    await gw.end_sessions()
