"""Latency and throughput of Cellgate next to jupyter_client direct, in one run.

    .venv/bin/python bench/latency.py            # full run (about a minute)
    .venv/bin/python bench/latency.py --quick    # fewer rounds

Measures, on loopback:
  * warm `1+1` round trip (send -> execute_result and idle status) straight through
    jupyter_client, through Cellgate over WebSocket, and over polling;
  * new session -> first result of `1+1` (kernel from the warm pool);
  * an output flood (a loop printing 20,000 lines), direct vs through Cellgate.
The gateway runs as its own process, as in production; the client runs here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

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


async def timed(n: int, once: Callable[[], Awaitable[None]], warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        await once()
    out = []
    for _ in range(n):
        began = time.perf_counter()
        await once()
        out.append((time.perf_counter() - began) * 1000)
    return out


# -- jupyter_client direct ---------------------------------------------------------


class Direct:
    async def start(self) -> None:
        self.km = AsyncKernelManager(kernel_name="python3")
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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 50 if args.quick else 300
    rows: list[tuple[str, list[float], str]] = []

    direct = Direct()
    await direct.start()
    d_rt = await timed(n, lambda: direct.run("1+1"))
    flood_direct = await timed(3 if args.quick else 5, lambda: direct.run(FLOOD), warmup=1)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_gateway(port)
    try:
        await wait_ready(url)
        results = {}
        for name, transports in (("websocket", ["websocket"]), ("polling", ["polling"])):
            c = Client(url, transports=transports)
            await c.connect()
            await c.execute("1+1")

            async def once(c: Client = c) -> None:
                run = await c.execute("1+1")
                assert run.result == {"text/plain": "2"}
                c.events.clear()  # keep the client's memory flat over many rounds

            results[name] = await timed(n, once)
            if name == "websocket":

                async def flood(c: Client = c) -> None:
                    run = await c.execute(FLOOD, timeout=120)
                    assert run.stdout.count("\n") == 20000
                    c.events.clear()

                results["flood"] = await timed(3 if args.quick else 5, flood, warmup=1)
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

    d_med = summary(d_rt)[0]
    rows.append(("warm 1+1, jupyter_client direct", d_rt, "reference"))
    rows.append(("warm 1+1, Cellgate websocket", results["websocket"], "target <= 1.30 x direct"))
    rows.append(("warm 1+1, Cellgate polling", results["polling"], ""))
    rows.append(("new session -> first 1+1 result", new_times, "target <= 30 ms"))
    print(f"\n{'what':40} {'median ms':>10} {'p90 ms':>9} {'x direct':>9}  note")
    for what, samples, note in rows:
        med, p90 = summary(samples)
        ratio = f"{med / d_med:.2f}" if "1+1," in what else ""
        print(f"{what:40} {med:10.2f} {p90:9.2f} {ratio:>9}  {note}")
    fd, fc = summary(flood_direct)[0], summary(results["flood"])[0]
    print(
        f"\noutput flood, 20,000 lines: direct {fd:.0f} ms, Cellgate {fc:.0f} ms "
        f"-> Cellgate at {100 * fd / fc:.0f} % of direct (target >= 90 %)"
    )


if __name__ == "__main__":
    asyncio.run(main())
