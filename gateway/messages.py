"""Validation of what clients send: one place decides what reaches a kernel."""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import CellgateError
from kernels.kernel import PROTOCOL_VERSION, now_iso

ALLOWED: dict[str, frozenset[str]] = {
    "shell": frozenset(
        {
            "execute_request",
            "complete_request",
            "inspect_request",
            "is_complete_request",
            "kernel_info_request",
            "comm_info_request",
            "comm_open",
            "comm_msg",
            "comm_close",
        }
    ),
    "stdin": frozenset({"input_reply"}),
    "control": frozenset({"interrupt_request", "shutdown_request"}),
}
FILENAME_MAX = 255


def validate(channel: str, data: Any, limit: int, session: str, extra: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A complete Jupyter message dict built from client data, or CellgateError.
    `extra` names message types allowed on top of ALLOWED (Jupyter API clients')."""
    if channel not in ALLOWED:
        raise CellgateError("bad_channel", f"no channel {channel!r}")
    if not isinstance(data, dict):
        raise CellgateError("bad_message", "a message must be an object")
    header = data.get("header")
    if not isinstance(header, dict):
        raise CellgateError("bad_message", "the message has no header object")
    msg_id, msg_type = header.get("msg_id"), header.get("msg_type")
    if not isinstance(msg_id, str) or not msg_id:
        raise CellgateError("bad_message", "header.msg_id must be a non-empty string")
    if not isinstance(msg_type, str) or not msg_type:
        raise CellgateError("bad_message", "header.msg_type must be a non-empty string", msg_id=msg_id)
    if msg_type not in ALLOWED[channel] and msg_type not in extra:
        home = next((c for c, types in ALLOWED.items() if msg_type in types), None)
        if home:
            raise CellgateError("bad_channel", f"{msg_type} goes on the {home} channel", msg_id=msg_id)
        raise CellgateError("forbidden_msg_type", f"{msg_type} is not accepted", msg_id=msg_id)
    parts = {}
    for name in ("content", "parent_header", "metadata"):
        value = data.get(name)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise CellgateError("bad_message", f"{name} must be an object", msg_id=msg_id)
        parts[name] = value
    buffers = data.get("buffers") or []
    if not isinstance(buffers, list) or not all(isinstance(b, bytes | bytearray | memoryview) for b in buffers):
        raise CellgateError("bad_message", "buffers must be a list of binary attachments", msg_id=msg_id)
    if msg_type == "execute_request" and not isinstance(parts["content"].get("code"), str):
        raise CellgateError("bad_message", "execute_request content.code must be a string", msg_id=msg_id)
    try:
        size = len(json.dumps([header, parts])) + sum(len(b) for b in buffers)
    except (TypeError, ValueError):
        raise CellgateError("bad_message", "the message is not JSON", msg_id=msg_id) from None
    if size > limit:
        raise CellgateError("too_large", f"message of {size} bytes is over the {limit} byte limit", msg_id=msg_id)
    header = {"session": session, "username": "cellgate", "date": now_iso(), "version": PROTOCOL_VERSION, **header}
    return {"header": header, **parts, "buffers": [bytes(b) for b in buffers]}


def check_filename(name: Any) -> str:
    """A plain file name for the kernel's working directory, or bad_filename."""
    if not isinstance(name, str) or not name:
        raise CellgateError("bad_filename", "name must be a non-empty string")
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise CellgateError("bad_filename", f"{name!r} is not a plain file name")
    if len(name.encode()) > FILENAME_MAX:
        raise CellgateError("bad_filename", "name is too long")
    return name
