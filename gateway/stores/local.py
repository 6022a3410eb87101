"""The embedded blob store: a local directory, served by the gateway at /files/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile

from gateway.stores.base import Blob, BlobInfo, BlobStore, StoreUnavailable, check_key


class LocalStore(BlobStore):
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        try:
            await asyncio.to_thread(self._put, path, data, content_type)
        except OSError as exc:
            raise StoreUnavailable(f"the store directory cannot be written: {exc}") from exc

    @staticmethod
    def _put(path: str, data: bytes, content_type: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        for target, body in ((path + ".meta", json.dumps({"type": content_type}).encode()), (path, data)):
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    async def head(self, key: str) -> BlobInfo | None:
        blob = await self._read(key, with_data=False)
        return BlobInfo(blob.content_type, blob.size, blob.modified) if blob else None

    async def get(self, key: str) -> Blob | None:
        return await self._read(key, with_data=True)

    async def _read(self, key: str, with_data: bool) -> Blob | None:
        try:
            path = self._path(key)
        except ValueError:
            return None
        try:
            return await asyncio.to_thread(self._get, path, with_data)
        except OSError as exc:
            raise StoreUnavailable(f"the store directory cannot be read: {exc}") from exc

    @staticmethod
    def _get(path: str, with_data: bool) -> Blob | None:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read() if with_data else b""
            with open(path + ".meta", "rb") as f:
                meta = json.loads(f.read())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return Blob(meta.get("type", "application/octet-stream"), st.st_size, st.st_mtime, data)

    async def expire(self, prefix: str, before: float) -> int:
        return await asyncio.to_thread(self._expire, os.path.join(self.root, check_key(prefix)), before)

    @staticmethod
    def _expire(top: str, before: float) -> int:
        # Only the gateway writes here (0700), so a plain walk is safe.
        gone = 0
        for directory, _dirs, files in os.walk(top, topdown=False):
            for name in files:
                path = os.path.join(directory, name)
                if name.endswith(".meta") or name.startswith(".tmp-"):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_mtime < before:
                        os.unlink(path)
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path + ".meta")
                        gone += 1
            if directory != top:
                with contextlib.suppress(OSError):  # not empty: something newer is in it
                    os.rmdir(directory)
        return gone
