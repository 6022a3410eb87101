"""Real cluster processes for the tests: gateway nodes and kernel hosts, each its own
process on loopback, sharing a redis-server and a store (S3, as in production)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from tests.conftest import UNPRIVILEGED
from tests.s3server import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def descendants(self) -> list[int]:
        with contextlib.suppress(psutil.Error):
            return [p.pid for p in psutil.Process(self.popen.pid).children(recursive=True)]
        return []

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class Cluster:
    redis_url: str
    directory: Path  # others may pass through it (0755): an unprivileged node works in it
    store: dict[str, str]  # the shared store's settings
    prefix: str = "cluster"
    processes: list[Process] = field(default_factory=list)

    def _env(self, **settings: str) -> dict[str, str]:
        env = {**os.environ, "CELLGATE_REDIS": self.redis_url, "CELLGATE_REDIS_PREFIX": self.prefix}
        env["CELLGATE_LOG_LEVEL"] = "info"
        for name in ("home", "tmpdir"):
            if name in settings:
                env[name.upper()] = settings.pop(name)
        env.update({"CELLGATE_" + k.upper(): str(v) for k, v in {**self.store, **settings}.items()})
        return env

    def _start(self, args: list[str], name: str, wrap: list[str] | None = None, **settings: str) -> Process:
        log = self.directory / f"{name}-{len(self.processes)}.log"
        argv = [*(wrap or [sys.executable]), *args]
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, env=self._env(**settings), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        process = Process(popen, log)
        self.processes.append(process)
        return process

    def host(self, **settings: str) -> Process:
        """A kernel host; its /health and /metrics are on `url`."""
        port = free_port()
        settings.setdefault("pool_size", "1")
        settings.setdefault("spool_dir", str(self.directory / f"spool-host-{len(self.processes)}"))
        process = self._start(["-m", "kernels.host", "--port", str(port)], "host", **settings)
        process.port = port
        return process

    def node(self, run_as: list[str] | None = None, port: int = 0, **settings: str) -> Process:
        """A gateway node (on `port`, or a free one); `run_as` is the command that runs
        Python as another user."""
        port = port or free_port()
        home = self.directory / f"node-{port}-{len(self.processes)}"
        home.mkdir(mode=0o700)
        if run_as is not None:
            user = pwd.getpwnam(UNPRIVILEGED)
            os.chown(home, user.pw_uid, user.pw_gid)
            settings.update(home=str(home), tmpdir=str(home))  # not CELLGATE_: plain HOME, TMPDIR
        settings.setdefault("spool_dir", str(home / "spool"))
        args = ["-m", "gateway", "--remote-kernels", "true", "--port", str(port)]
        process = self._start(args, "node", wrap=run_as, **settings)
        process.port = port
        return process

    async def health(self, node: Process) -> dict[str, object]:
        async with aiohttp.ClientSession() as http, http.get(node.url + "/health") as r:
            return await r.json()

    async def wait(self, node: Process, max_kernels: int, warm: int = 1, timeout: float = 60) -> None:
        """Until `node` sees kernel hosts with `max_kernels` places in all, and `warm`
        warm kernels."""
        last: object = None
        for _ in range(int(timeout / 0.2)):
            with contextlib.suppress(aiohttp.ClientError, OSError):
                last = await self.health(node)
                kernels = last["kernels"]  # type: ignore[index]
                if last["max_kernels"] == max_kernels and kernels["warm"] >= warm:  # type: ignore[index]
                    return
            await asyncio.sleep(0.2)
        raise AssertionError(f"the cluster did not come up: {last}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
