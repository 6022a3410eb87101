"""What operators use on one node: the admin API, metrics by embedding origin, the
header a balancer sticks polling by, draining on SIGTERM, and JSON logs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest

from gateway.client import Client, parent_id
from tests.conftest import Gateway, GatewayFactory
from tests.s3server import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "an-admin-token-of-some-length"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_admin_api_is_off_without_a_token(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/admin/sessions", headers=AUTH) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"


async def test_admin_api_lists_and_ends_sessions(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(admin_token=TOKEN)
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": TOKEN}):
            async with http.get(gw.url + "/admin/sessions", headers=headers) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "token_invalid"
        async with Client(gw.url, headers={"Origin": "https://class.example"}) as c:
            await c.execute("1")
            async with http.get(gw.url + "/admin/sessions", headers=AUTH) as r:
                listed = (await r.json())["sessions"]
            assert [s["id"] for s in listed] == [c.info["session"]]
            entry = listed[0]
            assert entry["origin"] == "https://class.example" and entry["client"] == "127.0.0.1"
            assert entry["state"] == "connected" and entry["node"] == (await gw.health())["node"]
            assert entry["kernel"]["name"] == "python3" and entry["kernel"]["id"]
            async with http.delete(f"{gw.url}/admin/sessions/{entry['id']}", headers=AUTH) as r:
                assert r.status == 202
            ended = await c.wait_event("kernel", state="shutdown")
            assert ended["reason"] == "admin"
            async with http.delete(f"{gw.url}/admin/sessions/{entry['id']}", headers=AUTH) as r:
                assert r.status == 404
            async with http.get(gw.url + "/admin/nodes", headers=AUTH) as r:
                nodes = await r.json()
            assert list(nodes["nodes"]) == [nodes["node"]] and nodes["hosts"] == {}


async def test_sessions_and_executions_by_origin_are_bounded(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(metrics_origins=2)
    origins = ["https://a.example", "https://b.example", "https://c.example", "javascript:alert(1)", None]
    for origin in origins:
        async with Client(gw.url, headers={"Origin": origin} if origin else {}) as c:
            await c.execute("1")
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/metrics") as r:
        text = await r.text()
    opened = {line.split('origin="')[1].split('"')[0] for line in text.splitlines() if "sessions_opened_total{" in line}
    assert opened == {"https://a.example", "https://b.example", "other", "invalid", "none"}
    assert 'cellgate_executions_total{origin="other"} 1.0' in text
    assert "c.example" not in text and "javascript" not in text


async def test_polling_handshake_names_its_sid_in_a_header(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/socket.io/?EIO=4&transport=polling") as r:
            body = await r.text()
        sid = json.loads(body[1:])["sid"]
        assert r.headers["Cellgate-Sid"] == sid
        # Later requests of the connection carry it in the URL, and get no new one.
        async with http.post(f"{gw.url}/socket.io/?EIO=4&transport=polling&sid={sid}", data="40") as r:
            assert r.status == 200 and "Cellgate-Sid" not in r.headers


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # in a process group of its own, as a service manager starts it
        return subprocess.Popen(argv, env=env, cwd=ROOT, stderr=out, start_new_session=True)


@pytest.mark.timeout(120)
async def test_sigterm_drains_a_node_and_logs_json() -> None:
    """A node on its own: SIGTERM makes /health say draining and refuses new
    connections with node_draining, lets the running cell finish, then closes its
    connections and exits 0. Every log line is a JSON object."""
    port = free_port()
    store = tempfile.mkdtemp(prefix="cellgate-drain-")
    env = {**os.environ, "CELLGATE_STORE_DIR": store, "CELLGATE_POOL_SIZE": "1"}
    argv = [sys.executable, "-m", "gateway", "--port", str(port), "--drain-grace", "1", "--log-format", "json"]
    log = Path(store) / "node.log"
    node = start(argv, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            c = Client(url, transports=["websocket"])
            await c.connect()
            run = await c.execute(
                "import time\nfor i in range(40):\n    print(i, flush=True)\n    time.sleep(0.1)\n", wait=False
            )
            await c.wait_for(lambda e, d: e == "iopub" and parent_id(d) == run.msg_id and "3" in str(d["content"]))
            os.killpg(node.pid, signal.SIGTERM)  # to the whole group, as `timeout` or a terminal does
            await asyncio.sleep(0.3)
            async with http.get(url + "/health") as r:
                assert r.status == 503 and (await r.json())["status"] == "draining"
            async with http.get(url + "/socket.io/?EIO=4&transport=polling") as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "node_draining"
            async with http.post(url + "/service", json={"code": "1"}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
            # The cell that was running finishes, every line of it, before the node goes.
            await c.finish(run, timeout=30)
            assert run.stdout.split() == [str(i) for i in range(40)]
            await c.close()
        assert await asyncio.to_thread(node.wait, 60) == 0
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    stderr = log.read_text()
    shutil.rmtree(store, ignore_errors=True)
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records), stderr
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], stderr
    assert any("drained" in r["message"] for r in records)
