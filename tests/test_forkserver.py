"""Forked kernels are ordinary ipykernel kernels, each its own, and the node says how they are fenced.

Interrupts, comms, widgets, matplotlib inline and tracebacks are covered by the other
suites, which all run on forked kernels; this one covers what forking could break.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import psutil
import pytest

from gateway.app import create_fork_server
from gateway.client import Client
from gateway.config import Config
from kernels.kernel import Kernel, KernelSpec, KernelStartError
from kernels.pool import KernelPool
from kernels.provisioner import ForkServer, ForkServerError
from tests.conftest import ClientFactory, Gateway


async def test_each_kernel_has_its_own_random_seed(connect: ClientFactory) -> None:
    code = "import random, numpy\nprint(random.random(), numpy.random.random())"
    a, b = await connect(), await connect()
    first, second = (await a.execute(code)).stdout, (await b.execute(code)).stdout
    assert first and second and first != second
    assert set(first.split()).isdisjoint(second.split())


async def test_forked_kernels_are_provisioned_through_jupyter_client(connect: ClientFactory) -> None:
    c = await connect()
    run = await c.execute("import os\nprint(os.getppid(), os.getcwd() == os.environ['HOME'])")
    parent, home = run.stdout.split()
    assert home == "True"
    assert int(parent) != os.getpid()  # a child of the fork server, not of the gateway


async def test_a_fresh_kernel_is_configured_from_its_command_line_and_untouched(connect: ClientFactory) -> None:
    # The fork server parses ipykernel's command line once for every kernel, and the
    # start-up warm-up runs code: neither may show in what the user's first cell sees.
    c = await connect()
    run = await c.execute(
        "from ipykernel.kernelapp import IPKernelApp\n"
        "app = IPKernelApp.instance()\n"
        "print(app.connection_file.endswith('/state/kernel.json'), get_ipython().history_manager.enabled)\n"
        "print(sorted(Out), [n for n in ('_', '__', '_i') if n in globals() and globals()[n] != ''])"
    )
    assert run.stdout == "True False\n[] []\n"
    assert run.reply is not None and run.reply["execution_count"] == 1


async def test_exit_is_seen_at_once_with_its_code(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("1")
    await c.request("shell", "execute_request", {"code": "import os\nos._exit(3)"})
    dead = await c.wait_event("kernel", state="dead", timeout=10)
    assert dead["reason"] == "the kernel process exited with code 3"
    assert (await c.execute("1+1", timeout=30)).result == {"text/plain": "2"}


async def test_first_plot_needs_no_font_cache_build(connect: ClientFactory) -> None:
    c = await connect()
    run = await c.execute(
        "import matplotlib.pyplot as plt, matplotlib.font_manager as fm\n"
        "plt.plot([1, 2]); plt.title('hello'); plt.show()\nprint(len(fm.fontManager.ttflist) > 0)",
        timeout=60,
    )
    assert run.stdout == "True\n"
    assert any("image/png" in d["data"] for d in run.displays)


async def test_health_reports_isolation(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/health") as response:
        isolation = (await response.json())["isolation"]
    assert set(isolation) >= {"enabled", "uids", "pid_namespace", "network_namespace", "cgroups", "seccomp", "notes"}
    if os.geteuid() == 0:
        assert isolation["enabled"] and isolation["uids"] == "1500000-1500999"
        assert isolation["pid_namespace"] and isolation["network_namespace"] and isolation["seccomp"]


async def test_isolation_off_is_reported_and_kernels_still_work(kernel_root: str, start_gateway) -> None:
    fork_server = create_fork_server(Config(workdir_root=kernel_root, isolation="off"))
    pool = KernelPool({"python3": KernelSpec(workdir_root=kernel_root, fork_server=fork_server)}, size=0)
    await pool.open()
    try:
        assert pool.isolation()["enabled"] is False
        assert "isolation is switched off (--isolation off)" in pool.isolation()["notes"]
        gw = await start_gateway(kernel_pool=pool)
        c = Client(gw.url, transports=["websocket"])
        await c.connect()
        run = await c.execute("import os\nos.getuid() == os.geteuid()")
        assert run.result == {"text/plain": "True"}
        await c.drop()
        await gw.end_sessions()
    finally:
        await pool.close()


async def test_kernel_that_dies_while_starting_fails_its_start(kernel_root: str) -> None:
    # Eight open files are too few for ipykernel: it dies before it binds its sockets.
    # The start must say so at once, not wait out its (here very long) timeout.
    fork_server = create_fork_server(Config(workdir_root=kernel_root, kernel_open_files=8))
    assert fork_server is not None
    try:
        with pytest.raises(KernelStartError, match="exited during start-up"):
            await Kernel.start(KernelSpec(workdir_root=kernel_root, fork_server=fork_server, start_timeout=3600))
    finally:
        await fork_server.close()


async def test_a_command_line_that_is_not_a_kernels_is_refused(pool: KernelPool) -> None:
    (server,) = pool.fork_servers
    with pytest.raises(ForkServerError, match="not a kernel's command line"):
        await server.spawn("/nonexistent", ["script.py"], {})
    # The refusal cost the server nothing: it goes on forking kernels.
    kernel = await Kernel.start(KernelSpec(workdir_root=server.root, fork_server=server))
    try:
        assert kernel.alive
    finally:
        await kernel.shutdown()


def fork_server_processes(server: ForkServer) -> list[psutil.Process]:
    """The fork server and everything forked from it (spares and reapers run as root)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if server.socket_path in " ".join(p.info["cmdline"] or ()):
            found.append(p)
    return found


async def test_a_spare_that_died_is_replaced_and_none_outlives_the_server(kernel_root: str) -> None:
    server = create_fork_server(Config(workdir_root=kernel_root))
    assert server is not None
    await server.start()
    try:
        assert server._process is not None
        main = psutil.Process(server._process.pid)
        # Nothing is running but the spare: a reaper and its kernel-to-be, both waiting
        # (the process that made their namespaces exits once the reaper exists).
        spare: list[psutil.Process] = []
        for _ in range(100):
            spare = [p for p in main.children(recursive=True) if p.uids().real == 0]
            if len(spare) == 2 and all(p.status() == psutil.STATUS_SLEEPING for p in spare):
                break
            await asyncio.sleep(0.05)
        assert len(spare) == 2
        for p in spare:
            p.kill()
        kernel = await Kernel.start(KernelSpec(workdir_root=kernel_root, fork_server=server))
        try:
            assert kernel.alive
        finally:
            await kernel.shutdown()
    finally:
        await server.close()
    for _ in range(50):
        if not fork_server_processes(server):
            break
        await asyncio.sleep(0.1)
    assert fork_server_processes(server) == []
