"""Everything a kernel sends is bounded, and nothing it forges bends a limit.

Each attack runs in one session while a bystander session keeps answering `1+1`, and
each is bounded in itself, so that a containment failure fails the test, not the
machine. The gateway runs in this process, so its memory is this process's memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator

import aiohttp
import psutil
import pytest
import pytest_asyncio

from gateway.app import create_fork_server
from gateway.client import Client, Execution
from gateway.config import Config
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from tests.conftest import Bystander, ClientFactory, Gateway, GatewayFactory

MiB = 1 << 20
RSS_GROWTH = 100 * MiB

# Kernel-side helpers: the kernel's own session and sockets, as user code can reach them.
FORGE = """
import uuid
k = get_ipython().kernel
def shell_stream():
    if k._supports_kernel_subshells:
        return k.shell_channel_thread.manager.get_subshell_to_shell_channel_socket(None)
    return k.shell_stream
def forge_iopub(msg_type, content, parent=None):
    k.session.send(k.iopub_socket, msg_type, content, parent=parent or {'msg_id': uuid.uuid4().hex})
"""

FLOODS = {
    # 200 MiB of JSON display data, which the old cap counted as 64 bytes a message
    "display": "from IPython.display import display\n"
    "for _ in range(200):\n    display({'application/json': {'k': 'x' * (1 << 20)}}, raw=True)",
    # 200 MiB of comm messages, which the old cap did not count at all
    "comm": "from comm import create_comm\nc = create_comm(target_name='flood')\n"
    "for _ in range(200):\n    c.send({'k': 'x' * (1 << 20)})",
    # stream output naming a fresh parent each time, which the old cap never charged
    "random_parent": FORGE + "for _ in range(400):\n"
    "    forge_iopub('stream', {'name': 'stdout', 'text': 'x' * (512 << 10)})",
}


@pytest.fixture
def transport() -> list[str]:
    return ["websocket"]


@pytest_asyncio.fixture
async def gw(start_gateway: GatewayFactory) -> AsyncIterator[Gateway]:
    g = await start_gateway(queue_timeout=60.0)
    yield g
    await g.end_sessions()


def rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


async def metric(gw: Gateway, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@pytest.mark.parametrize("flood", list(FLOODS))
async def test_floods_are_capped_over_socketio(
    flood: str, connect: ClientFactory, gw: Gateway, bystander: Bystander
) -> None:
    c = await connect()
    before = rss()
    run = await c.execute(FLOODS[flood], timeout=120)
    assert [e["code"] for e in run.errors] == ["output_capped"]
    assert run.errors[0]["msg_id"] == run.msg_id  # charged to the execution, whatever parent was named
    received = sum(len(json.dumps(d)) for e, d in c.events if e in ("iopub", "shell"))
    assert received < gw.config.output_cap + 2 * MiB
    assert rss() - before < RSS_GROWTH
    assert run.reply is not None and run.reply["status"] == "ok"  # the reply is never dropped
    assert (await c.execute("1+1")).result == {"text/plain": "2"}


@pytest.mark.parametrize("flood", list(FLOODS))
async def test_floods_are_capped_over_service(flood: str, gw: Gateway, bystander: Bystander) -> None:
    before = rss()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/service", json={"code": FLOODS[flood]}) as resp:
            assert resp.status == 200
            body = await resp.json()
    notices = [o["content"]["code"] for o in body["outputs"] if o["msg_type"] == "cellgate_error"]
    assert notices == ["output_capped"]
    assert len(json.dumps(body)) < gw.config.output_cap + 2 * MiB
    assert rss() - before < RSS_GROWTH


async def test_one_oversized_message_is_dropped_and_told(
    connect: ClientFactory, gw: Gateway, bystander: Bystander
) -> None:
    c = await connect()
    before = rss()
    run = await c.execute("'x' * (100 << 20)", timeout=120)
    [notice] = run.errors
    assert notice["code"] == "too_large" and notice["msg_id"] == run.msg_id
    assert "execute_result" in notice["message"]
    assert run.result is None and run.reply["status"] == "ok"
    assert rss() - before < RSS_GROWTH
    assert (await c.execute("1+1")).result == {"text/plain": "2"}  # same kernel, channel intact


async def test_an_oversized_reply_keeps_its_status(connect: ClientFactory, bystander: Bystander) -> None:
    c = await connect()
    await c.execute("x = 'y' * (4 << 20)", timeout=60)
    msg_id = await c.request("shell", "execute_request", {"code": "", "user_expressions": {"big": "x"}})
    big = await c.finish(Execution(msg_id), timeout=60)
    assert big.reply["cellgate_truncated"]["size"] > 4 * MiB and "user_expressions" not in big.reply
    assert big.reply["status"] == "ok"


async def test_a_client_that_never_reads_is_disconnected(
    start_gateway: GatewayFactory, connect: ClientFactory, bystander: Bystander
) -> None:
    gw = await start_gateway(client_buffer=40 * MiB, replay_bytes=8 * MiB, output_cap=200 * MiB, queue_timeout=60.0)
    base = f"{gw.url}/socket.io/?EIO=4&transport=polling"
    async with aiohttp.ClientSession() as http:
        # Engine.IO and Socket.IO by hand over long-polling: connect, run, then never poll.
        async with http.get(base) as resp:
            sid = json.loads((await resp.text())[1:])["sid"]
        url = f"{base}&sid={sid}"
        async with http.post(url, data="40{}") as resp:
            assert resp.status == 200
        async with http.get(url) as resp:
            token = json.loads((await resp.text()).split("\x1e")[-1][2:])[1]["resume"]
        flood = "for _ in range(100):\n    print('x' * (1 << 20), flush=True)"
        request = {"header": {"msg_id": "flood", "msg_type": "execute_request"}, "content": {"code": flood}}
        async with http.post(url, data="421" + json.dumps(["shell", request])) as resp:
            assert resp.status == 200
        before = rss()
        drops = await metric(gw, "cellgate_slow_clients_total")
        for _ in range(300):  # the server drops the client once 40 MiB wait for it
            if await metric(gw, "cellgate_slow_clients_total") > drops:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("a client that never reads was never disconnected")
        assert rss() - before < RSS_GROWTH
        async with http.get(url) as resp:  # what is left for it: the reason, then the end
            left = await resp.text()
        assert '"slow_client"' in left and len(left) < MiB

    # It resumes and gets its output back from the replay log: all of it, or what the
    # log still holds after a replay_gap (the reply may have overtaken the last of the
    # output and been trimmed with the rest). Either way the execution's end arrives.
    # On a loaded machine this client too may read slower than the flood arrives: then
    # it is dropped the same way, and resumes again from what it has, as any client would.
    def finished(e: str, d: dict) -> bool:
        return (
            e == "iopub" and d["parent_header"].get("msg_id") == "flood" and d["content"] == {"execution_state": "idle"}
        )

    c = Client(gw.url, transports=["websocket"])
    await c.resume(token, None, 0)
    for _ in range(10):
        start = len(c.events)
        e, _ = await c.wait_for(
            lambda e, d: finished(e, d) or (e == "error" and d.get("code") == "slow_client"), timeout=60, start=start
        )
        if e == "iopub":
            break
        await c.resume()
    else:
        pytest.fail("the resumed client never saw the flood end")
    codes = {d["code"] for e, d in c.events if e == "error"}
    assert codes <= {"slow_client", "replay_gap", "output_capped"}, codes
    if "replay_gap" not in codes:
        assert any(e == "shell" and d["parent_header"].get("msg_id") == "flood" for e, d in c.events)
    await c.drop()


async def test_cpu_loop_is_interrupted(
    start_gateway: GatewayFactory, connect: ClientFactory, bystander: Bystander
) -> None:
    gw = await start_gateway(execution_timeout=2.0, queue_timeout=60.0)
    c = await connect(gw)
    run = await c.execute("while True:\n    pass", timeout=30)
    assert run.error is not None and run.error["ename"] == "KeyboardInterrupt"
    assert [e["code"] for e in run.errors] == ["timeout"]
    assert (await c.execute("1+1")).result == {"text/plain": "2"}  # same kernel, still alive
    await c.shutdown()


async def test_kernel_that_ignores_interrupts_is_killed(
    start_gateway: GatewayFactory, connect: ClientFactory, bystander: Bystander
) -> None:
    gw = await start_gateway(execution_timeout=1.0, queue_timeout=60.0)
    c = await connect(gw)
    await c.request(
        "shell",
        "execute_request",
        {"code": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"},
    )
    dead = await c.wait_event("kernel", state="dead", timeout=30)
    assert "ignored the interrupt" in dead["reason"]
    assert (await c.execute("1+1", timeout=30)).result == {"text/plain": "2"}  # a fresh kernel
    await c.shutdown()


async def test_print_flood(start_gateway: GatewayFactory, connect: ClientFactory, bystander: Bystander) -> None:
    # A 1 MiB cap, so that the loop passes it well inside its 3 s on a busy machine.
    gw = await start_gateway(execution_timeout=3.0, queue_timeout=60.0, output_cap=MiB)
    c = await connect(gw)
    run = await c.execute("while True:\n    print('x' * 100)", timeout=30)
    codes = [e["code"] for e in run.errors]
    assert "output_capped" in codes and "timeout" in codes
    assert len(run.stdout) <= gw.config.output_cap + 64 * 1024
    await c.shutdown()


async def test_a_forged_reply_does_not_stop_the_clock(
    start_gateway: GatewayFactory, connect: ClientFactory, bystander: Bystander
) -> None:
    gw = await start_gateway(execution_timeout=2.0, queue_timeout=60.0)
    c = await connect(gw)
    code = FORGE + (
        "k.session.send(shell_stream(), 'execute_reply', {'status': 'ok', 'execution_count': 1}, "
        "k.get_parent('shell'), ident=k._parent_ident['shell'])\n"
        "k._publish_status('idle', 'shell')\n"
        "while True:\n    pass"
    )
    run = await c.execute(code, wait=False)
    await c.wait_event("error", code="timeout", timeout=30)
    await c.wait_for(
        lambda e, d: (
            e == "iopub" and d["header"]["msg_type"] == "error" and d["content"]["ename"] == "KeyboardInterrupt"
        ),
        timeout=30,
    )
    replies = [d for e, d in c.events if e == "shell" and d["parent_header"].get("msg_id") == run.msg_id]
    assert replies[0]["content"]["status"] == "ok"  # the forgery did reach the client
    # The real reply follows; what was queued behind the error is aborted, as ipykernel does.
    await c.wait_for(
        lambda e, d: (
            e == "shell" and d["parent_header"].get("msg_id") == run.msg_id and d["content"]["status"] == "error"
        ),
        timeout=30,
    )
    for _ in range(5):
        answer = await c.execute("1+1", timeout=30)
        if answer.reply["status"] != "aborted":
            break
    assert answer.result == {"text/plain": "2"}


async def test_suppressing_execute_input_does_not_stop_the_clock(
    start_gateway: GatewayFactory, connect: ClientFactory, bystander: Bystander
) -> None:
    gw = await start_gateway(execution_timeout=2.0, queue_timeout=60.0)
    c = await connect(gw)
    await c.execute("get_ipython().kernel._publish_execute_input = lambda *a, **k: None")
    run = await c.execute("while True:\n    pass", timeout=30)
    assert not [d for e, d in run.messages if e == "iopub" and d["header"]["msg_type"] == "execute_input"]
    assert [e["code"] for e in run.errors] == ["timeout"]
    assert run.error is not None and run.error["ename"] == "KeyboardInterrupt"


async def test_forged_activity_does_not_keep_a_session_alive(
    start_gateway: GatewayFactory, connect: ClientFactory, bystander: Bystander
) -> None:
    gw = await start_gateway(idle_timeout=2.0, queue_timeout=60.0)
    c = await connect(gw)
    await c.execute(
        FORGE + "import threading, time\n"
        "def chatter():\n    while True:\n"
        "        forge_iopub('status', {'execution_state': 'busy'})\n"
        "        forge_iopub('stream', {'name': 'stdout', 'text': 'still here'})\n"
        "        time.sleep(0.1)\n"
        "threading.Thread(target=chatter, daemon=True).start()"
    )
    ended = await c.wait_event("kernel", state="timed_out", timeout=20)
    assert ended["reason"] == "idle"


async def test_malformed_messages_are_dropped_and_counted(
    connect: ClientFactory, gw: Gateway, bystander: Bystander
) -> None:
    c = await connect()
    before = await metric(gw, "cellgate_kernel_messages_dropped_total")
    run = await c.execute(
        "k = get_ipython().kernel\n"
        "def raw(*parts):\n"
        "    parts = [p.encode() for p in parts]\n"
        "    k.iopub_socket.send_multipart([b'x', b'<IDS|MSG>', k.session.sign(parts), *parts])\n"
        "raw('[1, 2]', '{}', '{}', '{}')\n"  # a header that is not an object
        "raw('{\"msg_type\": \"stream\", \"msg_id\": \"a\"}', '{}', '{}', '[' * 5000 + ']' * 5000)\n"  # deep
        "raw('{\"msg_type\": \"stream\", \"msg_id\": \"b\"}', '{}', '{}', '{\"a\":' * 200 + '1' + '}' * 200)\n"
        "raw('not json', '{}', '{}', '{}')\n"
        "print('after')"
    )
    assert run.stdout == "after\n"
    for _ in range(50):
        if await metric(gw, "cellgate_kernel_messages_dropped_total") >= before + 4:
            break
        await asyncio.sleep(0.1)
    assert await metric(gw, "cellgate_kernel_messages_dropped_total") == before + 4
    assert (await c.execute("1+1")).result == {"text/plain": "2"}  # the reader goes on


async def test_uploads_onto_fifos_fail_at_once(connect: ClientFactory, bystander: Bystander) -> None:
    c, other = await connect(), await connect()
    await c.execute("import os\nfor i in range(8):\n    os.mkfifo(f'f{i}')")
    results = await asyncio.wait_for(
        asyncio.gather(*(c.upload(f"f{i}", b"data") for i in range(8)), return_exceptions=True), 10
    )
    assert [getattr(r, "code", r) for r in results] == ["bad_filename"] * 8
    # Meanwhile the node's file work goes on for everyone.
    run = await other.execute("open('fine.txt', 'w').write('ok')")
    assert [f["name"] for f in await other.wait_files(run, timeout=10)] == ["fine.txt"]


async def test_swapping_a_directory_for_a_link_never_leaks(
    connect: ClientFactory, kernel_root: str, bystander: Bystander
) -> None:
    outside = os.path.join(kernel_root, "server-only-dir")
    os.makedirs(outside, exist_ok=True)
    with open(os.path.join(outside, "secret.txt"), "w") as f:
        f.write("server secret")
    c = await connect()
    await c.execute(
        "import ctypes, os, threading\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"os.mkdir('d'); os.symlink({outside!r}, 'l')\n"
        "stop = False\n"
        "def swap():\n"
        "    while not stop:\n"
        "        libc.renameat2(-100, b'd', -100, b'l', 2)\n"  # AT_FDCWD, RENAME_EXCHANGE
        "threading.Thread(target=swap, daemon=True).start()"
    )
    for i in range(20):
        await c.execute(
            f"for name in ('d', 'l'):\n    try:\n        open(name + '/f{i}.txt', 'w').write('mine')\n"
            "    except OSError:\n        pass"
        )
    await c.execute("stop = True")
    await asyncio.sleep(1)  # the last file reports
    reported = [f for e, d in c.events if e == "files" for f in d["files"]]
    assert reported, "no files were reported at all"
    assert not [f["name"] for f in reported if "secret" in f["name"]]
    for f in reported:  # and nothing stored is the server's
        if f["url"]:
            async with aiohttp.ClientSession() as http, http.get(c.url + f["url"]) as resp:
                # A scan runs while the next cell writes, so it may catch a file half written.
                assert b"mine".startswith(await resp.read())


async def test_deep_and_wide_trees_cost_a_bounded_scan_and_go_with_the_kernel(
    start_gateway: GatewayFactory, connect: ClientFactory, kernel_root: str, bystander: Bystander
) -> None:
    # With the disk quota off (--kernel-disk 0), so that the tree is on the host's own
    # filesystem, where the gateway scans and removes it itself.
    fork_server = create_fork_server(Config(workdir_root=kernel_root, kernel_disk=0))
    pool = KernelPool({"python3": KernelSpec(workdir_root=kernel_root, fork_server=fork_server)}, size=1)
    await pool.open()
    try:
        await _deep_and_wide(await connect(await start_gateway(kernel_pool=pool, queue_timeout=60.0)))
    finally:
        await pool.close()


async def _deep_and_wide(c: Client) -> None:
    home = (await c.execute("import os\nos.getcwd()")).result["text/plain"].strip("'")
    run = await c.execute(
        "for i in range(100_000):\n    os.close(os.open(f'w{i}', os.O_CREAT | os.O_WRONLY))\n"
        "for _ in range(3000):\n    os.mkdir('d'); os.chdir('d')\n"
        f"os.chdir({home!r})",
        timeout=120,
    )
    assert run.error is None, run.error
    assert (await c.execute("1+1", timeout=30)).result == {"text/plain": "2"}  # the scan returned
    await c.shutdown()
    # Removing 100,000 files and a 3,000-deep chain takes seconds, more on a loaded
    # machine: the bound is generous, what matters is that the tree goes.
    for _ in range(900):
        if not os.path.exists(home):
            break
        await asyncio.sleep(0.1)
    assert not os.path.exists(home)
