"""What Redis costs: round trips through a node on the Redis registry, and through a
node whose kernel is on a kernel host, next to the in-process registry and to
jupyter_client direct; and the Redis commands one relayed message takes on each.

    .venv/bin/python bench/registry.py            # 300 rounds each
    .venv/bin/python bench/registry.py --quick    # 50 rounds

A redis-server (started here, on loopback) backs one gateway node; another node uses
the in-process registry; a second redis-server carries a kernel host and a node with
--remote-kernels. All run as their own processes; the paths are measured interleaved,
round by round. Redis commands are counted with INFO commandstats, and relayed
messages with the node's own cellgate_messages_total.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import aiohttp  # noqa: E402
import redis  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.latency import FLOOD, Direct, close_all, free_port, interleaved, summary, wait_ready  # noqa: E402
from gateway.client import Client  # noqa: E402
from tests.redisserver import redis_server  # noqa: E402


def start_node(port: int, extra: dict[str, str], module: str = "gateway") -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CELLGATE_PORT": str(port),
        "CELLGATE_POOL_SIZE": "2",
        "CELLGATE_LOG_LEVEL": "warning",
        "CELLGATE_STORE_DIR": "/tmp/cellgate-bench-store",
        **extra,
    }
    return subprocess.Popen([sys.executable, "-m", module], env=env, cwd=ROOT)


async def relayed(url: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "cellgate_messages"
        for sample in family.samples
        if sample.name == "cellgate_messages_total" and sample.labels.get("direction") == "to_client"
    )


# Commands nodes and hosts send themselves (the scripts' own commands are counted apart
# only where no script uses them: xread, set, mget, ...).
TOP_LEVEL = ("evalsha", "eval", "hgetall", "get", "set", "mget", "smembers", "sadd", "exists", "xread", "multi")


def commands(client: redis.Redis) -> tuple[int, int]:
    """(round trips: commands sent by a node, all commands Redis executed)"""
    stats: dict[str, Any] = client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
    calls.pop("info", None)
    sent = sum(calls.get(name, 0) for name in TOP_LEVEL)
    return sent, sum(calls.values())


async def ops_per_message(c: Client, url: str, client: redis.Redis, code: str, rounds: int) -> tuple[float, ...]:
    """Per message relayed to the client: Redis round trips, all Redis commands; and
    messages per run."""
    before_msgs, (before_sent, before_all) = await relayed(url), commands(client)
    for _ in range(rounds):
        await c.execute(code, timeout=120)
        c.events.clear()
    sent, everything = commands(client)
    msgs = await relayed(url) - before_msgs
    return (sent - before_sent) / msgs, (everything - before_all) / msgs, msgs / rounds


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    n = 50 if parser.parse_args().quick else 300
    direct = Direct()
    await direct.start()
    persistent = ["appendonly yes", "appendfsync everysec"]
    clients: dict[str, Client] = {}
    with redis_server(persistent) as server, redis_server(persistent) as cluster_redis:
        nodes = {"memory": free_port(), "redis": free_port(), "cluster": free_port()}
        on_cluster = {"CELLGATE_REDIS": cluster_redis.url, "CELLGATE_REDIS_PREFIX": "bench"}
        procs = [
            start_node(nodes["memory"], {}),
            start_node(nodes["redis"], {"CELLGATE_REDIS": server.url, "CELLGATE_REDIS_PREFIX": "bench"}),
            start_node(0, on_cluster, module="kernels.host"),
            start_node(nodes["cluster"], {**on_cluster, "CELLGATE_REMOTE_KERNELS": "true"}),
        ]
        try:
            for name, port in nodes.items():
                await wait_ready(f"http://127.0.0.1:{port}")
                clients[name] = Client(f"http://127.0.0.1:{port}", transports=["websocket"], timeout=60)
                await clients[name].connect()

            async def through(c: Client, code: str) -> None:
                run = await c.execute(code, timeout=120)
                assert run.result == {"text/plain": "2"}
                c.events.clear()

            paths = {
                "jupyter_client direct": direct.run,
                "Cellgate, in-process registry": lambda code: through(clients["memory"], code),
                "Cellgate, Redis registry": lambda code: through(clients["redis"], code),
                "Cellgate, node + Redis + kernel host": lambda code: through(clients["cluster"], code),
            }
            rt = await interleaved(paths, "1+1", n)

            costs = {}
            for name, where in (("Redis registry", server), ("node + kernel host", cluster_redis)):
                key = "redis" if where is server else "cluster"
                counter = redis.Redis.from_url(where.url)
                node_url = f"http://127.0.0.1:{nodes[key]}"
                costs[name] = (
                    await ops_per_message(clients[key], node_url, counter, "1+1", 50),
                    await ops_per_message(clients[key], node_url, counter, FLOOD, 3),
                )
                counter.close()
        finally:
            await close_all(clients.values(), procs)
            await direct.stop()

    d_med = summary(rt["jupyter_client direct"])[0]
    print(f"\nwarm 1+1 round trip, {n} rounds each, one gateway node over WebSocket")
    print(f"{'path':34} {'median ms':>10} {'p90 ms':>9} {'x direct':>9}")
    for name, samples in rt.items():
        med, p90 = summary(samples)
        print(f"{name:34} {med:10.2f} {p90:9.2f} {med / d_med:9.2f}")
    print("\nRedis per message relayed to the client (INFO commandstats): round trips, and every")
    print("command executed, those inside the Lua scripts included")
    for name, (small, flood) in costs.items():
        print(f"  {name}")
        for what, (trips, everything, per_run) in (("1+1", small), ("20,000-line flood", flood)):
            print(f"    {what:18} ({per_run:.0f} messages a run): {trips:.2f} round trips, {everything:.2f} commands")


if __name__ == "__main__":
    asyncio.run(main())
