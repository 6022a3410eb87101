"""The cluster in production shape: HAProxy with the project's own infra/haproxy.cfg in
front of three gateway nodes, two kernel hosts and redis-server, all real processes on
loopback. Clients on WebSocket and on polling (one without cookies) run a cell that
prints a numbered line every 50 ms while a node is killed, a node drains, Redis
restarts, or a kernel host drains; each must see every line exactly once, on the same
kernel."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from gateway.client import Client, parent_id
from tests.cluster import Cluster, Process
from tests.haproxy import HAProxy, haproxy
from tests.redisserver import RedisServer, redis_server
from tests.s3server import S3Server
from tests.test_infra import alert_metrics, dashboard_metrics

ADMIN = "admin-token-for-the-cluster-tests"
LINES = 100  # one every 50 ms: five seconds of output
COUNT = f"import time\nfor i in range({LINES}):\n    print(f'line {{i}}', flush=True)\n    time.sleep(0.05)\n"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server(["appendonly yes", "appendfsync always"]) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def setup(redis: RedisServer, s3: S3Server) -> AsyncIterator[tuple[Cluster, HAProxy, list[Process]]]:
    directory = Path(tempfile.mkdtemp(prefix="cellgate-haproxy-"))
    os.chmod(directory, 0o755)
    cluster = Cluster(redis.url, directory, store=s3.settings(prefix="haproxy"), prefix="ha")
    proxy = haproxy(directory)
    try:
        for _ in range(2):
            cluster.host(max_kernels="12", pool_size="2", resume_grace="20", drain_timeout="30")
        nodes = [node(cluster) for _ in range(3)]
        for n in nodes:
            await cluster.wait(n, max_kernels=24, warm=4)
        proxy.start([n.port for n in nodes])
        await until_up(proxy, 3)
        yield cluster, proxy, nodes
    finally:
        proxy.stop()
        cluster.stop()
        logs = cluster.logs() + (directory / "haproxy.log").read_text(errors="replace")[-2000:]
        shutil.rmtree(directory, ignore_errors=True)
        for line in logs.splitlines():  # a kill, a drain and a Redis restart are normal operation
            assert " ERROR " not in line and "Traceback" not in line and "Unclosed" not in line, logs


def node(cluster: Cluster, port: int = 0) -> Process:
    return cluster.node(
        port=port,
        sessions_per_client="100",
        trusted_proxies="127.0.0.1",
        drain_grace="3",
        admin_token=ADMIN,
        resume_grace="20",
    )


async def until_up(proxy: HAProxy, count: int, timeout: float = 30) -> None:
    """Until HAProxy's Prometheus endpoint says `count` nodes of the main backend are up."""
    url = f"http://127.0.0.1:{proxy.stats_port}/metrics"
    pattern = re.compile(r'haproxy_server_status\{proxy="cellgate_nodes",server="node\d",state="UP"\} 1')
    async with aiohttp.ClientSession() as http:
        for _ in range(int(timeout / 0.25)):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as r:
                    if len(pattern.findall(await r.text())) == count:
                        return
            await asyncio.sleep(0.25)
    raise AssertionError(f"HAProxy does not see {count} nodes up")


async def admin(proxy: HAProxy, method: str, path: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http, http.request(method, proxy.url + path, headers=headers) as r:
        assert r.status < 300, await r.text()
        return await r.json()


async def node_ids(nodes: list[Process]) -> dict[str, Process]:
    out = {}
    async with aiohttp.ClientSession() as http:
        for n in nodes:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(n.url + "/health") as r:
                    out[(await r.json())["node"]] = n
    return out


def clients(proxy: HAProxy) -> list[Client]:
    """The four kinds of client a deployment sees."""
    return [
        Client(proxy.url, transports=["websocket"], reconnect=True),
        Client(proxy.url, transports=["polling"], reconnect=True),
        Client(proxy.url, transports=["polling"], reconnect=True, cookies=False),  # a mobile app
        Client(proxy.url, reconnect=True, cookies=False),  # polling, then upgraded to WebSocket
    ]


def lines_of(client: Client, msg_id: str) -> list[str]:
    text = "".join(
        d["content"]["text"]
        for e, d in client.events
        if e == "iopub" and d["header"]["msg_type"] == "stream" and parent_id(d) == msg_id
    )
    return text.splitlines()


Run = tuple[Client, str, str, int]  # client, the counting cell's msg_id, its kernel, where it began


def kernel_of(c: Client) -> str:
    return [d["id"] for e, d in c.events if e == "kernel" and d.get("state") == "ready"][-1]


async def start_counting(cs: list[Client]) -> list[Run]:
    """Each client: a variable, its kernel id, then the counting cell (not awaited)."""
    runs = []
    for c in cs:
        await c.connect()
        await c.execute("x = 6 * 7")
        start = len(c.events)
        run = await c.execute(COUNT, wait=False)
        runs.append((c, run.msg_id, kernel_of(c), start))
    # Under way everywhere before anything breaks.
    for c, msg_id, _, _ in runs:
        await c.wait_for(lambda e, d, m=msg_id: e == "iopub" and parent_id(d) == m and "line 5" in str(d["content"]))
    return runs


async def check_counted(runs: list[Run]) -> None:
    """Every line exactly once, and the same kernel with its variable."""
    for c, msg_id, kernel, start in runs:
        await c.wait_for(lambda e, d, m=msg_id: e == "shell" and parent_id(d) == m, timeout=90)
        assert lines_of(c, msg_id) == [f"line {i}" for i in range(LINES)], (c.transports, c.resumes)
        after = await c.execute("print(x)", timeout=60)
        assert after.stdout == "42\n"
        assert not [d for e, d in c.events[start:] if e == "kernel"]  # no kernel died or was replaced
        if c.resumes:  # the resumed session names the kernel it had
            assert c.info["resumed"] and c.info["kernel"]["id"] == kernel
        await c.close()


async def holding(proxy: HAProxy, nodes: list[Process], cs: list[Client]) -> tuple[Process, int]:
    """The node holding the most of these clients' sessions, and how many it holds."""
    ids = await node_ids(nodes)
    mine = {c.info["session"] for c in cs}
    sessions = (await admin(proxy, "GET", "/admin/sessions"))["sessions"]
    counts: dict[str, int] = {}
    for s in sessions:  # type: ignore[union-attr]
        if s["id"] in mine and s["node"] in ids:
            counts[s["node"]] = counts.get(s["node"], 0) + 1
    best = max(counts, key=lambda n: counts[n])
    return ids[best], counts[best]


async def test_sticky_polling_with_and_without_cookies(setup: tuple[Cluster, HAProxy, list[Process]]) -> None:
    _, proxy, _ = setup
    cs = [Client(proxy.url, transports=["polling"], cookies=i % 2 == 0) for i in range(6)]
    try:
        for c in cs:
            await c.connect()
        # Many polls each: without stickiness they would land on other nodes and fail.
        for c in cs:
            run = await c.execute("for i in range(20): print(i, flush=True); import time; time.sleep(0.02)")
            assert run.stdout.split() == [str(i) for i in range(20)]
        sessions = (await admin(proxy, "GET", "/admin/sessions"))["sessions"]
        used = {s["node"] for s in sessions if s["id"] in {c.info["session"] for c in cs}}  # type: ignore[union-attr]
        assert len(used) >= 2  # leastconn spread them
        # The node saw the client's address from HAProxy, not the one the client claimed.
        async with aiohttp.ClientSession() as http:
            headers = {"X-Forwarded-For": "203.0.113.9", "Origin": "https://forged.example"}
            async with http.post(proxy.url + "/service", json={"code": "1+1"}, headers=headers) as r:
                assert r.status == 200
        clients_seen = {s["client"] for s in sessions}  # type: ignore[union-attr]
        assert clients_seen == {"127.0.0.1"}
    finally:
        for c in cs:
            await c.close()


async def test_tls_and_cached_static_files(setup: tuple[Cluster, HAProxy, list[Process]]) -> None:
    _, proxy, _ = setup
    context = ssl.create_default_context()
    proxy.ca.configure_trust(context)
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.https_url + "/service", json={"code": "print(6*7)"}, ssl=context) as r:
            assert r.status == 200
            assert (await r.json())["stdout"] == "42\n"
        async with http.get(proxy.url + "/static/cellgate.js") as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "public, max-age=300"
            body = await r.text()
        frame = re.search(r"cellgate-frame-[A-Z0-9]+\.js", body)
        assert frame is not None
        for attempt in range(2):
            async with http.get(f"{proxy.url}/static/{frame.group(0)}") as r:
                assert r.status == 200 and "immutable" in r.headers["Cache-Control"]
                await r.read()  # a response cut short by the client is not cached
                if attempt:  # the second came from HAProxy's cache
                    assert "Age" in r.headers


async def test_node_killed_mid_run(setup: tuple[Cluster, HAProxy, list[Process]]) -> None:
    cluster, proxy, nodes = setup
    cs = clients(proxy)
    runs = await start_counting(cs)
    victim, held = await holding(proxy, nodes, cs)
    victim.kill()
    await check_counted(runs)
    assert sum(c.resumes for c in cs) >= held
    # Back on the same port for the next test.
    nodes[nodes.index(victim)] = node(cluster, victim.port)
    await cluster.wait(nodes[-1], max_kernels=24, warm=1)
    await until_up(proxy, 3)


async def test_node_drained_with_sigterm(setup: tuple[Cluster, HAProxy, list[Process]]) -> None:
    cluster, proxy, nodes = setup
    cs = clients(proxy)
    runs = await start_counting(cs)
    victim, held = await holding(proxy, nodes, cs)
    victim.popen.send_signal(signal.SIGTERM)
    await check_counted(runs)
    assert sum(c.resumes for c in cs) >= held
    assert await asyncio.to_thread(victim.popen.wait, 30) == 0  # it left on its own, cleanly
    assert "drained" in victim.tail()
    nodes[nodes.index(victim)] = node(cluster, victim.port)
    await cluster.wait(nodes[-1], max_kernels=24, warm=1)
    await until_up(proxy, 3)


async def test_redis_restarted_mid_run(setup: tuple[Cluster, HAProxy, list[Process]], redis: RedisServer) -> None:
    _, proxy, _ = setup
    cs = clients(proxy)
    runs = await start_counting(cs)
    redis.stop()
    redis.start()
    await check_counted(runs)
    await until_up(proxy, 3)


async def test_admin_api_ends_a_session_and_drains_a_node(
    setup: tuple[Cluster, HAProxy, list[Process]],
) -> None:
    cluster, proxy, nodes = setup
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/admin/sessions") as r:
            assert r.status == 401
        async with http.get(proxy.url + "/admin/sessions", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
    c = Client(proxy.url, headers={"Origin": "https://school.example"})
    try:
        await c.connect()
        await c.execute("1")
        listed = {s["id"]: s for s in (await admin(proxy, "GET", "/admin/sessions"))["sessions"]}  # type: ignore[union-attr]
        mine = listed[c.info["session"]]
        assert mine["origin"] == "https://school.example" and mine["state"] == "connected"
        assert mine["host"] and mine["node"] and mine["age"] >= 0
        await admin(proxy, "DELETE", f"/admin/sessions/{c.info['session']}")
        ended = await c.wait_event("kernel", state="shutdown", timeout=30)
        assert ended["reason"] == "admin"
    finally:
        await c.close()
    # Draining another node through whichever node HAProxy picks.
    listing = await admin(proxy, "GET", "/admin/nodes")
    ids = await node_ids(nodes)
    target = next(i for i in ids if i != listing["node"])
    assert set(ids) <= set(listing["nodes"])  # type: ignore[arg-type]
    await admin(proxy, "POST", f"/admin/nodes/{target}/drain")
    victim = ids[target]
    assert await asyncio.to_thread(victim.popen.wait, 30) == 0
    nodes[nodes.index(victim)] = node(cluster, victim.port)
    await cluster.wait(nodes[-1], max_kernels=24, warm=1)
    await until_up(proxy, 3)


async def test_kernel_host_drains(setup: tuple[Cluster, HAProxy, list[Process]]) -> None:
    """A host that drains lets the running cell finish, then its sessions go on with a
    new kernel on another host, told why."""
    cluster, proxy, nodes = setup
    # The most free places: it gets the new sessions.
    extra = cluster.host(max_kernels="40", pool_size="1", resume_grace="20", drain_timeout="30")
    await cluster.wait(nodes[0], max_kernels=64, warm=5)
    cs = [Client(proxy.url, reconnect=True) for _ in range(2)]
    try:
        on_extra = []
        for c in cs:
            await c.connect()
            await c.execute("x = 1")
        sessions = (await admin(proxy, "GET", "/admin/sessions"))["sessions"]
        hosts = {s["id"]: s["host"] for s in sessions}  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http, http.get(extra.url + "/health") as r:
            extra_id = (await r.json())["host"]
        on_extra = [c for c in cs if hosts[c.info["session"]] == extra_id]
        assert on_extra, "the new host took no session"
        c = on_extra[0]
        run = await c.execute(COUNT, wait=False)
        await c.wait_for(lambda e, d: e == "iopub" and parent_id(d) == run.msg_id and "line 5" in str(d["content"]))
        extra.popen.send_signal(signal.SIGTERM)
        await c.wait_for(lambda e, d: e == "shell" and parent_id(d) == run.msg_id, timeout=60)
        assert lines_of(c, run.msg_id) == [f"line {i}" for i in range(LINES)]
        dead = await c.wait_event("kernel", state="dead", timeout=30)
        assert dead["reason"] == "its kernel host was shut down"
        again = await c.execute("print('still here')", timeout=60)
        assert again.stdout == "still here\n"
        assert await asyncio.to_thread(extra.popen.wait, 30) == 0
    finally:
        for c in cs:
            await c.close()


async def test_every_metric_the_dashboard_and_alerts_name_is_served(
    setup: tuple[Cluster, HAProxy, list[Process]],
) -> None:
    cluster, proxy, nodes = setup
    async with aiohttp.ClientSession() as http:
        # One execution from a page, so that the per-origin series exist.
        headers = {"Origin": "https://course.example"}
        async with http.post(proxy.url + "/service", json={"code": "1+1"}, headers=headers) as r:
            assert r.status == 200
        # /metrics is for Prometheus on the private network, not through the balancer.
        async with http.get(proxy.url + "/metrics") as r:
            assert r.status == 404
        served: set[str] = set()
        hosts = [p for p in cluster.processes if p not in nodes and p.popen.poll() is None and "host" in p.log.name]
        urls = [n.url for n in nodes] + [h.url for h in hosts] + [f"http://127.0.0.1:{proxy.stats_port}"]
        for url in urls:
            async with http.get(url + "/metrics") as r:
                assert r.status == 200
                samples = [line for line in (await r.text()).splitlines() if line[:1] != "#"]
                served |= {line.split("{")[0].split(" ")[0] for line in samples}
    named = dashboard_metrics() | alert_metrics()
    assert named - served == set()
    assert "cellgate_executions_total" in named and 'origin="https://course.example"' in await metrics_text(nodes)


async def metrics_text(nodes: list[Process]) -> str:
    async with aiohttp.ClientSession() as http:
        texts = []
        for n in nodes:
            async with http.get(n.url + "/metrics") as r:
                texts.append(await r.text())
    return "\n".join(texts)


async def test_a_burst_of_sessions_spreads_over_the_kernel_hosts(
    setup: tuple[Cluster, HAProxy, list[Process]],
) -> None:
    """Heartbeats are up to a second old: sessions opened within one still go where
    the free places are, not all to the host that had the most at its last beat."""
    _, proxy, nodes = setup
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http, http.get(nodes[0].url + "/admin/nodes", headers=headers) as r:
        hosts_seen = (await r.json())["hosts"].items()  # as this node sees them
        free = {h: report["free"] for h, report in hosts_seen if not report.get("draining")}
    # Enough sessions to fill the gap between the hosts, and six more to share.
    cs = [Client(nodes[0].url) for _ in range(abs(min(free.values()) - max(free.values())) + 6)]
    try:
        await asyncio.gather(*(c.connect() for c in cs))
        sessions = (await admin(proxy, "GET", "/admin/sessions"))["sessions"]
        mine = {c.info["session"] for c in cs}
        hosts = [s["host"] for s in sessions if s["id"] in mine]  # type: ignore[union-attr]
        assert len(hosts) == len(cs)
        assert min(hosts.count(h) for h in free) >= 2, (free, hosts)
    finally:
        for c in cs:
            await c.close()
