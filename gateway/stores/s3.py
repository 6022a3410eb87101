"""The S3 blob store: every node of a cluster sees the same files and permalinks.

boto3 blocks, so each call runs on a small thread pool of the store's own: a slow S3
then holds those threads, never the event loop or the threads kernel file work uses.
Each call is one attempt bounded by `--store-timeout`; retrying is the spool's job.

The gateway needs no `s3:ListBucket`, and without it S3 answers 403, not 404, for a
key that does not exist: both mean "no such blob" here. Expiry is the bucket's
lifecycle rule (docs/OPERATIONS.md), since removing by age needs a listing.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from gateway.stores.base import Blob, BlobInfo, BlobStore, StoreUnavailable, check_key

T = TypeVar("T")
MISSING = {"404", "403", "NoSuchKey", "NotFound", "AccessDenied", "Forbidden"}
THREADS = 8


class S3Store(BlobStore):
    sweeps = False

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str = "", region: str = "", timeout: float = 10.0):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = botocore.config.Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 1},
            signature_version="s3v4",
            max_pool_connections=THREADS,
            # S3-compatible servers on a custom endpoint rarely have per-bucket DNS names.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        # The usual AWS credential chain: environment, shared files, instance role.
        session = boto3.session.Session(region_name=region or None)
        self._client = session.client("s3", endpoint_url=endpoint_url or None, config=config)
        self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="cellgate-s3")
        self.timeout = timeout

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _call(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            # The client's own timeouts end the thread's call; this bounds our wait even
            # if a response trickles in slower than the read timeout can see.
            return await asyncio.wait_for(
                loop.run_in_executor(self._threads, functools.partial(fn, **kwargs)), self.timeout * 2
            )
        except TimeoutError:
            raise StoreUnavailable("S3 did not answer in time") from None
        except botocore.exceptions.ClientError:
            raise
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"S3 is unreachable: {exc}") from exc

    async def _lookup(self, fn: Callable[..., dict[str, Any]], key: str) -> dict[str, Any] | None:
        """S3's answer for `key`, or None if there is no such blob (or no such key)."""
        try:
            return await self._call(fn, Bucket=self.bucket, Key=self._key(key))
        except ValueError:
            return None
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING:
                return None
            raise StoreUnavailable(f"S3 refused: {exc}") from exc

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            await self._call(
                self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except botocore.exceptions.ClientError as exc:
            raise StoreUnavailable(f"S3 refused: {exc}") from exc

    async def head(self, key: str) -> BlobInfo | None:
        meta = await self._lookup(self._client.head_object, key)
        if meta is None:
            return None
        return BlobInfo(meta["ContentType"], meta["ContentLength"], meta["LastModified"].timestamp())

    async def get(self, key: str) -> Blob | None:
        obj = await self._lookup(self._client.get_object, key)
        if obj is None:
            return None
        body = obj["Body"]
        try:
            data = await self._call(body.read)
        finally:
            body.close()
        return Blob(obj["ContentType"], len(data), obj["LastModified"].timestamp(), data)

    async def presign(self, key: str, info: BlobInfo, filename: str, attachment: bool, expires: float) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._key(key), "ResponseContentType": info.content_type}
        if attachment:
            # S3 cannot send nosniff or a sandbox policy: active content is a download.
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        # Signing may refresh credentials (an instance role), which is network I/O.
        return await self._call(
            self._client.generate_presigned_url, ClientMethod="get_object", Params=params, ExpiresIn=int(expires)
        )

    async def expire(self, prefix: str, before: float) -> int:
        return 0  # the bucket's lifecycle rule expires by age (docs/OPERATIONS.md)

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._client.close()
