"""Permalinks: code stored under an id derived from its language and text."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from gateway.stores import BlobStore

ID = re.compile(r"^[A-Za-z0-9_-]{20}$")


def permalink_id(language: str, code: str) -> str:
    digest = hashlib.sha256(f"{language}\0{code}".encode()).digest()
    return base64.urlsafe_b64encode(digest[:15]).decode()


class Permalinks:
    def __init__(self, store: BlobStore, base_url: str) -> None:
        self.store = store
        self.base_url = base_url
        self._known: set[str] = set()  # ids this node stored: skip rewriting them

    def url(self, pid: str) -> str:
        return f"{self.base_url}/p/{pid}"

    async def save(self, code: str, language: str = "python") -> str:
        pid = permalink_id(language, code)
        if pid not in self._known:
            body = json.dumps({"code": code, "language": language}).encode()
            await self.store.put(f"permalinks/{pid}", body, "application/json")
            if len(self._known) > 100_000:
                self._known.clear()
            self._known.add(pid)
        return pid

    async def load(self, pid: str) -> dict[str, Any] | None:
        if not ID.match(pid):
            return None
        blob = await self.store.get(f"permalinks/{pid}")
        return json.loads(blob.data) if blob else None
