"""`python -m kernels.host --redis URL`: a kernel host, on this machine or another.

It owns the fork server, the warm pool, the kernels, their sockets and keys, and
their files: the trusted side of every session a gateway node gave it. For each of
those it runs the session's kernel-facing half (gateway/session.py: budgets, time
limits, file reports, the replay log), takes the session's client messages from its
own Redis stream and writes everything for the client into the session's log. Gateway
nodes speak Socket.IO and Redis only; nothing of a kernel reaches Redis unbounded.

It beats every second in Redis with its free places, counts and isolation, so nodes
pick it for new sessions and notice when it dies. It takes every kernel setting a
node takes (`python -m kernels.host --help`); it is the only part that needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import uuid
from collections.abc import Sequence
from typing import Any

from gateway.app import create_pool
from gateway.cluster import BEAT, Cluster
from gateway.config import Config, parse
from gateway.errors import CellgateError
from gateway.metrics import Metrics
from gateway.registry import create_registry
from gateway.registry.redis import RedisRegistry
from gateway.session import Session
from gateway.sessions import SessionManager
from gateway.stores import create_store
from kernels.provisioner import ForkServerError

log = logging.getLogger("kernels.host")


class KernelHost:
    def __init__(self, config: Config) -> None:
        if not config.redis:
            raise SystemExit("cellgate kernel host: --redis (or CELLGATE_REDIS) is required")
        self.config = config
        self.id = uuid.uuid4().hex[:12]
        registry = create_registry(config)
        assert isinstance(registry, RedisRegistry)
        self.cluster = Cluster(registry.redis, config.redis_prefix)
        self.pool = create_pool(config)
        self.manager = SessionManager(
            config, self.pool, registry, create_store(config), Metrics(), cluster=self.cluster, host_id=self.id
        )
        self._inboxes: dict[str, asyncio.Queue[tuple[str, Any]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self, stop: asyncio.Event) -> None:
        await self.manager.registry.open()
        await self.manager.spool.open()
        await self.pool.open()
        self.pool.start()
        log.info("kernel host %s serving (isolation: %s)", self.id, self.pool.isolation().get("level"))
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._receive())]
        await stop.wait()
        await self.close()

    def report(self) -> dict[str, Any]:
        counts = self.pool.counts()
        return {
            "free": max(0, self.pool.max_kernels - counts["attached"] - counts["starting"]),
            "kernels": counts,
            "max_kernels": self.pool.max_kernels,
            "healthy": self.pool.healthy,
            "last_error": self.pool.last_error,
            "isolation": self.pool.isolation(),
            "sessions": len(self.manager.sessions),
        }

    async def _beat(self) -> None:
        while True:
            try:
                if not await self.cluster.host_beat(self.id, self.report()):
                    await self._reaped()
            except Exception as exc:  # Redis away: nodes will think us dead, and reap
                log.warning("kernel host %s: heartbeat failed: %s", self.id, exc)
            await asyncio.sleep(BEAT)

    async def _reaped(self) -> None:
        """This host stalled past its heartbeat and its sessions went to other hosts:
        let go of each, and of its kernel, here."""
        lost = [s for s in self.manager.sessions.values() if not await self.manager.owns(s)]
        if lost:
            log.warning("kernel host %s was taken for dead; %d sessions went elsewhere", self.id, len(lost))
        await asyncio.gather(*(s.let_go() for s in lost))

    async def _receive(self) -> None:
        # The stream is this host's own, new with its id: reading it from the start
        # misses nothing a node queued before the first read began.
        after = "0-0"
        while True:
            try:
                entries = await self.cluster.receive(self.id, after, block_ms=1000)
            except Exception as exc:
                log.warning("kernel host %s: reading client messages failed: %s", self.id, exc)
                await asyncio.sleep(0.5)
                continue
            for entry_id, session_id, channel, msg in entries:
                after = entry_id
                self._inbox(session_id).put_nowait((channel, msg))

    def _inbox(self, session_id: str) -> asyncio.Queue[tuple[str, Any]]:
        """One queue and one worker per session: its messages in order, and a session
        waiting for a kernel holds up no other."""
        if session_id not in self._inboxes:
            self._inboxes[session_id] = asyncio.Queue()
            self._workers[session_id] = asyncio.create_task(self._work(session_id))
        return self._inboxes[session_id]

    async def _work(self, session_id: str) -> None:
        inbox = self._inboxes[session_id]
        try:
            session = await self._session(session_id)
            while session is not None and not session.ended:
                channel, msg = await inbox.get()
                await self._handle(session, channel, msg)
        finally:
            self._inboxes.pop(session_id, None)
            self._workers.pop(session_id, None)

    async def _session(self, session_id: str) -> Session | None:
        session = self.manager.sessions.get(session_id)
        if session is not None:
            return session
        record = await self.manager.registry.get(session_id)
        if record is None or record.host != self.id:
            return None  # ended meanwhile, or not ours
        return await self.manager.adopt(record)

    async def _handle(self, session: Session, channel: str, msg: Any) -> None:
        msg_id = msg.get("header", {}).get("msg_id") if isinstance(msg, dict) else None
        try:
            if channel == "open":
                return
            if channel == "upload":
                await session.upload(msg["name"], msg["data"])
            else:
                await session.to_kernel(channel, msg)
        except CellgateError as exc:
            # The node acked the message when it queued it: a refusal is an event.
            self.manager.metrics.errors.labels(exc.code).inc()
            session.publish("error", {**exc.as_dict(), **({"msg_id": msg_id} if msg_id else {})})
        except Exception:
            log.exception("kernel host %s: session %s: a %s message failed", self.id, session.id, channel)

    async def close(self) -> None:
        for task in [*self._tasks, *self._workers.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._workers.values(), return_exceptions=True)
        # Its sessions are not ended: said gone, the host is reaped at once, and each
        # session goes on with a new kernel on another host.
        with contextlib.suppress(Exception):
            await self.cluster.host_gone(self.id)
        await asyncio.gather(*(s.abandon() for s in list(self.manager.sessions.values())))
        await self.pool.close()
        await self.manager.spool.close()
        await self.manager.registry.close()
        await self.manager.store.close()


def main(argv: Sequence[str] | None = None) -> None:
    config = parse(argv, prog="python -m kernels.host")
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await KernelHost(config).run(stop)

    try:
        asyncio.run(serve())
    except ForkServerError as exc:
        raise SystemExit(f"cellgate kernel host: {exc}") from None


if __name__ == "__main__":
    main()
