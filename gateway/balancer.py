"""What a node does for the load balancer in front of it: a header for sticky polling,
and draining before it stops.

Polling clients send every request with their Engine.IO `sid` in the URL, and all of
them must reach the node that holds the socket. The `sid` is only in the body of the
handshake response, which a balancer does not read, so each node also puts it in a
`Cellgate-Sid` response header: HAProxy stores it (`stick store-response`) and matches
later requests on their `sid` parameter (infra/haproxy.cfg). No cookie is needed, so a
mobile app without a cookie jar, or a browser that blocks third-party cookies, stays on
its node.

A node told to stop (SIGTERM, or `POST /admin/nodes/<id>/drain`) drains:

1. `/health` answers 503 `{"status": "draining"}`, so the balancer takes the node out,
   and new Engine.IO handshakes and `POST /service` calls get 503 `node_draining`,
   which HAProxy retries on another node (`retry-on 503`).
2. It goes on serving its connections for `--drain-grace` seconds, while the balancer
   notices; a node running its own kernels also waits (up to `--drain-timeout`) for
   their running executions.
3. It closes every client connection at the transport, so clients reconnect through
   the balancer to another node and resume their sessions there.
4. It stops. A session whose kernel is on a kernel host lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.errors import CellgateError

log = logging.getLogger(__name__)

SID_HEADER = "Cellgate-Sid"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Drain:
    """One node's drain: started once, done when the node may stop."""

    def __init__(self, grace: float, timeout: float, metrics: Any) -> None:
        self.grace = grace
        self.timeout = timeout
        self.metrics = metrics
        self.draining = False
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.metrics.draining.set(0)

    def start(self, why: str, busy: Callable[[], bool], close_connections: Callable[[], Awaitable[None]]) -> None:
        if self.draining:
            return
        self.draining = True
        self.metrics.draining.set(1)
        log.info("draining (%s): no new sessions; connections move in %g s", why, self.grace)
        self._task = asyncio.create_task(self._run(busy, close_connections))

    async def _run(self, busy: Callable[[], bool], close_connections: Callable[[], Awaitable[None]]) -> None:
        try:
            await asyncio.sleep(self.grace)
            deadline = time.monotonic() + self.timeout
            while busy() and time.monotonic() < deadline:  # noqa: ASYNC110 (sessions signal nothing)
                await asyncio.sleep(0.1)
            await close_connections()
            log.info("drained: every connection was asked to move to another node")
        finally:
            self.done.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _handshake(request: web.Request) -> bool:
    """A request that would open a new Engine.IO connection (no sid yet)."""
    return request.path.startswith("/socket.io") and "sid" not in request.query


def middleware(drain: Drain) -> Callable[..., Any]:
    @web.middleware
    async def balancer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if drain.draining and (_handshake(request) or (request.method == "POST" and request.path == "/service")):
            exc = CellgateError("node_draining", "this node is shutting down; connect again to reach another")
            return web.json_response({"error": exc.as_dict()}, status=exc.http_status, headers={"Retry-After": "1"})
        response = await handler(request)
        if _handshake(request) and isinstance(response, web.Response) and not response.prepared:
            sid = _sid_of(response.body)
            if sid is not None:
                response.headers[SID_HEADER] = sid
        return response

    return balancer


def _sid_of(body: Any) -> str | None:
    """The sid in a polling handshake's body: Engine.IO's open packet, `0{"sid": ...}`."""
    if not isinstance(body, bytes) or not body.startswith(b"0{") or len(body) > 4096:
        return None
    try:
        sid = json.loads(body[1:].split(b"\x1e", 1)[0]).get("sid")
    except (ValueError, AttributeError):
        return None
    return sid if isinstance(sid, str) and sid.isascii() and len(sid) <= 64 else None
