"""Permalinks: code stored under an id derived from its language and text."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from typing import Any

from gateway.spool import Spool
from gateway.stores import BlobStore

ID = re.compile(r"^[A-Za-z0-9_-]{20}$")


def permalink_id(language: str, code: str) -> str:
    digest = hashlib.sha256(f"{language}\0{code}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:15]).decode()


class Permalinks:
    """Written through the spool, so a store outage delays a permalink, never loses it."""

    def __init__(self, store: BlobStore, spool: Spool, base_url: str, retention: float = 0.0) -> None:
        self.store = store
        self.spool = spool
        self.base_url = base_url
        self.retention = retention  # 0: forever
        self._known: set[str] = set()  # ids this node stored: skip rewriting them

    def url(self, pid: str) -> str:
        return f"{self.base_url}/p/{pid}"

    async def save(self, code: str, language: str = "python", note: dict[str, Any] | None = None) -> tuple[str, bool]:
        """The id, and whether the store has it now (else the spool has it; SpoolFull
        if not even that). `note` says whom to tell once a late write lands."""
        pid = permalink_id(language, code)
        if pid in self._known:
            return pid, True
        body = json.dumps({"code": code, "language": language}).encode()
        note = {"kind": "permalink", "id": pid, **(note or {})}
        stored = await self.spool.put(f"permalinks/{pid}", body, "application/json", note)
        # With a retention, writing again renews a permalink someone still shares.
        if stored and not self.retention:
            if len(self._known) > 100_000:
                self._known.clear()
            self._known.add(pid)
        return pid, stored

    async def load(self, pid: str) -> dict[str, Any] | None:
        if not ID.match(pid):
            return None
        blob = await self.store.get(f"permalinks/{pid}")
        if blob is None or (self.retention and blob.modified < time.time() - self.retention):
            return None
        return json.loads(blob.data)
