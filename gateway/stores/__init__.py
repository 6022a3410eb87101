"""Blob stores for permalinks and generated files: one interface, chosen by config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.stores.base import Blob, BlobInfo, BlobStore, StoreUnavailable
from gateway.stores.local import LocalStore

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["Blob", "BlobInfo", "BlobStore", "LocalStore", "StoreUnavailable", "create_store"]


def create_store(config: Config) -> BlobStore:
    if config.s3_bucket:
        from gateway.stores.s3 import S3Store  # boto3 loads only when S3 is used

        return S3Store(
            config.s3_bucket, config.s3_prefix, config.s3_endpoint_url, config.s3_region, config.store_timeout
        )
    return LocalStore(config.store_dir)
