"""Bad input gets a clear error; the connection and everyone else keep working."""

from __future__ import annotations

import aiohttp
import pytest
import socketio

from gateway.client import Client, Refused, make_message
from tests.conftest import ClientFactory, Gateway

BAD_MESSAGES = [
    ("shell", "just a string", "bad_message"),
    ("shell", {"content": {}}, "bad_message"),
    ("shell", {"header": {"msg_type": "execute_request"}}, "bad_message"),
    ("shell", {"header": {"msg_id": "m1", "msg_type": "frobnicate"}}, "forbidden_msg_type"),
    ("shell", {"header": {"msg_id": "m2", "msg_type": "history_request"}}, "forbidden_msg_type"),
    ("shell", {"header": {"msg_id": "m3", "msg_type": "debug_request"}}, "forbidden_msg_type"),
    ("control", {"header": {"msg_id": "m4", "msg_type": "execute_request"}, "content": {"code": "1"}}, "bad_channel"),
    ("shell", {"header": {"msg_id": "m5", "msg_type": "interrupt_request"}}, "bad_channel"),
    ("shell", {"header": {"msg_id": "m6", "msg_type": "execute_request"}, "content": "1+1"}, "bad_message"),
    ("shell", {"header": {"msg_id": "m7", "msg_type": "execute_request"}, "content": {"code": 5}}, "bad_message"),
    ("shell", {"header": {"msg_id": "m8", "msg_type": "comm_msg"}, "content": {}, "buffers": ["text"]}, "bad_message"),
    ("iopub", {"header": {"msg_id": "m9", "msg_type": "stream"}}, "bad_channel"),
    ("frobnicate", {}, "bad_channel"),
]


@pytest.mark.parametrize(("channel", "data", "code"), BAD_MESSAGES)
async def test_bad_message_gets_an_ack_with_a_code(
    connect: ClientFactory, channel: str, data: object, code: str
) -> None:
    c = await connect()
    ack = await c.sio.call(channel, data, timeout=10)
    assert ack["ok"] is False
    assert ack["error"]["code"] == code and ack["error"]["message"]
    if isinstance(data, dict) and isinstance(data.get("header", {}).get("msg_id"), str):
        assert ack["error"]["msg_id"] == data["header"]["msg_id"]
    # Same connection, still serving.
    assert (await c.execute("1 + 1")).result == {"text/plain": "2"}


async def test_too_large_below_transport_limit_is_answered(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    msg = make_message("execute_request", {"code": "x = '" + "a" * (gw.config.message_limit + 10) + "'"})
    with pytest.raises(Refused) as err:
        await c.send("shell", msg)
    assert err.value.code == "too_large"
    assert (await c.execute("'fine'")).result == {"text/plain": "'fine'"}


async def test_past_transport_limit_drops_only_that_connection(connect: ClientFactory, gw: Gateway) -> None:
    bystander = await connect()
    await bystander.execute("b = 1")
    c = await connect(transports=["websocket"])
    huge = make_message("comm_msg", {"comm_id": "x", "data": {}})
    huge["buffers"] = [b"\0" * (gw.config.transport_limit + 1024)]
    with pytest.raises(socketio.exceptions.SocketIOError):
        await c.sio.call("shell", huge, timeout=5)
    assert (await bystander.execute("b + 1")).result == {"text/plain": "2"}


async def test_unknown_kernel_and_bad_auth_are_refused(gw: Gateway, transport: list[str]) -> None:
    c = Client(gw.url, transports=transport)
    with pytest.raises(Refused) as err:
        await c.connect(kernel="cobol")
    assert err.value.code == "no_kernel"
    with pytest.raises(Refused) as err:
        await c._connect({"resume": "t", "epoch": 5})
    assert err.value.code == "bad_message"


async def test_garbage_on_the_polling_endpoint(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    async with aiohttp.ClientSession() as http:
        for method, query, body in [
            ("GET", "?EIO=4&transport=polling&sid=not-a-session", None),
            ("POST", "?EIO=4&transport=polling&sid=not-a-session", b"\xff\xfe garbage"),
            ("GET", "?EIO=99&transport=polling", None),
            ("GET", "?transport=carrier-pigeon", None),
        ]:
            async with http.request(method, gw.url + "/socket.io/" + query, data=body) as r:
                assert 400 <= r.status < 500, (method, query, r.status)
    assert (await c.execute("'ok'")).result == {"text/plain": "'ok'"}
