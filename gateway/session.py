"""One session: a client's conversation with one kernel, and its ordered event log.

Data flows one way through here. Client messages go `to_kernel` (validated before they
arrive); kernel messages come back through `_from_kernel`, are charged to an output
budget and counted, and are `publish`ed. One sender task per session gives every
published event its seq, appends it to the replay log and delivers it to whichever
client holds the session now, strictly in order.

What the session believes comes from its own clocks and its own record of what it
handed the kernel, never from what the kernel claims: see "What the trusted side
believes" in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol

from gateway.errors import CellgateError
from gateway.files import FileReporter
from gateway.ratelimit import TokenBucket
from gateway.registry import SessionRecord
from gateway.registry.base import LogLost
from gateway.replay import replay
from gateway.spool import SpoolFull
from kernels import workdir
from kernels.handle import Incoming, KernelBusy, KernelHandle
from kernels.pool import PoolExhausted
from kernels.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from gateway.sessions import SessionManager

log = logging.getLogger(__name__)
_registry_warnings = RateLimitedLog(log)

STREAM_MERGE_MAX = 64 * 1024
REPLY_CONTENT_MAX = 1 << 20  # a status, reply or execute_input bigger than this keeps only a marker
EVENT_OVERHEAD = 512  # bytes an event costs beyond its content (headers, seq, framing)
OVERRUN_GRACE = 5.0  # seconds an interrupted kernel has to stop before it is killed
SHUTDOWN_GRACE = 10.0  # seconds a kernel has to answer a shutdown_request or exit
SPINNING = 0.5  # CPU share that counts as running code while nothing is outstanding
EXPECTED_TRACKED = 1024  # requests whose lifecycle messages are still expected
SEND_BATCH = 256  # events logged in one registry call


class Life(IntEnum):
    """A session's life, in order: each state holds every restriction of those before."""

    OPEN = 0
    ENDING = 1  # a shutdown_request is under way: no new work is accepted
    CLOSING = 2  # end() has begun: the last events are going out
    ENDED = 3  # forgotten: nothing more is published


class Sink(Protocol):
    """Where a session's events go: a socket, or the collector of a /service call."""

    async def send(self, event: str, data: dict[str, Any]) -> None: ...

    async def close(self, reason: str) -> None: ...


@dataclass
class Budget:
    """Output bytes that one request, or the time between requests, may send."""

    cap: int
    msg_id: str | None
    used: int = 0
    capped: bool = False  # told output_capped
    truncated: bool = False  # told too_large

    def charge(self, size: int) -> bool:
        self.used += size
        return self.used <= self.cap


@dataclass
class Request:
    """A shell request the session handed to the kernel, which runs them one at a time
    in the order sent: the head of the queue is the one running."""

    msg_id: str
    msg_type: str
    budget: Budget
    handed: float = field(default_factory=time.monotonic)
    deadline: asyncio.TimerHandle | None = None


class Session:
    def __init__(self, manager: SessionManager, record: SessionRecord, logged: bool = True) -> None:
        self.manager = manager
        self.config = manager.config
        self.record = record
        self.id = record.id
        self.logged = logged
        self.kernel: KernelHandle | None = None
        self.sink: Sink | None = None
        self.created = time.monotonic()
        self.last_activity = self.created  # of the client: the kernel's messages do not count
        self.disconnected_at: float | None = self.created
        self.life = Life.OPEN
        self._unanswered_shutdown: dict[str, Any] | None = None  # a shutdown_request's header, until its reply
        self._seq = 0  # the newest seq given out (and, when logged, in the registry's log)
        self._outbox: asyncio.Queue[tuple[str, Any, int]] = asyncio.Queue()
        self.outbox_bytes = 0
        self._emit_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._queue: deque[Request] = deque()  # shell requests handed to the kernel, oldest first
        self._between = Budget(self.config.session_output_cap, None)  # output while nothing is outstanding
        # request msg_id -> lifecycle messages still expected for it (status, reply, ...)
        self._expected: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._cpu_mark: tuple[float, float] | None = None  # (when, kernel CPU seconds)
        self._spin_since: float | None = None  # CPU-busy with nothing outstanding since
        self._spin_told: float | None = None
        self._last_msg_id: str | None = None
        self._rate = TokenBucket(self.config.message_rate, self.config.message_burst)
        self.files = FileReporter(
            self.config, manager.spool, manager.file_url, manager.metrics, self.publish, record.id
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reports: set[asyncio.Future[Any]] = set()
        self._sender = asyncio.create_task(self._send_loop())
        self._watchdog = asyncio.create_task(self._watch())

    # -- events to the client ---------------------------------------------------

    def publish(self, event: str, data: dict[str, Any], size: int = 0) -> None:
        """Queue an event for the client; it gets the next seq. Never blocks. `size` is
        its bytes as the kernel sent it (0: estimate)."""
        if not self.ended:
            size = size + EVENT_OVERHEAD if size else _event_size(data)
            self.outbox_bytes += size
            self._outbox.put_nowait((event, data, size))

    async def _send_loop(self) -> None:
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            async with self._emit_lock:
                for start in range(0, len(batch := _coalesce(batch)), SEND_BATCH):
                    await self._log_and_deliver(batch[start : start + SEND_BATCH])

    async def _log_and_deliver(self, batch: list[tuple[str, Any, int]]) -> None:
        events = [item for item in batch if item[0] != "__flush__"]
        # One registry call logs them all (one round trip to Redis), then each goes out.
        seq = await self._log(events) if events else 0
        for event, data, size in batch:
            self.outbox_bytes -= size
            if event == "__flush__":
                if not data.done():
                    data.set_result(None)
            else:
                await self._deliver(event, data, seq)
                seq += 1

    async def _log(self, events: list[tuple[str, Any, int]]) -> int:
        """The seq of the first of `events`, once they are in the replay log.

        A registry that cannot be reached is retried until it can: the events wait
        here, bounded by --client-buffer like any backlog, and none is delivered
        unlogged. A registry that lost writes (a Redis restart or failover) gets the
        session back under a new epoch, its seqs going on, so that a resume across
        the loss is told `replay_gap` instead of meeting a silent hole."""
        if not self.logged:
            first = self._seq + 1
            self._seq += len(events)
            return first
        delay = 0.05
        while self.life is not Life.ENDED or self.manager.sessions.get(self.id) is self:
            try:
                first = await self.manager.registry.append(self.id, events, after=self._seq)
                self._seq = first + len(events) - 1
                return first
            except LogLost:
                with contextlib.suppress(Exception):  # unreachable again: the loop retries
                    if not await self.manager.owns(self):
                        # Given to another kernel host while this one seemed dead: that
                        # one serves it now, and this one lets go of it and its kernel.
                        log.warning("session %s: taken on by another kernel host; let go here", self.id)
                        self._spawn(self.let_go())
                        return self._seq + 1
                    await self._new_epoch()
            except Exception as exc:
                _registry_warnings.warning("session %s: the replay log cannot be written: %s", self.id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return self._seq + 1  # let go of: nothing more is logged here

    def resume_log(self, last: int) -> None:
        """Go on from seq `last` of an existing log (a session taken on by a kernel host)."""
        self._seq = last

    async def _new_epoch(self) -> None:
        self.record.epoch = secrets.token_hex(8)
        log.warning("session %s: the registry lost part of its log; it goes on as a new epoch", self.id)
        await self.manager.registry.restore(self.record, last=self._seq)

    async def recover(self) -> None:
        """Put the session back in a registry that lost it, before a client resumes."""
        async with self._emit_lock:
            try:
                await self.manager.registry.read(self.id, self._seq)
            except KeyError:
                await self._new_epoch()

    async def _deliver(self, event: str, data: dict[str, Any], seq: int) -> None:
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
        self._outbox.put_nowait(("__flush__", done, 0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, timeout)

    async def attach(self, sink: Sink, token: str, resumed: bool, after: int | None, epoch: str | None) -> None:
        """Make `sink` the session's client: greet it, replay what it missed, go live."""
        async with self._emit_lock:
            old, self.sink = self.sink, None
            if old is not None:
                self._spawn(self._take_from(old))
                self.disconnected_at = time.monotonic()  # until this attach succeeds
            await sink.send("session", self.describe(token, resumed))
            if after is not None:
                await replay(
                    self.manager.registry, self.id, self.record.epoch, sink, after, epoch, self.manager.metrics
                )
            self.sink = sink
            self.disconnected_at = None
            self.touch()

    async def _take_from(self, old: Sink) -> None:
        err = CellgateError("session_taken", "this session was resumed on another connection")
        with contextlib.suppress(Exception):
            await old.send("error", err.as_dict())
            await old.close("session_taken")

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
                "execution_state": "busy" if self._queue else "idle",
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

    @property
    def busy(self) -> bool:
        """A request is outstanding: the kernel is running (or about to run) code."""
        return bool(self._queue)

    @property
    def ended(self) -> bool:
        return self.life is Life.ENDED

    def touch(self) -> None:
        """The client did something: idleness counts from here, and output between
        requests gets a fresh budget."""
        self.last_activity = time.monotonic()
        if self._between.used:
            self._between = Budget(self.config.session_output_cap, None)

    def admit(self, msg_id: str | None = None) -> None:
        """A client message counts against the session's rate; rate_limited past it."""
        if not self._rate.take():
            extra = {"msg_id": msg_id} if msg_id else {}
            raise CellgateError("rate_limited", "too many messages: slow down and send again", **extra)

    async def to_kernel(self, channel: str, msg: dict[str, Any]) -> None:
        """Queue a validated message for the kernel, attaching one if the session needs it."""
        msg_id, msg_type = msg["header"]["msg_id"], msg["header"]["msg_type"]
        if self.life >= Life.ENDING:
            raise CellgateError("kernel_dead", "this session has ended", msg_id=msg_id)
        self.touch()
        async with self._send_lock:  # FIFO: messages reach the kernel in the order sent
            if channel == "control" and msg_type == "shutdown_request":
                if msg["content"].get("restart") is True:
                    await self._restart(msg)
                else:
                    self._shutdown_requested(msg)
                return
            if channel == "shell":
                kernel = await self._ensure_kernel()
            else:
                kernel = self.kernel
                if kernel is None or not kernel.alive:
                    raise CellgateError("no_kernel", "this session has no running kernel", msg_id=msg_id)
            if channel != "stdin":
                self._expect(msg_id, msg_type)
            try:
                kernel.send(channel, msg)
            except KernelBusy as exc:
                self._expected.pop(msg_id, None)
                raise CellgateError("rate_limited", str(exc), msg_id=msg_id) from None
            if channel == "shell":
                cap = self.config.output_cap if msg_type == "execute_request" else self.config.session_output_cap
                self._queue.append(Request(msg_id, msg_type, Budget(cap, msg_id)))
                self._spin_since = self._spin_told = None
                if len(self._queue) == 1:
                    self._start(self._queue[0])
            if msg_type == "execute_request":
                self._spawn(self._permalink(msg_id, msg["content"]["code"]))
        self.manager.metrics.messages.labels("to_kernel", channel).inc()

    def _expect(self, msg_id: str, msg_type: str) -> None:
        """The lifecycle messages a request earns: a busy and an idle status, a reply if
        it is a *_request, an execute_input if it is an execution. These are never
        dropped; anything past them is output like any other."""
        expected = {"status": 2}
        if msg_type.endswith("_request"):
            expected["reply"] = 1
        if msg_type == "execute_request":
            expected["execute_input"] = 1
        self._expected[msg_id] = expected
        while len(self._expected) > EXPECTED_TRACKED:
            self._expected.popitem(last=False)

    async def _ensure_kernel(self, reason: str = "replaced") -> KernelHandle:
        if self.kernel is not None and self.kernel.alive:
            return self.kernel
        replaced = self.record.kernel_id is not None
        if self.manager.pool.counts()["warm"] == 0:
            self.publish("kernel", {"state": "starting"})
        try:
            kernel = await self.manager.pool.acquire(self.record.kernel_name, self.config.queue_timeout)
        except PoolExhausted as exc:
            raise CellgateError("capacity_node", f"no kernel available: {exc}") from None
        if self.life >= Life.ENDING:
            await self.manager.pool.release(kernel)
            raise CellgateError("kernel_dead", "this session has ended")
        self.kernel = kernel
        self.files.forget()
        kernel.set_listener(self._from_kernel, self._dropped)
        kernel.on_exit(self._kernel_exited)
        self.record.kernel_id = kernel.id
        if self.logged:
            await self.manager.registry.update(self.record)
        event: dict[str, Any] = {"state": "ready", "id": kernel.id, "name": kernel.name}
        if replaced:
            event["reason"] = reason
        self.publish("kernel", event)
        return kernel

    async def _restart(self, msg: dict[str, Any]) -> None:
        """A shutdown_request with restart: the session keeps going on a fresh kernel
        from the pool, which is faster than asking the old one to restart itself and
        trusts nothing it says. The client gets `restarting`, the reply, then `ready`."""
        old, self.kernel = self.kernel, None  # its exit is not a death to report
        self._forget_requests()
        self.publish("kernel", {"state": "restarting"})
        if old is not None:
            await self.manager.pool.release(old)
        self.publish("control", _gateway_reply("shutdown_reply", msg["header"], {"status": "ok", "restart": True}))
        await self._ensure_kernel("restarted")

    def _shutdown_requested(self, msg: dict[str, Any]) -> None:
        self.life = max(self.life, Life.ENDING)
        self._unanswered_shutdown = msg["header"]
        kernel = self.kernel
        if kernel is not None and kernel.alive:
            self._expect(msg["header"]["msg_id"], "shutdown_request")
            with contextlib.suppress(KernelBusy):
                kernel.send("control", msg)
            # The session ends at the shutdown_reply (relayed) or at the kernel's exit,
            # whichever comes first; a loaded kernel may take seconds to answer, and one
            # that does neither is ended all the same.
            self._spawn(self._end_later(SHUTDOWN_GRACE, "shutdown", "requested"))
        else:
            self._spawn(self.end("shutdown", "requested"))

    async def _end_after(self, release: Awaitable[None]) -> None:
        await release
        await self.end("shutdown", "requested")

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
            await self.files.upload(kernel, name, data)
        except workdir.UnsafeFile as exc:
            raise CellgateError("bad_filename", str(exc)) from None
        except workdir.QuotaFull as exc:
            raise CellgateError("file_too_large", f"{exc}: its disk quota is used up") from None
        return {"name": name, "size": len(data)}

    # -- messages from the kernel -----------------------------------------------

    def _from_kernel(self, incoming: Incoming) -> None:
        channel, msg, size = incoming.channel, incoming.msg, incoming.size
        msg_type = msg["header"]["msg_type"]
        parent = msg["parent_header"].get("msg_id", "")
        # Output is charged to what this side knows is running, whatever parent it names.
        budget = self._queue[0].budget if self._queue else self._between
        lifecycle = self._lifecycle(channel, msg_type, parent)
        if lifecycle:
            budget.charge(size)
            if incoming.truncated or size > REPLY_CONTENT_MAX:
                msg = {**msg, "content": _marker(msg_type, msg["content"], size), "buffers": []}
        elif incoming.truncated:
            self._drop(budget, size, "too_large", f"the kernel sent a {size}-byte {msg_type} message")
            return
        elif not budget.charge(size):
            self._drop(budget, size, "output_capped", f"output passed {budget.cap} bytes")
            return
        elif self.outbox_bytes + size > self.config.client_buffer:
            self._drop(budget, size, "output_capped", "output arrived faster than it could be delivered")
            return
        self.publish(channel, msg, size)
        self.manager.metrics.messages.labels("to_client", channel).inc()
        if not lifecycle:
            return
        # IOPub is one ordered stream (busy, output, idle) while the reply races it on
        # shell: a request is over at its idle status, after all of its output.
        if self._queue and parent == self._queue[0].msg_id and msg_type == "status":
            if msg["content"].get("execution_state") == "idle":
                self._finished(self._queue.popleft())
        if channel == "control" and msg_type == "shutdown_reply" and self.life >= Life.ENDING:
            self._unanswered_shutdown = None
            self._spawn(self.end("shutdown", "requested"))

    def _lifecycle(self, channel: str, msg_type: str, parent: str) -> bool:
        """Whether this is a lifecycle message a request of ours still has coming."""
        expected = self._expected.get(parent)
        if expected is None:
            return False
        if channel == "iopub" and msg_type in ("status", "execute_input"):
            kind = msg_type
        elif channel in ("shell", "control") and msg_type.endswith("_reply"):
            kind = "reply"
        else:
            return False
        if expected.get(kind, 0) <= 0:
            return False
        expected[kind] -= 1
        if not any(expected.values()):
            del self._expected[parent]
        return True

    def _drop(self, budget: Budget, size: int, code: str, why: str) -> None:
        """Drop one output message; the client hears once per budget and code."""
        self.manager.metrics.dropped.inc(size)
        too_large = code == "too_large"
        if budget.truncated if too_large else budget.capped:
            return
        if too_large:
            budget.truncated = True
            message = f"{why}, over the {self.config.kernel_message_limit}-byte limit; it was dropped"
        else:
            budget.capped = True
            message = f"{why}; further output is dropped"
        self.manager.metrics.errors.labels(code).inc()
        event = {"code": code, "message": message}
        if budget.msg_id is not None:
            event["msg_id"] = budget.msg_id
        self.publish("error", event)

    def _dropped(self, channel: str, reason: str) -> None:
        self.manager.metrics.kernel_dropped.labels(channel).inc()

    def _start(self, request: Request) -> None:
        """The head of the queue: the kernel is running it now, and its clock starts."""
        request.deadline = asyncio.get_running_loop().call_later(
            self.config.execution_timeout, lambda: self._spawn(self._stop_overrun(request))
        )

    def _finished(self, request: Request) -> None:
        if request.deadline is not None:
            request.deadline.cancel()
        self._last_msg_id = request.msg_id
        if request.msg_type == "execute_request":
            self.manager.metrics.execution.observe(time.monotonic() - request.handed)
            self._reports.add(self._spawn(self._report_files(request.msg_id)))
        self._spin_since = self._spin_told = None
        if self._queue:
            self._start(self._queue[0])

    async def _stop_overrun(self, request: Request) -> None:
        """Past its wall-clock limit a request is interrupted; a kernel that has not
        finished it OVERRUN_GRACE seconds later is killed (and replaced on the next
        message)."""
        kernel = self.kernel
        if kernel is None or not self._queue or self._queue[0] is not request:
            return
        limit = self.config.execution_timeout
        self._timed_out(request.msg_id, f"the execution ran past {limit:g} s; interrupted")
        await kernel.interrupt()
        await asyncio.sleep(OVERRUN_GRACE)
        if self._queue and self._queue[0] is request and kernel is self.kernel:
            await kernel.kill(f"the execution ran past {limit:g} s and ignored the interrupt")

    def _timed_out(self, msg_id: str | None, message: str) -> None:
        self.manager.metrics.errors.labels("timeout").inc()
        event = {"code": "timeout", "message": message}
        if msg_id is not None:
            event["msg_id"] = msg_id
        self.publish("error", event)

    def _check_spinning(self, now: float) -> None:
        """With nothing outstanding, the kernel should be idle. One that keeps a CPU busy
        for longer than an execution may run (a reply it forged, a thread it left
        running) is interrupted, then killed, as an overrunning execution would be."""
        kernel = self.kernel
        cpu = kernel.cpu_seconds() if kernel is not None and not self._queue else None
        mark, self._cpu_mark = self._cpu_mark, (now, cpu) if cpu is not None else None
        if cpu is None or mark is None or now <= mark[0]:
            return
        if cpu - mark[1] < SPINNING * (now - mark[0]):
            self._spin_since = self._spin_told = None
            return
        if self._spin_since is None:
            self._spin_since = mark[0]
        limit = self.config.execution_timeout
        if now - self._spin_since <= limit or kernel is None:
            return
        if self._spin_told is None:
            self._spin_told = now
            self._timed_out(self._last_msg_id, f"the kernel kept running code {limit:g} s past its last request")
            self._spawn(kernel.interrupt())
        elif now - self._spin_told > OVERRUN_GRACE:
            self._spawn(kernel.kill(f"the kernel kept running code past {limit:g} s and ignored the interrupt"))

    def _forget_requests(self) -> None:
        """The kernel is gone: nothing it was asked will be answered by it."""
        for request in self._queue:
            if request.deadline is not None:
                request.deadline.cancel()
        self._queue.clear()
        self._expected.clear()
        self._cpu_mark = self._spin_since = self._spin_told = None

    def _kernel_exited(self, kernel: KernelHandle) -> None:
        if kernel is not self.kernel:
            return
        self._forget_requests()
        self.kernel = None
        if Life.ENDING <= self.life < Life.ENDED:
            # It exited as asked, and whatever it said has been relayed: the session ends
            # once its kernel is reclaimed, as it does when it ends the kernel itself.
            self._spawn(self._end_after(self.manager.pool.release(kernel)))
            return
        self._spawn(self.manager.pool.release(kernel))
        if not self.ended:
            log.info("session %s: kernel %s died", self.id, kernel.id)
            self.manager.metrics.errors.labels("kernel_dead").inc()
            self.publish("kernel", {"state": "dead", "reason": kernel.exit_reason})

    # -- files ------------------------------------------------------------------

    async def _report_files(self, msg_id: str) -> None:
        kernel = self.kernel
        if kernel is not None and not self.ended:
            await self.files.report(kernel, msg_id)

    async def _permalink(self, msg_id: str, code: str) -> None:
        language = self.manager.language(self.record.kernel_name)
        try:
            pid, stored = await self.manager.permalinks.save(code, language, {"session": self.id, "msg_id": msg_id})
        except SpoolFull as exc:
            log.warning("session %s: no permalink: %s", self.id, exc)
            return
        if stored:  # else the spool announces it once stored
            self.announce_permalink(msg_id, pid)

    def announce_permalink(self, msg_id: str, pid: str) -> None:
        self.publish("permalink", {"msg_id": msg_id, "id": pid, "url": self.manager.permalinks.url(pid)})

    async def settle(self) -> None:
        """Wait for pending file reports, then for their delivery."""
        while self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)
        await self.flush()

    # -- time limits and the end ------------------------------------------------

    async def _watch(self) -> None:
        c = self.config
        if self.record.kind == "jupyter":  # Jupyter's habits: long-lived, culled when idle
            lifespan, idle = c.jupyter_api_lifespan, c.jupyter_api_cull_idle_timeout
            grace = idle
        else:
            lifespan, idle, grace = c.lifespan, c.idle_timeout, c.resume_grace
        tick = max(0.05, min(1.0, grace / 4, idle / 4, lifespan / 4, c.execution_timeout / 4))
        while not self.ended:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self.created > lifespan:
                await self.end("timed_out", "lifespan")
            elif not self._queue and now - self.last_activity > idle:
                await self.end("timed_out", "idle")
            elif (away := await self.manager.client_away(self)) is not None and away > grace:
                await self.end("timed_out", "disconnected")
            else:
                self._check_spinning(now)

    async def end(self, state: str, reason: str) -> None:
        """End the session: reclaim the kernel, tell the client, forget the token."""
        if self.life >= Life.CLOSING:
            return
        self.life = Life.CLOSING
        if self._reports:  # what the last execution wrote is reported before its kernel goes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._reports, return_exceptions=True), 10)
        kernel, self.kernel = self.kernel, None
        self._forget_requests()
        if kernel is not None:
            await self.manager.pool.release(kernel)
        if self._unanswered_shutdown is not None:
            # The kernel ended without a reply (seen, rarely, from a loaded kernel): a
            # client waiting for one is answered all the same, and told by whom.
            self.publish("control", _gateway_reply("shutdown_reply", self._unanswered_shutdown, {"status": "ok"}))
            self._unanswered_shutdown = None
        self.publish("kernel", {"state": state, "reason": reason})
        await self.flush()
        self.life = Life.ENDED
        await self.manager.forget(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            with contextlib.suppress(Exception):
                await sink.close(state)
        current = asyncio.current_task()
        for task in (self._sender, self._watchdog, *self._tasks):
            if task is not current:
                task.cancel()

    async def let_go(self) -> None:
        """Stop serving the session here, and end its kernel: another kernel host has
        been given it while this one seemed dead."""
        self.life = Life.ENDED  # publishes nothing more
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            await self.manager.pool.release(kernel)
        self._stop_tasks()

    async def abandon(self) -> None:
        """Stop serving the session here without ending it (a kernel host stopping):
        what was published is logged, and the session goes on elsewhere."""
        self.life = Life.ENDED
        await self.flush(timeout=2.0)
        self._stop_tasks()

    def _stop_tasks(self) -> None:
        self.manager.sessions.pop(self.id, None)
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


def _gateway_reply(msg_type: str, parent: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    """A reply the gateway makes in the kernel's place, marked as such in its metadata."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": "cellgate",
        "username": "cellgate",
        "date": datetime.now(UTC).isoformat(),
        "version": "5.3",
    }
    return {"header": header, "parent_header": parent, "metadata": {"from": "gateway"}, "content": content}


def _event_size(data: dict[str, Any]) -> int:
    """An estimate of the bytes of an event the gateway made itself (small, flat)."""
    return EVENT_OVERHEAD + sum(len(str(v)) for v in data.values())


def _marker(msg_type: str, content: dict[str, Any], size: int) -> dict[str, Any]:
    """What is left of an oversized lifecycle message: its short fields, and a note."""
    kept = {k: v for k, v in content.items() if k in ("status", "execution_state", "execution_count")}
    kept = {k: v for k, v in kept.items() if isinstance(v, int | str) and len(str(v)) < 64}
    if msg_type.endswith("_reply"):
        kept.setdefault("status", "error")
        if kept["status"] == "error":
            kept.update(ename="OutputTooLarge", evalue=f"the {msg_type} was {size} bytes", traceback=[])
    kept["cellgate_truncated"] = {"size": size, "limit": REPLY_CONTENT_MAX}
    return kept


def _coalesce(batch: list[tuple[str, Any, int]]) -> list[tuple[str, Any, int]]:
    """Merge runs of stream messages to the same parent and stream into one message.

    Only a backlog is ever merged (what queued up while the client was being served),
    so a quiet session sees every message as the kernel sent it, with no added delay.
    """
    out: list[tuple[str, Any, int]] = []
    for event, data, size in batch:
        if out and event == "iopub" and _mergeable(out[-1], data):
            _, prev, prev_size = out[-1]
            merged = {**prev, "content": {**prev["content"], "text": prev["content"]["text"] + data["content"]["text"]}}
            out[-1] = ("iopub", merged, prev_size + size)
        else:
            out.append((event, data, size))
    return out


def _mergeable(prev: tuple[str, Any, int], msg: dict[str, Any]) -> bool:
    event, last, _ = prev
    if event != "iopub" or msg["header"]["msg_type"] != "stream" or last["header"]["msg_type"] != "stream":
        return False
    text, last_text = msg["content"].get("text"), last["content"].get("text")
    return (
        isinstance(text, str)
        and isinstance(last_text, str)
        and last["parent_header"].get("msg_id") == msg["parent_header"].get("msg_id")
        and last["content"].get("name") == msg["content"].get("name")
        and len(last_text) + len(text) <= STREAM_MERGE_MAX
    )
