"""The fork server: one process that has already paid for a kernel's imports forks each kernel.

Run by the gateway as `python -m kernels.forkserver SETTINGS_JSON` with a pipe on stdin
(its lifeline: when the gateway goes, the fork server kills every kernel and exits) and
a pipe on stdout (one JSON line when ready, then one per kernel that exits). Requests
come on a Unix SOCK_SEQPACKET socket only the server's uid can use.

Each kernel is three forks away from here, and the forks are made ahead: one spare
(B and C, fenced into their namespaces but nobody's yet) waits for the next request,
so a request costs no fork at all. The next spare is forked 150 ms later, once that
kernel has had the cores to itself, or at once if another request comes first.

    fork server ── A: unshare(PID, mount, IPC, UTS, net), then exits
                   └── B: PID 1 of the new namespace, a tiny reaper; private /proc, /tmp
                       └── C: waits for its orders; then limits, its own uid, seccomp,
                              IPKernelApp

A request is handed to the spare's B as orders (home, env, uid, cgroup): B gives the
uid its directories, passes the orders to C and puts C in its cgroups while C
initialises. The server answers the gateway with B's pid and a pidfd for it; B is
re-parented here (we are a child subreaper). Killing B ends the namespace, so every
process the kernel started dies with it. The fork server never reads a kernel's key:
C, still root, reads it from the connection file in the kernel's root-owned directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import pickle
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

from kernels import egress, isolation
from kernels.cgroups import Cgroups, KernelCgroup
from kernels.environment import python_runtime
from kernels.isolation import Limits

MAX_REQUEST = 1 << 20
SPARE_DELAY = 0.15  # seconds: about as long as a kernel's start takes
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
    os.environ.update(python_runtime(shared_cache))  # before the imports: they read it
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


class Spare:
    """A reaper (B) and its kernel-to-be (C), forked and fenced into their namespaces
    ahead of any request: neither knows yet which kernel it will be, and neither holds
    anything of one. The orders socket tells B; B tells C."""

    def __init__(self, maker: int, orders: socket.socket, handoff: int) -> None:
        self.maker = maker  # A's pid
        self.orders = orders
        self._handoff = handoff  # A writes B's pid here
        self.pid: int | None = None

    def reaper(self) -> int:
        """B's pid, as this host sees it (waiting for A, if A is still forking B)."""
        if self.pid is None:
            data = os.read(self._handoff, 4)
            os.close(self._handoff)
            self._handoff = -1
            if len(data) != 4:
                raise OSError("the kernel's reaper could not be made (see the fork server's log)")
            self.pid = struct.unpack("i", data)[0]
        return self.pid

    def take(self, orders: bytes) -> int | None:
        """Give it a kernel's orders: a pidfd for its reaper, or None if it died waiting."""
        try:
            pidfd = os.pidfd_open(self.reaper())  # before the orders: B cannot be reaped yet
        except OSError:
            self.discard()
            return None
        try:
            self.orders.send(orders)
        except OSError:
            os.close(pidfd)
            self.discard()
            return None
        self.orders.close()
        return pidfd

    def discard(self) -> None:
        if self._handoff >= 0:
            os.close(self._handoff)
            self._handoff = -1
        self.orders.close()  # B reads end-of-file and exits; C dies with it
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._parent_gone = False
        root = os.geteuid() == 0
        self.cgroups = Cgroups() if settings.isolation and root else None
        held: tuple[str, ...] = ()
        cgroup_notes: list[str] = []
        if self.cgroups:
            held, cgroup_notes = self.cgroups.verify(settings.limits)
            cgroup_notes = self.cgroups.notes + cgroup_notes
        self.isolation, self.notes, self.seccomp = isolation.probe(
            settings.isolation, settings.network, settings.uids, held, settings.limits
        )
        self.notes += cgroup_notes
        self.egress = False
        if settings.isolation and not settings.network and self.isolation.uids:
            why = egress.install(self.isolation.uids)
            if why is None:
                self.egress = True
                self.isolation = dataclasses.replace(self.isolation, egress_rules=True)
            else:
                self.notes.append(f"no egress rules for kernels on the host's network: {why}")
        elif settings.isolation and not settings.network:
            self.notes.append("no egress rules for kernels on the host's network: they need root and a uid pool")
        uids = self.isolation.uids
        self.free_uids: deque[int] = deque(range(uids[0], uids[1] + 1) if uids else ())
        self.children: dict[int, Child] = {}  # reaper pid -> what to reclaim when it exits
        self.spare: Spare | None = None  # the next kernel's processes, forked ahead
        self._spare_due = 0.0  # when to fork the next one, if there is none
        self.count = 0
        self._configs: dict[tuple[str, ...], Any] = {}
        # What a kernel's filesystem view holds besides the system: the Python
        # installation (not our project directory, and so not the data directory) and
        # the shared font cache, all read-only.
        python = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
        python |= {os.path.realpath(p) for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")}
        self.view_paths = [*sorted(python), os.path.join(settings.root, "shared-cache")]

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
        self.spare = self._fork_spare()
        self._say({"ready": True, "isolation": self.isolation.report(), "notes": self.notes})
        while not stopping:
            wait = 1.0 if self.spare is not None else max(0.0, self._spare_due - time.monotonic())
            for key, _ in sel.select(timeout=wait):
                if key.fileobj is listener:
                    self._accept(listener)
                elif key.fileobj == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                elif not os.read(sys.stdin.fileno(), 4096):  # the gateway is gone
                    stopping.append(True)
            self._reap()
            if self.spare is None and time.monotonic() >= self._spare_due:
                self.spare = self._fork_spare()
        self.stop()

    def stop(self) -> None:
        if self.egress:
            egress.remove()
            self.egress = False
        if self.spare is not None:
            self.spare.discard()
        for pid in list(self.children):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)

    def _say(self, message: dict[str, Any]) -> None:
        if self._parent_gone:
            return
        try:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the host that started us died: nobody is listening
            self._parent_gone = True
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

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
            pid, pidfd = self._hand_to_spare(pickle.dumps((request, child)))
        except BaseException:
            self._reclaim(child)
            raise
        self.children[pid] = child
        try:
            socket.send_fds(conn, [json.dumps({"pid": pid, "uid": uid}).encode()], [pidfd])
        finally:
            os.close(pidfd)
        # The next spare once this kernel has had the cores to itself for a while: a
        # fork now would compete with its start. A request before then makes one.
        self._spare_due = time.monotonic() + SPARE_DELAY

    def _hand_to_spare(self, orders: bytes) -> tuple[int, int]:
        """Give a kernel's orders to the spare (made now if there was none, or if it died
        waiting): its reaper's pid and a pidfd for it."""
        spare, self.spare = self.spare, None
        pidfd = spare.take(orders) if spare is not None else None
        if pidfd is None:
            spare = self._fork_spare()
            pidfd = spare.take(orders)
            if pidfd is None:
                raise OSError("the kernel's processes could not be made (see the fork server's log)")
        return spare.reaper(), pidfd

    def _fork_spare(self) -> Spare:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        handoff_r, handoff_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(handoff_r)
            ours.close()
            _stage_a(self, theirs, handoff_w)
        os.close(handoff_w)
        theirs.close()
        return Spare(pid, ours, handoff_r)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                self._check_spare(pid)
                continue  # a stage A, or an orphan of some kernel re-parented here
            oom = bool(child.cgroup and child.cgroup.oom_killed())
            self._reclaim(child)
            self._say({"exit": pid, "code": os.waitstatus_to_exitcode(status), "oom": oom})

    def _check_spare(self, ended: int) -> None:
        """`ended` is not a kernel: if it was the spare's A, learn its B; if it was the
        spare's B (killed while it waited), drop it, so that the next request or the
        loop makes another."""
        spare = self.spare
        if spare is None:
            return
        try:
            if ended == spare.maker:
                spare.reaper()  # A has written it (or failed) by the time it exits
                return
            if ended != spare.pid:
                return
        except OSError:
            pass
        spare.discard()
        self.spare = None
        self._spare_due = time.monotonic() + 1.0  # not at once: a host refusing forks must not spin us

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


def _stage_a(server: Server, orders: socket.socket, handoff: int) -> NoReturn:
    """Makes the namespaces and forks their PID 1 into them; exits once the server knows its pid."""
    try:
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.setsid()
        iso = server.isolation
        isolation.enter_namespaces(iso.namespace_flags, iso.user_namespace)
        pid = os.fork()
        if pid == 0:
            os.close(handoff)
            _stage_b(server, orders)
        # The server may have stopped while this spare was being made: then B reads the
        # end of its orders and exits, and there is nothing to say.
        with contextlib.suppress(BrokenPipeError):
            os.write(handoff, struct.pack("i", pid))
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _quiet_stdio(keep: tuple[int, ...]) -> None:
    """Standard streams to /dev/null, every other descriptor but `keep` closed (the
    server's listener and pipes among them)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _stage_b(server: Server, orders: socket.socket) -> NoReturn:
    """The reaper: PID 1 of the kernel's namespace, or a subreaper where there is none.
    It and its kernel-to-be are made ahead; the orders say which kernel they become."""
    iso, settings = server.isolation, server.settings
    try:
        report = os.dup(2)  # where the kernel says why it could not start, until it starts
        _quiet_stdio(keep=(report, orders.fileno()))
        if iso.mount_namespace:
            # The kernel root, not one home: this process does not know its kernel yet.
            # Other kernels' homes under it stay closed to this one by their owners' modes.
            python = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, *sys.path) if p}
            isolation.private_mounts([os.path.realpath(settings.root), *sorted(python)], settings.limits.tmp_size)
        else:
            isolation.prctl(isolation.PR_SET_CHILD_SUBREAPER, 1)
        go_r, go_w = os.pipe()
        task_r, task_w = os.pipe()
        kernel = os.fork()
        if kernel == 0:
            orders.close()
            os.close(go_w)
            os.close(task_w)
            _stage_c(server, task_r, report, go_r)
        os.close(report)
        os.close(go_r)
        os.close(task_r)
        data = orders.recv(MAX_REQUEST)  # waits here until a kernel is asked for
        if not data:  # the server is done with us: nothing was started
            os._exit(0)
        request, child = pickle.loads(data)
        if child.uid is not None:
            # The gateway made these a moment ago; nothing but us has touched them yet.
            for sub in ("work", "state"):
                os.chown(os.path.join(request["home"], sub), child.uid, child.uid, follow_symlinks=False)
        procs = child.cgroup.open_procs() if child.cgroup else []  # before the kernel's pivot
        with os.fdopen(task_w, "wb") as task:
            task.write(pickle.dumps((request, child.uid)))
        # Joining cgroups costs 10-20 ms (the host synchronises RCU): the reaper does it
        # while the kernel initialises, and the kernel waits for it before it serves
        # anyone, so nothing it runs is ever outside them.
        for fd in procs:
            KernelCgroup.join_by(fd, kernel)
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


def _stage_c(server: Server, task: int, report: int, go: int) -> NoReturn:
    """The kernel: told which one it is, fenced in step by step, seccomp last, then
    ipykernel as usual."""
    iso, settings = server.isolation, server.settings
    try:
        isolation.prctl(isolation.PR_SET_PDEATHSIG, signal.SIGKILL)
        with os.fdopen(task, "rb") as f:
            orders = f.read()  # waits, as its reaper does, until a kernel is asked for
        if not orders:
            os._exit(0)
        request, uid = pickle.loads(orders)
        home = request["home"]
        # Still root: read the key from the kernel's root-owned directory, never
        # following a link.
        fd = os.open(os.path.join(home, "connection.json"), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd) as f:
            connection = f.read()
        from kernels.kernelapp import ParsedKernelApp  # before the view: our own code is not in it

        if iso.filesystem_view:
            isolation.restricted_view(home, server.view_paths, settings.limits, uid)
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
        if iso.user_namespace:
            isolation.drop_capabilities()  # held in its own namespaces until now
        if iso.seccomp:
            isolation.load_seccomp(server.seccomp)
        _fresh_randomness()
        sys.argv = ["ipykernel_launcher", "-f", connection_file, *request.get("argv", [])]
        config = request["config"]  # parsed by the server, unpickled here: ours to change
        config.IPKernelApp.connection_file = connection_file
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
