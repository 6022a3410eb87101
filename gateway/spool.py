"""Blobs on their way to the blob store, kept on the trusted side's disk until stored.

Every file an execution wrote and every permalink goes through `put`: it tries the
store once, and if the store does not take it, writes the bytes to a private
directory (mode 0700, names of our own making, opened with O_NOFOLLOW | O_EXCL, so
nothing a kernel planted is ever followed) and retries from there with backoff until
it is stored; `on_done` then says so, and the session tells its client. While the
store is failing, new blobs go straight to disk instead of each waiting out a timeout.
The spool outlives its process: `open` takes up whatever a previous run left waiting.
It is bounded in bytes, and a blob that does not fit raises SpoolFull.
"""

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.metrics import Metrics
from gateway.stores import BlobStore, StoreUnavailable
from kernels.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

WORKERS = 4  # uploads in flight from the retry queue
MAX_BACKOFF = 60.0
BLOCK = 4096  # each item is charged at least a disk block, so many tiny ones stay bounded too


class SpoolFull(Exception):
    pass


@dataclass
class Item:
    id: str
    key: str
    content_type: str
    size: int
    note: dict[str, Any]  # whom to tell once it is stored (a session, a msg_id, an entry)
    created: float = field(default_factory=time.time)
    attempts: int = 0

    @property
    def charge(self) -> int:
        return max(self.size, BLOCK)


class Spool:
    def __init__(
        self,
        directory: str,
        max_bytes: int,
        store: BlobStore,
        metrics: Metrics,
        on_done: Callable[[Item, bool], None],
        give_up_after: float = 0.0,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.store = store
        self.metrics = metrics
        self.on_done = on_done
        self.give_up_after = give_up_after  # 0: retry for as long as it takes
        self.used = 0
        self._items: dict[str, Item] = {}
        self._due: asyncio.Queue[Item] = asyncio.Queue()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._warn = RateLimitedLog(log)
        self._failing = False  # the last store call failed: new blobs go to disk first

    async def put(self, key: str, data: bytes, content_type: str, note: dict[str, Any]) -> bool:
        """True if the store has it now; False if it waits here (SpoolFull if not even
        that). `note` is handed to `on_done` once a waiting blob is stored."""
        if not self._failing and await self._store(key, data, content_type):
            return True
        item = Item(secrets.token_hex(16), key, content_type, len(data), note)
        if self.used + item.charge > self.max_bytes:
            raise SpoolFull(f"the spool holds {self.used} of {self.max_bytes} bytes")
        self._reserve(item)
        try:
            await asyncio.to_thread(self._write, item, data)
        except OSError as exc:
            self._release(item)
            raise SpoolFull(f"the spool cannot be written: {exc}") from exc
        self._retry_later(item)
        return False

    # -- life ---------------------------------------------------------------------

    async def open(self) -> None:
        """Make the directory, take up what an earlier run left, start the uploaders."""
        waiting = await asyncio.to_thread(self._recover)
        for item in waiting:
            self._reserve(item)
            self._due.put_nowait(item)
        if waiting:
            log.info("spool: %d blobs from an earlier run are waiting for the store", len(waiting))
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    @property
    def pending(self) -> int:
        return len(self._items)

    # -- internals ------------------------------------------------------------------

    def _reserve(self, item: Item) -> None:
        self._items[item.id] = item
        self.used += item.charge
        self._gauge()

    def _release(self, item: Item) -> None:
        if self._items.pop(item.id, None) is not None:
            self.used -= item.charge
            self._gauge()

    def _gauge(self) -> None:
        self.metrics.spool_bytes.set(self.used)
        self.metrics.spool_items.set(len(self._items))

    def _path(self, item_id: str, suffix: str) -> str:
        return os.path.join(self.directory, item_id + suffix)

    async def _store(self, key: str, data: bytes, content_type: str) -> bool:
        try:
            await self.store.put(key, data, content_type)
        except StoreUnavailable as exc:
            self._failing = True
            self.metrics.store_failures.inc()
            self._warn.warning("storing %s failed, it waits in the spool: %s", key, exc)
            return False
        self._failing = False
        return True

    async def _attempt(self, item: Item) -> bool:
        try:
            data = await asyncio.to_thread(self._read, item)
        except OSError as exc:  # its bytes are gone: nothing left to store
            log.error("spool: %s is unreadable, given up: %s", item.key, exc)
            self._give_up(item)
            return False
        if not await self._store(item.key, data, item.content_type):
            self._retry_later(item)
            return False
        await asyncio.to_thread(self._remove, item.id)
        self._release(item)
        self.on_done(item, True)
        return True

    def _give_up(self, item: Item) -> None:
        self._release(item)
        with contextlib.suppress(OSError):
            self._remove(item.id)
        self.on_done(item, False)

    def _retry_later(self, item: Item) -> None:
        if self.give_up_after and time.time() - item.created > self.give_up_after:
            log.error("spool: %s could not be stored in %.0f s, given up", item.key, self.give_up_after)
            self._give_up(item)
            return
        delay = min(MAX_BACKOFF, 0.25 * 2**item.attempts) * random.uniform(0.5, 1.0)
        item.attempts += 1
        self._timers[item.id] = asyncio.get_running_loop().call_later(delay, self._wake, item)

    def _wake(self, item: Item) -> None:
        self._timers.pop(item.id, None)
        self._due.put_nowait(item)

    async def _work(self) -> None:
        while True:
            item = await self._due.get()
            try:
                await self._attempt(item)
            except Exception:  # a bug must not stop the uploads behind it
                log.exception("spool: uploading %s failed unexpectedly", item.key)
                self._retry_later(item)

    # -- disk (worker threads) ----------------------------------------------------------

    def _ensure_directory(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        st = os.lstat(self.directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise OSError(f"{self.directory} is not a directory of this user")
        os.chmod(self.directory, 0o700)

    def _write_new(self, path: str, body: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())

    def _write(self, item: Item, data: bytes) -> None:
        try:
            self._write_new(self._path(item.id, ".data"), data)
            # The description goes last, under its final name: it marks the item complete.
            tmp = self._path(item.id, ".json.tmp")
            self._write_new(tmp, json.dumps(asdict(item)).encode())
            os.rename(tmp, self._path(item.id, ".json"))
        except BaseException:
            self._remove(item.id)
            raise

    def _read(self, item: Item) -> bytes:
        fd = os.open(self._path(item.id, ".data"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError(f"spool item {item.id} is not a regular file")
            return f.read(item.size)

    def _remove(self, item_id: str) -> None:
        for suffix in (".json", ".json.tmp", ".data"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(item_id, suffix))

    def _recover(self) -> list[Item]:
        self._ensure_directory()
        items, ids = [], set()
        with os.scandir(self.directory) as entries:
            names = [(e.name, e.is_file(follow_symlinks=False)) for e in entries]
        for name, regular in names:
            item_id = name.split(".", 1)[0]
            ids.add(item_id)
            if not (regular and name.endswith(".json")):
                continue
            try:
                fd = os.open(os.path.join(self.directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    item = Item(**json.loads(f.read(1 << 20)))
                if stat.S_ISREG(os.lstat(self._path(item_id, ".data")).st_mode) and item.id == item_id:
                    items.append(item)
                    continue
            except (OSError, ValueError, TypeError) as exc:
                log.warning("spool: %s is unreadable, removed: %s", name, exc)
        kept = {item.id for item in items}
        for item_id in ids - kept:  # half-written items of a run that died mid-write
            self._remove(item_id)
        return items
