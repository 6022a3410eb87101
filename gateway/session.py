"""One session: a client's conversation with one kernel, and its ordered event log.

Data flows one way through here. Client messages go `to_kernel` (validated before they
arrive); kernel messages come back through `_from_kernel`, are capped and counted, and
are `publish`ed. One sender task per session gives every published event its seq,
appends it to the replay log and delivers it to whichever client holds the session
now, strictly in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from gateway import workdir
from gateway.errors import CellgateError
from gateway.files import FileReporter
from gateway.registry import SessionRecord
from kernels.kernel import Kernel
from kernels.pool import PoolExhausted

if TYPE_CHECKING:
    from gateway.sessions import SessionManager

log = logging.getLogger(__name__)

STREAM_MERGE_MAX = 64 * 1024
CAPPED_TYPES = frozenset({"stream", "display_data", "update_display_data"})


class Sink(Protocol):
    """Where a session's events go: a socket, or the collector of a /service call."""

    async def send(self, event: str, data: dict[str, Any]) -> None: ...

    async def close(self, reason: str) -> None: ...


class Session:
    def __init__(self, manager: SessionManager, record: SessionRecord, logged: bool = True) -> None:
        self.manager = manager
        self.config = manager.config
        self.record = record
        self.id = record.id
        self.logged = logged
        self.kernel: Kernel | None = None
        self.kernel_busy = False
        self.sink: Sink | None = None
        self.created = time.monotonic()
        self.last_activity = self.created
        self.disconnected_at: float | None = self.created
        self.ended = False
        self._ending = False  # no new work accepted
        self._closing = False  # end() has begun
        self._seq = 0  # used only when not logged
        self._outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._emit_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._started: dict[str, float] = {}  # execute_request msg_id -> start time
        # parent msg_id -> output bytes seen; past the cap means capped
        self._output: OrderedDict[str, int] = OrderedDict()
        self.files = FileReporter(
            self.config, manager.store, manager.file_url, manager.metrics, self.publish, self._spawn
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deadlines: dict[str, asyncio.TimerHandle] = {}  # running execution -> its time limit
        self._reports: set[asyncio.Future[Any]] = set()
        self._sender = asyncio.create_task(self._send_loop())
        self._watchdog = asyncio.create_task(self._watch())

    # -- events to the client ---------------------------------------------------

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Queue an event for the client; it gets the next seq. Never blocks."""
        if not self.ended:
            self._outbox.put_nowait((event, data))

    async def _send_loop(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            async with self._emit_lock:
                for event, data in _coalesce(batch):
                    if event == "__flush__":
                        if not data.done():
                            data.set_result(None)
                        continue
                    await self._deliver(event, data)

    async def _deliver(self, event: str, data: dict[str, Any]) -> None:
        if self.logged:
            seq = await self.manager.registry.append(self.id, event, data, _event_size(data))
        else:
            self._seq += 1
            seq = self._seq
        payload = {**data, "seq": seq}
        sink = self.sink
        if sink is not None:
            try:
                await sink.send(event, payload)
            except Exception:  # the log holds it; a resume will replay it
                log.debug("session %s: delivery failed", self.id, exc_info=True)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything published so far has been logged and delivered."""
        done = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait(("__flush__", done))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, timeout)

    async def attach(self, sink: Sink, token: str, resumed: bool, after: int | None, epoch: str | None) -> None:
        """Make `sink` the session's client: greet it, replay what it missed, go live."""
        async with self._emit_lock:
            old, self.sink = self.sink, None
            if old is not None:
                self._spawn(self._take_from(old))
            await sink.send("session", self.describe(token, resumed))
            if after is not None:
                await self._replay(sink, after, epoch)
            self.sink = sink
            self.disconnected_at = None
            self.touch()

    async def _take_from(self, old: Sink) -> None:
        err = CellgateError("session_taken", "this session was resumed on another connection")
        with contextlib.suppress(Exception):
            await old.send("error", err.as_dict())
            await old.close("session_taken")

    async def _replay(self, sink: Sink, after: int, epoch: str | None) -> None:
        same_epoch = epoch == self.record.epoch
        read = await self.manager.registry.read(self.id, after if same_epoch else 0)
        # A hole is always announced: another epoch, a seq we never sent, or trimmed entries.
        if not same_epoch or after > read.last or read.first > after + 1:
            self.manager.metrics.errors.labels("replay_gap").inc()
            await sink.send(
                "error",
                CellgateError(
                    "replay_gap",
                    "some events cannot be replayed",
                    epoch=read.epoch,
                    first=read.first,
                    last=read.last,
                ).as_dict(),
            )
        for entry in read.entries:
            await sink.send(entry.event, {**entry.data, "seq": entry.seq})

    def detach(self, sink: Sink) -> None:
        """The client's connection went away (cleanly or not): the grace period starts."""
        if self.sink is sink:
            self.sink = None
            self.disconnected_at = time.monotonic()

    def describe(self, token: str, resumed: bool) -> dict[str, Any]:
        kernel = None
        if self.kernel is not None and self.kernel.alive:
            kernel = {
                "id": self.kernel.id,
                "name": self.kernel.name,
                "state": "ready",
                "execution_state": "busy" if self.kernel_busy else "idle",
            }
        return {
            "session": self.id,
            "resume": token,
            "resumed": resumed,
            "protocol": "cellgate/1",
            "epoch": self.record.epoch,
            "kernel": kernel,
        }

    # -- messages to the kernel -------------------------------------------------

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    async def to_kernel(self, channel: str, msg: dict[str, Any]) -> None:
        """Queue a validated message for the kernel, attaching one if the session needs it."""
        if self.ended or self._ending:
            raise CellgateError("kernel_dead", "this session has ended", msg_id=msg["header"]["msg_id"])
        self.touch()
        msg_type = msg["header"]["msg_type"]
        async with self._send_lock:  # FIFO: messages reach the kernel in the order sent
            if channel == "control" and msg_type == "shutdown_request":
                self._shutdown_requested(msg)
                return
            if channel == "shell":
                kernel = await self._ensure_kernel()
            else:
                kernel = self.kernel
                if kernel is None or not kernel.alive:
                    raise CellgateError(
                        "no_kernel", "this session has no running kernel", msg_id=msg["header"]["msg_id"]
                    )
            if msg_type == "execute_request":
                msg_id = msg["header"]["msg_id"]
                self._started[msg_id] = time.monotonic()
                self._spawn(self._permalink(msg_id, msg["content"]["code"]))
            kernel.send(channel, msg)
        self.manager.metrics.messages.labels("to_kernel", channel).inc()

    async def _ensure_kernel(self) -> Kernel:
        if self.kernel is not None and self.kernel.alive:
            return self.kernel
        replaced = self.record.kernel_id is not None
        if self.manager.pool.counts()["warm"] == 0:
            self.publish("kernel", {"state": "starting"})
        try:
            kernel = await self.manager.pool.acquire(self.record.kernel_name, self.config.queue_timeout)
        except PoolExhausted as exc:
            raise CellgateError("capacity_node", f"no kernel available: {exc}") from None
        if self.ended or self._ending:
            await self.manager.pool.release(kernel)
            raise CellgateError("kernel_dead", "this session has ended")
        self.kernel = kernel
        self.kernel_busy = False
        self.files.forget()
        kernel.set_listener(self._from_kernel)
        kernel.on_exit(self._kernel_exited)
        self.record.kernel_id = kernel.id
        if self.logged:
            await self.manager.registry.update(self.record)
        event: dict[str, Any] = {"state": "ready", "id": kernel.id, "name": kernel.name}
        if replaced:
            event["reason"] = "replaced"
        self.publish("kernel", event)
        return kernel

    def _shutdown_requested(self, msg: dict[str, Any]) -> None:
        self._ending = True
        kernel = self.kernel
        if kernel is not None and kernel.alive:
            kernel.send("control", msg)
            # The kernel answers with shutdown_reply (relayed) and exits; end either way.
            self._spawn(self._end_later(2.0, "shutdown", "requested"))
        else:
            self._spawn(self.end("shutdown", "requested"))

    async def _end_later(self, delay: float, state: str, reason: str) -> None:
        await asyncio.sleep(delay)
        await self.end(state, reason)

    async def upload(self, name: str, data: bytes) -> dict[str, Any]:
        """Put a file in the kernel's working directory (attaching a kernel if needed)."""
        self.touch()
        if len(data) > self.config.file_cap:
            raise CellgateError(
                "file_too_large", f"{name}: {len(data)} bytes is over the {self.config.file_cap} byte cap"
            )
        async with self._send_lock:
            kernel = await self._ensure_kernel()
        try:
            await self.files.upload(kernel.workdir, name, data)
        except workdir.UnsafeFile as exc:
            raise CellgateError("bad_filename", str(exc)) from None
        return {"name": name, "size": len(data)}

    # -- messages from the kernel -----------------------------------------------

    def _from_kernel(self, channel: str, msg: dict[str, Any]) -> None:
        self.touch()
        msg_type = msg["header"].get("msg_type")
        parent = msg.get("parent_header", {}).get("msg_id", "")
        if channel == "iopub":
            if msg_type == "status":
                self.kernel_busy = msg["content"].get("execution_state") == "busy"
            elif msg_type in CAPPED_TYPES and not self._within_cap(parent, msg):
                return
        self.publish(channel, msg)
        self.manager.metrics.messages.labels("to_client", channel).inc()
        if channel == "iopub" and msg_type == "execute_input":
            # The kernel runs one execution at a time: its clock starts now, not when sent.
            loop = asyncio.get_running_loop()
            self._deadlines[parent] = loop.call_later(self.config.execution_timeout, self._overran, parent)
        if channel == "shell" and msg_type == "execute_reply":
            deadline = self._deadlines.pop(parent, None)
            if deadline is not None:
                deadline.cancel()
            started = self._started.pop(parent, None)
            if started is not None:
                self.manager.metrics.execution.observe(time.monotonic() - started)
            self._reports.add(self._spawn(self._report_files(parent)))
        elif channel == "control" and msg_type == "shutdown_reply" and self._ending:
            self._spawn(self.end("shutdown", "requested"))

    def _within_cap(self, parent: str, msg: dict[str, Any]) -> bool:
        before = self._output.get(parent, 0)
        if before > self.config.output_cap:  # already capped and told
            self.manager.metrics.dropped.inc(_size(msg))
            return False
        sent = before + _size(msg)
        self._output[parent] = sent
        self._output.move_to_end(parent)
        while len(self._output) > 256:
            self._output.popitem(last=False)
        if sent <= self.config.output_cap:
            return True
        self.manager.metrics.errors.labels("output_capped").inc()
        self.publish(
            "error",
            {
                "code": "output_capped",
                "message": f"output of this execution passed {self.config.output_cap} bytes; further output is dropped",
                "msg_id": parent,
            },
        )
        return False

    def _overran(self, msg_id: str) -> None:
        self._spawn(self._stop_overrun(msg_id))

    async def _stop_overrun(self, msg_id: str, grace: float = 5.0) -> None:
        """Past its wall-clock limit an execution is interrupted; a kernel that does not
        answer the interrupt within `grace` seconds is killed (and replaced on the next
        message)."""
        kernel = self.kernel
        if kernel is None or msg_id not in self._deadlines:
            return
        limit = self.config.execution_timeout
        self.manager.metrics.errors.labels("timeout").inc()
        message = f"the execution ran past {limit:g} s; interrupted"
        self.publish("error", {"code": "timeout", "message": message, "msg_id": msg_id})
        await kernel.interrupt()
        await asyncio.sleep(grace)
        if msg_id in self._deadlines and kernel is self.kernel:
            self._deadlines.pop(msg_id, None)
            await kernel.kill(f"the execution ran past {limit:g} s and ignored the interrupt")

    def _kernel_exited(self, kernel: Kernel) -> None:
        if kernel is not self.kernel:
            return
        for deadline in self._deadlines.values():
            deadline.cancel()
        self._deadlines.clear()
        self.kernel = None
        self.kernel_busy = False
        self._spawn(self.manager.pool.release(kernel))
        if not (self._ending or self.ended):
            log.info("session %s: kernel %s died", self.id, kernel.id)
            self.manager.metrics.errors.labels("kernel_dead").inc()
            self.publish("kernel", {"state": "dead", "reason": kernel.exit_reason})

    # -- files ------------------------------------------------------------------

    async def _report_files(self, msg_id: str) -> None:
        kernel = self.kernel
        if kernel is not None and not self.ended:
            await self.files.report(kernel.workdir, msg_id)

    async def _permalink(self, msg_id: str, code: str) -> None:
        try:
            pid = await self.manager.permalinks.save(code, self.manager.language(self.record.kernel_name))
        except Exception:
            log.warning("session %s: storing a permalink failed", self.id, exc_info=True)
            return
        self.publish("permalink", {"msg_id": msg_id, "id": pid, "url": self.manager.permalinks.url(pid)})

    async def settle(self) -> None:
        """Wait for pending file reports, then for their delivery."""
        while self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)
        await self.flush()

    # -- time limits and the end ------------------------------------------------

    async def _watch(self) -> None:
        c = self.config
        tick = max(0.05, min(1.0, c.resume_grace / 4, c.idle_timeout / 4, c.lifespan / 4))
        while not self.ended:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self.created > c.lifespan:
                await self.end("timed_out", "lifespan")
            elif not self.kernel_busy and now - self.last_activity > c.idle_timeout:
                await self.end("timed_out", "idle")
            elif self.disconnected_at is not None and now - self.disconnected_at > c.resume_grace:
                await self.end("timed_out", "disconnected")

    async def end(self, state: str, reason: str) -> None:
        """End the session: reclaim the kernel, tell the client, forget the token."""
        if self._closing:
            return
        self._closing = self._ending = True
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            await self.manager.pool.release(kernel)
        self.publish("kernel", {"state": state, "reason": reason})
        await self.flush()
        self.ended = True
        await self.manager.forget(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            with contextlib.suppress(Exception):
                await sink.close(state)
        current = asyncio.current_task()
        for task in (self._sender, self._watchdog, *self._tasks):
            if task is not current:
                task.cancel()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._reports.discard)
        return task


def _event_size(data: dict[str, Any]) -> int:
    """A cheap estimate of an event's bytes: its text, data and buffers, plus headers."""
    content = data.get("content")
    size = 512 + sum(len(b) for b in data.get("buffers", ()))
    if isinstance(content, dict):
        size += _size(data)
    return size


def _size(msg: dict[str, Any]) -> int:
    content = msg.get("content", {})
    if "text" in content:
        return len(content["text"])
    data = content.get("data", {})
    if isinstance(data, dict) and data:
        return sum(len(v) if isinstance(v, str) else 64 for v in data.values())
    code = content.get("code")
    return len(code) if isinstance(code, str) else 64


def _coalesce(batch: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Merge runs of stream messages to the same parent and stream into one message.

    Only a backlog is ever merged (what queued up while the client was being served),
    so a quiet session sees every message as the kernel sent it, with no added delay.
    """
    out: list[tuple[str, Any]] = []
    for event, data in batch:
        if out and event == "iopub" and _mergeable(out[-1], data):
            prev = out[-1][1]
            merged = {**prev, "content": {**prev["content"], "text": prev["content"]["text"] + data["content"]["text"]}}
            out[-1] = ("iopub", merged)
        else:
            out.append((event, data))
    return out


def _mergeable(prev: tuple[str, Any], msg: dict[str, Any]) -> bool:
    event, last = prev
    if event != "iopub" or msg["header"].get("msg_type") != "stream" or last["header"].get("msg_type") != "stream":
        return False
    return (
        last["parent_header"].get("msg_id") == msg["parent_header"].get("msg_id")
        and last["content"].get("name") == msg["content"].get("name")
        and len(last["content"].get("text", "")) + len(msg["content"].get("text", "")) <= STREAM_MERGE_MAX
    )
