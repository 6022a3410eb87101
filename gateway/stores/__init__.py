"""Blob stores for permalinks and generated files: one interface, chosen by config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.stores.base import Blob, BlobStore
from gateway.stores.local import LocalStore

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["Blob", "BlobStore", "LocalStore", "create_store"]


def create_store(config: Config) -> BlobStore:
    return LocalStore(config.store_dir)
