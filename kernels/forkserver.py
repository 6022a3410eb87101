"""The fork server: one process that has already paid for a kernel's imports forks each kernel.

Run by the gateway as `python -m kernels.forkserver SETTINGS_JSON` with a pipe on stdin
(its lifeline: when the gateway goes, the fork server kills every kernel and exits) and
a pipe on stdout (one JSON line when ready, then one per kernel that exits). Requests
come on a Unix SOCK_SEQPACKET socket only the server's uid can use.

Each kernel is three forks away from here:

    fork server ── A: cgroup, uid's directories, unshare(PID, mount, IPC, UTS, net)
                   └── B: PID 1 of the new namespace, a tiny reaper; private /proc, /tmp
                       └── C: limits, its own uid, seccomp, then IPKernelApp

A answers the gateway with B's pid and a pidfd for it, and exits; B is re-parented
here (we are a child subreaper). Killing B ends the namespace, so every process the
kernel started dies with it. The fork server never reads a kernel's key: C, still
root, reads it from the connection file in the kernel's root-owned directory.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from kernels import isolation
from kernels.cgroups import Cgroups, KernelCgroup
from kernels.isolation import Limits

MAX_REQUEST = 1 << 20
# ipykernel's own start-up imports, and what a notebook's first cells reach for.
PRELOAD = (
    "kernels.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.debugger",
    "ipykernel.comm",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.logger",
    "IPython.core.oinspect",
    "IPython.utils.wildcard",
    "IPython.extensions.storemagic",
    "tornado.platform.asyncio",
    "faulthandler",
    "pdb",
    "jedi",
    "numpy",
    "numpy.random",
    "matplotlib.pyplot",  # not its inline backend: importing that hooks into the shell
    "ipywidgets",
)


@dataclass(frozen=True)
class Settings:
    root: str  # where kernel homes live (and matplotlib's shared font cache)
    socket: str
    isolation: bool = True
    network: bool = True
    uids: tuple[int, int] | None = None
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        raw = json.loads(text)
        raw["limits"] = Limits(**raw.get("limits", {}))
        if raw.get("uids"):
            raw["uids"] = tuple(raw["uids"])
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def preload(shared_cache: str) -> None:
    os.environ.update(
        {
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            "MPLCONFIGDIR": shared_cache,
            # One BLAS thread: a pool of them would not survive the fork anyway, and on a
            # small node kernels should not each spread over every core.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
    )
    import importlib
    import io

    for name in PRELOAD:
        importlib.import_module(name)
    # Build the font cache and warm FreeType's glyph cache with one small render, so
    # that a kernel's first plot costs what any later one does.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set_title("warm")
    fig.savefig(io.BytesIO(), format="png")
    # Move everything alive now out of the collector's sight: a kernel's collections
    # then never write to these pages, so they stay shared with every other kernel.
    gc.collect()
    gc.freeze()


@dataclass
class Child:
    uid: int | None
    cgroup: KernelCgroup | None


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        root = os.geteuid() == 0
        self.cgroups = Cgroups() if settings.isolation and root else None
        controllers = self.cgroups.controllers if self.cgroups else ()
        self.isolation, self.notes, self.seccomp = isolation.probe(
            settings.isolation, settings.network, settings.uids, controllers
        )
        if self.cgroups:
            self.notes += self.cgroups.notes
        uids = self.isolation.uids
        self.free_uids: deque[int] = deque(range(uids[0], uids[1] + 1) if uids else ())
        self.children: dict[int, Child] = {}  # reaper pid -> what to reclaim when it exits
        self.handoffs: dict[int, Child] = {}  # pipe from a stage A -> its kernel, pid not yet known
        self.count = 0
        self._configs: dict[tuple[str, ...], Any] = {}

    def kernel_config(self, argv: list[str]) -> Any:
        """ipykernel's command line, parsed here once: argparse over every configurable
        class costs a kernel about 10 ms, and every kernel of a node gets the same one."""
        key = tuple(argv)
        if key not in self._configs:
            from ipykernel.kernelapp import IPKernelApp

            app = IPKernelApp()  # a throwaway, not the singleton a kernel uses
            app.parse_command_line(list(argv))
            if app.subapp is not None or app.extra_args:
                raise ValueError(f"not a kernel's command line: {argv}")
            self._configs[key] = app.config
        return self._configs[key]

    # -- the loop ---------------------------------------------------------------

    def serve(self) -> None:
        isolation.prctl(isolation.PR_SET_CHILD_SUBREAPER, 1)
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGTERM)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.settings.socket)
        old = os.umask(0o177)
        listener.bind(self.settings.socket)
        os.umask(old)
        listener.listen(64)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        sel.register(wake_r, selectors.EVENT_READ)
        sel.register(sys.stdin.fileno(), selectors.EVENT_READ)
        self._say({"ready": True, "isolation": self.isolation.report(), "notes": self.notes})
        while not stopping:
            for key, _ in sel.select(timeout=1.0):
                if key.fileobj is listener:
                    self._accept(listener)
                elif key.fileobj == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                elif not os.read(sys.stdin.fileno(), 4096):  # the gateway is gone
                    stopping.append(True)
            self._reap()
        self.stop()

    def stop(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)

    def _say(self, message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def _accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if uid != os.getuid():  # only the gateway (our uid) may ask for kernels
                return
            try:
                request = json.loads(conn.recv(MAX_REQUEST))
                self._spawn(conn, request)
            except Exception as exc:  # a bad request must not stop the server
                with contextlib.suppress(OSError):
                    conn.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())

    def _spawn(self, conn: socket.socket, request: dict[str, Any]) -> None:
        config = self.kernel_config(request.get("argv", []))  # first: a bad one costs nothing
        uid = None
        if self.isolation.uids:
            if not self.free_uids:
                raise RuntimeError("every kernel uid is in use")
            uid = self.free_uids.popleft()
        request["config"] = config
        self.count += 1
        child = Child(uid, None)
        try:
            if self.cgroups and self.cgroups.places:
                child.cgroup = self.cgroups.create(f"k-{os.getpid()}-{self.count}", self.settings.limits)
            handoff_r, handoff_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
        except BaseException:
            self._reclaim(child)
            raise
        if pid == 0:
            os.close(handoff_r)
            _stage_a(self, conn, request, child, handoff_w)
        os.close(handoff_w)
        os.set_blocking(handoff_r, False)
        self.handoffs[handoff_r] = child

    def _take_handoffs(self) -> None:
        """A writes the reaper's pid here before it exits, so by the time the reaper is
        re-parented to us (and can be reaped) its pid is known."""
        for fd, child in list(self.handoffs.items()):
            try:
                data = os.read(fd, 4)
            except BlockingIOError:
                continue
            del self.handoffs[fd]
            os.close(fd)
            if len(data) == 4:
                self.children[struct.unpack("i", data)[0]] = child
            else:  # A failed before it forked a reaper
                self._reclaim(child)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._take_handoffs()
            child = self.children.pop(pid, None)
            if child is None:
                continue  # a stage A, or an orphan of some kernel re-parented here
            oom = bool(child.cgroup and child.cgroup.oom_killed())
            self._reclaim(child)
            self._say({"exit": pid, "code": os.waitstatus_to_exitcode(status), "oom": oom})

    def _reclaim(self, child: Child) -> None:
        if child.cgroup:
            child.cgroup.remove()
        if child.uid is not None:
            if not self.isolation.pid_namespace:
                _kill_uid(child.uid)  # whatever it left running, before the uid is reused
            self.free_uids.append(child.uid)


def _kill_uid(uid: int) -> None:
    """kill(-1) as the uid itself reaches exactly that uid's processes."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, 0)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


# -- in the children ----------------------------------------------------------


def _stage_a(server: Server, conn: socket.socket, request: dict[str, Any], child: Child, handoff: int) -> NoReturn:
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.setsid()
        iso = server.isolation
        home = request["home"]
        if child.uid is not None:
            # The gateway made these a moment ago; nothing but us has touched them yet.
            for sub in ("work", "state"):
                os.chown(os.path.join(home, sub), child.uid, child.uid, follow_symlinks=False)
        flags = 0
        if iso.pid_namespace:
            flags |= isolation.CLONE_NEWPID | isolation.CLONE_NEWNS | isolation.CLONE_NEWIPC | isolation.CLONE_NEWUTS
        if iso.network_namespace:
            flags |= isolation.CLONE_NEWNET
        if flags:
            isolation.unshare(flags)
        pid = os.fork()
        if pid == 0:
            _stage_b(server, request, child)
        os.write(handoff, struct.pack("i", pid))
        pidfd = os.pidfd_open(pid)
        socket.send_fds(conn, [json.dumps({"pid": pid, "uid": child.uid}).encode()], [pidfd])
        os._exit(0)
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            conn.send(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        os._exit(1)


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _quiet_stdio(keep: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def _stage_b(server: Server, request: dict[str, Any], child: Child) -> NoReturn:
    """The reaper: PID 1 of the kernel's namespace, or a subreaper where there is none."""
    iso, settings = server.isolation, server.settings
    try:
        report = os.dup(2)  # where the kernel says why it could not start, until it starts
        _quiet_stdio(keep=report)
        if iso.mount_namespace:
            python = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sys.path) if p}
            isolation.private_mounts([request["home"], *sorted(python)], settings.limits.tmp_size)
        else:
            isolation.prctl(isolation.PR_SET_CHILD_SUBREAPER, 1)
        go_r, go_w = os.pipe()
        kernel = os.fork()
        if kernel == 0:
            os.close(go_w)
            _stage_c(server, request, child.uid, report, go_r)
        os.close(report)
        os.close(go_r)
        if child.cgroup:
            # Joining cgroups costs 10-20 ms (the host synchronises RCU): the reaper
            # does it while the kernel initialises, and the kernel waits for it before
            # it serves anyone, so nothing it runs is ever outside them.
            child.cgroup.join(kernel)
        os.write(go_w, b"1")  # the kernel waits for this before it serves anyone
        os.close(go_w)
        for sig in FORWARDED:
            signal.signal(sig, lambda signum, _frame: _forward(kernel, signum))
        code = 1
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == kernel:
                code = os.waitstatus_to_exitcode(status)
                break
        if not iso.pid_namespace:
            _kill_children()
        # A kernel killed by a signal exits as 128 + signal, as a shell reports it.
        os._exit(code if code >= 0 else 128 - code)
    except BaseException:
        os._exit(1)


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signum)


def _kill_children() -> None:
    """Without a PID namespace, orphans of the kernel come to us (a subreaper): end them."""
    for _ in range(100):
        me = os.getpid()
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            _forward(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        time.sleep(0.01)


def _stage_c(server: Server, request: dict[str, Any], uid: int | None, report: int, go: int) -> NoReturn:
    """The kernel: fenced in step by step, seccomp last, then ipykernel as usual."""
    iso, settings = server.isolation, server.settings
    try:
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        home = request["home"]
        # Still root: read the key from the kernel's root-owned directory, never
        # following a link.
        fd = os.open(os.path.join(home, "connection.json"), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            connection = f.read()
        isolation.set_limits(settings.limits, with_uid_pool=uid is not None)
        os.chdir(os.path.join(home, "work"))
        os.umask(0o077)
        if uid is not None:
            isolation.drop_privileges(uid)
        connection_file = os.path.join(home, "state", "kernel.json")
        fd = os.open(connection_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(connection)
        os.environ.clear()
        os.environ.update(request["env"])
        if iso.seccomp:
            isolation.load_seccomp(server.seccomp)
        _fresh_randomness()
        sys.argv = ["ipykernel_launcher", "-f", connection_file, *request.get("argv", [])]
        config = request["config"]  # our own copy: we are a fork of the server
        config.IPKernelApp.connection_file = connection_file
        from kernels.kernelapp import ParsedKernelApp

        app = ParsedKernelApp.instance(config=config)
        app.initialize([])
        if os.read(go, 1) != b"1":  # the reaper could not put us in our memory cgroup
            raise RuntimeError("the kernel's cgroup could not be joined")
        os.close(go)
        os.close(report)
        report = -1
    except BaseException:
        if report >= 0:
            with contextlib.suppress(OSError):
                os.write(report, f"cellgate: kernel start failed:\n{traceback.format_exc()}".encode())
        os._exit(1)
    app.start()
    os._exit(0)


def _fresh_randomness() -> None:
    """Forked kernels share the server's generator states: reseed them from the OS."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def main() -> None:
    settings = Settings.from_json(sys.argv[1])
    shared_cache = os.path.join(settings.root, "shared-cache")
    os.makedirs(shared_cache, mode=0o755, exist_ok=True)
    server = Server(settings)  # probe first: the probes fork, cheaper before the imports
    preload(shared_cache)
    try:
        server.serve()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
