"""Kernels never see the server's secrets; logs never show tokens or kernel keys."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import psutil
import pytest

from gateway.app import create_fork_server
from gateway.client import Client
from gateway.config import Config
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from tests.conftest import AWS_CREDENTIALS, ClientFactory, Gateway, GatewayFactory
from tests.s3server import S3Server

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


# Kernel code: look for NEEDLES in its environment, in every process it can see, and in
# every file it can read outside the system's own trees; print what it read and found.
SEARCH = """
import json, os
needles, paths = NEEDLES, PATHS
found, read = [], 0
def look(where, data):
    global read
    read += 1
    for n in needles:
        if n.encode() in data:
            found.append((where, n))
look('os.environ', repr(dict(os.environ)).encode())
for pid in filter(str.isdigit, os.listdir('/proc')):
    for part in ('environ', 'cmdline'):
        try:
            look(f'/proc/{pid}/{part}', open(f'/proc/{pid}/{part}', 'rb').read())
        except OSError:
            pass
tops = [os.path.expanduser('~'), os.getcwd(), '/tmp', '/var/tmp', '/dev/shm', '/etc', '/run', '/root', '/home',
        '/opt', '/srv', '/mnt', '/var', '/work']
for top in tops:
    for directory, dirs, names in os.walk(top):
        for name in names:
            path = os.path.join(directory, name)
            try:
                if os.path.isfile(path) and os.path.getsize(path) < 1 << 20:
                    look(path, open(path, 'rb').read())
            except OSError:
                pass
opened = []
for path in paths:
    try:
        os.listdir(path) if os.path.isdir(path) else open(path, 'rb').read()
        opened.append(path)
    except OSError:
        pass
print(json.dumps({'found': found, 'read': read, 'opened': opened}))
"""


async def test_a_kernel_finds_no_credential_of_an_s3_node(
    start_gateway: GatewayFactory, s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A node as deployed: S3 keys in its environment (the s3 fixture's), a shared
    # credentials file, its settings and a server secret in the environment too.
    credentials = tmp_path / "aws-credentials"
    credentials.write_text("[other]\naws_access_key_id = AKIAFILEKEY0000\naws_secret_access_key = fIlEsEcReT0042\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("CELLGATE_S3_ENDPOINT_URL", s3.url)
    monkeypatch.setenv("MY_API_TOKEN", SECRETS["MY_API_TOKEN"])
    needles = [
        AWS_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        AWS_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "AKIAFILEKEY0000",
        "fIlEsEcReT0042",
        SECRETS["MY_API_TOKEN"],
    ]
    fork_server = create_fork_server(Config(workdir_root=str(tmp_path / "kernels")))
    pool = KernelPool({"python3": KernelSpec(workdir_root=str(tmp_path / "kernels"), fork_server=fork_server)}, size=0)
    await pool.open()
    try:
        store_dir = tmp_path / "data"
        gw = await start_gateway(kernel_pool=pool, store_dir=str(store_dir), **s3.settings())
        async with Client(gw.url, transports=["websocket"], timeout=60) as c:
            paths = [str(credentials), str(store_dir), str(store_dir / "spool")]
            code = SEARCH.replace("NEEDLES", repr(needles)).replace("PATHS", repr(paths))
            run = await c.execute(code + "open('proof.txt', 'w').write('stored')", timeout=60)
            report = json.loads(run.stdout)
            (stored,) = await c.wait_files(run)
            await c.shutdown()
        assert report["read"] > 20, report  # it did look
        assert report["found"] == [] and report["opened"] == []
        assert stored["url"] and s3.objects(gw.config.s3_prefix + "/files")  # and the node did use S3
    finally:
        await pool.close()
