"""Settings: every one is a command-line flag and an environment variable.

`--foo-bar` on the command line, `CELLGATE_FOO_BAR` in the environment; the flag
wins. Secrets (a Redis password, S3 keys) belong in the environment, never in argv,
which any local user can read in /proc.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB
PROTOCOL = "cellgate/1"
KEY_PREFIX = re.compile(r"^[A-Za-z0-9_./-]+$")


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
    queue_timeout: float = _setting(10.0, "seconds a request waits for a free kernel place before capacity_node")
    kernel_start_timeout: float = _setting(60.0, "seconds a kernel may take to start")
    resume_grace: float = _setting(60.0, "seconds a disconnected session waits for a resume")
    idle_timeout: float = _setting(900.0, "seconds without activity before a session ends")
    lifespan: float = _setting(1800.0, "hard limit on a session's life in seconds")
    sessions_per_client: int = _setting(5, "live sessions per client address")
    trusted_proxies: str = _setting("", "comma-separated proxy addresses whose X-Forwarded-For is believed")
    message_limit: int = _setting(1 * MiB, "largest client message in bytes (too_large above it)")
    message_rate: float = _setting(100.0, "client messages a session may send per second, on average (0: no limit)")
    message_burst: int = _setting(500, "client messages a session may send at once, above the rate")
    output_cap: int = _setting(16 * MiB, "output bytes per execution, every message type, before output_capped")
    session_output_cap: int = _setting(
        16 * MiB, "output bytes while no request is outstanding (widgets, threads), renewed by each client message"
    )
    kernel_message_limit: int = _setting(16 * MiB, "largest message a kernel may send, all frames (too_large above)")
    client_buffer: int = _setting(64 * MiB, "bytes waiting for one client before it is disconnected as too slow")
    file_cap: int = _setting(10 * MiB, "largest stored file in bytes")
    session_file_cap: int = _setting(50 * MiB, "stored file bytes per session")
    max_files: int = _setting(200, "files reported per execution")
    service_timeout: float = _setting(30.0, "seconds a POST /service run may take")
    replay_limit: int = _setting(10000, "events kept per session for replay")
    replay_bytes: int = _setting(32 * MiB, "bytes of events kept per session for replay")
    redis: str = _setting(
        "",
        "Redis URL of the shared session registry, redis:// or rediss:// (default: in-process); "
        "a URL with a password belongs in CELLGATE_REDIS, not on the command line",
    )
    redis_ca_file: str = _setting("", "CA certificate that signed a rediss:// server's certificate")
    redis_prefix: str = _setting("cellgate", "prefix of every Redis key this node uses")
    remote_kernels: bool = _setting(
        False, "run no kernels here: kernel hosts (python -m kernels.host) run them, reached through --redis"
    )
    store_dir: str = _setting("cellgate-data", "directory of the local blob store (without --s3-bucket)")
    s3_bucket: str = _setting("", "S3 bucket for files and permalinks (default: the local --store-dir)")
    s3_prefix: str = _setting("cellgate", "key prefix in the S3 bucket")
    s3_endpoint_url: str = _setting("", "S3 API endpoint, for an S3-compatible server (default: AWS)")
    s3_region: str = _setting("", "S3 region (default: the AWS configuration's)")
    file_delivery: str = _setting(
        "redirect", "how file links answer from S3: redirect (to a presigned URL) or proxy (the gateway sends them)"
    )
    presign_expiry: float = _setting(300.0, "seconds a presigned file URL stays valid")
    store_timeout: float = _setting(10.0, "seconds one blob store call may take before it counts as failed")
    spool_dir: str = _setting("", "where files wait until the store has them (default: <store-dir>/spool)")
    spool_size: int = _setting(1 * GiB, "bytes the spool may hold; past it a file gets store_failed")
    file_retention: float = _setting(7 * 86400.0, "seconds a stored file is kept (0: forever)")
    permalink_retention: float = _setting(0.0, "seconds a permalink is kept (0: forever)")
    workdir_root: str = _setting("", "where kernel working directories are made (default: a fresh one per node)")
    fork_server: bool = _setting(True, "start Python kernels by forking a pre-imported process (Linux)")
    isolation: str = _setting("auto", "kernel isolation: auto (what the host allows), required (all or refuse), off")
    network_isolation: bool = _setting(True, "give each kernel an empty network namespace (no TCP, no UDP)")
    kernel_uids: str = _setting("1500000-1500999", "uid range for kernels when running as root, one uid per kernel")
    execution_timeout: float = _setting(120.0, "wall-clock seconds an execution may run before it is interrupted")
    kernel_cpu_seconds: int = _setting(600, "CPU seconds per kernel (RLIMIT_CPU; 0: no limit)")
    kernel_address_space: int = _setting(4 * GiB, "address space per kernel process in bytes (RLIMIT_AS)")
    kernel_memory: int = _setting(1 * GiB, "memory per kernel in bytes, all its processes (cgroup)")
    kernel_file_size: int = _setting(64 * MiB, "largest file a kernel may write, in bytes (RLIMIT_FSIZE)")
    kernel_processes: int = _setting(64, "processes and threads per kernel (RLIMIT_NPROC with a uid pool)")
    kernel_pids: int = _setting(128, "processes and threads per kernel (cgroup pids)")
    kernel_open_files: int = _setting(256, "open files per kernel process (RLIMIT_NOFILE)")
    kernel_cpus: float = _setting(1.0, "CPUs per kernel (cgroup CPU quota; 0: no limit)")
    kernel_tmp_size: int = _setting(64 * MiB, "size of a kernel's private /tmp, /var/tmp and /dev/shm in bytes")
    kernel_disk: int = _setting(256 * MiB, "bytes a kernel's working directory holds, uploads included (0: no quota)")
    kernel_inodes: int = _setting(20_000, "files and directories a kernel's working directory holds")
    log_level: str = _setting("info", "debug, info, warning or error")
    log_format: str = _setting("text", "text (one line per record) or json (one JSON object per line)")
    drain_grace: float = _setting(
        5.0, "seconds a draining node keeps serving while the load balancer notices its /health (503)"
    )
    drain_timeout: float = _setting(
        60.0, "seconds a draining kernel host waits for running executions before its kernels end"
    )
    metrics_origins: int = _setting(
        50, "distinct embedding origins counted by name in metrics; later ones count as 'other'"
    )
    jupyter_api_tokens: str = _setting(
        "",
        "comma-separated tokens of Jupyter's kernels API (/api/kernels); belongs in CELLGATE_JUPYTER_API_TOKENS",
    )
    jupyter_api_tokens_file: str = _setting("", "file of Jupyter API tokens, one per line (# starts a comment)")
    jupyter_api_anonymous: bool = _setting(
        False, "serve Jupyter's kernels API without a token too, under the per-address limits (Thebe-style pages)"
    )
    jupyter_api_base_url: str = _setting("", "path the Jupyter API lives under: <base>/api/kernels (default: /api)")
    jupyter_api_cors_origins: str = _setting("", "comma-separated origins allowed to call the Jupyter API, or *")
    jupyter_api_kernels_per_token: int = _setting(10, "live kernels per Jupyter API token (capacity_client above)")
    jupyter_api_cull_idle_timeout: float = _setting(
        3600.0, "seconds a Jupyter API kernel lives without a message from a client, connected or not"
    )
    jupyter_api_lifespan: float = _setting(43200.0, "hard limit on a Jupyter API kernel's life in seconds")
    jupyter_api_open_channels: bool = _setting(
        False,
        "let a kernel's channels WebSocket open with the kernel id alone (122 random bits), without a token: "
        "jupyter_server's GatewayKernelClient, which nbclient uses, sends none",
    )
    jupyter_api_debug: bool = _setting(False, "let Jupyter API clients send debug_request (refused by default)")
    admin_token: str = _setting(
        "", "token of the admin API (/admin/...; off when empty); belongs in CELLGATE_ADMIN_TOKEN, not argv"
    )

    @property
    def allowed_kernels(self) -> list[str]:
        return _split(self.kernels)

    @property
    def default_kernel(self) -> str:
        return self.allowed_kernels[0]

    @property
    def cors(self) -> str | list[str]:
        return _origins(self.cors_origins)

    @property
    def jupyter_api(self) -> bool:
        return bool(self.jupyter_api_tokens or self.jupyter_api_tokens_file or self.jupyter_api_anonymous)

    @property
    def jupyter_cors(self) -> str | list[str]:
        return _origins(self.jupyter_api_cors_origins)

    @property
    def jupyter_api_base(self) -> str:
        return "/" + self.jupyter_api_base_url.strip("/") if self.jupyter_api_base_url.strip("/") else ""

    @property
    def proxies(self) -> list[str]:
        return _split(self.trusted_proxies)

    @property
    def uid_range(self) -> tuple[int, int]:
        low, _, high = self.kernel_uids.partition("-")
        return int(low), int(high or low)

    @property
    def spool_path(self) -> str:
        return self.spool_dir or os.path.join(self.store_dir, "spool")

    @property
    def transport_limit(self) -> int:
        # The transport drops a connection past its buffer size, so it sits well above
        # our own limit: anything between the two gets a proper too_large answer.
        return self.message_limit * 2 + MiB


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _origins(value: str) -> str | list[str]:
    origins = _split(value)
    return "*" if origins == ["*"] else origins


def env_name(name: str) -> str:
    return "CELLGATE_" + name.upper()


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_boolean.__name__ = "bool"  # what argparse names in its error message


def _convert(kind: Any, raw: str, name: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"cellgate: {env_name(name)}={raw!r} is not a valid {kind.__name__}") from None


def parse(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str = "python -m gateway",
    defaults: Mapping[str, Any] | None = None,
) -> Config:
    """Build a Config from the defaults (`defaults` over the dataclass's), then the
    environment, then argv."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Cellgate: run code in Jupyter kernels over Socket.IO and HTTP.",
        epilog="Every flag --foo-bar can also be set as the environment variable CELLGATE_FOO_BAR.",
    )
    for f in dataclasses.fields(Config):
        kind: Any = _boolean if isinstance(f.default, bool) else type(f.default)
        default = f.default if defaults is None else defaults.get(f.name, f.default)
        own_default = default
        if env_name(f.name) in environ:
            default = _convert(kind, environ[env_name(f.name)], f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=default,
            metavar=kind.__name__.upper(),  # BOOL takes true/false, yes/no, on/off, 1/0
            help=f"{f.metadata['help']} (default: {own_default!r}; env {env_name(f.name)})",
        )
    args = parser.parse_args(argv)
    if args.redis != environ.get(env_name("redis"), "") and urllib.parse.urlsplit(args.redis).password:
        raise SystemExit(
            "cellgate: a Redis URL with a password belongs in CELLGATE_REDIS, not on the command line, "
            "which any local user can read in /proc"
        )
    if args.jupyter_api_tokens != environ.get(env_name("jupyter_api_tokens"), ""):
        raise SystemExit(
            "cellgate: Jupyter API tokens belong in CELLGATE_JUPYTER_API_TOKENS or --jupyter-api-tokens-file, "
            "not on the command line, which any local user can read in /proc"
        )
    if args.admin_token != environ.get(env_name("admin_token"), ""):
        raise SystemExit(
            "cellgate: the admin token belongs in CELLGATE_ADMIN_TOKEN, not on the command line, "
            "which any local user can read in /proc"
        )
    config = Config(**vars(args))
    validate(config)
    return config


def validate(config: Config) -> None:
    problems = []
    if not config.allowed_kernels:
        problems.append("--kernels names no kernel")
    for name in (
        "pool_size",
        "sessions_per_client",
        "max_files",
        "file_retention",
        "permalink_retention",
        "message_rate",
    ):
        if getattr(config, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must not be negative")
    positive = ("max_kernels", "message_limit", "output_cap", "file_cap", "replay_limit", "replay_bytes", "port")
    positive += ("execution_timeout", "kernel_address_space", "kernel_open_files", "session_output_cap")
    positive += ("kernel_message_limit", "client_buffer", "store_timeout", "spool_size", "message_burst")
    for name in positive:
        if getattr(config, name) <= 0 and not (name == "port" and config.port == 0):
            problems.append(f"--{name.replace('_', '-')} must be positive")
    # A resume pushes the whole replay log at once, and one more message may follow.
    if config.client_buffer < config.replay_bytes + 2 * config.kernel_message_limit:
        problems.append("--client-buffer must be at least --replay-bytes plus twice --kernel-message-limit")
    if config.redis and urllib.parse.urlsplit(config.redis).scheme not in ("redis", "rediss", "unix"):
        problems.append("--redis must be a redis://, rediss:// or unix:// URL")
    if config.remote_kernels and not config.redis:
        problems.append("--remote-kernels needs --redis, through which nodes and kernel hosts meet")
    if config.redis_ca_file and not config.redis.startswith("rediss://"):
        problems.append("--redis-ca-file needs a rediss:// URL")
    if config.file_delivery not in ("redirect", "proxy"):
        problems.append("--file-delivery must be redirect or proxy")
    if not 1 <= config.presign_expiry <= 7 * 86400:
        problems.append("--presign-expiry must be between 1 s and 7 days (S3's longest)")
    if config.s3_prefix and not KEY_PREFIX.match(config.s3_prefix):
        problems.append("--s3-prefix may hold only letters, digits and _ . - /")
    if config.spool_size < config.file_cap:
        problems.append("--spool-size must hold at least one file of --file-cap")
    if config.log_format not in ("text", "json"):
        problems.append("--log-format must be text or json")
    if config.drain_grace < 0 or config.drain_timeout < 0:
        problems.append("--drain-grace and --drain-timeout must not be negative")
    if config.jupyter_api_tokens_file and not os.path.isfile(config.jupyter_api_tokens_file):
        problems.append("--jupyter-api-tokens-file names no file")
    if config.jupyter_api_cull_idle_timeout <= 0 or config.jupyter_api_lifespan <= 0:
        problems.append("--jupyter-api-cull-idle-timeout and --jupyter-api-lifespan must be positive")
    if config.admin_token and len(config.admin_token) < 16:
        problems.append("CELLGATE_ADMIN_TOKEN must be at least 16 characters")
    if config.isolation not in ("auto", "required", "off"):
        problems.append("--isolation must be auto, required or off")
    if config.isolation == "required" and not config.fork_server:
        problems.append("--isolation required needs the fork server: kernels started without it have no fence")
    try:
        low, high = config.uid_range
        if not 0 < low <= high:
            raise ValueError
        if high - low + 1 < config.max_kernels:
            problems.append("--kernel-uids must hold at least --max-kernels uids")
    except ValueError:
        problems.append("--kernel-uids must be a range like 1500000-1500999 of non-root uids")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        problems.append("--log-level must be debug, info, warning or error")
    if problems:
        raise SystemExit("cellgate: " + "; ".join(problems))
