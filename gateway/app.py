"""Builds one gateway node: the aiohttp app with its Socket.IO server, pool and stores."""

from __future__ import annotations

import dataclasses
import logging

from aiohttp import web

from gateway import admin, balancer, jupyter
from gateway.config import Config, MiB
from gateway.metrics import Metrics
from gateway.registry import create_registry
from gateway.registry.redis import RedisRegistry
from gateway.remote import RemoteSessionManager
from gateway.retention import Retention
from gateway.routes import add_routes, cors, json_errors
from gateway.sessions import SessionManager
from gateway.sockets import create_server
from gateway.stores import create_store
from kernels.isolation import Limits
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from kernels.provisioner import ForkServer
from kernels.workdir import default_root

log = logging.getLogger(__name__)


def create_fork_server(config: Config) -> ForkServer | None:
    if not config.fork_server:
        return None
    # Every per-kernel limit is the setting of the same name with a kernel_ prefix.
    limits = Limits(**{f.name: getattr(config, "kernel_" + f.name) for f in dataclasses.fields(Limits)})
    return ForkServer(
        root=config.workdir_root or default_root(),
        isolation=config.isolation != "off",
        required=config.isolation == "required",
        network=config.network_isolation,
        uids=config.uid_range,
        limits=limits,
        start_timeout=config.kernel_start_timeout,
    )


def create_pool(config: Config) -> KernelPool:
    fork_server = create_fork_server(config)
    specs = {
        name: KernelSpec(
            name=name,
            workdir_root=config.workdir_root,
            start_timeout=config.kernel_start_timeout,
            fork_server=fork_server,
            message_limit=config.kernel_message_limit,
        )
        for name in config.allowed_kernels
    }
    return KernelPool(specs, size=config.pool_size, max_kernels=config.max_kernels)


def create_manager(config: Config, pool: KernelPool | None) -> SessionManager | RemoteSessionManager:
    if config.remote_kernels:
        registry = create_registry(config)
        assert isinstance(registry, RedisRegistry)
        return RemoteSessionManager(config, registry, create_store(config), Metrics(config.metrics_origins))
    assert pool is not None
    return SessionManager(config, pool, create_registry(config), create_store(config), Metrics(config.metrics_origins))


def create_app(config: Config, pool: KernelPool | None = None) -> web.Application:
    """The node's app. Pass `pool` to share one warm pool between apps (tests do)."""
    owns_pool = pool is None and not config.remote_kernels
    if owns_pool:
        pool = create_pool(config)
    manager = create_manager(config, pool)
    drain = balancer.Drain(config.drain_grace, config.drain_timeout, manager.metrics)
    app = web.Application(
        middlewares=[balancer.middleware(drain), cors(config), json_errors],
        client_max_size=max(config.file_cap, config.message_limit) + MiB,
    )
    app["config"] = config
    app["manager"] = manager
    app["drain"] = drain
    sio = create_server(config, manager)
    if isinstance(manager, RemoteSessionManager):
        manager.sio = sio  # to reach a socket that another node holds
    sio.attach(app)
    app["sio"] = sio
    add_routes(app)
    admin.add_routes(app)
    jupyter.add_routes(app, config)
    retention = Retention(config, manager.store)

    async def close_connections() -> None:
        # Closed at the transport, not with a Socket.IO disconnect: clients take it as
        # a dropped connection, reconnect (through the balancer, elsewhere) and resume.
        for sock in list(sio.eio.sockets.values()):
            await sock.close(wait=False)

    def busy() -> bool:
        return any(getattr(s, "busy", False) for s in manager.sessions.values())

    def start_drain(why: str) -> None:
        if isinstance(manager, RemoteSessionManager):
            manager.draining = True
        drain.start(why, busy, close_connections)

    app["start_drain"] = start_drain
    if isinstance(manager, RemoteSessionManager):
        manager.on_drain_asked = start_drain

    async def start(app: web.Application) -> None:
        await manager.registry.open()
        await manager.spool.open()
        if isinstance(manager, RemoteSessionManager):
            await manager.start()
        if owns_pool:
            await pool.open()
            pool.start()
        retention.start()

    async def stop(app: web.Application) -> None:
        await drain.close()
        await manager.close()
        # Close every engine.io socket properly, so that pending long-poll requests are
        # answered now rather than holding the shutdown until their ping timeout.
        await close_connections()
        await sio.shutdown()
        await retention.close()
        await manager.spool.close()  # what is still waiting stays on disk for the next run
        await manager.registry.close()
        await manager.store.close()
        if owns_pool:
            await pool.close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app
