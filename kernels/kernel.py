"""One running kernel, as the gateway sees it: the seam between trusted and untrusted.

The gateway hands a `Kernel` plain message dicts (no signature, no key) and gets plain
message dicts back through a listener. Everything that touches the kernel's process,
its ZMQ sockets and its HMAC key stays in this module: the key never leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session

from kernels.environment import kernel_environment
from kernels.provisioner import Exit, ForkProvisioner, ForkServer

log = logging.getLogger(__name__)

CHANNELS = ("shell", "control", "stdin", "iopub")
DELIM = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
WARMUP = "get_ipython().display_formatter.format(0)"

Message = dict[str, Any]
Listener = Callable[[str, Message], None]


class KernelStartError(RuntimeError):
    """The kernel did not come up (or its IOPub never proved live) in time."""


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel is started with; the pool makes every kernel from one of these."""

    name: str = "python3"
    workdir_root: str = ""
    start_timeout: float = 60.0
    fork_server: ForkServer | None = None  # None: a plain jupyter_client process per kernel


def default_root() -> str:
    return os.path.join(tempfile.gettempdir(), "cellgate-kernels")


def _handshake(sock: zmq.asyncio.Socket) -> Coroutine[Any, Any, None]:
    """Done once `sock` has completed a ZMTP handshake. Call it before `connect`: the
    monitor sees only what happens after it is attached, and a handshake can finish
    before a coroutine would first run."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)

    async def succeeded() -> None:
        try:
            await monitor.recv_multipart()
        finally:
            if not sock.closed:  # a start abandoned mid-way has closed it already
                sock.disable_monitor()
            monitor.close(linger=0)

    return succeeded()


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Kernel:
    """A started kernel with live channels. Create with `await Kernel.start(spec)`."""

    def __init__(self, spec: KernelSpec, manager: AsyncKernelManager, home: str) -> None:
        self.id = uuid.uuid4().hex
        self.name = spec.name
        self.workdir = os.path.join(home, "work")
        self._home = home
        self.started_at = time.monotonic()
        self._manager = manager
        self._session = Session(key=manager.session.key, username="cellgate")
        self._ctx = zmq.asyncio.Context.instance()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._listener: Listener | None = None
        self._on_exit: list[Callable[[Kernel], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._iopub_live = asyncio.Event()
        self._gone = asyncio.Event()  # its process has ended
        self._alive = True
        self._closed = False
        self.exit: Exit | None = None  # how it ended, when the fork server could tell
        self.killed_for = ""
        self.bad_signatures = 0
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
        workdir, statedir = os.path.join(home, "work"), os.path.join(home, "state")
        os.mkdir(workdir, 0o700)
        os.mkdir(statedir, 0o700)
        # IPC sockets live in the kernel's own directory: no ports to race for on a
        # busy node, nothing reachable over the network.
        options: dict[str, Any] = {}
        if spec.fork_server is not None:
            options["kernel_spec_manager"] = spec.fork_server.specs
        manager = AsyncKernelManager(
            kernel_name=spec.name,
            transport="ipc",
            ip=os.path.join(statedir, "zmq"),
            connection_file=os.path.join(home, "connection.json"),
            **options,
        )
        env = kernel_environment(workdir, statedir, shared_cache)
        # jupyter_client's start_kernel pauses after the launch; with a fork server we
        # connect as soon as the kernel exists and let that pause run alongside.
        launched = spec.fork_server.launched(home) if spec.fork_server is not None else None
        starting = asyncio.ensure_future(
            manager.start_kernel(cwd=workdir, env=env, extra_arguments=["--HistoryManager.enabled=False"])
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
            shutil.rmtree(home, ignore_errors=True)
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
        base = f"{info['transport']}://{info['ip']}"
        handshakes = []
        for channel in CHANNELS:
            kind = zmq.SUB if channel == "iopub" else zmq.DEALER
            sock = self._ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            # We connect while a forked kernel is still binding: retry every few ms, not
            # at ZMQ's default 100 ms.
            sock.setsockopt(zmq.RECONNECT_IVL, 5)
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            else:
                sock.setsockopt(zmq.IDENTITY, self._session.bsession)
                # The kernel's ROUTER drops what it sends to a peer whose handshake is
                # not done (an input_request, say): wait for every handshake.
                handshakes.append(_handshake(sock))
            sep = "-" if info["transport"] == "ipc" else ":"
            sock.connect(f"{base}{sep}{info[channel + '_port']}")
            self._sockets[channel] = sock
            self._tasks.append(asyncio.create_task(self._read(channel, sock)))
        self._tasks.append(asyncio.create_task(self._watch()))
        await self._unless_gone(asyncio.gather(*handshakes))
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
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():  # the kernel died, or the whole start was given up
                task.cancel()
                await asyncio.wait({task})
                if not task.cancelled():
                    task.exception()  # retrieved: a gather given up on must not log
        if gone.done() and not gone.cancelled():
            raise KernelStartError(f"kernel exited during start-up ({self.exit_reason})")
        return task.result()

    async def _watch(self) -> None:
        provisioner = self._manager.provisioner
        if isinstance(provisioner, ForkProvisioner):
            self.exit = await provisioner.exited()  # a pidfd: told the moment it ends
            # What it sent just before it ended (a shutdown_reply, its last output) may
            # still be in the sockets: let the readers deliver it first.
            await asyncio.sleep(0.1)
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

    @property
    def alive(self) -> bool:
        return self._alive and not self._closed

    def on_exit(self, callback: Callable[[Kernel], None]) -> None:
        self._on_exit.append(callback)

    def set_listener(self, listener: Listener | None) -> None:
        """Where every message the kernel sends goes, in the order it arrives."""
        self._listener = listener

    async def shutdown(self) -> None:
        """Kill the kernel, close its channels and remove its working directory."""
        if self._closed:
            return
        self._closed = True
        self._alive = False
        self._listener = None
        for task in self._tasks:
            task.cancel()
        for sock in self._sockets.values():
            sock.close(linger=0)
        try:
            await self._manager.shutdown_kernel(now=True)
        except Exception:  # a kernel that is already gone is the goal, not a failure
            log.debug("kernel %s shutdown", self.id, exc_info=True)
        # rmtree works through directory fds and never follows a link the kernel made.
        await asyncio.to_thread(shutil.rmtree, self._home, True)

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
        header = msg["header"]
        header.setdefault("session", self._session.session)
        parts = [
            json.dumps(header).encode(),
            json.dumps(msg.get("parent_header") or {}).encode(),
            json.dumps(msg.get("metadata") or {}).encode(),
            json.dumps(msg.get("content") or {}).encode(),
        ]
        frames: list[Any] = [DELIM, self._session.sign(parts), *parts, *msg.get("buffers", ())]
        # copy=True: messages are small, and zero-copy sends would need pyzmq's
        # garbage-collector thread, which can hold up the process at exit.
        self._sockets[channel].send_multipart(frames)

    def _unpack(self, frames: list[bytes]) -> Message | None:
        try:
            i = frames.index(DELIM)
        except ValueError:
            return None
        sig, *parts = frames[i + 1 : i + 6]
        if len(parts) != 4 or not hmac.compare_digest(sig, self._session.sign(parts)):
            self.bad_signatures += 1
            if self.bad_signatures == 1:  # once per kernel: a hostile kernel must not flood logs
                log.warning("kernel %s sent a message with a bad signature; dropped", self.id)
            return None
        header, parent, metadata, content = (json.loads(p) for p in parts)
        return {
            "header": header,
            "parent_header": parent,
            "metadata": metadata,
            "content": content,
            "buffers": frames[i + 6 :],
        }

    def _startup_message(self, channel: str, msg: Message) -> bool:
        """Swallow what the kernel says about our own start-up requests."""
        waiting = self._startup.get(msg["parent_header"].get("msg_id", ""))
        if waiting is None:
            return False
        msg_type = msg["header"].get("msg_type")
        if (channel == "shell" and msg_type.endswith("_reply")) or (
            msg_type == "status" and msg["content"].get("execution_state") == "idle"
        ):
            waiting[1] -= 1
            if waiting[1] == 0:
                del self._startup[msg["parent_header"]["msg_id"]]
                if not waiting[0].done():
                    waiting[0].set_result(None)
        return True

    async def _read(self, channel: str, sock: zmq.asyncio.Socket) -> None:
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    msg = self._unpack(frames)
                except ValueError:  # not JSON: a broken or hostile kernel
                    msg = None
                if msg is None:
                    continue
                if channel == "iopub":
                    msg_type = msg["header"].get("msg_type")
                    if not self._iopub_live.is_set():
                        self._iopub_live.set()
                    if msg_type == "iopub_welcome":
                        continue  # about our own subscription, not for clients
                if self._startup and self._startup_message(channel, msg):
                    continue
                listener = self._listener
                if listener is None:
                    continue
                try:
                    listener(channel, msg)
                except Exception:  # one bad message must not stop the channel
                    log.exception("kernel %s: handling a %s message failed", self.id, channel)
        except (asyncio.CancelledError, zmq.ZMQError):
            return
