"""Reporting the files an execution wrote: find them, store them, say where they are.

One `FileReporter` per session. It remembers what the kernel's working directory
held after the last report, so each report lists only new or changed files, and it
keeps the session's stored bytes under its cap.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
import secrets
from collections.abc import Callable
from typing import Any

import tenacity

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.stores import BlobStore
from kernels import workdir

log = logging.getLogger(__name__)

STORE_RETRIES = 6  # about 15 s of backoff before a file is given up
SAFE_KEY = re.compile(r"[^A-Za-z0-9_.-]")

Publish = Callable[[str, dict[str, Any]], None]
Spawn = Callable[[Any], Any]


class FileReporter:
    def __init__(
        self,
        config: Config,
        store: BlobStore,
        file_url: Callable[[str], str],
        metrics: Metrics,
        publish: Publish,
        spawn: Spawn,
    ) -> None:
        self.config = config
        self.store = store
        self.file_url = file_url
        self.metrics = metrics
        self.publish = publish
        self.spawn = spawn
        self.stored_bytes = 0
        self._known: dict[str, workdir.FileState] = {}
        self._lock = asyncio.Lock()

    def forget(self) -> None:
        """A new kernel, a new directory: nothing in it has been seen."""
        self._known = {}

    async def upload(self, directory: workdir.Directory, name: str, data: bytes) -> None:
        """Write a client's file; it is not reported back as output."""
        async with self._lock:
            self._known[name] = await workdir.run(workdir.write_file, directory, name, data)

    async def report(self, directory: workdir.Directory, msg_id: str) -> None:
        """Publish a `files` event for what changed in `directory` since the last report."""
        async with self._lock:
            try:
                found = await workdir.run(workdir.scan, directory, self.config.max_files)
            except workdir.UnsafeFile:
                return
            changed = [name for name, st in found.items() if self._known.get(name) != st]
            self._known = found
            if not changed:
                return
            entries = [await self._store(directory, name, found[name], msg_id) for name in changed]
        self.publish("files", {"msg_id": msg_id, "files": entries})

    async def _store(
        self, directory: workdir.Directory, name: str, seen: workdir.FileState, msg_id: str
    ) -> dict[str, Any]:
        c = self.config
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        entry: dict[str, Any] = {"name": name, "url": None, "size": None, "mime": mime}
        room = min(c.file_cap, c.session_file_cap - self.stored_bytes)
        try:
            data = await workdir.run(workdir.read_file, directory, name, max(room, 0), seen)
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
        self.stored_bytes += len(data)  # reserved now, so retries cannot overshoot the cap
        try:
            await self.store.put(key, data, mime)
        except Exception as exc:
            log.warning("storing %s failed, will retry: %s", name, exc)
            entry["error"] = {"code": "store_failed", "message": "the file could not be stored yet; retrying"}
            self.spawn(self._store_later(msg_id, key, data, dict(entry)))
            return entry
        entry["url"] = self.file_url(key)
        return entry

    async def _store_later(self, msg_id: str, key: str, data: bytes, entry: dict[str, Any]) -> None:
        """Retry a failed store with backoff; a later `files` event carries the URL."""
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(STORE_RETRIES),
            wait=tenacity.wait_exponential(multiplier=0.5, max=10),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self.store.put(key, data, entry["mime"])
        except Exception as exc:
            self.stored_bytes -= len(data)
            log.error("storing %s failed for good: %s", entry["name"], exc)
            message = f"{entry['name']} could not be stored"
            self.publish("error", {"code": "store_failed", "message": message, "msg_id": msg_id})
            return
        entry.pop("error", None)
        entry["url"] = self.file_url(key)
        self.publish("files", {"msg_id": msg_id, "files": [entry]})
