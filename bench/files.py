"""How long a client waits for the link of a file the code wrote, per blob store.

    .venv/bin/python bench/files.py            # 40 rounds per store
    .venv/bin/python bench/files.py --quick    # 10 rounds

Each round runs code that writes 1 MiB of fresh random bytes and times, at the client,
from the `execute_reply` to the `files` event that carries the URL. Two gateway nodes
run as their own processes, one on the local directory store and one on S3 (moto's
server over loopback, started here); the rounds alternate between them so that both
see the same machine. moto is a Python development server, so the S3 column measures
the node's path plus a slow S3, not AWS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.latency import close_all, free_port, wait_ready  # noqa: E402
from gateway.client import Client  # noqa: E402
from tests.s3server import REGION, s3_server  # noqa: E402

CODE = "import os\nopen('one-mib.bin', 'wb').write(os.urandom(1 << 20))"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true"}


class TimedClient(Client):
    """Notes when each event arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrived: list[float] = []

    async def _received(self, event: str, data: Any) -> None:
        self.arrived.append(time.perf_counter())
        await super()._received(event, data)


def start_node(port: int, store_dir: str, extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **CREDENTIALS,
        "CELLGATE_PORT": str(port),
        "CELLGATE_POOL_SIZE": "2",
        "CELLGATE_LOG_LEVEL": "warning",
        "CELLGATE_STORE_DIR": store_dir,
        **extra,
    }
    return subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=ROOT)


async def one_round(c: TimedClient) -> float:
    start = len(c.events)
    run = await c.execute(CODE)
    files = await c.wait_event("files", msg_id=run.msg_id, start=start)
    assert files["files"][0]["url"], files
    reply = next(
        i
        for i, (e, d) in enumerate(c.events)
        if i >= start and e == "shell" and d["parent_header"].get("msg_id") == run.msg_id
    )
    got = next(i for i, (e, d) in enumerate(c.events) if i >= start and e == "files" and d["msg_id"] == run.msg_id)
    return (c.arrived[got] - c.arrived[reply]) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    rounds = 10 if parser.parse_args().quick else 40
    os.environ.update(CREDENTIALS)
    clients: dict[str, TimedClient] = {}
    with s3_server() as s3, tempfile.TemporaryDirectory(prefix="cellgate-bench-files-") as tmp:
        s3.client().create_bucket(Bucket=s3.bucket)
        settings = {
            "CELLGATE_S3_BUCKET": s3.bucket,
            "CELLGATE_S3_ENDPOINT_URL": s3.url,
            "CELLGATE_S3_REGION": REGION,
        }
        nodes = {"local": free_port(), "s3 (moto)": free_port()}
        procs = [
            start_node(nodes["local"], os.path.join(tmp, "local"), {}),
            start_node(nodes["s3 (moto)"], os.path.join(tmp, "s3"), settings),
        ]
        try:
            for name, port in nodes.items():
                await wait_ready(f"http://127.0.0.1:{port}")
                clients[name] = TimedClient(f"http://127.0.0.1:{port}", transports=["websocket"], timeout=60)
                await clients[name].connect()
                await one_round(clients[name])  # warm-up: the kernel attached, the first connection made
            samples: dict[str, list[float]] = {name: [] for name in nodes}
            for _ in range(rounds):
                for name, c in clients.items():
                    samples[name].append(await one_round(c))
        finally:
            await close_all(clients.values(), procs)
    print(f"execute_reply -> files event, 1 MiB file, {rounds} rounds each (ms)")
    print(f"{'store':<12}{'median':>10}{'p90':>10}")
    for name, values in samples.items():
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
        print(f"{name:<12}{statistics.median(ordered):>10.1f}{p90:>10.1f}")


if __name__ == "__main__":
    asyncio.run(main())
