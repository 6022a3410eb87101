"""The blob store interface: put bytes under a key, get them back, say where they live."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

# Keys are made by the gateway, never by a client or a kernel; this guards that rule.
KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True)
class Blob:
    data: bytes
    content_type: str


class BlobStore(ABC):
    """What a backend must do. Keys look like `files/<token>/<name>`."""

    @abstractmethod
    async def put(self, key: str, data: bytes, content_type: str) -> None: ...

    @abstractmethod
    async def get(self, key: str) -> Blob | None:
        """The blob, or None if there is none under that key."""

    @abstractmethod
    def url(self, key: str) -> str | None:
        """Where a client fetches the blob directly, or None if the gateway serves it."""

    @abstractmethod
    async def expire(self, prefix: str, before: float) -> int:
        """Remove every blob under `prefix/` last written before `before` (a UNIX
        time); how many went."""

    async def close(self) -> None:
        return None


def check_key(key: str) -> str:
    if not KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"bad blob key {key!r}")
    return key
