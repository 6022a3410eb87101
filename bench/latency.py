"""Latency and throughput of Cellgate next to jupyter_client direct, in one run.

    .venv/bin/python bench/latency.py            # full run (about a minute)
    .venv/bin/python bench/latency.py --quick    # fewer rounds

Measures, on loopback:
  * warm `1+1` round trip (send -> execute_result and idle status) straight through
    jupyter_client, through Cellgate over WebSocket, and over polling;
  * new session -> first result of `1+1` (kernel from the warm pool);
  * an output flood (a loop printing 20,000 lines), direct vs through Cellgate.
The gateway runs as its own process, as in production; the client runs here. The paths
are measured interleaved, round by round, so that each sees the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jupyter_client.manager import AsyncKernelManager

from gateway.client import Client

FLOOD = "for i in range(20000): print(i)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]


async def timed_once(run: Callable[[str], Awaitable[Any]], code: str) -> float:
    began = time.perf_counter()
    await run(code)
    return (time.perf_counter() - began) * 1000


# -- jupyter_client direct ---------------------------------------------------------


def direct_manager() -> AsyncKernelManager:
    """A kernel as jupyter_client starts one, over ipc sockets like Cellgate's (its TCP
    default would warn, and would not compare like with like)."""
    return AsyncKernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(_SOCKETS.name, uuid.uuid4().hex))


_SOCKETS = tempfile.TemporaryDirectory(prefix="cellgate-bench-direct-")


class Direct:
    async def start(self) -> None:
        self.km = direct_manager()
        await self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)

    async def run(self, code: str) -> int:
        """Execute, wait for the result (if any) and idle; return stream messages seen."""
        msg_id = self.kc.execute(code)
        result = code == FLOOD
        streams = 0
        idle = False
        while not (result and idle):
            msg = await self.kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            t = msg["msg_type"]
            if t == "execute_result":
                result = True
            elif t == "stream":
                streams += 1
            elif t == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        return streams

    async def stop(self) -> None:
        self.kc.stop_channels()
        await self.km.shutdown_kernel(now=True)


# -- Cellgate ------------------------------------------------------------------------


def start_gateway(port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CELLGATE_PORT": str(port),
        "CELLGATE_POOL_SIZE": "2",
        "CELLGATE_LOG_LEVEL": "warning",
        "CELLGATE_STORE_DIR": "/tmp/cellgate-bench-store",
        "CELLGATE_SESSIONS_PER_CLIENT": "100",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway"], env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    )
    return proc


async def wait_ready(url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url + "/health") as r:
                    body = await r.json()
                    if body["kernels"]["warm"] >= 2:
                        return
            except Exception:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("gateway did not become ready")


async def interleaved(paths: dict[str, Callable[[str], Awaitable[Any]]], code: str, n: int) -> dict[str, list[float]]:
    """`n` timed rounds of `code` on each path, after 10 untimed ones. Interleaved, round
    by round, so that every path sees the same machine: on a small shared host,
    minutes apart can differ by more than the paths do."""
    for path in paths.values():
        for _ in range(10):
            await path(code)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(n):
        for name, path in paths.items():
            times[name].append(await timed_once(path, code))
    return times


async def close_all(clients: Any, procs: list[subprocess.Popen[bytes]]) -> None:
    """End every client's session, then stop the processes."""
    for c in clients:
        await c.shutdown()
        await c.drop()
    for proc in procs:
        proc.terminate()
        proc.wait(30)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 50 if args.quick else 300
    floods = 3 if args.quick else 9
    rows: list[tuple[str, list[float], str]] = []

    direct = Direct()
    await direct.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_gateway(port)
    try:
        await wait_ready(url)
        clients = {"websocket": Client(url, transports=["websocket"]), "polling": Client(url, transports=["polling"])}
        for c in clients.values():
            await c.connect()
            await c.execute("1+1")
        await wait_ready(url)  # the pool has refilled behind the two sessions

        async def cellgate(c: Client, code: str) -> None:
            run = await c.execute(code, timeout=120)
            if code == FLOOD:
                assert run.stdout.count("\n") == 20000
            else:
                assert run.result == {"text/plain": "2"}
            c.events.clear()  # keep the client's memory flat over many rounds

        paths: dict[str, Callable[[str], Awaitable[Any]]] = {
            "direct": direct.run,
            "websocket": lambda code: cellgate(clients["websocket"], code),
            "polling": lambda code: cellgate(clients["polling"], code),
        }
        rt = await interleaved(paths, "1+1", n)
        flood: dict[str, list[float]] = {"direct": [], "websocket": []}
        for name in flood:
            await paths[name](FLOOD)  # warm-up
        for _ in range(floods):
            for name in flood:
                flood[name].append(await timed_once(paths[name], FLOOD))
        for c in clients.values():
            await c.shutdown()
            await c.drop()

        async def new_session() -> None:
            c = Client(url)
            began = time.perf_counter()
            await c.connect()
            run = await c.execute("1+1")
            took = (time.perf_counter() - began) * 1000
            assert run.result == {"text/plain": "2"}
            new_times.append(took)
            await c.shutdown()
            await c.drop()
            await wait_ready(url)  # the pool is back to full before the next round

        new_times: list[float] = []
        for _ in range(10 if args.quick else 30):
            await new_session()
    finally:
        proc.terminate()
        proc.wait(10)
        await direct.stop()

    d_med = summary(rt["direct"])[0]
    rows.append(("warm 1+1, jupyter_client direct", rt["direct"], "reference"))
    rows.append(("warm 1+1, Cellgate websocket", rt["websocket"], "target <= 1.30 x direct"))
    rows.append(("warm 1+1, Cellgate polling", rt["polling"], ""))
    rows.append(("new session -> first 1+1 result", new_times, "target <= 30 ms"))
    print(f"\n{'what':40} {'median ms':>10} {'p90 ms':>9} {'x direct':>9}  note")
    for what, samples, note in rows:
        med, p90 = summary(samples)
        ratio = f"{med / d_med:.2f}" if "1+1," in what else ""
        print(f"{what:40} {med:10.2f} {p90:9.2f} {ratio:>9}  {note}")
    fd, fc = summary(flood["direct"])[0], summary(flood["websocket"])[0]
    print(
        f"\noutput flood, 20,000 lines: direct {fd:.0f} ms, Cellgate {fc:.0f} ms "
        f"-> Cellgate at {100 * fd / fc:.0f} % of direct (target >= 90 %)"
    )


if __name__ == "__main__":
    asyncio.run(main())
