"""Removing stored files, and permalinks if configured, once they are past their retention.

One sweep per node, through the blob store's interface: each node may sweep the same
shared store, which costs a listing, never a wrong removal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gateway.config import Config
from gateway.stores import BlobStore

log = logging.getLogger(__name__)


class Retention:
    def __init__(self, config: Config, store: BlobStore) -> None:
        self.rules = {
            prefix: seconds
            for prefix, seconds in (("files", config.file_retention), ("permalinks", config.permalink_retention))
            if seconds > 0
        }
        # Sweep often enough that nothing outlives its retention by more than a quarter.
        self.every = min([3600.0, *(s / 4 for s in self.rules.values())])
        self.store = store
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        # A store that cannot list (S3 without ListBucket) expires by its own rules;
        # reads past the retention answer not_found either way.
        if self.rules and self.store.sweeps:
            self._task = asyncio.create_task(self._run())

    async def sweep(self) -> int:
        now = time.time()
        return sum([await self.store.expire(prefix, now - seconds) for prefix, seconds in self.rules.items()])

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                gone = await self.sweep()
            except Exception:  # a store outage: try again next time
                log.warning("the retention sweep failed", exc_info=True)
                continue
            if gone:
                log.info("retention: removed %d stored blobs", gone)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
