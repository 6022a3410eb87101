"""The cluster through HAProxy, next to jupyter_client direct, in one run.

    .venv/bin/python bench/cluster.py            # full run (about four minutes)
    .venv/bin/python bench/cluster.py --quick    # shorter phases

All real processes on loopback: redis-server, two kernel hosts, three gateway nodes
(`--remote-kernels`) and HAProxy running infra/haproxy.cfg (ports filled in, as the
tests do). Measures:
  * the warm `1+1` round trip through HAProxy (WebSocket and polling), interleaved
    round by round with jupyter_client talking to its own kernel directly;
  * K concurrent sessions (20, then 50), each running `1+1` back to back for a fixed
    time: sessions opened per second, executions per second, p50 and p99 latency, and
    Redis commands per message relayed to a client;
  * K sessions printing a numbered line every 50 ms while the node holding most of
    them is killed (SIGKILL): sessions lost and lines lost or doubled (target: 0, 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp
import redis

from bench.latency import Direct, interleaved, summary
from bench.registry import commands, relayed
from gateway.client import Client, parent_id
from tests.cluster import Cluster, Process
from tests.haproxy import haproxy
from tests.redisserver import redis_server

ADMIN = "bench-admin-token-0123456789"
COUNT = "import time\nfor i in range({n}):\n    print(f'line {{i}}', flush=True)\n    time.sleep(0.05)\n"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def relayed_all(nodes: list[Process]) -> float:
    return sum([await relayed(n.url) for n in nodes if n.popen.poll() is None])


async def load(url: str, k: int, seconds: float, nodes: list[Process], counter: redis.Redis) -> dict[str, float]:
    """K sessions (half WebSocket, half polling) opened at once, then `1+1` back to back."""
    clients = [Client(url, transports=["websocket"] if i % 2 else ["polling"], timeout=120) for i in range(k)]
    began = time.perf_counter()

    async def first(c: Client) -> None:
        await c.connect()
        run = await c.execute("1+1", timeout=120)
        assert run.result == {"text/plain": "2"}

    await asyncio.gather(*(first(c) for c in clients))
    opened = time.perf_counter() - began
    latencies: list[float] = []
    msgs_before, (_, cmds_before) = await relayed_all(nodes), commands(counter)
    stop = time.perf_counter() + seconds

    async def loop(c: Client) -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            run = await c.execute("1+1", timeout=120)
            latencies.append((time.perf_counter() - t) * 1000)
            assert run.result == {"text/plain": "2"}
            c.events.clear()

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in clients))
    elapsed = time.perf_counter() - t0
    msgs = await relayed_all(nodes) - msgs_before
    cmds = commands(counter)[1] - cmds_before
    for c in clients:
        await c.shutdown()
        await c.close()
    return {
        "sessions/s": k / opened,
        "executions/s": len(latencies) / elapsed,
        "p50": statistics.median(latencies),
        "p99": pct(latencies, 0.99),
        "redis/msg": cmds / msgs,
    }


async def kill_one(url: str, k: int, lines: int, nodes: list[Process]) -> dict[str, int]:
    """K sessions counting while the node holding most of them is killed."""
    kinds = [
        {"transports": ["websocket"]},
        {"transports": ["polling"]},
        {"transports": ["polling"], "cookies": False},
        {"cookies": False},
    ]
    clients = [Client(url, reconnect=True, timeout=120, **kinds[i % 4]) for i in range(k)]  # type: ignore[arg-type]
    for c in clients:
        await c.connect()
        await c.execute("x = 1", timeout=120)
    runs = [await c.execute(COUNT.format(n=lines), wait=False) for c in clients]
    for c, run in zip(clients, runs, strict=True):
        await c.wait_for(lambda e, d, m=run.msg_id: e == "iopub" and parent_id(d) == m, timeout=60)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/admin/sessions", headers=headers) as r:
            sessions = (await r.json())["sessions"]
        ids = {}
        for n in nodes:
            async with http.get(n.url + "/health") as r:
                ids[(await r.json())["node"]] = n
    mine = {c.info["session"] for c in clients}
    held: dict[str, int] = {}
    for s in sessions:
        if s["id"] in mine and s["node"] in ids:
            held[s["node"]] = held.get(s["node"], 0) + 1
    victim = max(held, key=lambda n: held[n])
    ids[victim].kill()
    lost_sessions = lost_lines = doubled = 0
    for c, run in zip(clients, runs, strict=True):
        try:
            await c.wait_for(lambda e, d, m=run.msg_id: e == "shell" and parent_id(d) == m, timeout=120)
            after = await c.execute("print(x)", timeout=120)
            if after.stdout != "1\n":
                lost_sessions += 1
        except (TimeoutError, Exception):
            lost_sessions += 1
        text = "".join(
            d["content"]["text"]
            for e, d in c.events
            if e == "iopub" and d["header"]["msg_type"] == "stream" and parent_id(d) == run.msg_id
        )
        got = text.splitlines()
        want = [f"line {i}" for i in range(lines)]
        lost_lines += len(set(want) - set(got))
        doubled += len(got) - len(set(got))
        await c.shutdown()
        await c.close()
    return {
        "clients": k,
        "on the killed node": held[victim],
        "resumed": sum(c.resumes for c in clients),
        "sessions lost": lost_sessions,
        "lines lost": lost_lines,
        "lines doubled": doubled,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    rounds, seconds = (50, 5.0) if quick else (200, 15.0)
    directory = Path(tempfile.mkdtemp(prefix="cellgate-bench-cluster-"))
    os.chmod(directory, 0o755)
    direct = Direct()
    await direct.start()
    with redis_server(["appendonly yes", "appendfsync everysec"]) as server:
        cluster = Cluster(server.url, directory, store={"store_dir": str(directory / "store")}, prefix="bench")
        proxy = haproxy(directory)
        counter = redis.Redis.from_url(server.url)
        # Warm pools that hold the largest K: the figures are the relay's, not kernel starts'.
        settings = {"log_level": "warning", "resume_grace": "30", "queue_timeout": "60"}
        try:
            for _ in range(2):
                cluster.host(max_kernels="60", pool_size="26", **settings)
            nodes = [
                cluster.node(sessions_per_client="200", trusted_proxies="127.0.0.1", admin_token=ADMIN, **settings)
                for _ in range(3)
            ]
            for n in nodes:
                await cluster.wait(n, max_kernels=120, warm=52, timeout=300)
            proxy.start([n.port for n in nodes])
            await asyncio.sleep(3)  # HAProxy's health checks see every node up

            ws = Client(proxy.url, transports=["websocket"], timeout=60)
            polling = Client(proxy.url, transports=["polling"], timeout=60)
            for c in (ws, polling):
                await c.connect()

            async def through(c: Client, code: str) -> None:
                run = await c.execute(code, timeout=60)
                assert run.result == {"text/plain": "2"}
                c.events.clear()

            rt = await interleaved(
                {
                    "jupyter_client direct": direct.run,
                    "Cellgate via HAProxy, WebSocket": lambda code: through(ws, code),
                    "Cellgate via HAProxy, polling": lambda code: through(polling, code),
                },
                "1+1",
                rounds,
            )
            for c in (ws, polling):
                await c.shutdown()
                await c.close()

            loads = {}
            for k in (20, 50):
                await cluster.wait(nodes[0], max_kernels=120, warm=52, timeout=300)  # pools refilled
                loads[k] = await load(proxy.url, k, seconds, nodes, counter)
            await cluster.wait(nodes[0], max_kernels=120, warm=52, timeout=300)
            killed = await kill_one(proxy.url, 20, 100 if quick else 200, nodes)
        finally:
            counter.close()
            proxy.stop()
            cluster.stop()
            await direct.stop()

    d_med = summary(rt["jupyter_client direct"])[0]
    print(f"\nwarm 1+1 round trip, {rounds} rounds each, 3 nodes + 2 kernel hosts + Redis behind HAProxy")
    print(f"{'path':34} {'median ms':>10} {'p90 ms':>9} {'x direct':>9}")
    for name, samples in rt.items():
        med, p90 = summary(samples)
        print(f"{name:34} {med:10.2f} {p90:9.2f} {med / d_med:9.2f}")
    print(f"\nK concurrent sessions via HAProxy, each running 1+1 back to back for {seconds:g} s")
    print(f"{'K':>3} {'sessions/s':>11} {'executions/s':>13} {'p50 ms':>8} {'p99 ms':>8} {'Redis cmds/msg':>15}")
    for k, r in loads.items():
        print(
            f"{k:3d} {r['sessions/s']:11.1f} {r['executions/s']:13.1f} {r['p50']:8.2f} {r['p99']:8.2f}"
            f" {r['redis/msg']:15.2f}"
        )
    print("\na gateway node killed (SIGKILL) mid-run, sessions printing a line every 50 ms")
    print("  " + ", ".join(f"{name}: {value}" for name, value in killed.items()) + "   (target: 0 lost, 0 doubled)")


if __name__ == "__main__":
    asyncio.run(main())
