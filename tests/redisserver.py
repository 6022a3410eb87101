"""A real redis-server for the tests, on a free loopback port, with its own directory.

Debian's redis-server is built with TLS, so the same helper starts a rediss:// server
(certificates from trustme) with ACL users.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from tests.s3server import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    port: int
    directory: str
    config: str
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    ping_options: dict[str, object] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, self.config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.directory
        )
        client = redis.Redis.from_url(self.url, **(self.ping_options or {}))
        try:
            for _ in range(200):
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    if client.ping():
                        return
                if self.process.poll() is not None:
                    raise RuntimeError("redis-server exited at start")
                time.sleep(0.025)
            raise RuntimeError("redis-server did not start")
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def redis_server(extra: list[str] | None = None, url: str = "", **ping_options: object) -> Iterator[RedisServer]:
    """A redis-server with the config lines `extra`; `url` (with {port}) is how to reach
    it when that is not plain redis://127.0.0.1:{port}."""
    directory = tempfile.mkdtemp(prefix="cellgate-test-redis-")
    port = free_port()
    lines = ["bind 127.0.0.1", f"port {port}", 'save ""', "appendonly no", f"dir {directory}", *(extra or [])]
    config = os.path.join(directory, "redis.conf")
    with open(config, "w") as f:
        f.write("\n".join(line.replace("{port}", str(port)) for line in lines) + "\n")
    server = RedisServer(port, directory, config, url=(url or "redis://127.0.0.1:{port}").format(port=port))
    server.ping_options = ping_options
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
