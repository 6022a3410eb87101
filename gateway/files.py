"""Reporting the files an execution wrote: find them, spool them, store them, say where.

One `FileReporter` per session. It remembers what the kernel's working directory
held after the last report, so each report lists only new or changed files, and it
keeps the session's stored bytes under its cap. A file the store does not take at
once waits in the spool (gateway/spool.py), and a later `files` event announces it.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
import secrets
from collections.abc import Callable
from typing import Any

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.spool import Spool, SpoolFull
from kernels import workdir
from kernels.handle import KernelHandle

log = logging.getLogger(__name__)

SAFE_KEY = re.compile(r"[^A-Za-z0-9_.-]")
NOT_YET = "not stored yet: it waits on the server and a later files event carries its URL"

Publish = Callable[[str, dict[str, Any]], None]


class FileReporter:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        file_url: Callable[[str], str],
        metrics: Metrics,
        publish: Publish,
        session_id: str,
    ) -> None:
        self.config = config
        self.spool = spool
        self.file_url = file_url
        self.metrics = metrics
        self.publish = publish
        self.session_id = session_id
        self.stored_bytes = 0
        self._known: dict[str, workdir.FileState] = {}
        self._lock = asyncio.Lock()

    def forget(self) -> None:
        """A new kernel, a new directory: nothing in it has been seen."""
        self._known = {}

    async def upload(self, kernel: KernelHandle, name: str, data: bytes) -> None:
        """Write a client's file; it is not reported back as output."""
        async with self._lock:
            self._known[name] = await kernel.write_file(name, data)

    async def report(self, kernel: KernelHandle, msg_id: str) -> None:
        """Publish a `files` event for what changed in the kernel's directory since the
        last report."""
        async with self._lock:
            try:
                found = await kernel.list_files(self.config.max_files)
            except workdir.UnsafeFile:
                return
            changed = [name for name, st in found.items() if self._known.get(name) != st]
            self._known = found
            if not changed:
                return
            entries = [await self._store(kernel, name, found[name], msg_id) for name in changed]
        self.publish("files", {"msg_id": msg_id, "files": entries})

    async def _store(self, kernel: KernelHandle, name: str, seen: workdir.FileState, msg_id: str) -> dict[str, Any]:
        c = self.config
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        entry: dict[str, Any] = {"name": name, "url": None, "size": None, "mime": mime}
        room = min(c.file_cap, c.session_file_cap - self.stored_bytes)
        try:
            data = await kernel.read_file(name, max(room, 0), seen)
        except workdir.FileTooLarge as exc:
            entry["size"] = exc.size
            over, cap = ("file", c.file_cap) if exc.size > c.file_cap else ("session", c.session_file_cap)
            entry["error"] = {"code": "file_too_large", "message": f"over the {over} cap of {cap} bytes"}
            self.metrics.errors.labels("file_too_large").inc()
            return entry
        except (workdir.UnsafeFile, OSError) as exc:
            entry["error"] = {"code": "bad_filename", "message": f"not stored: {exc}"}
            return entry
        entry["size"] = len(data)
        key = f"files/{secrets.token_urlsafe(16)}/{SAFE_KEY.sub('_', name.rsplit('/', 1)[-1]) or 'file'}"
        note = {"kind": "file", "session": self.session_id, "msg_id": msg_id, "entry": dict(entry)}
        try:
            stored = await self.spool.put(key, data, mime, note)
        except SpoolFull as exc:
            log.warning("not storing %s: %s", name, exc)
            entry["error"] = {"code": "store_failed", "message": "not stored: the server's spool is full"}
            self.metrics.errors.labels("store_failed").inc()
            return entry
        self.stored_bytes += len(data)
        if stored:
            entry["url"] = self.file_url(key)
        else:
            entry["error"] = {"code": "store_failed", "message": NOT_YET}
            self.metrics.errors.labels("store_failed").inc()
        return entry
