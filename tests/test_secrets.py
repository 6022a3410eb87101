"""Kernels never see the server's secrets; logs never show tokens or kernel keys."""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import pytest

from gateway.app import create_fork_server
from gateway.client import Client
from gateway.config import Config
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from tests.conftest import ClientFactory, Gateway, GatewayFactory

SECRETS = {
    "CELLGATE_REDIS": "redis://:hunter2@10.0.0.1",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
    "MY_API_TOKEN": "tok-5c1f",
    "DATABASE_PASSWORD": "pa55-9d2e",
}


def fork_servers() -> list[psutil.Process]:
    """The fork servers this process started (not the spares they fork)."""
    return [p for p in psutil.Process().children() if "kernels.forkserver" in p.cmdline()]


async def key_of(c: Client) -> str:
    """The kernel's signing key, as kernel code reads it."""
    return (await c.execute("get_ipython().kernel.session.key.decode()")).result["text/plain"].strip("'")


async def test_no_secret_reaches_a_kernel_or_its_fork_server(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Set before the fork server and the kernel start, as a deployment sets them.
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    before = {p.pid for p in fork_servers()}
    fork_server = create_fork_server(Config(workdir_root=str(tmp_path)))
    pool = KernelPool({"python3": KernelSpec(workdir_root=str(tmp_path), fork_server=fork_server)}, size=0)
    await pool.open()
    try:
        (server,) = [p for p in fork_servers() if p.pid not in before]
        environ = server.environ()
        assert environ and not set(environ) & set(SECRETS)
        assert not [v for v in environ.values() if any(s in v for s in SECRETS.values())]
        gw = await start_gateway(kernel_pool=pool)
        async with Client(gw.url, transports=["websocket"]) as c:
            run = await c.execute("import os\nprint(repr(dict(os.environ)))\nprint(open('/proc/self/environ').read())")
            assert "HOME" in run.stdout
            assert not [v for v in list(SECRETS) + list(SECRETS.values()) if v in run.stdout]
        await gw.end_sessions()
    finally:
        await pool.close()


async def test_kernel_never_gets_its_key_to_the_client(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    await c.execute("print('hello')\n1")
    seen = len(c.events)  # everything the gateway sent before user code asked for the key
    key = await key_of(c)
    assert len(key) >= 32
    assert all(key not in repr(d) for _, d in c.events[:seen])


async def test_logs_never_contain_tokens_or_keys(
    connect: ClientFactory, gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    c = await connect()
    await c.execute("import os; os._exit(1)", wait=False)
    await c.wait_event("kernel", state="dead", timeout=10)
    key = await key_of(c)
    await c.drop()
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert c.token not in text
    assert key not in text
