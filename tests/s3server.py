"""A real S3 API over HTTP for the tests: moto's server on a free loopback port.

It runs as its own process, so a test can make S3 unreachable for real (SIGSTOP: the
port accepts connections and then nothing answers) and bring it back (SIGCONT).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    url: str
    bucket: str
    process: subprocess.Popen[bytes]

    def client(self, **credentials: Any) -> Any:
        """A boto3 client, with the environment's credentials unless others are given."""
        config = botocore.config.Config(s3={"addressing_style": "path"}, signature_version="s3v4")
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, config=config, **credentials)

    def settings(self, prefix: str | None = None) -> dict[str, Any]:
        """Gateway settings that use this server, under a prefix of their own."""
        return {
            "s3_bucket": self.bucket,
            "s3_prefix": prefix or "t-" + secrets.token_hex(4),
            "s3_endpoint_url": self.url,
            "s3_region": REGION,
        }

    def objects(self, prefix: str) -> dict[str, bytes]:
        client = self.client()
        listed = client.list_objects_v2(Bucket=self.bucket, Prefix=prefix + "/").get("Contents", [])
        return {o["Key"]: client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read() for o in listed}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        os.kill(self.process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.process.pid, signal.SIGCONT)


@contextlib.contextmanager
def s3_server(env: dict[str, str] | None = None, bucket: str = "cellgate-test") -> Iterator[S3Server]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = S3Server(f"http://127.0.0.1:{port}", bucket, process)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(server.url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError("moto's server exited at start") from None
                time.sleep(0.05)
        else:
            raise RuntimeError("moto's server did not start")
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
