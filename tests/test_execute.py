"""A session runs code end to end over both transports, on real kernels."""

from __future__ import annotations

import asyncio

from gateway.client import Refused, make_message
from tests.conftest import ClientFactory, Gateway


async def test_session_event_then_first_execution(connect: ClientFactory) -> None:
    c = await connect()
    assert c.info["protocol"] == "cellgate/1"
    assert c.info["kernel"] is None and c.info["resumed"] is False
    assert len(c.token) >= 22 and c.epoch
    run = await c.execute("print('hello')\n6 * 7")
    assert run.stdout == "hello\n"
    assert run.result == {"text/plain": "42"}
    assert run.reply["status"] == "ok"
    assert run.reply["execution_count"] == 1  # the pool's warm-up run left no trace
    kernel_events = [d for e, d in c.events if e == "kernel"]
    assert kernel_events[-1]["state"] == "ready" and "reason" not in kernel_events[-1]


async def test_every_event_has_a_seq_in_order(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("for i in range(3): print(i)")
    await c.execute("1")
    seqs = [d["seq"] for _, d in c.events]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_state_persists_between_executions(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("counter = 10")
    await c.execute("counter += 5")
    run = await c.execute("counter")
    assert run.result == {"text/plain": "15"}


async def test_errors_come_back_as_jupyter_errors(connect: ClientFactory) -> None:
    c = await connect()
    run = await c.execute("1 / 0")
    assert run.reply["status"] == "error"
    assert run.error["ename"] == "ZeroDivisionError"
    # The kernel is still there and usable.
    assert (await c.execute("2 + 2")).result == {"text/plain": "4"}


async def test_permalink_is_stored_and_stable(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    first = await c.execute("x = 'same code'")
    await c.wait_event("permalink", msg_id=first.msg_id)
    second = await c.execute("x = 'same code'")
    await c.wait_event("permalink", msg_id=second.msg_id)
    link1, link2 = c.collect(first).permalink, c.collect(second).permalink
    assert link1["id"] == link2["id"]
    assert link1["url"] == f"/p/{link1['id']}"
    stored = await gw.manager.permalinks.load(link1["id"])
    assert stored == {"code": "x = 'same code'", "language": "python"}


async def test_first_output_is_never_lost(connect: ClientFactory) -> None:
    # A freshly attached kernel must deliver even output printed at once.
    for _ in range(2):
        c = await connect()
        run = await c.execute("print('first')")
        assert run.stdout == "first\n"
        await c.shutdown()


async def test_matplotlib_inline_and_numpy(connect: ClientFactory) -> None:
    c = await connect()
    run = await c.execute(
        "import numpy as np, matplotlib.pyplot as plt\n"
        "plt.plot(np.arange(5) ** 2)\nplt.show()\nprint(np.arange(4).sum())",
        timeout=60,
    )
    assert run.stdout == "6\n"
    assert any("image/png" in d["data"] for d in run.displays)


async def test_binary_buffers_travel_both_ways(connect: ClientFactory) -> None:
    c = await connect()
    setup = (
        "from ipykernel.comm import Comm\n"
        "def target(comm, msg):\n"
        "    @comm.on_msg\n"
        "    def echo(m):\n"
        "        comm.send({'got': len(m['buffers'])}, buffers=[bytes(b)[::-1] for b in m['buffers']])\n"
        "get_ipython().kernel.comm_manager.register_target('echo', target)\n"
    )
    await c.execute(setup)
    await c.request("shell", "comm_open", {"comm_id": "c1", "target_name": "echo", "data": {}})
    start = len(c.events)
    await c.comm_msg("c1", {"hello": 1}, buffers=[b"\x00\x01\x02abc"])
    _, reply = await c.wait_for(lambda e, d: e == "iopub" and d["header"]["msg_type"] == "comm_msg", start=start)
    assert reply["content"]["data"] == {"got": 1}
    assert reply["buffers"] == [b"cba\x02\x01\x00"]


async def test_stdin_input_request_and_reply(connect: ClientFactory) -> None:
    c = await connect()
    c.on_input = lambda content: "Ada" if "name" in content["prompt"] else "?"
    run = await c.execute("name = input('your name: ')\nprint('hi', name)", allow_stdin=True)
    assert run.stdout == "hi Ada\n"
    assert any(e == "stdin" for e, _ in c.events)


async def test_interrupt_stops_a_loop_and_kernel_stays(connect: ClientFactory) -> None:
    c = await connect()
    run = await c.execute("import time\nwhile True: time.sleep(0.01)", wait=False)
    await asyncio.sleep(0.5)
    await c.interrupt()
    await c.finish(run, timeout=10)
    assert run.error["ename"] == "KeyboardInterrupt"
    assert (await c.execute("'still here'")).result == {"text/plain": "'still here'"}


async def test_kernel_death_then_replacement(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("x = 1")
    first_kernel = [d for e, d in c.events if e == "kernel"][-1]["id"]
    await c.execute("import os; os._exit(1)", wait=False)
    dead = await c.wait_event("kernel", state="dead", timeout=10)
    assert dead["seq"] > 0
    run = await c.execute("'x' in dir()", timeout=30)
    ready = [d for e, d in c.events if e == "kernel"][-1]
    assert ready["state"] == "ready" and ready["reason"] == "replaced"
    assert ready["id"] != first_kernel
    assert run.result == {"text/plain": "False"}  # a fresh kernel, fresh state


async def test_messages_without_kernel_are_refused(connect: ClientFactory) -> None:
    c = await connect()
    try:
        await c.interrupt()
    except Refused as exc:
        assert exc.code == "no_kernel"
    else:
        raise AssertionError("interrupt without a kernel was accepted")


async def test_shutdown_request_ends_the_session(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    await c.execute("1")
    start = len(c.events)
    await c.shutdown()
    events = c.events[start:]
    assert any(e == "control" and d["header"]["msg_type"] == "shutdown_reply" for e, d in events)
    assert events[-1][0] == "kernel" and events[-1][1]["state"] == "shutdown"
    assert await gw.wait_sessions(0) == 0
    resumed = await connect(connect=False)
    try:
        await resumed.resume(c.token, c.epoch, c.last_seq)
    except Refused as exc:
        assert exc.code == "token_invalid"
    else:
        raise AssertionError("a shut-down session could be resumed")


async def test_a_restart_keeps_the_session_on_a_fresh_kernel(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    await c.execute("x = 41")
    start = len(c.events)
    before = next(d["id"] for e, d in reversed(c.events) if e == "kernel" and d.get("state") == "ready")
    ready = await c.restart()
    events = [(e, d) for e, d in c.events[start:] if e in ("kernel", "control")]
    assert [d.get("state") or d["header"]["msg_type"] for _, d in events] == [
        "restarting",
        "shutdown_reply",
        "ready",
    ]
    assert events[1][1]["content"] == {"status": "ok", "restart": True}
    assert ready["reason"] == "restarted" and ready["id"] != before
    run = await c.execute("print('x' in dir())")
    assert run.stdout == "False\n"
    assert await gw.wait_sessions(1) == 1


async def test_several_requests_per_socket_in_order(connect: ClientFactory) -> None:
    c = await connect()
    ids = []
    for i in range(5):
        msg = make_message("execute_request", {"code": f"print({i})", "silent": False})
        await c.send("shell", msg)
        ids.append(msg["header"]["msg_id"])
    # Channels are not ordered with each other: the last idle status on IOPub comes
    # after all IOPub output of that request, its shell reply may come before.
    await c.wait_for(
        lambda e, d: (
            e == "iopub"
            and d["parent_header"].get("msg_id") == ids[-1]
            and d["header"]["msg_type"] == "status"
            and d["content"]["execution_state"] == "idle"
        ),
        timeout=20,
    )
    outputs = [d["content"]["text"] for e, d in c.events if e == "iopub" and d["header"]["msg_type"] == "stream"]
    assert "".join(outputs) == "0\n1\n2\n3\n4\n"


async def test_complete_and_inspect_requests(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("import math")
    msg_id = await c.request("shell", "complete_request", {"code": "math.sq", "cursor_pos": 7})
    _, reply = await c.wait_for(lambda e, d: e == "shell" and d["parent_header"].get("msg_id") == msg_id)
    matches = reply["content"]["matches"]
    assert "sqrt" in matches or "math.sqrt" in matches
    msg_id = await c.request("shell", "inspect_request", {"code": "math.sqrt", "cursor_pos": 9, "detail_level": 0})
    _, reply = await c.wait_for(lambda e, d: e == "shell" and d["parent_header"].get("msg_id") == msg_id)
    assert reply["content"]["found"] is True


async def test_large_message_under_the_limit_arrives_whole(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    size = gw.config.message_limit - 4096
    run = await c.execute(f"s = '{'q' * size}'\nlen(s)", timeout=30)
    assert run.result == {"text/plain": str(size)}


async def test_bursts_of_events_arrive_whole(connect: ClientFactory) -> None:
    # Many events queue up between two polls; all of them must arrive.
    c = await connect()
    run = await c.execute("from IPython.display import display\nfor i in range(300): display(i)", timeout=60)
    assert [d["data"]["text/plain"] for d in run.displays] == [str(i) for i in range(300)]
    # And many emits batched by the client into one request.
    await c.execute("import ipywidgets as w\ns = w.IntSlider()\ns")
    slider = next(
        d["content"]["comm_id"]
        for e, d in c.events
        if e == "iopub"
        and d["header"]["msg_type"] == "comm_open"
        and d["content"]["data"]["state"].get("_model_name") == "IntSliderModel"
    )
    ids = []
    for v in range(40):
        msg = make_message("comm_msg", {"comm_id": slider, "data": {"method": "update", "state": {"value": v}}})
        ids.append(msg["header"]["msg_id"])
        await c.sio.emit("shell", msg)
    assert (await c.execute("s.value", timeout=30)).result == {"text/plain": "39"}


async def test_a_shutdown_request_is_answered_even_if_the_kernel_ends_without_a_reply(
    connect: ClientFactory, gw: Gateway
) -> None:
    c = await connect()
    await c.execute(
        "import os\nk = get_ipython().kernel\n"
        "async def silent(*args):\n    os._exit(0)\n"
        "k.control_handlers['shutdown_request'] = silent"
    )
    start = len(c.events)
    await c.shutdown()
    replies = [d for e, d in c.events[start:] if e == "control" and d["header"]["msg_type"] == "shutdown_reply"]
    assert len(replies) == 1 and replies[0]["metadata"] == {"from": "gateway"}
    assert replies[0]["content"]["status"] == "ok"
    assert c.events[-1][0] == "kernel" and c.events[-1][1]["state"] == "shutdown"
    assert await gw.wait_sessions(0) == 0
