"""`python -m gateway`: run one node on the settings from flags and the environment."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from gateway.app import create_app
from gateway.config import parse
from gateway.registry.base import RegistryUnavailable
from kernels.provisioner import ForkServerError


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        # aiohttp's access log would print query strings, and polling URLs carry sids.
        web.run_app(
            create_app(config),
            host=config.host,
            port=config.port,
            access_log=None,
            # A client that gives up on a long-poll frees its handler at once.
            handler_cancellation=True,
            print=lambda msg: logging.getLogger("gateway").info("%s", msg.strip()),
        )
    except (ForkServerError, RegistryUnavailable) as exc:  # isolation that was required does not hold, and such
        raise SystemExit(f"cellgate: {exc}") from None


if __name__ == "__main__":
    main()
