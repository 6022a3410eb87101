"""The admin API, for operators: list sessions, end one, list nodes and hosts, drain a node.

Off unless `CELLGATE_ADMIN_TOKEN` is set (then every /admin route answers 404). Each
request sends `Authorization: Bearer <token>`. Any node answers for the whole cluster
where the registry is shared: sessions come from the registry, and a drain asked of
another node reaches it through Redis within its next heartbeat.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from aiohttp import web

from gateway.errors import CellgateError
from gateway.remote import RemoteSessionManager

LIST_LIMIT = 10_000


def _authorized(request: web.Request) -> None:
    token = request.app["config"].admin_token
    if not token:
        raise web.HTTPNotFound()
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise CellgateError("token_invalid", "send Authorization: Bearer <admin token>")


async def list_sessions(request: web.Request) -> web.Response:
    _authorized(request)
    manager = request.app["manager"]
    try:
        limit = max(1, min(LIST_LIMIT, int(request.query.get("limit", LIST_LIMIT))))
    except ValueError:
        raise CellgateError("bad_message", "limit must be an integer") from None
    now = time.time()
    out = []
    for record in await manager.registry.list(limit):
        entry: dict[str, Any] = {
            "id": record.id,
            "kernel": {"id": record.kernel_id, "name": record.kernel_name},
            "host": record.host or None,
            "client": record.client,
            "origin": record.origin or None,
            "kind": record.kind or "embed",
            "age": round(now - record.created, 1),
        }
        out.append({**entry, **await manager.client_state(record)})
    return web.json_response({"sessions": out, "truncated": len(out) >= limit})


async def end_session(request: web.Request) -> web.Response:
    _authorized(request)
    manager = request.app["manager"]
    session_id = request.match_info["id"]
    record = await manager.registry.get(session_id)
    if record is None:
        raise CellgateError("not_found", "no live session with this id")
    if not await manager.end_session(session_id, "admin"):
        where = "" if isinstance(manager, RemoteSessionManager) else " here (its kernel may be on another node)"
        raise CellgateError("not_found", f"no live session with this id{where}")
    return web.json_response({"ended": session_id}, status=202)


async def list_nodes(request: web.Request) -> web.Response:
    _authorized(request)
    manager = request.app["manager"]
    me = {"id": manager.node_id, "draining": request.app["drain"].draining, "sessions": len(manager.sessions)}
    if not isinstance(manager, RemoteSessionManager):
        return web.json_response({"node": manager.node_id, "nodes": {manager.node_id: me}, "hosts": {}})
    nodes = await manager.cluster.nodes()
    nodes[manager.node_id] = {**nodes.get(manager.node_id, {}), **me}
    return web.json_response({"node": manager.node_id, "nodes": nodes, "hosts": manager.pool.live})


async def drain_node(request: web.Request) -> web.Response:
    _authorized(request)
    manager = request.app["manager"]
    node_id = request.match_info["id"]
    if node_id == manager.node_id:
        request.app["start_drain"]("admin API")
    elif not isinstance(manager, RemoteSessionManager) or not await manager.cluster.ask_drain(node_id):
        raise CellgateError("not_found", "no live node with this id")
    return web.json_response({"draining": node_id}, status=202)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/sessions", list_sessions)
    app.router.add_delete(r"/admin/sessions/{id}", end_session)
    app.router.add_get("/admin/nodes", list_nodes)
    app.router.add_post(r"/admin/nodes/{id}/drain", drain_node)
