"""The error codes of the wire contract and the one exception that carries them."""

from __future__ import annotations

from typing import Any

# code -> HTTP status used when the error ends an HTTP request.
CODES: dict[str, int] = {
    "bad_message": 400,
    "bad_channel": 400,
    "forbidden_msg_type": 400,
    "too_large": 413,
    "token_invalid": 401,
    "session_taken": 409,
    "replay_gap": 409,
    "no_kernel": 404,
    "kernel_dead": 503,
    "capacity_node": 429,
    "capacity_client": 429,
    "rate_limited": 429,
    "slow_client": 429,
    "output_capped": 413,
    "file_too_large": 413,
    "bad_filename": 400,
    "timeout": 504,
    "not_found": 404,
    "store_failed": 503,
    "node_draining": 503,
}


class CellgateError(Exception):
    """A refusal the client is told about, with a contract code and a message."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        assert code in CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    @property
    def http_status(self) -> int:
        return CODES[self.code]

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.extra}

    def ack(self) -> dict[str, Any]:
        return {"ok": False, "error": self.as_dict()}
