"""The blob store interface: put bytes under a key, read them back, say who serves them."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

# Keys are made by the gateway, never by a client or a kernel; this guards that rule.
KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")


@dataclass(frozen=True)
class BlobInfo:
    content_type: str
    size: int
    modified: float  # UNIX time of the last write


@dataclass(frozen=True)
class Blob(BlobInfo):
    data: bytes


class StoreUnavailable(Exception):
    """The store could not answer (unreachable, slow, refused): try again later."""


class BlobStore(ABC):
    """What a backend must do. Keys look like `files/<token>/<name>` or `permalinks/<id>`.

    A missing key is None, never an error; any other failure raises StoreUnavailable.
    """

    sweeps: bool = True  # expire() removes old blobs (False: the store's own rules do)

    @abstractmethod
    async def put(self, key: str, data: bytes, content_type: str) -> None: ...

    @abstractmethod
    async def head(self, key: str) -> BlobInfo | None:
        """What is stored under `key`, without its bytes."""

    @abstractmethod
    async def get(self, key: str) -> Blob | None: ...

    async def presign(self, key: str, info: BlobInfo, filename: str, attachment: bool, expires: float) -> str | None:
        """A URL a browser fetches the blob from directly, valid for `expires` seconds,
        answering with `info.content_type` (and as a download if `attachment`); None
        when the gateway serves the bytes itself."""
        return None

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
