"""The node's session manager: opens, finds and forgets sessions, enforcing the limits."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from gateway.cluster import Cluster
from gateway.config import Config
from gateway.errors import CellgateError
from gateway.metrics import Metrics
from gateway.permalinks import Permalinks
from gateway.registry import SessionRecord, SessionRegistry
from gateway.registry.base import RegistryUnavailable, new_token, token_digest
from gateway.session import Session
from gateway.spool import Item, Spool
from gateway.stores import BlobStore
from kernels.pool import KernelPool

log = logging.getLogger(__name__)


def unreachable(**extra: object) -> CellgateError:
    """The answer to a client while the session registry (Redis) cannot be reached."""
    return CellgateError("capacity_node", "the session registry cannot be reached; try again shortly", **extra)


async def find(registry: SessionRegistry, token: object) -> SessionRecord | None:
    """The record a resume token belongs to, or None; a bad token is token_invalid."""
    if not isinstance(token, str) or not token:
        raise CellgateError("token_invalid", "the resume token must be a non-empty string")
    try:
        return await registry.find(token)
    except RegistryUnavailable:
        raise unreachable() from None


async def register(
    config: Config,
    registry: SessionRegistry,
    client: str,
    kernel_name: str | None,
    host: str = "",
    origin: str = "",
    kind: str = "",
    limit: int | None = None,
) -> tuple[SessionRecord, str]:
    """A new session's record, in the registry under the per-client limit (the
    per-address one unless `limit` says otherwise), and its resume token (the only
    time the token is seen)."""
    name = kernel_name or config.default_kernel
    if not isinstance(name, str) or name not in config.allowed_kernels:
        raise CellgateError("no_kernel", f"no kernel named {name!r}; this node offers {config.kernels}")
    token = new_token()
    record = SessionRecord(
        id=uuid.uuid4().hex,
        token_digest=token_digest(token),
        epoch=secrets.token_hex(8),
        kernel_name=name,
        client=client,
        created=time.time(),
        host=host,
        origin=origin[:256],
        kind=kind,
    )
    limit = config.sessions_per_client if limit is None else limit
    try:
        created = await registry.create(record, per_client=limit)
    except RegistryUnavailable:
        raise unreachable() from None
    if not created:
        who = "for this token" if client.startswith("token:") else "from your address"
        raise CellgateError("capacity_client", f"{limit} sessions are already open {who}")
    return record, token


class KeepsBlobs:
    """What a node's manager, of either kind, holds for files and permalinks: the
    spool in front of the store, permalinks kept through it, and the node's own links."""

    base_url: str
    spool: Spool
    permalinks: Permalinks

    def _keep_blobs(
        self, config: Config, store: BlobStore, metrics: Metrics, stored_late: Callable[[Item, bool], None]
    ) -> None:
        self.base_url = config.public_url.rstrip("/")
        self.spool = Spool(
            config.spool_path, config.spool_size, store, metrics, stored_late, give_up_after=config.file_retention
        )
        self.permalinks = Permalinks(store, self.spool, self.base_url, config.permalink_retention)

    def file_url(self, key: str) -> str:
        """A stable gateway URL: it answers with the bytes or a freshly presigned link,
        so what the replay log holds never expires before the file does."""
        return f"{self.base_url}/{key}"


class SessionManager(KeepsBlobs):
    def __init__(
        self,
        config: Config,
        pool: KernelPool,
        registry: SessionRegistry,
        store: BlobStore,
        metrics: Metrics,
        cluster: Cluster | None = None,
        host_id: str = "",
    ) -> None:
        self.config = config
        self.pool = pool
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self._keep_blobs(config, store, metrics, self._stored_late)
        self.sessions: dict[str, Session] = {}
        # On a kernel host: the sessions are opened by gateway nodes, which hold their
        # clients; whether a client is there is read from the registry.
        self.cluster = cluster
        self.host_id = host_id
        self.node_id = host_id or uuid.uuid4().hex[:12]  # what /health and the admin API call this process
        self._languages: dict[str, str] = {}

    def language(self, kernel_name: str) -> str:
        if kernel_name not in self._languages:
            try:
                self._languages[kernel_name] = KernelSpecManager().get_kernel_spec(kernel_name).language
            except NoSuchKernel:
                self._languages[kernel_name] = kernel_name
        return self._languages[kernel_name]

    def _stored_late(self, item: Item, stored: bool) -> None:
        """The spool stored (or gave up on) something the store did not take at once:
        tell the session that wrote it, if it is still here."""
        note = item.note
        session = self.sessions.get(note.get("session", ""))
        if session is None or session.ended:
            return  # stored all the same: its link works for whoever was told it
        msg_id = note.get("msg_id")
        if note.get("kind") == "permalink":
            if stored:
                session.announce_permalink(msg_id, note["id"])
        elif stored:
            entry = {**note["entry"], "url": self.file_url(item.key)}
            entry.pop("error", None)
            session.publish("files", {"msg_id": msg_id, "files": [entry]})
        else:
            message = f"{note['entry']['name']} could not be stored"
            session.publish("error", {"code": "store_failed", "message": message, "msg_id": msg_id})

    async def open(
        self,
        client: str,
        kernel_name: str | None = None,
        logged: bool = True,
        origin: str = "",
        kind: str = "",
        limit: int | None = None,
    ) -> tuple[Session, str]:
        """A new session and its resume token (the only time the token is seen)."""
        record, token = await register(
            self.config, self.registry, client, kernel_name, origin=origin, kind=kind, limit=limit
        )
        self.metrics.sessions_opened.labels(self.metrics.origins.label(origin)).inc()
        session = Session(self, record, logged=logged)
        self.sessions[record.id] = session
        return session, token

    async def resume(self, token: object) -> Session:
        record = await find(self.registry, token)
        session = self.sessions.get(record.id) if record else self._lost_by_registry(str(token))
        if session is None or session.ended:
            raise CellgateError("token_invalid", "no live session has this token (it may have expired)")
        if record is None:
            await session.recover()
        return session

    def _lost_by_registry(self, token: str) -> Session | None:
        """A live session of this node that the registry no longer has (a Redis that
        kept nothing through a restart)."""
        digest = token_digest(token)
        return next((s for s in self.sessions.values() if s.record.token_digest == digest), None)

    async def adopt(self, record: SessionRecord) -> Session:
        """Take on a session a gateway node opened (on a kernel host): its log goes on
        from where it is, and its lifespan counts from when it opened."""
        session = Session(self, record, logged=True)
        read = await self.registry.read(record.id, 1 << 62)
        session.resume_log(read.last)
        session.created = time.monotonic() - max(0.0, time.time() - record.created)
        self.sessions[record.id] = session
        return session

    async def owns(self, session: Session) -> bool:
        """Whether this process still serves `session`: a registry that lost it has
        no other owner; on a kernel host, another host may have been given it."""
        record = await self.registry.get(session.id)
        return record is None or record.host == self.host_id

    async def client_away(self, session: Session) -> float | None:
        """Seconds since the session's client went away; None while it is there."""
        if self.cluster is None:
            return None if session.disconnected_at is None else time.monotonic() - session.disconnected_at
        try:
            sink, since = await self.registry.attachment(session.id)
            if sink:
                node = sink.split(" ", 1)[0]
                if await self.cluster.node_alive(node):
                    return None
                # The node holding the socket died: the client is away from now on.
                await self.registry.detach(session.id, sink, time.time())
                return 0.0
        except Exception:  # Redis away, or the session gone: no decision on what cannot be read
            return None
        return None if since is None else time.time() - since

    async def forget(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        try:
            await self.registry.delete(session.id)
            if self.cluster is not None:
                await self.cluster.unassign(session.id, self.host_id)
        except (RegistryUnavailable, OSError) as exc:  # its keys expire by themselves
            log.warning("session %s: not removed from the registry: %s", session.id, exc)

    async def client_state(self, record: SessionRecord) -> dict[str, Any]:
        """Where a session's client is, for operators and Jupyter clients: the node
        holding it, connected or disconnected, seconds away; "elsewhere" for a session
        of another node (a shared registry without kernel hosts)."""
        session = self.sessions.get(record.id)
        if session is None:
            return {"node": None, "state": "elsewhere", "away": None}
        away = session.disconnected_at
        return {
            "node": self.node_id,
            "state": "connected" if session.sink is not None else "disconnected",
            "away": None if away is None else round(time.monotonic() - away, 1),
        }

    async def end_session(self, session_id: str, reason: str) -> bool:
        """End a session of this node (`kernel shutdown` with `reason`); False if it
        is not one of this node's."""
        session = self.sessions.get(session_id)
        if session is None or session.ended:
            return False
        await session.end("shutdown", reason)
        return True

    def counts(self) -> dict[str, int]:
        connected = sum(1 for s in self.sessions.values() if s.sink is not None)
        return {"connected": connected, "disconnected": len(self.sessions) - connected}

    async def close(self) -> None:
        await asyncio.gather(
            *(s.end("shutdown", "server stopping") for s in list(self.sessions.values())),
            return_exceptions=True,
        )
