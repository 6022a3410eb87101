"""Settings: every one is a command-line flag and an environment variable.

`--foo-bar` on the command line, `CELLGATE_FOO_BAR` in the environment; the flag
wins. Secrets (a Redis password, S3 keys) belong in the environment, never in argv,
which any local user can read in /proc.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MiB = 1024 * 1024
PROTOCOL = "cellgate/1"


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8888, "port to listen on")
    public_url: str = _setting("", "absolute base URL for links handed out (default: relative)")
    cors_origins: str = _setting("*", "comma-separated origins allowed to connect, or *")
    kernels: str = _setting("python3", "comma-separated kernel names clients may ask for")
    pool_size: int = _setting(2, "warm kernels kept ready per kernel name (0: start on demand)")
    max_kernels: int = _setting(50, "kernels per node, warm and attached")
    queue_timeout: float = _setting(10.0, "seconds a request waits for a kernel before capacity_node")
    kernel_start_timeout: float = _setting(60.0, "seconds a kernel may take to start")
    resume_grace: float = _setting(60.0, "seconds a disconnected session waits for a resume")
    idle_timeout: float = _setting(900.0, "seconds without activity before a session ends")
    lifespan: float = _setting(1800.0, "hard limit on a session's life in seconds")
    sessions_per_client: int = _setting(5, "live sessions per client address")
    trusted_proxies: str = _setting("", "comma-separated proxy addresses whose X-Forwarded-For is believed")
    message_limit: int = _setting(1 * MiB, "largest client message in bytes (too_large above it)")
    output_cap: int = _setting(1 * MiB, "stream output bytes per execution before output_capped")
    file_cap: int = _setting(10 * MiB, "largest stored file in bytes")
    session_file_cap: int = _setting(50 * MiB, "stored file bytes per session")
    max_files: int = _setting(200, "files reported per execution")
    service_timeout: float = _setting(30.0, "seconds a POST /service run may take")
    replay_limit: int = _setting(10000, "events kept per session for replay")
    replay_bytes: int = _setting(16 * MiB, "bytes of events (approximate) kept per session for replay")
    store_dir: str = _setting("cellgate-data", "directory of the local blob store")
    workdir_root: str = _setting("", "where kernel working directories are made (default: system temp)")
    log_level: str = _setting("info", "debug, info, warning or error")

    @property
    def allowed_kernels(self) -> list[str]:
        return _split(self.kernels)

    @property
    def default_kernel(self) -> str:
        return self.allowed_kernels[0]

    @property
    def cors(self) -> str | list[str]:
        origins = _split(self.cors_origins)
        return "*" if origins == ["*"] else origins

    @property
    def proxies(self) -> list[str]:
        return _split(self.trusted_proxies)

    @property
    def transport_limit(self) -> int:
        # The transport drops a connection past its buffer size, so it sits well above
        # our own limit: anything between the two gets a proper too_large answer.
        return self.message_limit * 2 + MiB


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def env_name(name: str) -> str:
    return "CELLGATE_" + name.upper()


def _convert(kind: type, raw: str, name: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"cellgate: {env_name(name)}={raw!r} is not a valid {kind.__name__}") from None


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config from the defaults, then the environment, then argv."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Cellgate: run code in Jupyter kernels over Socket.IO and HTTP.",
        epilog="Every flag --foo-bar can also be set as the environment variable CELLGATE_FOO_BAR.",
    )
    for f in dataclasses.fields(Config):
        kind = type(f.default)
        default = f.default
        if env_name(f.name) in environ:
            default = _convert(kind, environ[env_name(f.name)], f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=default,
            metavar=kind.__name__.upper(),
            help=f"{f.metadata['help']} (default: {f.default!r}; env {env_name(f.name)})",
        )
    args = parser.parse_args(argv)
    config = Config(**vars(args))
    validate(config)
    return config


def validate(config: Config) -> None:
    problems = []
    if not config.allowed_kernels:
        problems.append("--kernels names no kernel")
    for name in ("pool_size", "sessions_per_client", "max_files"):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative")
    for name in ("max_kernels", "message_limit", "output_cap", "file_cap", "replay_limit", "replay_bytes", "port"):
        if getattr(config, name) <= 0 and not (name == "port" and config.port == 0):
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        problems.append("--log-level must be debug, info, warning or error")
    if problems:
        raise SystemExit("cellgate: " + "; ".join(problems))
