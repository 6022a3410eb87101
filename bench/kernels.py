"""Kernel start-up, memory and one-shot throughput, next to the references, in one run.

    .venv/bin/python bench/kernels.py            # full run (a few minutes)
    .venv/bin/python bench/kernels.py --quick    # fewer rounds

Measures, on loopback:
  * a fresh kernel (no pool) from the request to its first `1+1` result: Cellgate's
    fork server, a cold jupyter_client start, and Jupyter Kernel Gateway creating a
    kernel (installed into bench/.venv-jkg on first use, for this benchmark only);
  * proportional set size (PSS) per idle kernel, forked and cold, and how many idle
    kernels fit in 4 GiB;
  * sustained one-shot throughput through a Cellgate node: new session -> `1+1`
    result -> session end, back to back from several clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp

from bench.latency import direct_manager, free_port, start_gateway, summary
from gateway.app import create_fork_server
from gateway.client import Client
from gateway.config import Config
from kernels.kernel import Incoming, Kernel, KernelSpec

HERE = os.path.dirname(os.path.abspath(__file__))
JKG_VENV = os.path.join(HERE, ".venv-jkg")
JKG_VERSION = "3.0.1"


def show(name: str, samples: list[float], reference: float | None = None) -> float:
    median, p90 = summary(samples)
    ratio = f"{median / reference:5.2f}x" if reference else "   ref"
    print(f"  {name:<44} median {median:7.1f} ms   p90 {p90:7.1f} ms   {ratio}")
    return median


# -- a fresh kernel to its first result -----------------------------------------------


async def first_result(kernel: Kernel) -> None:
    done = asyncio.get_running_loop().create_future()

    def listener(incoming: Incoming) -> None:
        msg = incoming.msg
        if msg["header"]["msg_type"] == "execute_result" and not done.done():
            done.set_result(msg["content"]["data"]["text/plain"])

    kernel.set_listener(listener)
    kernel.send("shell", kernel.make_message("execute_request", {"code": "1+1"}))
    assert await asyncio.wait_for(done, 60) == "2"


async def forked(rounds: int, root: str) -> list[float]:
    fork_server = create_fork_server(Config(workdir_root=root))
    assert fork_server is not None
    await fork_server.start()
    spec = KernelSpec(workdir_root=root, fork_server=fork_server)
    out = []
    try:
        for i in range(rounds + 2):
            await asyncio.sleep(0.3)  # the previous kernel's teardown is not this one's cost
            began = time.perf_counter()
            kernel = await Kernel.start(spec)
            await first_result(kernel)
            if i >= 2:  # the first two warm the fork server's page cache
                out.append((time.perf_counter() - began) * 1000)
            await kernel.shutdown()
    finally:
        await fork_server.close()
    return out


async def cold(rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        await asyncio.sleep(0.3)
        began = time.perf_counter()
        km = direct_manager()
        await km.start_kernel()
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)  # a client must, or IOPub may miss the result
        msg_id = kc.execute("1+1")
        while True:
            msg = await kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_result":
                break
        out.append((time.perf_counter() - began) * 1000)
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    return out


# -- Jupyter Kernel Gateway -------------------------------------------------------------


def jkg_python() -> str:
    python = os.path.join(JKG_VENV, "bin", "python")
    if not os.path.exists(python):
        print(f"  (installing jupyter-kernel-gateway {JKG_VERSION} into {JKG_VENV})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", JKG_VENV], check=True)
        # pip's own chatter (index warnings) is shown only if the install fails.
        done = subprocess.run(
            [python, "-m", "pip", "install", "--quiet", f"jupyter-kernel-gateway=={JKG_VERSION}", "ipykernel"],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            sys.exit(f"installing jupyter-kernel-gateway failed:\n{done.stdout}{done.stderr}")
    return python


def start_jkg(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [jkg_python(), "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wait_api(http: aiohttp.ClientSession, base: str, headers: dict[str, str] | None = None) -> None:
    for _ in range(300):
        try:
            async with http.get(base + "/api", headers=headers) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no Jupyter API at {base}")


async def api_first_result(http: aiohttp.ClientSession, base: str, headers: dict[str, str] | None = None) -> float:
    """Milliseconds from POST /api/kernels to the first `1+1` result on its channels
    WebSocket, as a Jupyter client does it; the kernel is deleted afterwards."""
    began = time.perf_counter()
    async with http.post(base + "/api/kernels", json={"name": "python3"}, headers=headers) as r:
        kernel_id = (await r.json())["id"]
    async with http.ws_connect(f"{base}/api/kernels/{kernel_id}/channels", headers=headers) as ws:
        msg_id = uuid.uuid4().hex
        request = {
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": "b", "username": "b"},
            "parent_header": {},
            "metadata": {},
            "content": {"code": "1+1", "silent": False},
            "channel": "shell",
        }
        await ws.send_str(json.dumps(request))
        async for frame in ws:
            msg = json.loads(frame.data)
            if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "execute_result":
                break
    elapsed = (time.perf_counter() - began) * 1000
    async with http.delete(f"{base}/api/kernels/{kernel_id}", headers=headers):
        pass
    return elapsed


async def jkg(rounds: int) -> list[float]:
    port = free_port()
    proc = start_jkg(port)
    base = f"http://127.0.0.1:{port}"
    out = []
    try:
        async with aiohttp.ClientSession() as http:
            await wait_api(http, base)
            for _ in range(rounds):
                await asyncio.sleep(0.3)
                out.append(await api_first_result(http, base))
    finally:
        proc.terminate()
        proc.wait(10)
    return out


# -- memory ---------------------------------------------------------------------------


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                pids += tree(int(child))
    except OSError:
        pass
    return pids


async def memory(n: int, root: str) -> tuple[float, float]:
    """Mean PSS (MB) of an idle kernel, every process of it counted: forked, then cold."""
    fork_server = create_fork_server(Config(workdir_root=root))
    assert fork_server is not None
    spec = KernelSpec(workdir_root=root, fork_server=fork_server)
    kernels = [await Kernel.start(spec) for _ in range(n)]
    for k in kernels:
        await first_result(k)
    await asyncio.sleep(2)
    forked_pss = [sum(pss_kb(p) for p in tree(k.pid)) for k in kernels]
    for k in kernels:
        await k.shutdown()
    await fork_server.close()
    managers = []
    for _ in range(n):
        km = direct_manager()
        await km.start_kernel()
        managers.append(km)
    await asyncio.sleep(4)
    cold_pss = [sum(pss_kb(p) for p in tree(km.provisioner.pid)) for km in managers]
    for km in managers:
        await km.shutdown_kernel(now=True)
    return sum(forked_pss) / n / 1024, sum(cold_pss) / n / 1024


# -- one-shot throughput ----------------------------------------------------------------


async def one_shots(clients: int, per_client: int) -> tuple[float, list[float]]:
    port = free_port()
    proc = start_gateway(port)
    url = f"http://127.0.0.1:{port}"
    from bench.latency import wait_ready

    latencies: list[float] = []
    try:
        await wait_ready(url)

        async def client() -> None:
            for _ in range(per_client):
                began = time.perf_counter()
                c = Client(url, transports=["websocket"], timeout=60)
                await c.connect()
                run = await c.execute("1+1")
                assert run.result == {"text/plain": "2"}
                await c.shutdown()
                latencies.append((time.perf_counter() - began) * 1000)
                await c.drop()

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
    return clients * per_client / elapsed, latencies


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-jkg", action="store_true", help="skip Jupyter Kernel Gateway")
    args = parser.parse_args()
    rounds = 8 if args.quick else 20
    root = tempfile.mkdtemp(prefix="cellgate-bench-kernels-")
    os.chmod(root, 0o711)

    print(f"fresh kernel, no pool: request -> first 1+1 result ({rounds} rounds each)")
    cold_ms = cold(rounds)
    reference = show("jupyter_client cold start", await cold_ms)
    show("Cellgate fork server", await forked(rounds, root), reference)
    if not args.no_jkg:
        show("Jupyter Kernel Gateway (POST /api/kernels)", await jkg(rounds), reference)

    n = 4 if args.quick else 8
    forked_mb, cold_mb = await memory(n, root)
    print(f"idle kernel PSS ({n} of each, all their processes)")
    print(f"  {'Cellgate forked kernel':<44} {forked_mb:6.1f} MB   {int(4096 / forked_mb):4d} per 4 GiB")
    print(f"  {'jupyter_client cold kernel':<44} {cold_mb:6.1f} MB   {int(4096 / cold_mb):4d} per 4 GiB")

    clients, per_client = (4, 10) if args.quick else (4, 40)
    rate, latencies = await one_shots(clients, per_client)
    print(f"one-shot sessions through a node (pool of 2), {clients} clients x {per_client}")
    median, p90 = summary(latencies)
    print(f"  {'new session -> 1+1 -> end':<44} {rate:6.1f} /s   median {median:7.1f} ms   p90 {p90:7.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
