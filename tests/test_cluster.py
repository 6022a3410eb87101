"""Gateway nodes and kernel hosts as separate processes, meeting in a real redis-server:
a node killed mid-output, a kernel host killed mid-run. Clients connect to the nodes
directly (a balancer comes in front of them in production)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
import pytest_asyncio

from gateway.client import Client, Refused
from tests.cluster import Cluster
from tests.conftest import ROOT, unprivileged
from tests.redisserver import RedisServer, redis_server
from tests.s3server import S3Server

pytestmark = pytest.mark.timeout(240)


def seqs(c: Client) -> list[int]:
    return [d["seq"] for _, d in c.events if isinstance(d.get("seq"), int)]


@pytest.fixture(scope="module")
def cluster_redis() -> Iterator[RedisServer]:
    with redis_server(["appendonly yes", "appendfsync everysec"]) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def cluster(cluster_redis: RedisServer, s3: S3Server, unprivileged_python: str) -> AsyncIterator[Cluster]:
    """Two kernel hosts (as root) and two gateway nodes, the second as an unprivileged
    user, sharing a bucket; tests may start and kill more."""
    directory = Path(tempfile.mkdtemp(prefix="cellgate-cluster-"))
    os.chmod(directory, 0o755)
    c = Cluster(cluster_redis.url, directory, store=s3.settings(prefix="cluster"))
    try:
        c.host(max_kernels="8", resume_grace="3")
        c.host(max_kernels="8", resume_grace="3")
        c.node(sessions_per_client="50")
        unprivileged_node = c.node(run_as=unprivileged([unprivileged_python]), sessions_per_client="50")
        for node in c.processes[2:]:
            await c.wait(node, max_kernels=16)
        # The node runs without root, and serves all the same (the tests below use it).
        assert psutil.Process(unprivileged_node.popen.pid).uids().effective != 0 or not ROOT
        yield c
    finally:
        c.stop()
        text = "".join(p.log.read_text(errors="replace") for p in c.processes)
        shutil.rmtree(directory, ignore_errors=True)
    # A host killed on purpose is told in one WARNING; nothing else may sound alarming.
    alarming = [line for line in text.splitlines() if any(w in line for w in ("ERROR", "Traceback", "Unclosed"))]
    assert alarming == [], c.logs()


async def test_a_node_killed_mid_output_loses_nothing(cluster: Cluster) -> None:
    doomed = cluster.node(sessions_per_client="50")
    survivor = cluster.processes[3]
    await cluster.wait(doomed, max_kernels=16)
    c = Client(doomed.url, transports=["websocket"], timeout=30)
    await c.connect()
    await c.execute("import time\nsecret = 41")
    code = "for i in range(60):\n    print(f'line {i}', flush=True)\n    time.sleep(0.05)\nsecret += 1"
    run = await c.execute(code, wait=False)
    await c.wait_for(lambda e, d: e == "iopub" and "line 5" in str(d.get("content", {}).get("text", "")), timeout=20)
    doomed.kill()  # SIGKILL, mid-output
    seen = c.last_seq
    await c.drop()
    again = Client(survivor.url, transports=["websocket"], timeout=30)
    info = await again.resume(c.token, c.epoch, seen)
    assert info["resumed"] and info["session"] == c.info["session"]
    await again.finish(run, start=0)
    # Every line exactly once, across the two connections, and seqs with no hole.
    assert c.collect(run).stdout + again.collect(run).stdout == "".join(f"line {i}\n" for i in range(60))
    assert seqs(c) + seqs(again) == list(range(1, again.last_seq + 1))
    # The same kernel, its variables intact.
    assert (await again.execute("secret")).result == {"text/plain": "42"}
    await again.shutdown()
    await again.drop()


async def test_a_kernel_host_killed_tells_its_clients_and_spares_the_others(cluster: Cluster) -> None:
    node = cluster.processes[2]
    bystander = Client(node.url, transports=["websocket"], timeout=30)
    await bystander.connect()
    await bystander.execute("x = 1")  # on one of the two first hosts
    # A host with the most free places takes the next session.
    doomed = cluster.host(max_kernels="32")
    await cluster.wait(node, max_kernels=48)
    victim = Client(node.url, transports=["websocket"], timeout=30)
    await victim.connect()
    await victim.execute("y = 2")
    kernels = doomed.descendants()
    assert kernels, cluster.logs()
    await victim.execute("import time\nwhile True: time.sleep(0.1)", wait=False)
    doomed.kill()

    dead = await victim.wait_event("kernel", state="dead", timeout=20)
    assert dead["reason"] == "its kernel host stopped"
    # The bystander's kernel, on another host, answers as before.
    assert (await bystander.execute("x + 1")).result == {"text/plain": "2"}
    # The victim's session goes on, on a fresh kernel: its old variables are gone.
    run = await victim.execute("y")
    assert run.error is not None and run.error["ename"] == "NameError"
    assert any(e == "kernel" and d.get("reason") == "replaced" for e, d in victim.events)
    # No kernel of the dead host outlives it.
    for _ in range(100):
        alive = [pid for pid in kernels if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not alive:
            break
        await asyncio.sleep(0.1)
    assert alive == []
    for c in (bystander, victim):
        with contextlib.suppress(Exception):
            await c.shutdown()
        await c.drop()


async def test_service_and_files_through_a_node_of_kernel_hosts(cluster: Cluster) -> None:
    node = cluster.processes[2]
    async with aiohttp.ClientSession() as http:
        code = "print('out')\nopen('made.txt', 'w').write('on a host')\n40 + 2"
        async with http.post(node.url + "/service", json={"code": code}) as r:
            body = await r.json()
        assert r.status == 200 and body["success"] and body["stdout"] == "out\n", (body, cluster.logs())
        assert [f["name"] for f in body["files"]] == ["made.txt"]
        # Stored by the host, served by any node (they share the store, as with S3).
        async with http.get(cluster.processes[3].url + body["files"][0]["url"]) as r:
            assert r.status == 200 and await r.read() == b"on a host"
        async with http.get(node.url + body["permalink"]["url"].replace("/p/", "/permalink/")) as r:
            assert (await r.json())["code"] == code


async def test_the_newest_resume_takes_the_session_from_another_node(cluster: Cluster) -> None:
    a, b = cluster.processes[2], cluster.processes[3]
    first = Client(a.url, transports=["websocket"], timeout=30)
    await first.connect()
    await first.execute("z = 3")
    second = Client(b.url, transports=["websocket"], timeout=30)
    await second.resume(first.token, first.epoch, first.last_seq)
    taken = await first.wait_event("error", code="session_taken", timeout=10)
    assert "another connection" in taken["message"]
    for _ in range(100):
        if not first.connected:
            break
        await asyncio.sleep(0.05)
    assert not first.connected
    assert (await second.execute("z * 2")).result == {"text/plain": "6"}
    await second.shutdown()
    await second.drop()
    await first.drop()


async def test_a_session_whose_client_is_gone_is_reclaimed_once_by_its_host(cluster: Cluster) -> None:
    node = cluster.processes[2]
    c = Client(node.url, transports=["websocket"], timeout=30)
    await c.connect()
    await c.execute("1")
    await c.drop()  # and never comes back: the hosts' grace is 3 s here
    await asyncio.sleep(4.5)
    again = Client(cluster.processes[3].url, transports=["websocket"], timeout=30)
    with pytest.raises(Refused) as refused:
        await again.resume(c.token, c.epoch, c.last_seq)
    assert refused.value.code == "token_invalid"
