"""POST /service: one execution on a fresh session, answered as one JSON document."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

from gateway.errors import CellgateError
from gateway.messages import validate
from gateway.remote import RemoteSessionManager
from gateway.sessions import SessionManager

log = logging.getLogger(__name__)
REFUSALS = frozenset({"capacity_node", "kernel_dead", "no_kernel", "rate_limited"})
SKIPPED = frozenset({"status", "execute_input", "clear_output"})


class Collector:
    """A sink that keeps what one execution produced, up to `limit` bytes of output."""

    def __init__(self, msg_id: str, limit: int) -> None:
        self.msg_id = msg_id
        self.limit = limit
        self.kept = 0
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.reply: dict[str, Any] | None = None
        self.idle = False
        self.refused: dict[str, Any] | None = None  # the code was never run: why
        self.finished = asyncio.Event()
        self.closed = asyncio.Event()
        self.sid = "service-" + uuid.uuid4().hex  # what the registry names it, on a node of kernel hosts

    async def send(self, event: str, data: dict[str, Any]) -> None:
        if event == "iopub":
            # Output past the bound is not kept (the session's budget has already said
            # output_capped); the status and reply that finish the call always are.
            self.kept += len(json.dumps(data["content"], default=repr)) + sum(map(len, data.get("buffers", ())))
            if self.kept > self.limit and data["header"]["msg_type"] != "status":
                return
        self.events.append((event, data))
        parent = data.get("parent_header", {}).get("msg_id") if isinstance(data, dict) else None
        if parent == self.msg_id:
            msg_type = data["header"]["msg_type"]
            if event == "shell" and msg_type == "execute_reply":
                self.reply = data["content"]
            elif event == "iopub" and msg_type == "status" and data["content"].get("execution_state") == "idle":
                self.idle = True
        if event == "kernel" and data.get("state") == "dead":
            self.finished.set()
        # On a node of kernel hosts a refusal after the message was queued (no kernel
        # place in time, say) comes as an event: the call ends with it.
        if event == "error" and data.get("msg_id") == self.msg_id and data.get("code") in REFUSALS:
            self.refused = data
            self.finished.set()
        if self.reply is not None and self.idle:
            self.finished.set()

    async def close(self, reason: str) -> None:
        self.finished.set()
        self.closed.set()


def _request(code: str, msg_id: str) -> dict[str, Any]:
    return {
        "header": {"msg_id": msg_id, "msg_type": "execute_request"},
        "content": {"code": code, "silent": False, "store_history": False, "allow_stdin": False},
    }


async def run(
    manager: SessionManager | RemoteSessionManager, code: str, client: str, origin: str = ""
) -> dict[str, Any]:
    if isinstance(manager, RemoteSessionManager):
        return await _run_remote(manager, code, client, origin)
    timeout = manager.config.service_timeout
    session, _ = await manager.open(client, logged=False, origin=origin)
    msg_id = uuid.uuid4().hex
    sink = Collector(msg_id, manager.config.client_buffer)
    session.sink = sink
    session.disconnected_at = None  # the request itself holds the session
    request = _request(code, msg_id)
    try:
        # The same validation and header filling as a Socket.IO client's message gets.
        msg = validate("shell", request, manager.config.message_limit, session.id)
        async with asyncio.timeout(timeout):
            await session.to_kernel("shell", msg)
            await sink.finished.wait()
            await session.settle()
    except TimeoutError:
        raise CellgateError("timeout", f"the code ran longer than {timeout:g} s") from None
    finally:
        await session.end("shutdown", "service call done")
    return _result(sink, msg_id)


async def _run_remote(manager: RemoteSessionManager, code: str, client: str, origin: str) -> dict[str, Any]:
    """The same on a node whose kernels are on kernel hosts: the session is asked to
    shut down after the execution, and its host ends it once the files the code wrote
    are reported, so the session's last event (`kernel` `shutdown`) comes after them."""
    timeout = manager.config.service_timeout
    session, token = await manager.open(client, origin=origin)
    msg_id = uuid.uuid4().hex
    sink = Collector(msg_id, manager.config.client_buffer)
    await session.attach(sink, token, False, None, None)
    ask = {"header": {"msg_id": uuid.uuid4().hex, "msg_type": "shutdown_request"}, "content": {"restart": False}}
    shutdown = validate("control", ask, 1 << 16, session.id)
    stage = "running the code"
    try:
        msg = validate("shell", _request(code, msg_id), manager.config.message_limit, session.id)
        async with asyncio.timeout(timeout):
            await session.to_kernel("shell", msg)
            await sink.finished.wait()
            stage = "ending the session"
            await session.to_kernel("control", shutdown)
            if sink.refused is not None:
                raise CellgateError(sink.refused["code"], sink.refused.get("message", ""))
            await sink.closed.wait()
    except TimeoutError:
        log.warning("service call on session %s timed out %s (%d events seen)", session.id, stage, len(sink.events))
        with contextlib.suppress(CellgateError):
            await session.to_kernel("control", shutdown)
        raise CellgateError("timeout", f"the code ran longer than {timeout:g} s") from None
    finally:
        session.detach(sink)
    return _result(sink, msg_id)


def _result(sink: Collector, msg_id: str) -> dict[str, Any]:
    stdout, stderr, outputs, files = [], [], [], []
    permalink = None
    error = None
    died = False
    for event, data in sink.events:
        if event == "permalink" and data.get("msg_id") == msg_id:
            permalink = {"id": data["id"], "url": data["url"]}
        elif event == "files" and data.get("msg_id") == msg_id:
            files.extend(data["files"])
        elif event == "kernel" and data.get("state") == "dead":
            died = True
        elif event == "error" and data.get("msg_id") == msg_id:
            outputs.append({"msg_type": "cellgate_error", "content": {k: data[k] for k in ("code", "message")}})
        elif event == "iopub" and data["parent_header"].get("msg_id") == msg_id:
            msg_type = data["header"]["msg_type"]
            if msg_type in SKIPPED:
                continue
            content = data["content"]
            if msg_type == "stream" and isinstance(content.get("text"), str):
                (stdout if content.get("name") == "stdout" else stderr).append(content["text"])
            elif msg_type == "error":
                error = {k: content.get(k) for k in ("ename", "evalue", "traceback")}
            outputs.append({"msg_type": msg_type, "content": content})
    reply = sink.reply or {}
    if died and not reply:
        error = {"ename": "KernelDied", "evalue": "the kernel exited while running the code", "traceback": []}
    result: dict[str, Any] = {
        "success": reply.get("status") == "ok",
        "stdout": "".join(stdout),
        "stderr": "".join(stderr),
        "outputs": outputs,
        "files": files,
        "permalink": permalink,
    }
    if error is not None:
        result["error"] = error
    return result
