"""What a node says about its kernels' fences, and what `--isolation required` refuses.

Run as root (as CI runs), the node in this process has every fence; a second node is
started as an unprivileged user, as an operator without root would run it, and must
say what it lacks. Run without root, both are unprivileged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from gateway.app import create_fork_server
from gateway.client import Client, Refused
from gateway.config import Config, validate
from kernels.isolation import FENCES
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from kernels.provisioner import ForkServerError
from tests.conftest import (
    FILL,
    ROOT,
    UNPRIVILEGED,
    ClientFactory,
    Gateway,
    GatewayFactory,
    as_unprivileged,
    host_sockets,
    planted_sockets,
    reach_code,
    unprivileged,
)

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def transport() -> list[str]:
    return ["websocket"]


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the node owns, for its HOME, TMPDIR and store, that kernels under
    their own uids can pass through (pytest's own tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="cellgate-node-"))
    os.chmod(path, 0o755)
    if ROOT:
        user = pwd.getpwnam(UNPRIVILEGED)
        os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def node_env(scratch: Path, port: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "CELLGATE_PORT": str(port),
        "CELLGATE_STORE_DIR": str(scratch / "store"),
        "CELLGATE_POOL_SIZE": "1",
        # A small disk quota, so that filling it is quick.
        "CELLGATE_KERNEL_DISK": str(8 << 20),
        "CELLGATE_KERNEL_INODES": "2000",
        "CELLGATE_SECRET_FOR_TEST": "s3cr3t-value-7f1e",
    }


def free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture
async def unprivileged_node(unprivileged_python: str, scratch: Path) -> AsyncIterator[tuple[str, Path, int]]:
    """A node started as an unprivileged user, on `--isolation auto`."""
    port = free_port()
    log = scratch / "node.log"
    with open(log, "w") as out:
        proc = await asyncio.create_subprocess_exec(
            *unprivileged([unprivileged_python, "-m", "gateway"]),
            env=node_env(scratch, port),
            cwd=PROJECT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/health") as r:
                        if (await r.json())["kernels"]["warm"]:
                            break
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the unprivileged node never had a warm kernel:\n" + log.read_text())
        yield url, log, proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def test_the_node_reports_its_level_and_every_fence(gw: Gateway) -> None:
    isolation = (await gw.health())["isolation"]
    assert set(isolation["fences"]) == set(FENCES) - {"egress_rules"}  # that one is for no network isolation
    assert isolation["missing"] == [name for name, held in isolation["fences"].items() if not held]
    if ROOT:
        assert isolation["level"] == "full" and isolation["missing"] == []
    else:
        assert isolation["level"] == "partial" and "uid_per_kernel" in isolation["missing"]


async def test_an_unprivileged_node_says_what_it_lacks_and_kernels_still_run(
    unprivileged_node: tuple[str, Path, int],
) -> None:
    url, log, _ = unprivileged_node
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/health") as r:
            health = await r.json()
        async with http.post(url + "/service", json={"code": "import os\nprint(os.getuid())"}) as r:
            body = await r.json()
    isolation = health["isolation"]
    assert isolation["level"] == "partial", isolation
    # What needs root: a uid per kernel, and cgroups. Everything else holds.
    assert set(isolation["missing"]) == {"uid_per_kernel", "cgroup_memory", "cgroup_swap", "cgroup_pids", "cgroup_cpu"}
    assert isolation["user_namespace"] and isolation["filesystem_view"] and isolation["seccomp"]
    assert body["stdout"] == f"{pwd.getpwnam(UNPRIVILEGED).pw_uid if ROOT else os.getuid()}\n", body
    warnings = [line for line in log.read_text().splitlines() if " WARNING " in line and "isolation" in line]
    assert len(warnings) == 1, warnings  # one line that says it all
    assert "kernel isolation is partial" in warnings[0] and FENCES["cgroup_memory"] in warnings[0]


async def test_without_root_kernels_are_still_fenced_from_the_server_and_each_other(
    unprivileged_node: tuple[str, Path, int], scratch: Path
) -> None:
    url, _, node_pid = unprivileged_node
    port = int(url.rsplit(":", 1)[1])
    async with Client(url, transports=["websocket"]) as a, Client(url, transports=["websocket"]) as b:
        run = await a.execute("import os\nopen('secret.txt', 'w').write('mine')\nprint(os.getcwd())")
        home_a = run.stdout.strip()
        probe = (
            "import glob, os, signal, socket\n"
            "env = []\n"
            "for path in glob.glob('/proc/[0-9]*/environ'):\n"
            "    try:\n        env.append(open(path, 'rb').read())\n    except OSError:\n        pass\n"
            "print('secret' if any(b's3cr3t-value-7f1e' in e for e in env) else 'no secret')\n"
            "def reach(path):\n"
            "    try:\n        open(path).read(); return 'read'\n"
            "    except OSError as e:\n        return type(e).__name__\n"
            f"print(reach({home_a + '/secret.txt'!r}), reach({os.path.dirname(home_a) + '/connection.json'!r}))\n"
            f"print(os.path.exists({str(scratch / 'store')!r}), os.path.exists({str(PROJECT / 'gateway')!r}))\n"
            f"try:\n    os.kill({node_pid}, signal.SIGKILL); print('signalled')\n"
            "except OSError as e:\n    print(type(e).__name__)\n"
            "print(sorted(os.listdir(os.path.dirname(os.path.dirname(os.getcwd())))))\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('reached')\n"
            "except OSError as e:\n    print(type(e).__name__)\n"
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.unshare(0x10000000), os.strerror(ctypes.get_errno()))\n"
        )
        out = (await b.execute(probe)).stdout.splitlines()
        home_b = (await b.execute("import os\nprint(os.getcwd())")).stdout.strip()
    assert out[0] == "no secret"  # the node's environment is in no /proc/*/environ it can read
    assert out[1] == "FileNotFoundError FileNotFoundError"  # other kernels' files and keys: not there
    assert out[2] == "False False"  # neither the data directory nor the server's code
    assert out[3] == "ProcessLookupError"  # the node cannot even be seen, let alone signalled
    # Of the kernel root: its own home and the read-only font cache, nothing else.
    assert eval(out[4]) == sorted([os.path.basename(os.path.dirname(home_b)), "shared-cache"])
    assert out[5] in ("OSError", "PermissionError")  # no network: not even the node's own port
    assert out[6] == "-1 Operation not permitted"  # seccomp: no namespace of its own to escape into


async def test_without_root_the_quota_seccomp_and_the_view_of_sockets_hold(
    unprivileged_node: tuple[str, Path, int],
) -> None:
    url, _, _ = unprivileged_node
    with planted_sockets(("/run", "/tmp", "/dev/shm") if ROOT else ("/tmp", "/dev/shm")) as planted:
        async with Client(url, transports=["websocket"]) as c:
            home = os.path.dirname((await c.execute("import os\nprint(os.getcwd())")).stdout.strip())
            found = host_sockets(outside=home)
            run = await c.execute(
                FILL + "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "print(fill(lambda n: open(f'big{n}', 'wb').write(b'x' * (1 << 20))))\n"
                "print(fill(lambda n: open(f'f{n}', 'w').close()))\n"
                "def call(nr):\n    r = libc.syscall(nr, 0, 0, 0, 0, 0)\n"
                "    return 'ok' if r != -1 else os.strerror(ctypes.get_errno())\n"
                "print(sorted({call(nr) for nr in (431, 433, 442, 320, 438, 440, 272, 308, 101)}))\n"
                + reach_code(found)
            )
    big, small, calls, reached = run.stdout.splitlines()
    assert eval(big)[1] == "ENOSPC" and eval(big)[0] <= 8  # bytes: the 8 MiB quota
    assert eval(small)[1] == "ENOSPC" and eval(small)[0] < 2000  # and files
    assert eval(calls) == ["Operation not permitted"]  # mount API, kexec, pidfd_getfd, unshare, setns, ptrace
    assert set(planted) <= set(found) and reached == "[]"


def test_required_refuses_to_start_an_unprivileged_node(unprivileged_python: str, scratch: Path) -> None:
    done = as_unprivileged(
        [unprivileged_python, "-m", "gateway", "--isolation", "required"],
        env=node_env(scratch, free_port()),
        cwd=PROJECT,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cellgate: --isolation required, but uid_per_kernel"), done.stderr
    assert "Traceback" not in done.stderr


def test_required_refuses_kernels_without_the_fork_server() -> None:
    with pytest.raises(SystemExit) as exc:
        validate(Config(isolation="required", fork_server=False))
    assert "--isolation required needs the fork server" in str(exc.value)


async def test_a_kernel_that_cannot_be_isolated_is_refused_or_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A kernel spec for another interpreter: the fork server cannot run it.
    spec_dir = tmp_path / "jupyter" / "kernels" / "other"
    spec_dir.mkdir(parents=True)
    spec_dir.joinpath("kernel.json").write_text(
        json.dumps(
            {
                "argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Other Python",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    for mode in ("auto", "required"):
        fork_server = create_fork_server(Config(workdir_root=str(tmp_path / mode), isolation=mode))
        pool = KernelPool({"other": KernelSpec(name="other", workdir_root=str(tmp_path), fork_server=fork_server)}, 0)
        caplog.clear()
        try:
            if mode == "required":
                with pytest.raises(ForkServerError) as exc:
                    await pool.open()
                if ROOT:  # without root the missing fences are refused first
                    assert "kernels other cannot be isolated" in str(exc.value)
            else:
                with caplog.at_level(logging.WARNING, logger="kernels.pool"):
                    await pool.open()
                report = pool.isolation()
                assert report["level"] == "none" and report["missing"][0] == "fork_server"
                assert any("other run as plain processes" in n for n in report["notes"])
                assert any("kernel isolation is none" in r.getMessage() for r in caplog.records)
        finally:
            await pool.close()


async def test_each_node_has_a_fresh_kernel_root_and_removes_it(scratch: Path) -> None:
    # No --workdir-root: the node makes its own and removes it when it stops.
    port = free_port()
    env = {**node_env(scratch, port), "CELLGATE_POOL_SIZE": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", env=env, cwd=PROJECT, stderr=subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.post(
                        f"http://127.0.0.1:{port}/service",
                        json={"code": "import os\nprint(os.path.dirname(os.path.dirname(os.getcwd())))"},
                    ) as r:
                        root = (await r.json())["stdout"].strip()
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the node never answered")
        assert os.path.basename(root).startswith("cellgate-kernels-") and root.startswith(str(scratch))
        assert os.stat(root).st_mode & 0o777 == 0o711
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    assert not os.path.exists(root)


async def test_seccomp_refuses_the_newer_mount_calls_and_other_personas(connect: ClientFactory) -> None:
    c = await connect()
    # x86_64 numbers: fsconfig, fspick, mount_setattr, kexec_file_load, pidfd_getfd, process_madvise.
    run = await c.execute(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(nr, *args):\n"
        "    r = libc.syscall(nr, *args)\n"
        "    return 'ok' if r != -1 else os.strerror(ctypes.get_errno())\n"
        "print({nr: call(nr, 0, 0, 0, 0, 0) for nr in (431, 433, 442, 320, 438, 440)})\n"
        "print([call(135, ctypes.c_ulong(p)) for p in (0, 0xFFFFFFFF, 0x0040000, 0x0400000, 8)])\n"
    )
    calls, personas = run.stdout.splitlines()
    assert set(eval(calls).values()) == {"Operation not permitted"}, calls
    assert eval(personas) == ["ok", "ok"] + ["Operation not permitted"] * 3


async def test_a_kernels_disk_is_bounded_in_bytes_and_files_and_uploads_count(
    start_gateway: GatewayFactory, kernel_root: str
) -> None:
    # A small quota of its own, so that filling it is quick: 8 MiB and 2,000 files.
    fork_server = create_fork_server(Config(workdir_root=kernel_root, kernel_disk=8 << 20, kernel_inodes=2000))
    pool = KernelPool({"python3": KernelSpec(workdir_root=kernel_root, fork_server=fork_server)}, size=1)
    await pool.open()
    try:
        assert pool.isolation()["fences"]["disk_quota"]
        gw = await start_gateway(kernel_pool=pool, queue_timeout=60.0)
        free = shutil.disk_usage(kernel_root).free
        async with Client(gw.url, transports=["websocket"]) as c:
            run = await c.execute(
                FILL + "print(fill(lambda n: open(f'big{n}', 'wb').write(b'x' * (1 << 20))))\n"
                "print(fill(lambda n: open(f'f{n}', 'w').close()))"
            )
            big, small = (eval(line) for line in run.stdout.splitlines())
            assert big[1] == "ENOSPC" and big[0] <= 8
            assert small[1] == "ENOSPC" and small[0] < 2000
            with pytest.raises(Refused) as err:  # uploads go to the same, full, directory
                await c.upload("more.bin", b"y" * 4096)
            assert err.value.code == "file_too_large" and "disk quota" in err.value.message
        assert free - shutil.disk_usage(kernel_root).free < 8 << 20  # the host's disk did not pay
        await gw.end_sessions()
    finally:
        await pool.close()
