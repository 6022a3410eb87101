"""A gateway node whose kernels live on kernel hosts (`--remote-kernels`).

The node speaks Socket.IO to its clients and Redis to everything else. Opening a
session picks the live kernel host with the most free places and records it; the
session's client messages go to that host's stream (acked once queued there), and
its events come back through its log, which the node follows for the sockets it
holds (gateway/follower.py). Nothing of a session lives in the node: another node
serves it just as well, and a node that dies loses nothing but its sockets.

Every node also watches the hosts' heartbeats. The first node to see a host die takes
its sessions (one Redis lock per dead host), tells each client `kernel` `dead`, and
gives the session to a live host, where its next message attaches a fresh kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import socketio
from redis.exceptions import RedisError

from gateway.cluster import BEAT, Cluster
from gateway.config import Config
from gateway.errors import CellgateError
from gateway.follower import Follower
from gateway.metrics import Metrics
from gateway.registry import SessionRecord
from gateway.registry.redis import RedisRegistry
from gateway.replay import replay
from gateway.sessions import KeepsBlobs, find, register, unreachable
from gateway.spool import Item
from gateway.stores import BlobStore

log = logging.getLogger(__name__)

LEVELS = ("none", "partial", "full")


class Hosts:
    """The kernel hosts as the last heartbeats told: what /health and /metrics show."""

    def __init__(self) -> None:
        self.live: dict[str, dict[str, Any]] = {}

    @property
    def healthy(self) -> bool:
        return any(h.get("healthy") for h in self.live.values())

    @property
    def last_error(self) -> str | None:
        return None if self.live else "no kernel host is running"

    @property
    def max_kernels(self) -> int:
        return sum(h.get("max_kernels", 0) for h in self.live.values())

    def counts(self) -> dict[str, int]:
        total = {"warm": 0, "starting": 0, "attached": 0}
        for report in self.live.values():
            for state, n in report.get("kernels", {}).items():
                total[state] = total.get(state, 0) + n
        return total

    def isolation(self) -> dict[str, Any]:
        """The weakest host's level, the fences every host holds, and each host's report."""
        reports = [h.get("isolation", {}) for h in self.live.values()]
        if not reports:
            return {"level": "none", "fences": {}, "missing": [], "hosts": {}}
        level = min((r.get("level", "none") for r in reports), key=LEVELS.index)
        names = set().union(*(r.get("fences", {}) for r in reports))
        fences = {n: all(r.get("fences", {}).get(n, False) for r in reports) for n in sorted(names)}
        return {
            "level": level,
            "fences": fences,
            "missing": [n for n, ok in fences.items() if not ok],
            "hosts": {i: h.get("isolation", {}) for i, h in self.live.items()},
        }


class RemoteSession:
    """A session as a node sees it: where to send its client's messages, and the log
    its socket follows. One per connection; everything shared is in Redis."""

    def __init__(self, manager: RemoteSessionManager, record: SessionRecord) -> None:
        self.manager = manager
        self.record = record
        self.id = record.id
        self.sink: Any = None
        self._lock = asyncio.Lock()  # this socket's messages reach the host in the order sent

    async def to_kernel(self, channel: str, msg: dict[str, Any]) -> None:
        await self._send(channel, msg, msg["header"]["msg_id"])
        self.manager.metrics.messages.labels("to_kernel", channel).inc()

    async def upload(self, name: str, data: bytes) -> dict[str, Any]:
        cap = self.manager.config.file_cap
        if len(data) > cap:
            raise CellgateError("file_too_large", f"{name}: {len(data)} bytes is over the {cap} byte cap")
        await self._send("upload", {"name": name, "data": data}, None)
        return {"name": name, "size": len(data)}

    def admit(self, msg_id: str | None = None) -> None:
        return None  # the rate is counted in Redis, by the script that queues the message

    async def _send(self, channel: str, msg: Any, msg_id: str | None) -> None:
        extra = {"msg_id": msg_id} if msg_id else {}
        async with self._lock:
            try:
                # An interrupt or a shutdown always gets through the session's rate.
                sent = await self.manager.cluster.send(self.id, channel, msg, counted=channel != "control")
            except CellgateError as exc:
                exc.extra.update(extra)
                raise
            except Exception as exc:
                log.warning("session %s: queueing a message failed: %r", self.id, exc)
                raise unreachable(**extra) from None
        if not sent:
            raise CellgateError("kernel_dead", "this session has ended", **extra)

    async def attach(self, sink: Any, token: str, resumed: bool, after: int | None, epoch: str | None) -> None:
        m = self.manager
        mine = f"{m.node_id} {sink.sid}"
        old = await m.registry.attach(self.id, mine)
        if old and old != mine:
            await m.take_over(old)
        record = await m.registry.get(self.id) or self.record
        self.record = record
        await sink.send("session", self.describe(token, resumed))
        if after is not None:
            last = await replay(m.registry, self.id, record.epoch, sink, after, epoch, m.metrics)
        else:
            last = (await m.registry.read(self.id, 1 << 62)).last
        self.sink = sink
        m.sessions[self.id] = self
        m.follower.follow(self.id, sink, last)

    def detach(self, sink: Any) -> None:
        if self.sink is not sink:
            return
        self.sink = None
        m = self.manager
        m.follower.unfollow(self.id, sink)
        if m.sessions.get(self.id) is self:
            del m.sessions[self.id]
        m.spawn(m.registry.detach(self.id, f"{m.node_id} {sink.sid}", time.time()))

    def describe(self, token: str, resumed: bool) -> dict[str, Any]:
        r = self.record
        kernel = {"id": r.kernel_id, "name": r.kernel_name, "state": "ready"} if r.kernel_id else None
        return {
            "session": self.id,
            "resume": token,
            "resumed": resumed,
            "protocol": "cellgate/1",
            "epoch": r.epoch,
            "kernel": kernel,
        }


class RemoteSessionManager(KeepsBlobs):
    def __init__(self, config: Config, registry: RedisRegistry, store: BlobStore, metrics: Metrics) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.node_id = uuid.uuid4().hex[:12]
        self.cluster = Cluster(registry.redis, config.redis_prefix, config.message_rate, config.message_burst)
        self.follower = Follower(registry, metrics)
        self.pool = Hosts()
        self._keep_blobs(config, store, metrics, self._stored_late)
        self.sessions: dict[str, RemoteSession] = {}  # those with a socket on this node
        self.sio: socketio.AsyncServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.on_drain_asked: Any = None  # called when the admin API asks this node to drain
        self.draining = False

    def _stored_late(self, item: Item, stored: bool) -> None:
        return None  # only POST /permalink stores here; a late write needs no notice

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        await self.cluster.node_beat(self.node_id)
        self.follower.start()
        self._loops = [asyncio.create_task(self._beat()), asyncio.create_task(self._watch_hosts())]

    async def open(
        self,
        client: str,
        kernel_name: str | None = None,
        logged: bool = True,
        origin: str = "",
        kind: str = "",
        limit: int | None = None,
    ) -> tuple[Any, str]:
        """A session on the live host with the most free places, and its resume token."""
        try:
            host = await self.cluster.pick_host()
        except (RedisError, OSError):
            raise unreachable() from None
        record, token = await register(self.config, self.registry, client, kernel_name, host, origin, kind, limit)
        self.metrics.sessions_opened.labels(self.metrics.origins.label(origin)).inc()
        try:
            await self.cluster.assign(record.id, host)
            await self.cluster.send(record.id, "open", {}, counted=False)  # the host takes on its life now
        except (RedisError, OSError):
            raise unreachable() from None
        return RemoteSession(self, record), token

    async def resume(self, token: object) -> RemoteSession:
        record = await find(self.registry, token)
        if record is None:
            raise CellgateError("token_invalid", "no live session has this token (it may have expired)")
        return RemoteSession(self, record)

    async def take_over(self, old: str) -> None:
        """The newest resume wins: the older socket, on whatever node, is told and closed."""
        sid = old.partition(" ")[2]
        notice = CellgateError("session_taken", "this session was resumed on another connection").as_dict()
        if self.sio is None:
            return
        with contextlib.suppress(Exception):
            await self.sio.emit("error", notice, to=sid)  # through Redis when it is another node's
            await self.sio.disconnect(sid)

    async def client_state(self, record: SessionRecord) -> dict[str, Any]:
        """Where a session's client is (the same answer on every node: the registry's)."""
        sink, since = await self.registry.attachment(record.id)
        return {
            "node": sink.split(" ", 1)[0] or None,
            "state": "connected" if sink else "disconnected",
            "away": None if sink or since is None else round(time.time() - since, 1),
        }

    async def end_session(self, session_id: str, reason: str) -> bool:
        """Ask the session's kernel host to end it (`kernel shutdown` with `reason`,
        "admin" or "requested"); False if it has ended."""
        return await self.cluster.send(session_id, "end", {"reason": reason}, counted=False)

    def counts(self) -> dict[str, int]:
        return {"connected": len(self.sessions), "disconnected": 0}

    async def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                report = {"sessions": len(self.sessions), "draining": self.draining}
                if await self.cluster.node_beat(self.node_id, report) and self.on_drain_asked is not None:
                    self.on_drain_asked("admin API")
            await asyncio.sleep(BEAT)

    async def _watch_hosts(self) -> None:
        while True:
            try:
                live, dead = await self.cluster.hosts()
                self.pool.live = live
                for host in dead:
                    await self._reap(host, live)
            except Exception as exc:
                log.warning("watching the kernel hosts failed: %s", exc)
            await asyncio.sleep(BEAT)

    async def _reap(self, host: str, live: dict[str, dict[str, Any]]) -> None:
        """Sessions of a host that died: each client is told, each session goes to a
        live host. One node does it (the claim is a Redis lock)."""
        sessions = await self.cluster.claim(host, self.node_id)
        if sessions is None:
            return
        farewell = await self.cluster.farewell(host)
        reason = farewell or "its kernel host stopped"
        log.log(
            logging.INFO if farewell else logging.WARNING,
            "kernel host %s is gone (%s); its %d sessions go on elsewhere",
            host,
            reason,
            len(sessions),
        )
        for session_id in sessions:
            record = await self.registry.get(session_id)
            if record is None:
                continue
            taking = {i: h for i, h in live.items() if not h.get("draining")}
            record.host = max(taking, key=lambda i: (taking[i].get("free", 0), i)) if taking else ""
            await self.registry.update(record)
            dead = {"state": "dead", "reason": reason}
            with contextlib.suppress(Exception):
                await self.registry.append(session_id, [("kernel", dead, 256)], after=None)
            if record.host:
                await self.cluster.assign(session_id, record.host)
                await self.cluster.send(session_id, "open", {}, counted=False)
        await self.cluster.forget_host(host)

    async def close(self) -> None:
        """The node stops; its sessions do not (their clients resume elsewhere)."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.cluster.node_gone(self.node_id)
        await self.follower.close()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2)
