"""Live events for the clients a gateway node holds, read from their sessions' logs.

On a node whose kernels live on kernel hosts, everything for a client is written into
its session's log in Redis. One task per node follows the logs of every session with
a socket here, in one blocking XREAD over all of them, and sends each new entry to its
socket in seq order. A resume first replays the log up to its newest seq, then follows
from there: nothing twice, nothing missed. The event that ends a session (`kernel`
`shutdown` or `timed_out`) is the last one: the socket is closed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.metrics import Metrics
from gateway.registry.redis import RedisRegistry, log_entry

log = logging.getLogger(__name__)

BLOCK_MS = 50  # a socket attached meanwhile is followed after at most this long (its replay came first)
ENDING = ("shutdown", "timed_out")


class Sink(Protocol):
    async def send(self, event: str, data: dict[str, Any]) -> None: ...

    async def close(self, reason: str) -> None: ...


@dataclass
class Follow:
    sink: Sink
    last: int  # the newest seq this socket has been sent


class Follower:
    def __init__(self, registry: RedisRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.follows: dict[str, Follow] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def follow(self, session_id: str, sink: Sink, last: int) -> None:
        self.follows[session_id] = Follow(sink, last)
        self._changed.set()

    def unfollow(self, session_id: str, sink: Sink) -> None:
        follow = self.follows.get(session_id)
        if follow is not None and follow.sink is sink:
            del self.follows[session_id]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            if not self.follows:
                self._changed.clear()
                await self._changed.wait()
                continue
            streams = {self.registry.log_key(sid): f"{f.last}-0" for sid, f in self.follows.items()}
            try:
                answer = await self.registry.redis.xread(streams, block=BLOCK_MS, count=1000)
            except Exception as exc:  # Redis away: the logs wait there
                log.warning("following session logs failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for stream, entries in answer or []:
                session_id = stream.decode().rsplit(":", 1)[1]
                follow = self.follows.get(session_id)
                for entry_id, fields in entries:
                    if follow is None or self.follows.get(session_id) is not follow:
                        break
                    await self._deliver(session_id, follow, log_entry(entry_id, fields))

    async def _deliver(self, session_id: str, follow: Follow, entry: Any) -> None:
        if entry.seq <= follow.last:
            return
        follow.last = entry.seq
        if entry.event in ("iopub", "shell", "stdin", "control"):
            self.metrics.messages.labels("to_client", entry.event).inc()
        try:
            await follow.sink.send(entry.event, {**entry.data, "seq": entry.seq})
        except Exception:  # the log holds it; a resume will replay it
            log.debug("session %s: delivery failed", session_id, exc_info=True)
        if entry.event == "kernel" and entry.data.get("state") in ENDING:
            self.unfollow(session_id, follow.sink)
            task = asyncio.create_task(follow.sink.close(entry.data["state"]))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
