"""Hostile code is contained and told, while another session keeps being served.

Each test runs an attack in one session while a second session executes `1+1` over
and over; every one of those must answer within a second (a liveness bound: a kernel
that escaped its limits would starve it). Every attack is bounded in itself, so that
a containment failure fails the test and not the machine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import AsyncIterator

import psutil
import pytest
import pytest_asyncio

from gateway.app import create_fork_server
from gateway.client import Client
from gateway.config import Config
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from tests.conftest import Bystander, ClientFactory, Gateway, GatewayFactory, host_sockets, planted_sockets, reach_code

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel isolation needs root")


@pytest.fixture
def transport() -> list[str]:
    return ["websocket"]  # these tests are about kernels, not transports


@pytest.fixture(autouse=True)
def isolated(pool: KernelPool) -> None:
    report = pool.isolation()
    assert report["enabled"] and report["pid_namespace"] and report["seccomp"], report


@pytest_asyncio.fixture
async def gw(start_gateway: GatewayFactory) -> AsyncIterator[Gateway]:
    """A gateway of its own: after an attack the pool may need a while to refill."""
    g = await start_gateway(queue_timeout=60.0)
    yield g
    await g.end_sessions()


async def uid_of(c: Client) -> int:
    run = await c.execute("import os\nos.getuid()")
    uid = int(run.result["text/plain"])
    assert uid != 0
    return uid


async def assert_nothing_left(uid: int) -> None:
    """No process of the kernel's uid outlives its session."""
    left: list[int] = []
    for _ in range(50):
        left = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]
        if not left:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"processes of kernel uid {uid} outlived the session: {left}")


async def test_fork_storm(connect: ClientFactory, gw: Gateway, bystander: Bystander) -> None:
    c = await connect()
    uid = await uid_of(c)
    run = await c.execute(
        "import os, time\nborn = 0\n"
        "for _ in range(3000):\n"
        "    try:\n        pid = os.fork()\n    except OSError as e:\n        print('refused:', e); break\n"
        "    if pid == 0:\n        time.sleep(60); os._exit(0)\n"
        "    born += 1\n"
        "print('born', born)",
        timeout=60,
    )
    assert "refused:" in run.stdout and "Resource temporarily unavailable" in run.stdout
    born = int(run.stdout.split("born")[-1])
    assert born < 128  # the process limit, not the 3000 asked for
    assert (await c.execute("1+1")).result == {"text/plain": "2"}  # the kernel itself is fine
    await c.shutdown()
    await assert_nothing_left(uid)


async def test_memory_bomb(connect: ClientFactory, bystander: Bystander) -> None:
    c = await connect()
    # Up to 6 GiB, really written; the kernel is allowed 1 GiB (cgroup) and 4 GiB of
    # address space, so it dies or gets MemoryError long before.
    run = await c.execute(
        "hog = []\nfor _ in range(24):\n    hog.append(b'x' * (256 << 20))\nprint('survived')", timeout=60
    )
    if run.error is not None:
        assert run.error["ename"] == "MemoryError"
    else:
        dead = await c.wait_event("kernel", state="dead", timeout=30)
        assert "memory" in dead["reason"] or "killed" in dead["reason"]
    assert "survived" not in run.stdout
    # The session goes on, on a fresh kernel if it had to.
    assert (await c.execute("1+1", timeout=30)).result == {"text/plain": "2"}


async def test_file_past_the_size_limit(connect: ClientFactory, gw: Gateway, bystander: Bystander) -> None:
    c = await connect()
    run = await c.execute("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (100 << 20))")
    assert run.error is not None and "File too large" in run.error["evalue"]
    size = await c.execute("import os\nos.path.getsize('big.bin')")
    assert int(size.result["text/plain"]) <= 64 << 20


async def test_killing_parent_and_gateway_and_scanning_proc(connect: ClientFactory, bystander: Bystander) -> None:
    c = await connect()
    run = await c.execute(
        "import os, signal\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "print('pids', pids)\n"
        f"for name, pid in (('parent', os.getppid()), ('gateway', {os.getpid()})):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n"
        "        print(name, type(e).__name__)\n"
    )
    assert run.error is None, run.error
    pids = eval(run.stdout.split("pids")[1].splitlines()[0])
    assert max(pids) < 100 and os.getpid() not in pids  # its own namespace only
    assert "parent PermissionError" in run.stdout  # its reaper is root's
    assert "gateway ProcessLookupError" in run.stdout  # not even visible
    assert (await c.execute("1+1")).result == {"text/plain": "2"}


async def test_other_kernels_directories_are_unreadable(
    connect: ClientFactory, gw: Gateway, bystander: Bystander
) -> None:
    a, b = await connect(), await connect()
    run = await a.execute("import os\nopen('secret.txt', 'w').write('mine')\nos.path.abspath('secret.txt')")
    secret = run.result["text/plain"].strip("'")
    run = await b.execute(f"open({secret!r}).read()")
    # Not in its mount namespace at all where kernel homes are under /tmp; else not its uid's.
    assert run.error is not None and run.error["ename"] in ("FileNotFoundError", "PermissionError")


async def test_no_network_with_network_isolation(connect: ClientFactory, gw: Gateway, bystander: Bystander) -> None:
    # A listener standing in for Redis, next to the gateway's own port.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    try:
        c = await connect()
        for port in (gw.server.port, listener.getsockname()[1]):
            run = await c.execute(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
            assert run.error is not None and run.error["ename"] in ("OSError", "PermissionError"), run.error
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody got through
    finally:
        listener.close()


async def test_no_user_namespaces(connect: ClientFactory, bystander: Bystander) -> None:
    c = await connect()
    run = await c.execute(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))\n"
        "import subprocess\nprint(subprocess.run(['unshare', '-U', 'true'], capture_output=True).returncode)"
    )
    first, second = run.stdout.splitlines()
    assert first == "-1 Operation not permitted"
    assert second != "0"


async def test_tmp_and_shm_are_private(connect: ClientFactory, gw: Gateway, bystander: Bystander) -> None:
    plant = (
        "for d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
        "    p = d + '/leftover'\n    open(p, 'w').write('boo')\n    os.chmod(p, 0o666)\n"
    )
    a = await connect()
    run = await a.execute("import os\n" + plant)
    assert run.error is None, run.error
    await a.shutdown()
    b = await connect()
    run = await b.execute(
        "import os\nprint([os.path.exists(d + '/leftover') for d in ('/tmp', '/var/tmp', '/dev/shm')])"
    )
    assert run.stdout == "[False, False, False]\n"
    assert not os.path.exists("/tmp/leftover") and not os.path.exists("/dev/shm/leftover")


async def test_symlink_to_a_server_only_file(connect: ClientFactory, kernel_root: str, bystander: Bystander) -> None:
    secret = os.path.join(kernel_root, "server-only.txt")
    with open(secret, "w") as f:
        f.write("server secret")
    os.chmod(secret, 0o600)
    c = await connect()
    run = await c.execute(
        f"import os\nos.symlink({secret!r}, 'leak.txt')\n"
        "try:\n    open('leak.txt').read()\nexcept OSError as e:\n    print(type(e).__name__)\n"
        "open('real.txt', 'w').write('fine')"
    )
    assert run.stdout in ("PermissionError\n", "FileNotFoundError\n")  # not its uid's, or not in its /tmp
    files = await c.wait_files(run)
    assert [f["name"] for f in files] == ["real.txt"]  # the link is neither followed nor served


async def test_the_servers_files_are_not_in_a_kernels_view(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = await c.execute(
        f"import os\nprint(os.path.exists({gw.config.store_dir!r}), os.path.exists({project + '/gateway'!r}))\n"
        "print(os.path.exists('/etc/hostname'), os.path.exists('/usr/bin'))"
    )
    assert run.stdout == "False False\nTrue True\n"  # the system, yes; the server's data and code, no


async def test_no_unix_socket_of_the_host_is_reachable(connect: ClientFactory, bystander: Bystander) -> None:
    # A socket of our own in each place a host keeps them, next to whatever the host has.
    with planted_sockets(("/run", "/tmp", "/dev/shm")) as planted:
        c = await connect()
        home = os.path.dirname((await c.execute("import os\nprint(os.getcwd())")).stdout.strip())
        found = host_sockets(outside=home)  # its own sockets, in its home, are its own business
        assert set(planted) <= set(found)
        run = await c.execute(reach_code(found))
        assert run.stdout == "[]\n"


def nft_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True, timeout=30).stdout


async def test_without_network_isolation_kernels_still_cannot_reach_the_node_or_metadata(
    start_gateway: GatewayFactory, kernel_root: str
) -> None:
    fork_server = create_fork_server(Config(workdir_root=kernel_root, network_isolation=False))
    pool = KernelPool({"python3": KernelSpec(workdir_root=kernel_root, fork_server=fork_server)}, size=1)
    await pool.open()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    try:
        report = pool.isolation()
        assert report["fences"]["egress_rules"] and "network_namespace" not in report["fences"]
        rules = nft_ruleset()
        assert "169.254.0.0/16" in rules and "fib daddr type local reject" in rules
        gw = await start_gateway(kernel_pool=pool, queue_timeout=60.0)
        async with Client(gw.url, transports=["websocket"]) as c:
            ports = (gw.server.port, listener.getsockname()[1])
            run = await c.execute(
                "import socket\nfor port in " + repr(ports) + ":\n"
                "    try:\n        socket.create_connection(('127.0.0.1', port), timeout=2); print('reached')\n"
                "    except OSError as e:\n        print(type(e).__name__)\n"
                "print(socket.gethostname() != '')"
            )
        assert run.stdout == "ConnectionRefusedError\nConnectionRefusedError\nTrue\n", run.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody got through
        await gw.end_sessions()
    finally:
        listener.close()
        await pool.close()
    assert "169.254.0.0/16" not in nft_ruleset()  # gone with its fork server
