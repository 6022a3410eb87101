"""The project's own infra/haproxy.cfg, run for real in front of test nodes.

The test fills in what differs from production: the listening addresses (free
loopback ports), the nodes' addresses, a certificate from a throwaway CA, and HAProxy's
log (to a file). Every other line is used as shipped.
"""

from __future__ import annotations

import contextlib
import re
import resource
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.s3server import free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "infra" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@dataclass
class HAProxy:
    directory: Path
    http_port: int
    https_port: int
    stats_port: int
    ca: trustme.CA
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def render(self, nodes: list[int]) -> str:
        """infra/haproxy.cfg with this test's addresses: one server line per node port."""
        text = CONFIG.read_text()
        cert = self.directory / "cellgate.pem"
        self.ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        # Two file descriptors per connection: within what this machine allows.
        fds = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        text = re.sub(r"maxconn (\d+)", lambda m: f"maxconn {min(int(m.group(1)), (fds - 200) // 2)}", text)
        text = text.replace("bind :80\n", f"bind 127.0.0.1:{self.http_port}\n")
        text = re.sub(r"bind :443 ssl crt \S+", f"bind 127.0.0.1:{self.https_port} ssl crt {cert}", text)
        text = re.sub(r"bind 10\.0\.0\.10:8404", f"bind 127.0.0.1:{self.stats_port}", text)

        def servers(block: re.Match[str]) -> str:
            cookie = " cookie " in block.group(0)
            return "".join(
                f"    server node{i} 127.0.0.1:{port}" + (f" cookie node{i}" if cookie else "") + "\n"
                for i, port in enumerate(nodes, 1)
            )

        # Each backend's block of server lines becomes one line per test node.
        text = re.sub(r"(?:^    server node\d+ [^\n]*\n)+", servers, text, flags=re.M)
        return text

    def start(self, nodes: list[int]) -> None:
        path = self.directory / "haproxy.cfg"
        path.write_text(self.render(nodes))
        check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused the config: {check.stdout}{check.stderr}")
        log = open(self.directory / "haproxy.log", "wb")
        self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.http_port), 0.2):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"haproxy did not start: {(self.directory / 'haproxy.log').read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def haproxy(directory: Path) -> HAProxy:
    return HAProxy(directory, free_port(), free_port(), free_port(), trustme.CA())
