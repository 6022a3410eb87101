"""The HTTP routes. Every error is JSON: {"error": {"code", "message"}}."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import pages, service
from gateway.addresses import client_address
from gateway.config import PROTOCOL, Config
from gateway.errors import CellgateError
from gateway.messages import check_filename
from gateway.openapi import openapi
from gateway.remote import RemoteSessionManager
from gateway.sessions import SessionManager
from gateway.spool import SpoolFull
from gateway.stores import StoreUnavailable

log = logging.getLogger(__name__)

# Types a browser would run as active content: served as downloads, never inline.
ACTIVE = frozenset({"text/html", "application/xhtml+xml", "image/svg+xml", "text/javascript", "application/javascript"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: CellgateError) -> web.Response:
    return web.json_response({"error": exc.as_dict()}, status=exc.http_status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CellgateError as exc:
        request.app["manager"].metrics.errors.labels(exc.code).inc()
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 413: "too_large", 405: "bad_message"}.get(exc.status, "bad_message")
        body = {"error": {"code": code, "message": exc.reason}}
        return web.json_response(
            body, status=exc.status, headers={"Allow": exc.headers.get("Allow", "")} if exc.status == 405 else None
        )


def cors(config: Config) -> Callable[..., Any]:
    """Open CORS on the HTTP API too, since the embed lives on other sites. Jupyter's
    kernels API has origins of its own (--jupyter-api-cors-origins), none by default."""
    jupyter_api = config.jupyter_api_base + "/api"

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/socket.io"):
            return await handler(request)  # engine.io does its own CORS
        jupyter = config.jupyter_api and (request.path == jupyter_api or request.path.startswith(jupyter_api + "/"))
        origins = config.jupyter_cors if jupyter else config.cors
        origin = request.headers.get("Origin")
        allowed = origin and (origins == "*" or origin in origins)
        if request.method == "OPTIONS" and allowed:
            response: web.StreamResponse = web.Response(status=204)
            methods = "GET, POST, DELETE, OPTIONS" if jupyter else "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Methods"] = methods
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = origin if origins != "*" else "*"
            response.headers["Vary"] = "Origin"
        return response

    return middleware


def manager_of(request: web.Request) -> SessionManager:
    return request.app["manager"]


async def health(request: web.Request) -> web.Response:
    manager = manager_of(request)
    registry_ok = await manager.registry.reachable()
    draining = request.app["drain"].draining
    ok = manager.pool.healthy and registry_ok and not draining
    body = {
        "status": "ok" if ok else "draining" if draining else "unavailable",
        "protocol": PROTOCOL,
        "node": manager.node_id,
        "kernels": manager.pool.counts(),
        "max_kernels": manager.pool.max_kernels,
        "sessions": len(manager.sessions),
        "isolation": manager.pool.isolation(),
        "registry": {"backend": manager.registry.backend, "reachable": registry_ok},
        "store": {
            "backend": "s3" if manager.config.s3_bucket else "local",
            "spool": {"items": manager.spool.pending, "bytes": manager.spool.used},
        },
    }
    if draining:
        body["error"] = {"code": "node_draining", "message": "this node is shutting down"}
    elif not registry_ok:
        body["error"] = {"code": "no_kernel", "message": "the session registry (Redis) cannot be reached"}
    elif not ok:
        body["error"] = {"code": "no_kernel", "message": manager.pool.last_error or "kernels cannot start"}
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    manager = manager_of(request)
    m = manager.metrics
    for state, n in manager.pool.counts().items():
        m.kernels.labels(state).set(n)
    for state, n in manager.counts().items():
        m.sessions.labels(state).set(n)
    await m.observe_registry(manager.registry)
    if isinstance(manager, RemoteSessionManager):
        live = manager.pool.live.values()
        m.kernel_hosts.labels("draining").set(sum(1 for h in live if h.get("draining")))
        m.kernel_hosts.labels("live").set(sum(1 for h in live if not h.get("draining")))
    response = web.Response(body=m.render())
    response.headers["Content-Type"] = m.content_type
    return response


async def _json_body(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise CellgateError("too_large", f"the body is over the {limit} byte limit")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise CellgateError("too_large", f"the body is over the {limit} byte limit")
    if request.content_type == "application/x-www-form-urlencoded":
        try:
            form = urllib.parse.parse_qs(raw.decode(), strict_parsing=bool(raw))
        except (ValueError, UnicodeDecodeError):
            raise CellgateError("bad_message", "the form is not valid") from None
        return {k: v[0] for k, v in form.items()}
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise CellgateError("bad_message", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise CellgateError("bad_message", "the body must be a JSON object")
    return body


def _code(body: dict[str, Any]) -> str:
    code = body.get("code")
    if not isinstance(code, str):
        raise CellgateError("bad_message", "'code' must be a string")
    return code


async def create_permalink(request: web.Request) -> web.Response:
    manager = manager_of(request)
    body = await _json_body(request, manager.config.message_limit)
    language = body.get("language", "python")
    if not isinstance(language, str) or not language or len(language) > 64:
        raise CellgateError("bad_message", "'language' must be a short string")
    try:
        pid, stored = await manager.permalinks.save(_code(body), language)
    except SpoolFull as exc:
        raise CellgateError("store_failed", f"the permalink could not be kept: {exc}") from None
    # 202: the store is down, the spool holds it, and it opens once stored.
    return web.json_response({"id": pid, "url": manager.permalinks.url(pid)}, status=201 if stored else 202)


async def _load_permalink(request: web.Request) -> dict[str, Any]:
    doc = await manager_of(request).permalinks.load(request.match_info["id"])
    if doc is None:
        raise CellgateError("not_found", "no permalink with this id")
    return doc


async def get_permalink(request: web.Request) -> web.Response:
    pid = request.match_info["id"]
    doc = await _load_permalink(request)
    return web.json_response({"id": pid, "url": manager_of(request).permalinks.url(pid), **doc})


async def permalink_page(request: web.Request) -> web.Response:
    doc = await _load_permalink(request)
    intro = "Shared code: edit it and run it."
    return pages.page(manager_of(request).base_url, doc["code"], "Cellgate: shared code", intro, examples=False)


async def index(request: web.Request) -> web.Response:
    intro = "Write Python and run it on a live kernel: Shift+Enter runs, Tab completes, Shift+Tab shows help."
    return pages.page(manager_of(request).base_url, pages.EXAMPLES["Hello"], "Cellgate", intro, examples=True)


async def run_service(request: web.Request) -> web.Response:
    manager = manager_of(request)
    body = await _json_body(request, manager.config.message_limit)
    code = _code(body)
    client = client_address(request, manager.config.proxies)
    origin = request.headers.get("Origin", "")
    manager.metrics.executions.labels(manager.metrics.origins.label(origin)).inc()
    return web.json_response(await service.run(manager, code, client, origin))


async def upload(request: web.Request) -> web.Response:
    manager = manager_of(request)
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        raise CellgateError("token_invalid", "send Authorization: Bearer <resume token>")
    session = await manager.resume(auth[len("Bearer ") :].strip())
    if not request.content_type.startswith("multipart/"):
        raise CellgateError("bad_message", "upload a multipart/form-data body with a 'file' field")
    reader = await request.multipart()
    stored = []
    cap = manager.config.file_cap
    while (part := await reader.next()) is not None:
        if part.name != "file":  # type: ignore[union-attr]
            continue
        name = check_filename(part.filename)  # type: ignore[union-attr]
        data = bytearray()
        while chunk := await part.read_chunk(64 * 1024):  # type: ignore[union-attr]
            data += chunk
            if len(data) > cap:
                raise CellgateError("file_too_large", f"{name} is over the {cap} byte cap")
        stored.append(await session.upload(name, bytes(data)))
    if not stored:
        raise CellgateError("bad_message", "no 'file' field in the upload")
    return web.json_response({"ok": True, "files": stored})


async def get_file(request: web.Request) -> web.StreamResponse:
    manager = manager_of(request)
    config = manager.config
    name = request.match_info["name"]
    key = f"files/{request.match_info['token']}/{name}"
    store = manager.store
    try:
        info = await store.head(key)
        if info is None or (config.file_retention and info.modified < time.time() - config.file_retention):
            raise CellgateError("not_found", "no such file (it may have expired)")
        content_type = info.content_type.split(";")[0].strip().lower()
        attachment = content_type in ACTIVE or content_type.endswith(("+xml", "/xml"))
        if config.file_delivery == "redirect":
            # Signed now, for this request: links in events and replays never go stale.
            url = await store.presign(key, info, name, attachment, config.presign_expiry)
            if url is not None:
                raise web.HTTPFound(url, headers={"Cache-Control": "no-store"})
        blob = await store.get(key)
    except StoreUnavailable as exc:
        log.warning("serving %s failed: %s", key, exc)
        raise CellgateError("store_failed", "the file store is unavailable; try again shortly") from None
    if blob is None:
        raise CellgateError("not_found", "no such file (it may have expired)")
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
    if attachment:
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return web.Response(body=blob.data, content_type=content_type, headers=headers)


async def openapi_doc(request: web.Request) -> web.Response:
    return web.json_response(openapi(manager_of(request).config))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/permalink", create_permalink)
    app.router.add_get(r"/permalink/{id}", get_permalink)
    app.router.add_get(r"/p/{id}", permalink_page)
    app.router.add_post("/service", run_service)
    app.router.add_post("/upload", upload)
    app.router.add_get(r"/files/{token}/{name}", get_file)
    app.router.add_get("/openapi.json", openapi_doc)
    app.router.add_get(r"/static/{name}", pages.static_file)
