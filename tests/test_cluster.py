"""Gateway nodes and kernel hosts as separate processes, meeting in a real redis-server:
a node killed mid-output, a kernel host killed mid-run. Clients connect to the nodes
directly (a balancer comes in front of them in production)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
import pytest_asyncio
from redis import Redis

from gateway.client import Client, Refused
from tests.cluster import Cluster
from tests.conftest import ROOT, unprivileged
from tests.redisserver import RedisServer, redis_server
from tests.s3server import S3Server

pytestmark = pytest.mark.timeout(240)


def client(url: str) -> Client:
    return Client(url, transports=["websocket"], timeout=30)


def seqs(c: Client) -> list[int]:
    return [d["seq"] for _, d in c.events if isinstance(d.get("seq"), int)]


@pytest.fixture(scope="module")
def cluster_redis() -> Iterator[RedisServer]:
    with redis_server(["appendonly yes", "appendfsync everysec"]) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def cluster(
    cluster_redis: RedisServer, s3: S3Server, unprivileged_python: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Cluster]:
    """Two kernel hosts (as root) and two gateway nodes, the second as an unprivileged
    user, sharing a bucket; tests may start and kill more."""
    directory = Path(tempfile.mkdtemp(prefix="cellgate-cluster-"))
    os.chmod(directory, 0o755)
    c = Cluster(cluster_redis.url, directory, store=s3.settings(prefix="cluster"))
    try:
        c.host(max_kernels="8", resume_grace="3")
        c.host(max_kernels="8", resume_grace="3")
        c.node(sessions_per_client="50", service_timeout="60")
        unprivileged_node = c.node(run_as=unprivileged([unprivileged_python]), sessions_per_client="50")
        for node in c.processes[2:]:
            await c.wait(node, max_kernels=16, warm=2)  # each host has its warm kernel
        # The node runs without root, and serves all the same (the tests below use it).
        assert psutil.Process(unprivileged_node.popen.pid).uids().effective != 0 or not ROOT
        yield c
    finally:
        c.stop()
        text = "".join(f"--- {p.log.name}\n" + p.log.read_text(errors="replace") for p in c.processes)
        # Kept with pytest's temporary files, for a look after a failure.
        (tmp_path_factory.mktemp("cluster-logs") / "processes.log").write_text(text)
        shutil.rmtree(directory, ignore_errors=True)
    # A host killed on purpose is told in one WARNING; nothing else may sound alarming but
    # python-socketio's own line while Redis restarts ("Cannot receive from redis...").
    alarming = [
        line
        for line in text.splitlines()
        if any(w in line for w in ("ERROR", "Traceback", "Unclosed")) and "Cannot receive from redis" not in line
    ]
    assert alarming == [], text[-6000:]


async def test_a_node_killed_mid_output_loses_nothing(cluster: Cluster) -> None:
    doomed = cluster.node(sessions_per_client="50")
    survivor = cluster.processes[3]
    await cluster.wait(doomed, max_kernels=16)
    c = client(doomed.url)
    await c.connect()
    await c.execute("import time\nsecret = 41")
    code = "for i in range(60):\n    print(f'line {i}', flush=True)\n    time.sleep(0.05)\nsecret += 1"
    run = await c.execute(code, wait=False)
    await c.wait_for(lambda e, d: e == "iopub" and "line 5" in str(d.get("content", {}).get("text", "")), timeout=20)
    doomed.kill()  # SIGKILL, mid-output
    seen = c.last_seq
    await c.drop()
    again = client(survivor.url)
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
    bystander = client(node.url)
    await bystander.connect()
    await bystander.execute("x = 1")  # on one of the two first hosts
    # A host with the most free places takes the next session.
    doomed = cluster.host(max_kernels="32")
    await cluster.wait(node, max_kernels=48)
    victim = client(node.url)
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
    await cluster.wait(node, max_kernels=16, warm=2)  # both pools refilled after the tests before
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


async def test_service_is_refused_at_once_when_the_hosts_have_no_kernel_place(
    cluster: Cluster, cluster_redis: RedisServer, s3: S3Server
) -> None:
    # A cluster of its own (another key prefix) with one place: a session holds it.
    tight = Cluster(cluster_redis.url, cluster.directory, store=s3.settings(prefix="tight"), prefix="tight")
    try:
        tight.host(max_kernels="1", queue_timeout="1")
        node = tight.node()
        await tight.wait(node, max_kernels=1)
        async with client(node.url) as holder:
            await holder.execute("1")
            async with aiohttp.ClientSession() as http, http.post(node.url + "/service", json={"code": "2"}) as r:
                body = await r.json()
            assert r.status == 429 and body["error"]["code"] == "capacity_node", body
            await holder.shutdown()
    finally:
        tight.stop()


async def test_the_newest_resume_takes_the_session_from_another_node(cluster: Cluster) -> None:
    a, b = cluster.processes[2], cluster.processes[3]
    first = client(a.url)
    await first.connect()
    await first.execute("z = 3")
    second = client(b.url)
    await second.resume(first.token, first.epoch, first.last_seq)
    taken = await first.wait_event("error", code="session_taken", timeout=10)
    assert "another connection" in taken["message"]
    for _ in range(100):
        if not first.connected:
            break
        await asyncio.sleep(0.05)
    assert not first.connected
    assert (await second.execute("z * 2")).result == {"text/plain": "6"}
    # A restart asked on this node is done by the session's host: a fresh kernel.
    ready = await second.restart()
    assert ready["reason"] == "restarted"
    assert (await second.execute("'z' in dir()")).result == {"text/plain": "False"}
    await second.shutdown()
    await second.drop()
    await first.drop()


async def test_a_session_whose_client_is_gone_is_reclaimed_once_by_its_host(cluster: Cluster) -> None:
    node = cluster.processes[2]
    c = client(node.url)
    await c.connect()
    await c.execute("1")
    await c.drop()  # and never comes back: the hosts' grace is 3 s here
    await asyncio.sleep(4.5)
    again = client(cluster.processes[3].url)
    with pytest.raises(Refused) as refused:
        await again.resume(c.token, c.epoch, c.last_seq)
    assert refused.value.code == "token_invalid"


async def test_the_message_rate_of_a_session_holds_across_nodes(cluster: Cluster) -> None:
    slow = [cluster.node(message_rate="0.5", message_burst="6") for _ in range(2)]
    for node in slow:
        await cluster.wait(node, max_kernels=16)
    a = client(slow[0].url)
    await a.connect()
    for _ in range(5):
        await a.request("shell", "kernel_info_request", {})
    b = client(slow[1].url)
    await b.resume(a.token, a.epoch, None)  # the same session, through another node
    refused = 0
    for _ in range(4):
        try:
            await b.request("shell", "kernel_info_request", {})
        except Refused as exc:
            assert exc.code == "rate_limited"
            refused += 1
    assert refused >= 2  # six in all fit the burst; the node did not start a bucket of its own
    await asyncio.sleep(2.5)  # refilled at half a message a second
    assert (await b.execute("2 + 2")).result == {"text/plain": "4"}
    await b.shutdown()
    await b.drop()
    await a.drop()
    for node in slow:
        node.stop()


async def test_a_host_that_stalled_past_its_heartbeat_lets_go_of_what_went_elsewhere(
    cluster: Cluster, cluster_redis: RedisServer
) -> None:
    node = cluster.processes[2]
    before = (await cluster.health(node))["max_kernels"]
    stalled = cluster.host(max_kernels="64")  # the most free places: the next session is its
    await cluster.wait(node, max_kernels=before + 64)
    c = client(node.url)
    await c.connect()
    await c.execute("w = 1")
    stalled.popen.send_signal(signal.SIGSTOP)  # alive, but silent past its heartbeat
    try:
        dead = await c.wait_event("kernel", state="dead", timeout=30)
        assert dead["reason"] == "its kernel host stopped"
    finally:
        stalled.popen.send_signal(signal.SIGCONT)
    run = await c.execute("w")  # goes on, on a fresh kernel of another host
    assert run.error is not None and run.error["ename"] == "NameError"

    # Back, the stalled host sees it was taken for dead and ends the kernel it held.
    redis = Redis.from_url(cluster_redis.url)
    try:
        for _ in range(100):
            reports = [json.loads(v) for k in redis.keys("cluster:host:*") if (v := redis.get(k))]
            mine = [r for r in reports if r.get("max_kernels") == 64]
            if mine and mine[0]["kernels"]["attached"] == 0:
                break
            await asyncio.sleep(0.1)
        assert mine and mine[0]["kernels"]["attached"] == 0, reports
    finally:
        redis.close()
    await c.shutdown()
    await c.drop()
    stalled.stop()


async def test_redis_restarted_mid_run_leaves_no_silent_hole(cluster: Cluster, cluster_redis: RedisServer) -> None:
    # Last in this module: it restarts the cluster's Redis (append-only, as deployed).
    node = cluster.processes[2]
    c = client(node.url)
    await c.connect()
    await c.execute("import time")
    code = "for i in range(60):\n    print(f'line {i}', flush=True)\n    time.sleep(0.05)"
    run = await c.execute(code, wait=False)
    await c.wait_for(lambda e, d: e == "iopub" and "line 10" in str(d.get("content", {}).get("text", "")), timeout=20)
    cluster_redis.stop(signal.SIGKILL)
    await asyncio.sleep(0.5)
    cluster_redis.start()
    await c.finish(run, timeout=60)
    # The connected client has every line once, in order, with seqs that never skip.
    assert c.collect(run).stdout == "".join(f"line {i}\n" for i in range(60))
    assert seqs(c) == list(range(1, c.last_seq + 1))
    # Resuming from the start, through the other node: all of it, or a gap told first.
    again = client(cluster.processes[3].url)
    await again.resume(c.token, c.epoch, 0)
    await again.wait_for(lambda e, d: d.get("seq") == c.last_seq, timeout=20)
    gaps = [d for e, d in again.events if e == "error" and d.get("code") == "replay_gap"]
    if gaps:
        assert again.events[0] == ("error", gaps[0])
        assert seqs(again) == list(range(gaps[0]["first"], c.last_seq + 1))
    else:
        assert seqs(again) == list(range(1, c.last_seq + 1))
    # The same kernel. (A message that meets a connection Redis dropped is refused with
    # capacity_node, not queued, and a client sends it again.)
    for attempt in range(3):
        try:
            assert (await again.execute("i")).result == {"text/plain": "59"}
            break
        except Refused as exc:
            assert exc.code == "capacity_node" and attempt < 2
            await asyncio.sleep(0.5)
    await again.shutdown()
    await again.drop()
    await c.drop()
