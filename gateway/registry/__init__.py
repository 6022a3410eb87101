"""Session registries: one interface, chosen by config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.registry.base import LogEntry, LogRead, SessionRecord, SessionRegistry
from gateway.registry.memory import MemoryRegistry

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["LogEntry", "LogRead", "MemoryRegistry", "SessionRecord", "SessionRegistry", "create_registry"]


def create_registry(config: Config) -> SessionRegistry:
    if config.redis:
        from gateway.registry.redis import RedisRegistry, connect

        return RedisRegistry(
            connect(config.redis, config.redis_ca_file),
            prefix=config.redis_prefix,
            replay_limit=config.replay_limit,
            replay_bytes=config.replay_bytes,
            # Past its hard lifespan and grace nothing of a session is needed.
            ttl=config.lifespan + config.resume_grace + 300,
            # Jupyter API kernels live longer, by their own settings.
            ttls={"jupyter": config.jupyter_api_lifespan + config.jupyter_api_cull_idle_timeout + 300},
        )
    return MemoryRegistry(replay_limit=config.replay_limit, replay_bytes=config.replay_bytes)
