"""One running kernel, as the gateway sees it: the seam between trusted and untrusted.

The gateway hands a `Kernel` plain message dicts (no signature, no key) and gets plain
message dicts back through a listener. Everything that touches the kernel's process,
its channels and its HMAC key stays in this module: the key never leaves it.

What the kernel sends is hostile. Every message is bounded on the wire
(`kernels/wire.py`) before it is kept, and checked here before anyone sees it: four
JSON objects with a string `msg_type`, nested no deeper than `MAX_DEPTH`. Anything
else is dropped and counted. A signature proves only that the message came from the
kernel, since the kernel's own code holds the key; nothing here acts on what a message
claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from kernels import wire, workdir
from kernels.environment import kernel_environment
from kernels.handle import DropListener, Incoming, KernelBusy, Listener
from kernels.provisioner import Exit, ForkProvisioner, ForkServer
from kernels.ratelog import RateLimitedLog
from kernels.workdir import default_root

log = logging.getLogger(__name__)

CHANNELS = ("shell", "control", "stdin", "iopub")
DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
WARMUP = "get_ipython().display_formatter.format(0)"

MAX_DEPTH = 64  # JSON nesting of a kernel's message; real output nests a dozen deep
SEND_BACKLOG = 64 << 20  # bytes written to a kernel that it has not read yet
MiB = 1 << 20

Message = dict[str, Any]
__all__ = ["DropListener", "Incoming", "Kernel", "KernelBusy", "KernelSpec", "KernelStartError", "Listener"]
warn = RateLimitedLog(log)


class KernelStartError(RuntimeError):
    """The kernel did not come up (or its IOPub never proved live) in time."""


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel is started with; the pool makes every kernel from one of these."""

    name: str = "python3"
    workdir_root: str = ""
    start_timeout: float = 60.0
    fork_server: ForkServer | None = None  # None: a plain jupyter_client process per kernel
    message_limit: int = 16 * MiB  # the largest message a kernel may send, all frames


class _Manager(AsyncKernelManager):
    """jupyter_client's manager without its own control socket: it would be a libzmq
    reader of whatever the kernel sends it, unbounded. Signals do its work here."""

    def _connect_control_socket(self) -> None:
        return None


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Kernel:
    """A started kernel with live channels. Create with `await Kernel.start(spec)`."""

    def __init__(self, spec: KernelSpec, manager: AsyncKernelManager, home: str) -> None:
        self.id = uuid.uuid4().hex
        self.name = spec.name
        self._work = os.path.join(home, "work")
        self._home = home
        self._fork_server = spec.fork_server
        self.started_at = time.monotonic()
        self._manager = manager
        self._session = Session(key=manager.session.key, username="cellgate")
        self._limit = spec.message_limit
        self._channels: dict[str, wire.Connection] = {}
        self._listener: Listener | None = None
        self._on_drop: DropListener | None = None
        self._on_exit: list[Callable[[Kernel], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._iopub_live = asyncio.Event()
        self._gone = asyncio.Event()  # its process has ended
        self._alive = True
        self._closed = False
        self.exit: Exit | None = None  # how it ended, when the fork server could tell
        self.killed_for = ""
        self._startup: dict[str, list[Any]] = {}  # start-up msg_id -> [future, messages still due]

    # -- life -------------------------------------------------------------------

    @classmethod
    async def start(cls, spec: KernelSpec) -> Kernel:
        root = spec.workdir_root or default_root()
        shared_cache = os.path.join(root, "shared-cache")
        os.makedirs(shared_cache, mode=0o755, exist_ok=True)
        # The home is the server's (0711: a kernel under its own uid can pass through
        # but not list or change it); work/ and state/ become the kernel's.
        home = tempfile.mkdtemp(prefix="k-", dir=root)
        os.chmod(home, 0o711)
        work, statedir = os.path.join(home, "work"), os.path.join(home, "state")
        os.mkdir(work, 0o700)
        os.mkdir(statedir, 0o700)
        # IPC sockets live in the kernel's own directory: no ports to race for on a
        # busy node, nothing reachable over the network.
        options: dict[str, Any] = {}
        if spec.fork_server is not None:
            options["kernel_spec_manager"] = spec.fork_server.specs
        manager = _Manager(
            kernel_name=spec.name,
            transport="ipc",
            ip=os.path.join(statedir, "zmq"),
            connection_file=os.path.join(home, "connection.json"),
            **options,
        )
        env = kernel_environment(work, statedir, shared_cache)
        # jupyter_client's start_kernel pauses after the launch; with a fork server we
        # connect as soon as the kernel exists and let that pause run alongside.
        launched = spec.fork_server.launched(home) if spec.fork_server is not None else None
        starting = asyncio.ensure_future(
            manager.start_kernel(cwd=work, env=env, extra_arguments=["--HistoryManager.enabled=False"])
        )
        try:
            if launched is not None:
                await asyncio.wait({starting, launched}, return_when=asyncio.FIRST_COMPLETED)
                if starting.done():
                    starting.result()
            else:
                await starting
        except BaseException as exc:  # cancelled too: a launched process must not be left behind
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            with contextlib.suppress(Exception):
                if manager.has_kernel:
                    await manager.shutdown_kernel(now=True)
                await manager.cleanup_resources()  # the control socket it may have opened
            workdir.remove_tree(home)  # fresh: the kernel never ran, so there is little in it
            if isinstance(exc, Exception):
                raise KernelStartError(f"kernel {spec.name!r} failed to start: {exc}") from exc
            raise
        finally:
            if launched is not None:
                launched.cancel()
        kernel = cls(spec, manager, home)
        try:
            await asyncio.wait_for(asyncio.gather(kernel._connect(), starting), spec.start_timeout)
        except BaseException as exc:
            starting.cancel()
            await kernel.shutdown()
            if isinstance(exc, Exception):
                raise KernelStartError(f"kernel {spec.name!r} did not answer: {exc!r}") from exc
            raise
        return kernel

    async def _connect(self) -> None:
        info = self._manager.get_connection_info()
        if info["transport"] != "ipc":
            raise KernelStartError(f"kernels are reached over ipc, not {info['transport']}")
        connecting = [self._open(channel, f"{info['ip']}-{info[channel + '_port']}") for channel in CHANNELS]
        self._tasks.append(asyncio.create_task(self._watch()))
        await self._unless_gone(asyncio.gather(*connecting))
        # ZMQ's slow joiner: a SUB socket misses whatever is published before its
        # subscription reaches the kernel. ipykernel 7 greets each new subscriber with
        # iopub_welcome; older kernels answer kernel_info with a status on IOPub.
        # Either proves the subscription live, so no output of the first cell is lost.
        # Ask only once the greeting is late: an answer the kernel need not give is a
        # message it handles before our warm-up.
        patience = 0.05
        while not self._iopub_live.is_set():
            try:
                await asyncio.wait_for(self._unless_gone(self._iopub_live.wait()), patience)
            except TimeoutError:
                self.send("shell", self.make_message("kernel_info_request", {}))
                patience = 0.25
        # A kernel's first execution pays for lazy imports, and its first result for
        # IPython's formatters (about 10 ms together): pay it here, silently (no
        # history, no execution count, nothing in the user's namespace).
        warmup = self.make_message("execute_request", {"code": WARMUP, "silent": True, "store_history": False})
        done = asyncio.get_running_loop().create_future()
        self._startup[warmup["header"]["msg_id"]] = [done, 2]  # its reply and its idle status
        self.send("shell", warmup)
        await self._unless_gone(done)
        # The kernel has answered, so it is done initialising (its connection file
        # written): take the socket directory back, so that no user code can swap a
        # socket file for a link that a reconnect would follow.
        statedir = os.path.join(self._home, "state")
        os.chown(statedir, os.getuid(), os.getgid(), follow_symlinks=False)
        os.chmod(statedir, 0o711, follow_symlinks=False)

    async def _unless_gone(self, step: Awaitable[Any]) -> Any:
        """Wait for a start-up step, but fail at once if the kernel dies meanwhile: a
        kernel that exits before it binds would otherwise be waited for until the
        start timeout."""
        task = asyncio.ensure_future(step)
        # However this wait ends, the step's outcome counts as seen: a gather given up
        # on must not log "exception was never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():  # the kernel died, or the whole start was given up
                task.cancel()
                await asyncio.wait({task})
        if gone.done() and not gone.cancelled():
            raise KernelStartError(f"kernel exited during start-up ({self.exit_reason})")
        return task.result()

    async def _watch(self) -> None:
        provisioner = self._manager.provisioner
        if isinstance(provisioner, ForkProvisioner):
            self.exit = await provisioner.exited()  # a pidfd: told the moment it ends
            # What it sent just before it ended (a shutdown_reply, its last output) may
            # still be in the sockets: let the readers deliver it, up to each one's end.
            ends = [asyncio.ensure_future(conn.gone.wait()) for conn in self._channels.values()]
            if ends:
                _, pending = await asyncio.wait(ends, timeout=1.0)
                for end in pending:
                    end.cancel()
        else:  # our own child process: polling it is cheap and exact
            while await self._manager.is_alive():  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(0.2)
        self._gone.set()
        if self._closed:
            return
        self._alive = False
        log.info("kernel %s exited (%s)", self.id, self.exit)
        for callback in self._on_exit:
            callback(self)

    async def interrupt(self) -> None:
        """SIGINT to the kernel (through its reaper): KeyboardInterrupt in the running cell."""
        with contextlib.suppress(Exception):
            await self._manager.interrupt_kernel()

    async def kill(self, reason: str) -> None:
        """End the kernel now; `reason` is what its session is told."""
        self.killed_for = reason
        with contextlib.suppress(Exception):
            await self._manager.signal_kernel(signal.SIGKILL)

    @property
    def exit_reason(self) -> str:
        """Why the kernel process ended, in words for the client."""
        if self.killed_for:
            return self.killed_for
        exit = self.exit
        if exit is None:
            return "the kernel process exited"
        if exit.oom:
            return "the kernel was killed: out of memory (its memory limit)"
        if exit.code in (128 + 9, -9):
            return "the kernel was killed (SIGKILL): a resource limit, or it was ended"
        if exit.code in (128 + 24, -24):
            return "the kernel was killed: CPU time limit"
        return f"the kernel process exited with code {exit.code}"

    @property
    def pid(self) -> int | None:
        """The kernel's process (with a fork server, its reaper) as this host sees it."""
        return getattr(self._manager.provisioner, "pid", None)

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by the kernel and every process under it, from /proc:
        the trusted side's own measure of whether it is running anything."""
        pid = self.pid
        return None if pid is None else _tree_cpu(pid)

    @property
    def alive(self) -> bool:
        return self._alive and not self._closed

    def on_exit(self, callback: Callable[[Kernel], None]) -> None:
        self._on_exit.append(callback)

    def set_listener(self, listener: Listener | None, on_drop: DropListener | None = None) -> None:
        """Where every message the kernel sends goes, in the order it arrives, and who
        is told of each one dropped as malformed."""
        self._listener = listener
        self._on_drop = on_drop

    async def shutdown(self) -> None:
        """Kill the kernel, close its channels and remove its working directory."""
        if self._closed:
            return
        self._closed = True
        self._alive = False
        self._listener = None
        for task in self._tasks:
            task.cancel()
        for conn in self._channels.values():
            conn.close()
        try:
            await self._manager.shutdown_kernel(now=True)
        except Exception:  # a kernel that is already gone is the goal, not a failure
            log.debug("kernel %s shutdown", self.id, exc_info=True)
        # Through directory fds, never following a link the kernel made, however deep.
        await workdir.run(workdir.remove_tree, self._home, timeout=None)

    @property
    def workdir(self) -> str | workdir.Rooted:
        """Where the trusted side reads and writes the kernel's files. With a disk quota
        the working directory is a tmpfs in the kernel's own mount namespace, reached
        through its reaper's root (which shares that namespace)."""
        server, pid = self._fork_server, getattr(self._manager.provisioner, "pid", None)
        if server is not None and server.report.get("disk_quota") and pid:
            return workdir.Rooted(f"/proc/{pid}/root", self._work)
        return self._work

    # -- its working directory (the KernelHandle calls) ------------------------------

    async def list_files(self, limit: int) -> dict[str, workdir.FileState]:
        return await workdir.run(workdir.scan, self.workdir, limit)

    async def read_file(self, name: str, cap: int, seen: workdir.FileState) -> bytes:
        return await workdir.run(workdir.read_file, self.workdir, name, cap, seen)

    async def write_file(self, name: str, data: bytes) -> workdir.FileState:
        return await workdir.run(workdir.write_file, self.workdir, name, data)

    # -- messages ---------------------------------------------------------------

    def make_message(self, msg_type: str, content: dict[str, Any]) -> Message:
        return {
            "header": {
                "msg_id": uuid.uuid4().hex,
                "msg_type": msg_type,
                "session": self._session.session,
                "username": "cellgate",
                "date": now_iso(),
                "version": PROTOCOL_VERSION,
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
            "buffers": [],
        }

    def send(self, channel: str, msg: Message) -> None:
        """Sign and queue one message for the kernel. `msg` is a complete Jupyter dict."""
        conn = self._channels.get(channel)
        if conn is None:
            raise KernelBusy(f"the kernel's {channel} channel is closed")
        if conn.backlog > SEND_BACKLOG:
            raise KernelBusy(f"the kernel has not read the last {conn.backlog} bytes sent to it")
        header = msg["header"]
        header.setdefault("session", self._session.session)
        parts = [
            json.dumps(header).encode(),
            json.dumps(msg.get("parent_header") or {}).encode(),
            json.dumps(msg.get("metadata") or {}).encode(),
            json.dumps(msg.get("content") or {}).encode(),
        ]
        conn.send([DELIM, self._session.sign(parts), *parts, *(bytes(b) for b in msg.get("buffers", ()))])

    async def _open(self, channel: str, path: str) -> None:
        kind = "SUB" if channel == "iopub" else "DEALER"

        def received(r: wire.Received) -> None:
            self._received(channel, r)

        def lost(why: str) -> None:
            if channel in self._channels and self.alive:  # after start-up: the kernel's doing
                self._tasks.append(asyncio.ensure_future(self._lost_channel(channel, why)))

        conn = await wire.connect(path, kind, self._session.bsession, self._limit, received, lost)
        self._channels[channel] = conn

    async def _lost_channel(self, channel: str, why: str) -> None:
        """A kernel's channels close when its process ends; one that closes while the
        process goes on leaves a kernel that cannot be talked to: replace it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._gone.wait(), 1.0)
        if self.alive:
            await self.kill(f"the kernel closed its {channel} channel ({why})")

    def _drop(self, channel: str, reason: str) -> None:
        warn.warning("kernel %s sent a %s message that %s; dropped", self.id, channel, reason)
        if self._on_drop is not None:
            self._on_drop(channel, reason)

    def _decode(self, channel: str, r: wire.Received) -> Incoming | None:
        frames = r.frames
        try:
            i = frames.index(DELIM)
        except ValueError:
            return self._drop(channel, "has no delimiter")
        sig, parts = frames[i + 1] if len(frames) > i + 1 else b"", frames[i + 2 : i + 6]
        if r.oversized:
            # What arrived before the limit: the header and parent, if they were small.
            parts = [*parts[:2], b"{}", b"{}", b"{}", b"{}"][:4]
        elif len(parts) != 4 or not hmac.compare_digest(sig, self._session.sign(parts)):
            return self._drop(channel, "has a bad signature")
        try:
            header, parent, metadata, content = (json.loads(p) for p in parts)
        except (ValueError, RecursionError):  # not JSON, or nested past the interpreter's limit
            return self._drop(channel, "is not JSON")
        if not all(isinstance(p, dict) for p in (header, parent, metadata, content)):
            return self._drop(channel, "has a part that is not an object")
        msg_type, msg_id = header.get("msg_type"), header.get("msg_id")
        if not isinstance(msg_type, str) or not msg_type or len(msg_type) > 64 or not isinstance(msg_id, str):
            return self._drop(channel, "has no string msg_type and msg_id")
        if not isinstance(parent.get("msg_id", ""), str):
            return self._drop(channel, "has a parent msg_id that is not a string")
        if _too_deep(content) or _too_deep(metadata) or _too_deep(header) or _too_deep(parent):
            return self._drop(channel, f"is nested deeper than {MAX_DEPTH}")
        if r.oversized:
            content = {"cellgate_truncated": {"size": r.size, "limit": self._limit}}
        msg = {
            "header": header,
            "parent_header": parent,
            "metadata": metadata,
            "content": content,
            "buffers": [] if r.oversized else frames[i + 6 :],
        }
        return Incoming(channel, msg, r.size, r.oversized)

    def _startup_message(self, channel: str, msg: Message) -> bool:
        """Swallow what the kernel says about our own start-up requests."""
        waiting = self._startup.get(msg["parent_header"].get("msg_id", ""))
        if waiting is None:
            return False
        msg_type = msg["header"]["msg_type"]
        if (channel == "shell" and msg_type.endswith("_reply")) or (
            msg_type == "status" and msg["content"].get("execution_state") == "idle"
        ):
            waiting[1] -= 1
            if waiting[1] == 0:
                del self._startup[msg["parent_header"]["msg_id"]]
                if not waiting[0].done():
                    waiting[0].set_result(None)
        return True

    def _received(self, channel: str, r: wire.Received) -> None:
        """One message off the wire: checked, then handed on. Nothing it holds can
        stop the channel."""
        try:
            incoming = self._decode(channel, r)
            if incoming is None:
                return
            msg = incoming.msg
            if channel == "iopub":
                if not self._iopub_live.is_set():
                    self._iopub_live.set()
                if msg["header"]["msg_type"] == "iopub_welcome":
                    return  # about our own subscription, not for clients
            if self._startup and self._startup_message(channel, msg):
                return
            listener = self._listener
            if listener is not None:
                listener(incoming)
        except Exception as exc:
            warn.warning(
                "kernel %s: handling a %s message failed: %r",
                self.id,
                channel,
                exc,
            )


def _too_deep(value: Any) -> bool:
    """Nested past MAX_DEPTH: a client's JSON encoder would recurse that deep again."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


_TICK = os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int, bound: int = 512) -> float | None:
    """User and system time of `pid` and its descendants (at most `bound` processes)."""
    total, todo, seen = 0, [pid], 0
    while todo and seen < bound:
        p = todo.pop()
        seen += 1
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", "rb") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            if p == pid:
                return None
    return total / _TICK
