"""Jupyter's kernels API: Cellgate next to Jupyter Kernel Gateway, in one run.

    .venv/bin/python bench/jupyter_api.py            # 20 rounds each
    .venv/bin/python bench/jupyter_api.py --quick    # 8 rounds each

What a Jupyter client waits for when it opens a notebook: `POST /api/kernels`, then the
channels WebSocket, then the first `1+1` result; the kernel is deleted after each round.
Measured interleaved, round by round, on loopback:
  * Cellgate with its warm pool (the default, 2 kernels kept ready);
  * Cellgate with no pool (each kernel forked on demand by the fork server);
  * Jupyter Kernel Gateway with its defaults (installed into bench/.venv-jkg on first
    use, for this benchmark only), which starts a kernel process per request.
Every server runs as its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp

from bench.kernels import api_first_result, free_port, start_jkg, wait_api
from bench.latency import summary

TOKEN = "bench-jupyter-api-token"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_cellgate(port: int, pool: int, store: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CELLGATE_PORT": str(port),
        "CELLGATE_POOL_SIZE": str(pool),
        "CELLGATE_LOG_LEVEL": "warning",
        "CELLGATE_STORE_DIR": store,
        "CELLGATE_JUPYTER_API_TOKENS": TOKEN,
        "CELLGATE_JUPYTER_API_KERNELS_PER_TOKEN": "100",
    }
    return subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=ROOT)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    rounds = 8 if parser.parse_args().quick else 20
    store = tempfile.mkdtemp(prefix="cellgate-bench-jupyter-")
    ports = {"warm": free_port(), "no pool": free_port(), "jkg": free_port()}
    procs = [
        start_cellgate(ports["warm"], 2, store),
        start_cellgate(ports["no pool"], 0, store),
        start_jkg(ports["jkg"]),
    ]
    auth = {"Authorization": f"token {TOKEN}"}
    paths = {
        "Cellgate, warm pool": (f"http://127.0.0.1:{ports['warm']}", auth),
        "Cellgate, no pool (fork server)": (f"http://127.0.0.1:{ports['no pool']}", auth),
        "Jupyter Kernel Gateway": (f"http://127.0.0.1:{ports['jkg']}", None),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    try:
        async with aiohttp.ClientSession() as http:
            for base, headers in paths.values():
                await wait_api(http, base, headers)
            for base, headers in paths.values():  # one untimed round each
                await api_first_result(http, base, headers)
            for _ in range(rounds):
                for name, (base, headers) in paths.items():
                    await asyncio.sleep(0.5)  # a warm pool refills between rounds, as between users
                    times[name].append(await api_first_result(http, base, headers))
    finally:
        for proc in procs:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)

    reference = summary(times["Jupyter Kernel Gateway"])[0]
    print(f"\nPOST /api/kernels -> channels WebSocket -> first 1+1 result, {rounds} rounds each")
    print(f"{'server':34} {'median ms':>10} {'p90 ms':>9} {'x JKG':>7}")
    for name, samples in times.items():
        med, p90 = summary(samples)
        print(f"{name:34} {med:10.1f} {p90:9.1f} {med / reference:7.2f}")


if __name__ == "__main__":
    asyncio.run(main())
