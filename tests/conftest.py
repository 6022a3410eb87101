"""Shared fixtures: one warm kernel pool for the whole run, gateways on free ports.

A kernel costs about half a second of CPU to start, so every gateway started here
draws from the same pool unless a test is about the pool itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from gateway.app import create_app, create_fork_server
from gateway.client import Client
from gateway.config import Config
from gateway.sessions import SessionManager
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from tests.redisserver import RedisServer, redis_server
from tests.s3server import S3Server, s3_server

TRANSPORTS = {"websocket": ["websocket"], "polling": ["polling"]}


@dataclass
class Gateway:
    server: TestServer
    config: Config

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def manager(self) -> SessionManager:
        return self.server.app["manager"]

    async def health(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url + "/health") as r:
            return await r.json()

    async def wait_sessions(self, n: int, timeout: float = 10.0) -> int:
        """How many sessions /health reports, once it is `n` or `timeout` has passed."""
        count = -1
        for _ in range(int(timeout / 0.05)):
            if (count := (await self.health())["sessions"]) == n:
                break
            await asyncio.sleep(0.05)
        return count

    async def end_sessions(self) -> None:
        await self.manager.close()  # what the node does on its way down


@pytest.fixture(scope="session")
def kernel_root() -> str:
    return tempfile.mkdtemp(prefix="cellgate-test-kernels-")


@pytest_asyncio.fixture(scope="session")
async def pool(kernel_root: str) -> AsyncIterator[KernelPool]:
    """Kernels as a node makes them by default: forked, and isolated as far as the host allows."""
    fork_server = create_fork_server(Config(workdir_root=kernel_root))
    p = KernelPool({"python3": KernelSpec(workdir_root=kernel_root, fork_server=fork_server)}, size=2, max_kernels=16)
    await p.open()
    p.start()
    yield p
    await p.close()


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest_asyncio.fixture(scope="session")
async def start_gateway(pool: KernelPool, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def start(kernel_pool: KernelPool | None = None, **overrides: Any) -> Gateway:
        settings: dict[str, Any] = {
            "store_dir": str(tmp_path_factory.mktemp("store")),
            "sessions_per_client": 50,
            **overrides,
        }
        config = Config(**settings)
        server = TestServer(create_app(config, pool=kernel_pool or pool), host="127.0.0.1", port=0)
        await server.start_server()
        gw = Gateway(server, config)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        with contextlib.suppress(Exception):
            await gw.end_sessions()
        await gw.server.close()


@pytest_asyncio.fixture(scope="session")
async def shared_gateway(start_gateway: GatewayFactory) -> Gateway:
    return await start_gateway()


@pytest_asyncio.fixture
async def gw(shared_gateway: Gateway) -> AsyncIterator[Gateway]:
    """The shared gateway; every session a test opened is ended after it."""
    yield shared_gateway
    await shared_gateway.end_sessions()


@pytest.fixture(params=list(TRANSPORTS))
def transport(request: pytest.FixtureRequest) -> list[str]:
    return TRANSPORTS[request.param]


ClientFactory = Callable[..., Awaitable[Client]]


@pytest_asyncio.fixture
async def connect(gw: Gateway, transport: list[str]) -> AsyncIterator[ClientFactory]:
    """Open a client on the shared gateway over the test's transport."""
    clients: list[Client] = []

    async def make(gateway: Gateway | None = None, connect: bool = True, **kwargs: Any) -> Client:
        c = Client((gateway or gw).url, transports=kwargs.pop("transports", transport), timeout=20, **kwargs)
        clients.append(c)
        if connect:
            await c.connect()
        return c

    yield make
    for c in clients:
        await c.drop()


class Bystander:
    """A second session that keeps running 1+1; `misses` lists every slow or wrong answer."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.answers = 0
        self.misses: list[str] = []

    async def run(self) -> None:
        while True:
            try:
                run = await asyncio.wait_for(self.client.execute("1+1"), 1.0)
                if run.result != {"text/plain": "2"}:
                    self.misses.append(f"wrong answer {run.result}")
                self.answers += 1
            except TimeoutError:
                self.misses.append("no answer within 1 s")
            await asyncio.sleep(0.1)


@pytest_asyncio.fixture
async def bystander(connect: ClientFactory) -> AsyncIterator[Bystander]:
    b = Bystander(await connect())
    await b.client.execute("1+1")  # its kernel attached before the attack starts
    task = asyncio.create_task(b.run())
    yield b
    # One more answer after the attack is over: the node still serves (and a quick
    # attack may be over before the bystander's first answer).
    answered = b.answers
    for _ in range(100):
        if b.answers > answered:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert b.answers > answered, "no answer after the attack"
    assert not b.misses, b.misses


SOCKET_DIRS = ("/run", "/var/run", "/tmp", "/dev")  # where a host keeps its AF_UNIX sockets
SOCKET_DEPTH = 12  # levels below each of them that are searched


def host_sockets(outside: str) -> list[str]:
    """Every AF_UNIX socket under SOCKET_DIRS but those under `outside` (a kernel's home,
    whose sockets are its own)."""
    found = []
    for top in SOCKET_DIRS:
        for directory, dirs, names in os.walk(top):
            # Sockets live near the top; a kernel's home may hold a tree thousands of
            # levels deep (a test makes one), which os.walk would recurse into.
            if directory.count("/") - top.count("/") >= SOCKET_DEPTH:
                dirs[:] = []
            for name in names:
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):  # gone meanwhile
                    if stat.S_ISSOCK(os.lstat(path).st_mode) and not path.startswith(outside + "/"):
                        found.append(path)
    return sorted(found)


@contextlib.contextmanager
def planted_sockets(directories: tuple[str, ...]) -> Iterator[list[str]]:
    """A listening socket that anyone may connect to in each directory: only a kernel's
    filesystem view keeps it out."""
    planted: list[tuple[str, socket.socket]] = []
    try:
        for directory in directories:
            path = os.path.join(directory, f"cellgate-test-{os.getpid()}.sock")
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path)
            os.chmod(path, 0o777)
            sock.listen()
            planted.append((path, sock))
        yield [path for path, _ in planted]
    finally:
        for path, sock in planted:
            sock.close()
            os.unlink(path)


def reach_code(paths: list[str]) -> str:
    """Kernel code that prints the list of `paths` it could connect to."""
    return (
        "import socket\nreached = []\n"
        f"for path in {paths!r}:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n        s.connect(path); reached.append(path)\n    except OSError:\n        pass\n"
        "    finally:\n        s.close()\n"
        "print(reached)\n"
    )


# Kernel code: fill(make) calls make(0), make(1), ... until it fails, and returns how
# many calls succeeded and the errno name that stopped it.
FILL = (
    "import errno\ndef fill(make):\n    n = 0\n    try:\n"
    "        while n < 100_000:\n            make(n); n += 1\n"
    "    except OSError as e:\n        return n, errno.errorcode[e.errno]\n"
)


# Real-looking credentials: the S3 tests also check that kernels never see them.
AWS_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIA" + "7QX2LRMZ5N3KD4WE",
    "AWS_SECRET_ACCESS_KEY": "c3Gx9vL2mQ8rT5yW1zB7nK4pJ6hF0dS" + "aE3uI9oPq",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance metadata service
}


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server for the whole run, with one bucket; the gateways started by the
    tests find its credentials in the environment, as a deployment's would."""
    saved = {name: os.environ.get(name) for name in AWS_CREDENTIALS}
    os.environ.update(AWS_CREDENTIALS)
    try:
        with s3_server() as server:
            server.client().create_bucket(Bucket=server.bucket)
            yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def redis() -> Iterator[RedisServer]:
    """A redis-server for the whole run; each test keeps to a key prefix of its own."""
    with redis_server() as server:
        yield server


# -- a user without root, for what must hold without it ---------------------------------

ROOT = os.geteuid() == 0
UNPRIVILEGED = "nobody"


@pytest.fixture(scope="session")
def unprivileged_python() -> Iterator[str]:
    """A Python that an unprivileged user can run with our packages: a venv made from
    the system interpreter whose site points at this venv's packages (this venv's own
    interpreter may live under a home others cannot enter)."""
    if not ROOT:
        yield sys.executable
        return
    venv = Path(tempfile.mkdtemp(prefix="cellgate-unprivileged-python-"))  # pytest's own tmp is 0700
    os.chmod(venv, 0o755)
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    site.joinpath("cellgate-packages.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n"
    )
    python = str(venv / "bin" / "python")
    check = as_unprivileged([python, "-c", "import gateway, kernels, ipykernel"], cwd="/")
    assert check.returncode == 0, f"{UNPRIVILEGED} cannot import the project: {check.stderr}"
    yield python
    shutil.rmtree(venv, ignore_errors=True)


def as_unprivileged(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(unprivileged(argv), capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def unprivileged(argv: list[str]) -> list[str]:
    if not ROOT:
        return argv
    user = pwd.getpwnam(UNPRIVILEGED)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", *argv]
