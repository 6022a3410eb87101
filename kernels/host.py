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
It serves `/health` and `/metrics` on `--host`:`--port` (default 127.0.0.1:8889).

SIGTERM drains it: it takes no new sessions (its beat says so), lets running
executions finish for up to `--drain-timeout` seconds, then stops. Its sessions are
not ended: the node that reaps it tells each client `kernel` `dead` with the reason,
and each goes on with a fresh kernel on another host. SIGINT, or a second SIGTERM,
stops it without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from gateway import logs
from gateway.app import create_pool
from gateway.cluster import BEAT, Cluster
from gateway.config import PROTOCOL, Config, parse
from gateway.errors import CellgateError
from gateway.metrics import Metrics
from gateway.registry import create_registry
from gateway.registry.base import RegistryUnavailable
from gateway.registry.redis import RedisRegistry
from gateway.session import Session
from gateway.sessions import SessionManager
from gateway.stores import create_store
from kernels.provisioner import ForkServerError

log = logging.getLogger("kernels.host")

DRAINED = "its kernel host was shut down"


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
            config,
            self.pool,
            registry,
            create_store(config),
            Metrics(config.metrics_origins),
            cluster=self.cluster,
            host_id=self.id,
        )
        self._inboxes: dict[str, asyncio.Queue[tuple[str, Any]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.draining = False
        self.manager.metrics.draining.set(0)

    async def run(self, drain: asyncio.Event, stop: asyncio.Event) -> None:
        """Serve until `stop`; `drain` first lets running executions finish."""
        await self.manager.registry.open()
        await self.manager.spool.open()
        await self.pool.open()
        self.pool.start()
        http = await self._serve_http()
        log.info("kernel host %s serving (isolation: %s)", self.id, self.pool.isolation().get("level"))
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._receive())]
        draining = asyncio.ensure_future(drain.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([draining, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            await self._drain(stop)
        draining.cancel()
        stopping.cancel()
        await self.close(DRAINED if self.draining else "")
        await http.cleanup()

    async def _drain(self, stop: asyncio.Event) -> None:
        self.draining = True
        self.manager.metrics.draining.set(1)
        with contextlib.suppress(Exception):  # nodes learn it now rather than at the next beat
            await self.cluster.host_beat(self.id, self.report())
        timeout = self.config.drain_timeout
        log.info("kernel host %s draining: no new sessions; waiting up to %g s for running code", self.id, timeout)
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline and self._busy():  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # sessions signal nothing when they go idle: look ten times a second
        left = sum(1 for s in self.manager.sessions.values() if s.busy)
        log.info("kernel host %s drained (%d executions still running)", self.id, left)

    def _busy(self) -> bool:
        return any(s.busy for s in self.manager.sessions.values())

    async def _serve_http(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.config.host, self.config.port).start()
        return runner

    async def _health(self, request: web.Request) -> web.Response:
        registry_ok = await self.manager.registry.reachable()
        ok = self.pool.healthy and registry_ok and not self.draining
        body = {
            "status": "ok" if ok else "draining" if self.draining else "unavailable",
            "protocol": PROTOCOL,
            "host": self.id,
            **self.report(),
            "registry": {"backend": "redis", "reachable": registry_ok},
        }
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        m = self.manager.metrics
        for state, n in self.pool.counts().items():
            m.kernels.labels(state).set(n)
        m.sessions.labels("hosted").set(len(self.manager.sessions))
        await m.observe_registry(self.manager.registry)
        return web.Response(body=m.render(), headers={"Content-Type": m.content_type})

    def report(self) -> dict[str, Any]:
        counts = self.pool.counts()
        # A session takes its kernel at its first message: one without a kernel yet has
        # a place promised all the same.
        promised = max(counts["attached"] + counts["starting"], len(self.manager.sessions))
        free = max(0, self.pool.max_kernels - promised)
        return {
            "free": 0 if self.draining else free,
            "draining": self.draining,
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
            session = await self._session_once_reachable(session_id)
            while session is not None and not session.ended:
                channel, msg = await inbox.get()
                await self._handle(session, channel, msg)
        finally:
            self._inboxes.pop(session_id, None)
            self._workers.pop(session_id, None)

    async def _session_once_reachable(self, session_id: str) -> Session | None:
        """The session, waiting out a registry that cannot be reached (a Redis restart):
        its messages wait in its inbox meanwhile, and none is dropped."""
        delay = 0.1
        while True:
            try:
                return await self._session(session_id)
            except RegistryUnavailable as exc:
                if delay == 0.1:
                    log.warning("kernel host %s: session %s waits for the registry: %s", self.id, session_id, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

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
            if channel == "end":  # end_session(): the admin API, or a Jupyter API client's DELETE
                await session.end("shutdown", "requested" if msg.get("reason") == "requested" else "admin")
            elif channel == "upload":
                await session.upload(msg["name"], msg["data"])
            else:
                await session.to_kernel(channel, msg)
        except CellgateError as exc:
            # The node acked the message when it queued it: a refusal is an event.
            self.manager.metrics.errors.labels(exc.code).inc()
            session.publish("error", {**exc.as_dict(), **({"msg_id": msg_id} if msg_id else {})})
        except Exception:
            log.exception("kernel host %s: session %s: a %s message failed", self.id, session.id, channel)

    async def close(self, reason: str = "") -> None:
        for task in [*self._tasks, *self._workers.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._workers.values(), return_exceptions=True)
        # Its sessions are not ended: said gone, the host is reaped at once, and each
        # session goes on with a new kernel on another host.
        with contextlib.suppress(Exception):
            await self.cluster.host_gone(self.id, reason)
        await asyncio.gather(*(s.abandon() for s in list(self.manager.sessions.values())))
        await self.pool.close()
        await self.manager.spool.close()
        await self.manager.registry.close()
        await self.manager.store.close()


def main(argv: Sequence[str] | None = None) -> None:
    # Its own port, so that a node and a host can share a machine with the defaults.
    config = parse(argv, prog="python -m kernels.host", defaults={"port": 8889})
    logs.setup(config.log_level, config.log_format, process="kernel-host")

    async def serve() -> None:
        drain, stop = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        # The first SIGTERM drains; a second one, or SIGINT, stops at once.
        loop.add_signal_handler(signal.SIGTERM, lambda: (stop if drain.is_set() else drain).set())
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await KernelHost(config).run(drain, stop)

    try:
        asyncio.run(serve())
    except ForkServerError as exc:
        raise SystemExit(f"cellgate kernel host: {exc}") from None


if __name__ == "__main__":
    main()
