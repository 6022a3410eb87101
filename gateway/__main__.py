"""`python -m gateway`: run one node on the settings from flags and the environment.

SIGTERM drains the node before it stops (gateway/balancer.py); SIGINT, or a second
SIGTERM, stops it at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from gateway import logs
from gateway.app import create_app
from gateway.config import Config, parse
from gateway.registry.base import RegistryUnavailable
from kernels.provisioner import ForkServerError

log = logging.getLogger("gateway")


async def serve(config: Config) -> None:
    app = create_app(config)
    # aiohttp's access log would print query strings, and polling URLs carry sids.
    # A client that gives up on a long-poll frees its handler at once.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        log.info("serving on http://%s:%d (node %s)", config.host, config.port, app["manager"].node_id)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def terminate() -> None:
            if app["drain"].draining:
                stop.set()
            else:
                app["start_drain"]("SIGTERM")

        loop.add_signal_handler(signal.SIGTERM, terminate)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        drained = asyncio.ensure_future(app["drain"].done.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([drained, stopped], return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        stopped.cancel()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    logs.setup(config.log_level, config.log_format, process="gateway")
    try:
        asyncio.run(serve(config))
    except (ForkServerError, RegistryUnavailable) as exc:  # isolation that was required does not hold, and such
        raise SystemExit(f"cellgate: {exc}") from None


if __name__ == "__main__":
    main()
