"""Blob stores for permalinks and generated files: one interface, chosen by config."""

from gateway.stores.base import Blob, BlobStore
from gateway.stores.local import LocalStore

__all__ = ["Blob", "BlobStore", "LocalStore", "create_store"]


def create_store(config) -> BlobStore:  # type: ignore[no-untyped-def]
    return LocalStore(config.store_dir)
