"""The fork server as jupyter_client sees it: a kernel provisioner, and the process behind it.

`ForkServer` runs `kernels.forkserver` and asks it for kernels. `ForkProvisioner` is a
jupyter_client kernel provisioner (entry point `cellgate-fork`), so a KernelManager
writes the connection file, signals, interrupts and shuts kernels down exactly as it
does for the local provisioner; only the launch is a fork instead of a Popen, and the
kernel is watched through a pidfd, so its exit is seen the moment it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory, LocalProvisioner
from traitlets import Unicode

from kernels import workdir
from kernels.environment import server_environment
from kernels.forkserver import MAX_REQUEST, Settings
from kernels.isolation import Limits

log = logging.getLogger(__name__)

PROVISIONER = "cellgate-fork"


def register() -> None:
    """Make the provisioner known to jupyter_client in code, so that a plain checkout
    works without `pip install -e .` having registered its entry point."""
    KernelProvisionerFactory.provisioners.setdefault(
        PROVISIONER,
        EntryPoint(PROVISIONER, f"{__name__}:ForkProvisioner", KernelProvisionerFactory.GROUP_NAME),
    )


class ForkServerError(RuntimeError):
    """The fork server could not start, or could not make a kernel."""


@dataclass
class Exit:
    code: int
    oom: bool


@dataclass
class ForkServer:
    """One fork server per gateway node, started on first use and restarted if it dies."""

    root: str
    isolation: bool = True
    network: bool = True
    uids: tuple[int, int] | None = None
    limits: Limits = field(default_factory=Limits)
    start_timeout: float = 60.0
    required: bool = False  # refuse to run with less isolation than asked for

    def __post_init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="cellgate-forkserver-")  # 0700: only our uid
        self.socket_path = os.path.join(self._dir, "socket")
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._exits: dict[int, asyncio.Future[Exit]] = {}
        self._launches: dict[str, asyncio.Future[None]] = {}
        self.report: dict[str, Any] = {
            "enabled": False,
            "level": "none",
            "missing": ["fork_server"],
            "notes": ["the fork server has not started yet"],
        }
        self.specs = ForkSpecs(fork_socket=self.socket_path)  # what its kernels' managers look specs up in
        register()
        _SERVERS[self.socket_path] = self

    async def start(self) -> None:
        async with self._lock:
            if self._process is not None and self._process.returncode is None:
                return
            os.makedirs(self.root, mode=0o711, exist_ok=True)
            try:
                os.chmod(self.root, 0o711)  # kernels under their own uids must reach their homes
            except PermissionError:
                raise ForkServerError(
                    f"the kernel root {self.root} belongs to another user: choose another --workdir-root"
                ) from None
            settings = Settings(
                root=self.root,
                socket=self.socket_path,
                isolation=self.isolation,
                network=self.network,
                uids=self.uids,
                limits=self.limits,
            )
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kernels.forkserver",
                settings.to_json(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=server_environment(),
                cwd=self.root,
                limit=1 << 20,
                # Its life is ours (stdin's end, or our death): a signal to our whole
                # process group (a terminal's Ctrl-C, `timeout`, `kill -TERM -<pgid>`)
                # must not stop it while we drain and its kernels finish their cells.
                start_new_session=True,
            )
            assert self._process.stdout is not None
            try:
                line = await asyncio.wait_for(self._process.stdout.readline(), self.start_timeout)
                ready = json.loads(line)
            except (TimeoutError, ValueError) as exc:
                self._process.kill()
                raise ForkServerError(f"the fork server did not start: {exc!r}") from None
            self.report = {**ready["isolation"], "notes": ready["notes"]}
            if self.required and self.report["level"] != "full":
                self._process.stdin.close()  # type: ignore[union-attr]
                await self._process.wait()
                self._process = None
                raise ForkServerError(
                    f"--isolation required, but {', '.join(self.report['missing'])} do not hold: "
                    + "; ".join(ready["notes"])
                )
            self._reader = asyncio.create_task(self._read_exits(self._process.stdout))

    async def _read_exits(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            with contextlib.suppress(ValueError, KeyError):
                report = json.loads(line)
                self._exit_future(report["exit"]).set_result(Exit(report["code"], report["oom"]))
        for future in self._exits.values():  # the fork server died: so did its kernels
            if not future.done():
                future.set_result(Exit(-signal.SIGKILL, False))

    def _exit_future(self, pid: int) -> asyncio.Future[Exit]:
        if pid not in self._exits:
            self._exits[pid] = asyncio.get_running_loop().create_future()
        return self._exits[pid]

    async def exit_of(self, pid: int, timeout: float = 1.0) -> Exit | None:
        """How the kernel whose reaper is `pid` ended, once the fork server has reaped it."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._exit_future(pid)), timeout)
        except TimeoutError:
            return None
        finally:
            if self._exit_future(pid).done():
                self._exits.pop(pid, None)

    def can_fork(self, kernel_name: str) -> bool:
        try:
            return forkable(self.specs.get_kernel_spec(kernel_name))
        except Exception:  # no such spec: the pool's start reports it
            return False

    def launched(self, home: str) -> asyncio.Future[None]:
        """Done once the kernel for `home` exists (its sockets may not be bound yet)."""
        return self._launches.setdefault(home, asyncio.get_running_loop().create_future())

    async def spawn(self, home: str, argv: list[str], env: dict[str, str]) -> tuple[int, int]:
        """A new kernel in `home` (which holds connection.json, work/ and state/): its
        reaper's pid and a pidfd for it."""
        await self.start()
        request = json.dumps({"home": home, "argv": argv, "env": env}).encode()
        try:
            return await asyncio.to_thread(self._ask, request)
        finally:
            launched = self._launches.pop(home, None)
            if launched is not None and not launched.done():
                launched.set_result(None)

    def _ask(self, request: bytes) -> tuple[int, int]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(self.start_timeout)
            conn.connect(self.socket_path)
            conn.send(request)
            data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 1)
        reply = json.loads(data or b'{"error": "the fork server closed the connection"}')
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise ForkServerError(reply["error"])
        return reply["pid"], fds[0]

    async def close(self) -> None:
        _SERVERS.pop(self.socket_path, None)
        process = self._process
        if process is not None and process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()  # its lifeline: it kills every kernel and exits
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
            os.rmdir(self._dir)
        if self.root == workdir.default_root():  # made for this process: nothing else uses it
            await workdir.run(workdir.remove_tree, self.root, timeout=None)


_SERVERS: dict[str, ForkServer] = {}


def forkable(spec: KernelSpec) -> bool:
    """The fork server has this interpreter's ipykernel loaded: it serves kernels that
    would run exactly that."""
    argv = spec.argv
    return (
        spec.language.lower() == "python"
        and len(argv) >= 3
        and argv[1:3] == ["-m", "ipykernel_launcher"]
        and os.path.realpath(argv[0] if os.path.isabs(argv[0]) else sys.executable) == os.path.realpath(sys.executable)
    )


class ForkSpecs(KernelSpecManager):
    """Installed kernel specs, with Python ones pointed at the fork provisioner. Each
    spec is read once per fork server (a lookup walks every kernel directory, a few ms
    of each start); a new or changed spec is seen when the node restarts."""

    fork_socket = Unicode("")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._read: dict[str, KernelSpec] = {}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name not in self._read:
            spec = super().get_kernel_spec(kernel_name)
            if self.fork_socket and forkable(spec):
                provisioner = {"provisioner_name": PROVISIONER, "config": {"fork_socket": self.fork_socket}}
                spec.metadata = {**spec.metadata, "kernel_provisioner": provisioner}
            self._read[kernel_name] = spec
        read = self._read[kernel_name]
        # A copy: a KernelManager is free to change the one it is given.
        return KernelSpec(resource_dir=read.resource_dir, **copy.deepcopy(read.to_dict()))


class ForkProvisioner(LocalProvisioner):
    """Launches by asking the fork server; pre-launch (connection file, ports) is the
    local provisioner's."""

    fork_socket = Unicode("", config=True)

    pidfd: int | None = None
    _exit: asyncio.Future[int] | None = None

    @property
    def server(self) -> ForkServer:
        try:
            return _SERVERS[self.fork_socket]
        except KeyError:
            raise ForkServerError("the fork server is closed") from None

    @property
    def has_process(self) -> bool:
        return self.pidfd is not None

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        connection_file = cmd[cmd.index("-f") + 1]
        argv = cmd[cmd.index("-f") + 2 :]
        env = {k: v for k, v in kwargs.get("env", {}).items() if k != "JPY_PARENT_PID"}
        self.pid, self.pidfd = await self.server.spawn(os.path.dirname(connection_file), argv, env)
        self.pgid = None
        self.cwd = kwargs.get("cwd")
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        loop.add_reader(self.pidfd, self._on_exit)
        return self.connection_info

    def _on_exit(self) -> None:
        assert self.pidfd is not None and self._exit is not None
        asyncio.get_running_loop().remove_reader(self.pidfd)
        if not self._exit.done():
            self._exit.set_result(-signal.SIGKILL)  # the real code follows from the fork server

    async def exited(self) -> Exit:
        """Wait for the kernel to end; how it ended, as far as the fork server knows."""
        assert self._exit is not None
        await asyncio.shield(self._exit)
        exit = await self.server.exit_of(self.pid) if self.fork_socket in _SERVERS else None
        return exit or Exit(-signal.SIGKILL, False)

    async def poll(self) -> int | None:
        if self._exit is None:
            return 0
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int | None:
        if self._exit is None:
            return 0
        code = await asyncio.shield(self._exit)
        self._close_pidfd()
        return code

    async def send_signal(self, signum: int) -> None:
        # To the reaper, which passes it on to the kernel (and SIGKILL ends them all).
        if self.pidfd is not None and self._exit is not None and not self._exit.done():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signum)

    async def kill(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        await self.send_signal(signal.SIGTERM)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart)
        self._close_pidfd()

    def _close_pidfd(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
