"""Jupyter's own clients against Cellgate, each on one node and once more across two
nodes (the kernel made through one, its channels through the other):
jupyter_server started with --gateway-url, nbclient running a notebook with
jupyter_server's GatewayKernelManager, and @jupyterlab/services' KernelManager from
Node.js."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nbformat
import pytest

from tests.cluster import Cluster
from tests.redisserver import RedisServer, redis_server
from tests.s3server import free_port
from tests.test_jupyter_api import channels

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "jupyter-clients-token"
SERVICES = ROOT / "client-js" / "test" / "jupyter" / "services.mjs"

pytestmark = pytest.mark.timeout(180)


@dataclass
class Target:
    """Where a client makes kernels (http) and where it opens their channels (ws)."""

    http: str
    ws: str


@pytest.fixture(scope="module")
def two_nodes_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def two_nodes(two_nodes_redis: RedisServer) -> Iterator[Target]:
    """A kernel host and two nodes with --remote-kernels (sync, so that the
    parametrized `target` can ask for it only when it is wanted)."""
    directory = Path(tempfile.mkdtemp(prefix="cellgate-jupyter-"))
    os.chmod(directory, 0o755)
    cluster = Cluster(two_nodes_redis.url, directory, store={"store_dir": str(directory / "store")}, prefix="jc")
    try:
        cluster.host(max_kernels="8", pool_size="2")
        nodes = [cluster.node(jupyter_api_tokens=TOKEN, jupyter_api_open_channels="true") for _ in range(2)]
        for n in nodes:
            wait_ready(n.url, cluster)
        yield Target(nodes[0].url, nodes[1].url.replace("http", "ws", 1))
    finally:
        cluster.stop()
        logs = cluster.logs()
        shutil.rmtree(directory, ignore_errors=True)
        assert " ERROR " not in logs and "Traceback" not in logs, logs


def wait_ready(url: str, cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready(url):
        if time.monotonic() > deadline:
            raise AssertionError(f"the cluster did not come up:\n{cluster.logs()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def one_node() -> Iterator[Target]:
    """A node of its own, with its own kernels (no Redis)."""
    directory = Path(tempfile.mkdtemp(prefix="cellgate-jupyter-node-"))
    port = free_port()
    env = {
        **os.environ,
        "CELLGATE_STORE_DIR": str(directory),
        "CELLGATE_POOL_SIZE": "2",
        "CELLGATE_JUPYTER_API_TOKENS": TOKEN,
        # jupyter_server's GatewayKernelClient (nbclient's) opens channels without a token.
        "CELLGATE_JUPYTER_API_OPEN_CHANNELS": "true",
    }
    with open(directory / "node.log", "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "gateway", "--port", str(port)], env=env, cwd=ROOT, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not ready(url):
            assert time.monotonic() < deadline and node.poll() is None, (directory / "node.log").read_text()
            time.sleep(0.2)
        yield Target(url, url.replace("http", "ws", 1))
    finally:
        node.terminate()
        node.wait(30)
        logs = (directory / "node.log").read_text()
        shutil.rmtree(directory, ignore_errors=True)
        assert " ERROR " not in logs and "Traceback" not in logs, logs


def ready(url: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return json.load(r)["kernels"]["warm"] >= 2
    return False


@pytest.fixture(params=["one node", "two nodes"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue("one_node" if request.param == "one node" else "two_nodes")


def start_jupyter_server(target: Target, port: int, token: str, home: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
        f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
        f"--gateway-url={target.http}", f"--GatewayClient.ws_url={target.ws}",
        f"--GatewayClient.auth_token={TOKEN}", f"--ServerApp.root_dir={home}",
    ]  # fmt: skip
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data")}
    with open(home / "server.log", "wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_jupyter_server_with_gateway_url_runs_a_cell(target: Target, tmp_path: Path) -> None:
    port, token = free_port(), uuid.uuid4().hex
    server = start_jupyter_server(target, port, token, tmp_path)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"token {token}"}
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(url + "/api/kernelspecs", headers=headers) as r:
                        if r.status == 200:
                            specs = await r.json()
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError((tmp_path / "server.log").read_text())
            assert "python3" in specs["kernelspecs"]  # Cellgate's, through jupyter_server
            async with http.post(url + "/api/kernels", json={"name": "python3"}, headers=headers) as r:
                assert r.status == 201, await r.text()
                kernel = await r.json()
            # The kernel is Cellgate's: the same id there.
            async with http.get(
                f"{target.http}/api/kernels/{kernel['id']}", headers={"Authorization": f"token {TOKEN}"}
            ) as r:
                assert r.status == 200
            ws = await http.ws_connect(f"{url}/api/kernels/{kernel['id']}/channels", headers=headers)
            msg_id = uuid.uuid4().hex
            header = {
                "msg_id": msg_id,
                "msg_type": "execute_request",
                "session": "t",
                "username": "t",
                "version": "5.3",
            }
            content = {"code": "6 * 7", "silent": False}
            await ws.send_json(
                {"channel": "shell", "header": header, "parent_header": {}, "metadata": {}, "content": content}
            )
            result = None
            async with asyncio.timeout(60):
                while True:
                    msg = await ws.receive_json()
                    if msg["parent_header"].get("msg_id") != msg_id:
                        continue
                    if msg["msg_type"] == "execute_result":
                        result = msg["content"]["data"]["text/plain"]
                    if msg["msg_type"] == "execute_reply":
                        break
            await ws.close()
            assert result == "42"
            async with http.delete(f"{url}/api/kernels/{kernel['id']}", headers=headers) as r:
                assert r.status == 204
    finally:
        server.terminate()
        server.wait(30)


NOTEBOOK = [
    "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
    "import ipywidgets as w\nw.IntSlider(value=7)",
    "1 / 0",
]


RUN_NOTEBOOK = """
import asyncio, sys, nbformat
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.gateway.managers import GatewayKernelManager
from nbclient import NotebookClient

class Manager(GatewayKernelManager):
    # jupyter_client 8.10's kernel client asks its manager's _async_is_alive, which
    # jupyter_server 2.21's GatewayKernelManager does not override (it has is_alive).
    async def _async_is_alive(self):
        return await self.is_alive()


url, ws, token = sys.argv[1:4]
gateway = GatewayClient.instance()
gateway.url, gateway.ws_url, gateway.auth_token = url, ws, token
gateway.init_connection_args()
nb = nbformat.read(sys.stdin, as_version=4)
km = Manager(kernel_name="python3")
NotebookClient(nb, km=km, allow_errors=True, timeout=60).execute()
# A kernel manager passed in is the caller's to shut down; until the kernel goes, the
# gateway client's (non-daemon) reader thread keeps its WebSocket, and the process, open.
asyncio.run(km.shutdown_kernel(now=True))
nbformat.write(nb, sys.stdout)
"""


async def test_nbclient_runs_a_notebook_through_the_gateway_kernel_manager(target: Target) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code) for code in NOTEBOOK])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RUN_NOTEBOOK, target.http, target.ws, TOKEN,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(nbformat.writes(nb).encode()), 150)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"nbclient did not finish:\n{err.decode()[-3000:]}") from None
    assert proc.returncode == 0, err.decode()
    nb = nbformat.reads(out.decode(), as_version=4)
    plot, widget, error = (cell["outputs"] for cell in nb.cells)
    assert any("image/png" in o.get("data", {}) for o in plot)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in widget)
    assert error[0]["output_type"] == "error" and error[0]["ename"] == "ZeroDivisionError"


async def test_jupyterlab_services_kernel_manager_from_node(target: Target) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed (make test installs it)"
    proc = await asyncio.create_subprocess_exec(
        node, str(SERVICES), target.http, target.ws, TOKEN,
        cwd=SERVICES.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    # The library logs to the console too ("Starting WebSocket", "Kernel: dead"): the
    # script's report is its one JSON line.
    seen = json.loads(next(line for line in out.decode().splitlines() if line.startswith("{")))
    assert seen["status"] == "ok" and seen["id"] in seen["listed"]
    assert seen["display"]["text/html"] == "<b>from Cellgate</b>"
    assert seen["result"]["text/plain"] == "42"


async def test_a_reconnect_through_the_other_node_misses_nothing(two_nodes: Target) -> None:
    """Channels opened through one node, dropped mid-run, reopened through the other
    with the same session_id: every line once."""
    client_session = uuid.uuid4().hex
    headers = {"Authorization": f"token {TOKEN}"}
    a, b = two_nodes.http, two_nodes.ws.replace("ws", "http", 1)
    async with aiohttp.ClientSession() as http:
        async with http.post(a + "/api/kernels", headers=headers) as r:
            kernel = (await r.json())["id"]
        async for ch in channels(http, b, kernel, session_id=client_session, token=TOKEN):
            code = "import time\nfor i in range(20):\n    print(i, flush=True)\n    time.sleep(0.1)\n"
            run = await ch.send("shell", "execute_request", {"code": code, "silent": False})
            await ch.until(run, "stream")
            before = ch.stream(run)
        async for ch in channels(http, a, kernel, session_id=client_session, token=TOKEN):
            await ch.until(run, "execute_reply")
            after = ch.stream(run)
        assert (before + after).split() == [str(i) for i in range(20)]
        async with http.delete(f"{a}/api/kernels/{kernel}", headers=headers) as r:
            assert r.status == 204
