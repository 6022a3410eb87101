"""Jupyter Server's kernels API on one node, through HTTP and the channels WebSocket as
Jupyter clients speak them: tokens and ownership, limits, CORS, anonymous mode, the
JSON and v1 WebSocket protocols, reconnecting with a session_id, culling."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.jupyter import _frame, _parse, message
from tests.conftest import Gateway, GatewayFactory

A, B = "token-of-alice", "token-of-bob"
ECHO = """
def target(comm, msg):
    @comm.on_msg
    def _(m):
        comm.send({"n": len(m["buffers"])}, buffers=[bytes(b)[::-1] for b in m["buffers"]])
get_ipython().kernel.comm_manager.register_target("echo", target)
"""


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
async def jgw(start_gateway: GatewayFactory) -> Gateway:
    return await start_gateway(jupyter_api_tokens=f"{A},{B}", jupyter_api_kernels_per_token=3)


async def create(http: aiohttp.ClientSession, url: str, token: str = A) -> dict[str, Any]:
    async with http.post(url + "/api/kernels", json={"name": "python3"}, headers=auth(token)) as r:
        assert r.status == 201, await r.text()
        body = await r.json()
        assert r.headers["Location"] == f"/api/kernels/{body['id']}"
        return body


class Channels:
    """A channels WebSocket, speaking the legacy JSON protocol or v1."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, v1: bool) -> None:
        self.ws = ws
        self.v1 = v1
        self.seen: list[dict[str, Any]] = []

    async def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: list[bytes] | None = None
    ) -> str:
        msg = {**message(msg_type, content), "buffers": buffers or []}
        frame = _frame(msg, channel, self.v1)
        await (self.ws.send_bytes(frame) if isinstance(frame, bytes) else self.ws.send_str(frame))
        return msg["header"]["msg_id"]

    async def next(self, timeout: float = 30) -> dict[str, Any]:
        frame = await self.ws.receive(timeout)
        assert frame.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), frame
        channel, msg = _parse(frame.data, self.v1)
        msg["channel"] = channel
        self.seen.append(msg)
        return msg

    async def until(self, parent: str, msg_type: str, timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.next()
                if msg["parent_header"].get("msg_id") == parent and msg["header"]["msg_type"] == msg_type:
                    return msg

    async def note(self) -> str:
        """The next of this server's notices on stderr (the kernel's own status
        messages, from its start, may come first)."""
        while True:
            msg = await self.next()
            if msg["header"]["msg_type"] == "stream" and msg["content"]["text"].startswith("Cellgate:"):
                return msg["content"]["text"]

    def stream(self, parent: str) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.seen
            if m["header"]["msg_type"] == "stream" and m["parent_header"].get("msg_id") == parent
        )


async def channels(
    http: aiohttp.ClientSession, url: str, kernel: str, v1: bool = False, session_id: str = "", token: str = A
) -> AsyncIterator[Channels]:
    query = f"?session_id={session_id}" if session_id else ""
    protocols = ("v1.kernel.websocket.jupyter.org",) if v1 else ()
    ws = await http.ws_connect(f"{url}/api/kernels/{kernel}/channels{query}", headers=auth(token), protocols=protocols)
    if v1:
        assert ws.protocol == "v1.kernel.websocket.jupyter.org"
    try:
        yield Channels(ws, v1)
    finally:
        await ws.close()


async def test_the_api_is_off_without_tokens(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/api/kernels", headers=auth(A)) as r:
        assert r.status == 404


async def test_rest_api_with_tokens_and_ownership(jgw: Gateway) -> None:
    url = jgw.url
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/api/kernels") as r:
            assert r.status == 401 and (await r.json())["reason"] == "token_invalid"
        async with http.get(url + "/api/kernels", headers=auth("not-a-token")) as r:
            assert r.status == 401
        async with http.get(url + "/api") as r:
            assert r.status == 200 and "version" in await r.json()
        async with http.get(url + f"/api/kernelspecs?token={A}") as r:
            specs = await r.json()
        assert specs["default"] == "python3" and specs["kernelspecs"]["python3"]["spec"]["language"] == "python"
        kernel = await create(http, url)
        assert uuid.UUID(kernel["id"]) and kernel["name"] == "python3"
        assert set(kernel) >= {"id", "name", "last_activity", "execution_state", "connections"}
        async with http.get(url + "/api/kernels", headers=auth(A)) as r:
            assert [k["id"] for k in await r.json()] == [kernel["id"]]
        # Bob sees none of Alice's kernels, and cannot touch them.
        async with http.get(url + "/api/kernels", headers=auth(B)) as r:
            assert await r.json() == []
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/interrupt"), ("POST", "/restart")):
            async with http.request(method, f"{url}/api/kernels/{kernel['id']}{path}", headers=auth(B)) as r:
                assert r.status == 404, (method, path)
        async with http.post(f"{url}/api/kernels/{kernel['id']}/interrupt", headers=auth(A)) as r:
            assert r.status == 204
        async with http.post(f"{url}/api/kernels/{kernel['id']}/restart", headers=auth(A)) as r:
            assert r.status == 200 and (await r.json())["id"] == kernel["id"]
        async with http.delete(f"{url}/api/kernels/{kernel['id']}", headers=auth(A)) as r:
            assert r.status == 204
        async with http.get(f"{url}/api/kernels/{kernel['id']}", headers=auth(A)) as r:
            assert r.status == 404 and "Kernel does not exist" in (await r.json())["message"]
        async with http.post(url + "/api/kernels", json={"name": "nope"}, headers=auth(A)) as r:
            assert r.status == 404


async def test_kernels_per_token_are_limited(jgw: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        kernels = [await create(http, jgw.url) for _ in range(3)]
        async with http.post(jgw.url + "/api/kernels", headers=auth(A)) as r:
            assert r.status == 429 and (await r.json())["reason"] == "capacity_client"
        await create(http, jgw.url, B)  # another token has places of its own
        for k in kernels:
            async with http.delete(f"{jgw.url}/api/kernels/{k['id']}", headers=auth(A)):
                pass


@pytest.mark.parametrize("v1", [False, True], ids=["json", "v1"])
async def test_channels_run_code_and_refuse_debug_requests(jgw: Gateway, v1: bool) -> None:
    async with aiohttp.ClientSession() as http:
        kernel = await create(http, jgw.url)
        async for ch in channels(http, jgw.url, kernel["id"], v1=v1):
            info = await ch.send("shell", "kernel_info_request", {})
            reply = await ch.until(info, "kernel_info_reply")
            assert reply["channel"] == "shell" and reply["content"]["status"] == "ok"
            run = await ch.send("shell", "execute_request", {"code": "print('hi')\n6*7", "silent": False})
            result = await ch.until(run, "execute_result")
            assert result["content"]["data"]["text/plain"] == "42"
            assert ch.stream(run) == "hi\n"
            done = await ch.until(run, "execute_reply")
            assert done["content"]["status"] == "ok"
            debug = await ch.send("control", "debug_request", {"command": "initialize"})
            refused = await ch.until(debug, "debug_reply")
            assert refused["content"]["status"] == "error" and refused["content"]["ename"] == "forbidden_msg_type"
            history = {"hist_access_type": "tail", "n": 1, "output": False, "raw": True}
            asked = await ch.send("shell", "history_request", history)
            assert (await ch.until(asked, "history_reply"))["content"]["status"] == "ok"
            # Binary buffers reach the kernel and come back: a comm that reverses them.
            echo = await ch.send("shell", "execute_request", {"code": ECHO, "silent": False})
            await ch.until(echo, "execute_reply")
            comm = uuid.uuid4().hex
            await ch.send("shell", "comm_open", {"comm_id": comm, "target_name": "echo", "data": {}})
            sent = await ch.send("shell", "comm_msg", {"comm_id": comm, "data": {}}, [b"abc", bytes(range(256))])
            back = await ch.until(sent, "comm_msg")
            assert back["content"]["data"] == {"n": 2}
            assert [bytes(b) for b in back["buffers"]] == [b"cba", bytes(range(256))[::-1]]


async def test_a_reconnect_with_the_same_session_id_misses_nothing(jgw: Gateway) -> None:
    client_session = uuid.uuid4().hex
    async with aiohttp.ClientSession() as http:
        kernel = await create(http, jgw.url)
        async for ch in channels(http, jgw.url, kernel["id"], session_id=client_session):
            code = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.2)\n"
            run = await ch.send("shell", "execute_request", {"code": code, "silent": False})
            await ch.until(run, "stream")
        await asyncio.sleep(1.5)  # most of the output comes while nobody is connected
        async for ch in channels(http, jgw.url, kernel["id"], session_id=client_session):
            await ch.until(run, "execute_reply")
            # The first stream message came before the drop; the rest are replayed once.
            later = ch.stream(run)
            assert later and "5\n" in later and later.count("5\n") == 1
        # A different session_id starts afresh: nothing of the earlier run is replayed.
        async for ch in channels(http, jgw.url, kernel["id"], session_id=uuid.uuid4().hex):
            info = await ch.send("shell", "kernel_info_request", {})
            await ch.until(info, "kernel_info_reply")
            assert not [m for m in ch.seen if m["parent_header"].get("msg_id") == run]


async def test_bad_frames_get_clear_errors_and_the_socket_stays(jgw: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        kernel = await create(http, jgw.url)
        async for ch in channels(http, jgw.url, kernel["id"]):
            await ch.ws.send_str("not json")
            assert "bad_message" in await ch.note()
            await ch.ws.send_bytes(b"\xff\xff\xff\xff")
            assert "bad_message" in await ch.note()
            await ch.ws.send_str(json.dumps({"channel": "shell", "header": {"msg_id": "x", "msg_type": "exec_bogus"}}))
            assert "forbidden_msg_type" in await ch.note()
            run = await ch.send("shell", "execute_request", {"code": "1+1", "silent": False})
            assert (await ch.until(run, "execute_result"))["content"]["data"]["text/plain"] == "2"


async def test_cors_is_the_api_s_own(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(jupyter_api_tokens=A, jupyter_api_cors_origins="https://thebe.example")
    async with aiohttp.ClientSession() as http:
        for origin, allowed in (("https://thebe.example", True), ("https://elsewhere.example", False)):
            headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
            async with http.options(gw.url + "/api/kernels", headers=headers) as r:
                assert ("Access-Control-Allow-Origin" in r.headers) == allowed, origin
        # The embed's routes keep their own (open) CORS.
        async with http.get(gw.url + "/health", headers={"Origin": "https://elsewhere.example"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"
        # A page from an origin not listed cannot open a kernel's channels.
        kernel = await create(http, gw.url)
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(
                f"{gw.url}/api/kernels/{kernel['id']}/channels",
                headers={**auth(A), "Origin": "https://elsewhere.example"},
            )


async def test_anonymous_mode_and_culling(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(jupyter_api_anonymous=True, jupyter_api_cull_idle_timeout=1.0, sessions_per_client=2)
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/api/kernels") as r:
            assert r.status == 201
            kernel = await r.json()
        async with http.post(gw.url + "/api/kernels") as r:
            assert r.status == 201
        async with http.post(gw.url + "/api/kernels") as r:  # the public per-address limit
            assert r.status == 429
        for _ in range(100):  # culled once idle past the timeout
            async with http.get(f"{gw.url}/api/kernels/{kernel['id']}") as r:
                if r.status == 404:
                    break
            await asyncio.sleep(0.1)
        assert r.status == 404
