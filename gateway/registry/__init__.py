"""Session registries: one interface, chosen by config."""

from gateway.registry.base import LogEntry, LogRead, SessionRecord, SessionRegistry
from gateway.registry.memory import MemoryRegistry

__all__ = ["LogEntry", "LogRead", "MemoryRegistry", "SessionRecord", "SessionRegistry", "create_registry"]


def create_registry(config) -> SessionRegistry:  # type: ignore[no-untyped-def]
    return MemoryRegistry(replay_limit=config.replay_limit)
