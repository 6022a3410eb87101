"""A warm pool of started kernels, bounded by the node's kernel limit.

`acquire` hands out a kernel whose IOPub is already proven live, so attaching one to a
session costs nothing. The pool refills in the background; when it is empty the caller
waits (FIFO) for a bounded time, and when the node is at its limit it is told so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from kernels import isolation
from kernels.kernel import Kernel, KernelSpec, KernelStartError
from kernels.provisioner import ForkServer, ForkServerError

log = logging.getLogger(__name__)


class PoolExhausted(Exception):
    """No kernel became free in time: the node is at its kernel limit or too slow."""


Starter = Callable[[KernelSpec], Awaitable[Kernel]]


class KernelPool:
    def __init__(
        self,
        specs: dict[str, KernelSpec],
        size: int = 2,
        max_kernels: int = 50,
        starter: Starter = Kernel.start,
    ) -> None:
        self.specs = specs
        self.size = size
        self.max_kernels = max_kernels
        self._starter = starter
        self._warm: dict[str, deque[Kernel]] = {name: deque() for name in specs}
        self._starting: dict[str, int] = dict.fromkeys(specs, 0)
        self._waiting: dict[str, int] = dict.fromkeys(specs, 0)
        self._attached: set[Kernel] = set()
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.last_error: str | None = None
        self.failures_in_row = 0

    # -- accounting -------------------------------------------------------------

    @property
    def total(self) -> int:
        warm = sum(len(q) for q in self._warm.values())
        return warm + sum(self._starting.values()) + len(self._attached)

    def counts(self) -> dict[str, int]:
        return {
            "warm": sum(len(q) for q in self._warm.values()),
            "starting": sum(self._starting.values()),
            "attached": len(self._attached),
        }

    @property
    def fork_servers(self) -> list[ForkServer]:
        servers = {id(s.fork_server): s.fork_server for s in self.specs.values() if s.fork_server is not None}
        return list(servers.values())

    def bare(self) -> list[str]:
        """The kernels this pool starts as plain processes, outside every fence."""
        return [
            name for name, spec in self.specs.items() if spec.fork_server is None or not spec.fork_server.can_fork(name)
        ]

    def isolation(self) -> dict[str, Any]:
        """What fences the kernels in, for /health: the weakest of any kernel's."""
        servers = self.fork_servers
        report = dict(servers[0].report) if servers else isolation.Isolation().report()
        bare = self.bare()
        if bare:
            report["missing"] = ["fork_server", *[m for m in report.get("missing", []) if m != "fork_server"]]
            report["fences"] = {**report.get("fences", {}), "fork_server": False}
            report["level"] = "none"
            why = "no fork server" if not servers else "not this interpreter's ipykernel, so not forkable"
            report["notes"] = [*report.get("notes", []), f"kernels {', '.join(bare)} run as plain processes ({why})"]
        return report

    @property
    def healthy(self) -> bool:
        # The last start failed and nothing is warm: this node cannot serve.
        return not self._closed and (self.failures_in_row == 0 or self.counts()["warm"] > 0)

    # -- filling ----------------------------------------------------------------

    async def open(self) -> None:
        """Start the fork servers now, so that isolation is known (and required isolation
        enforced) before the first kernel is asked for."""
        for server in self.fork_servers:
            await server.start()
        required = any(server.required for server in self.fork_servers)
        if required and self.bare():
            raise ForkServerError(f"--isolation required: kernels {', '.join(self.bare())} cannot be isolated")
        warning = isolation.warning(self.isolation())
        if warning:
            log.warning(warning)

    def start(self) -> None:
        for name in self.specs:
            self._fill(name)

    def _fill(self, name: str) -> None:
        if self._closed:
            return
        wanted = self.size + self._waiting[name]
        while len(self._warm[name]) + self._starting[name] < wanted and self.total < self.max_kernels:
            self._starting[name] += 1
            task = asyncio.create_task(self._start_one(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start_one(self, name: str) -> None:
        kernel: Kernel | None = None
        try:
            kernel = await self._starter(self.specs[name])
        except Exception as exc:
            self._failed(str(exc) if isinstance(exc, KernelStartError) else f"kernel start failed: {exc!r}")
            log.debug("kernel start failed", exc_info=True)
        finally:
            self._starting[name] -= 1
        if kernel is None:
            async with self._changed:
                self._changed.notify_all()  # whoever waited for this start decides again
            # Back off so that a broken kernel spec does not spin a core.
            await asyncio.sleep(min(10.0, 0.5 * 2**self.failures_in_row))
            self._fill(name)
            return
        if self.failures_in_row:
            log.info("kernels start again")
        self.failures_in_row = 0
        self.last_error = None
        if self._closed:
            await kernel.shutdown()
            return
        kernel.on_exit(self._lost)
        self._warm[name].append(kernel)
        async with self._changed:
            self._changed.notify_all()

    def _failed(self, error: str) -> None:
        """One clear line per new reason; the same failure again is not repeated."""
        self.failures_in_row += 1
        if error != self.last_error:
            log.error("kernels cannot start: %s", error)
        self.last_error = error

    def _lost(self, kernel: Kernel) -> None:
        """A warm kernel died before anyone took it: forget it and start another."""
        queue = self._warm.get(kernel.name)
        if queue is not None and kernel in queue:
            queue.remove(kernel)
            self._spawn(kernel.shutdown())
            self._fill(kernel.name)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- handing out ------------------------------------------------------------

    async def acquire(self, name: str, timeout: float) -> Kernel:
        """A live kernel of `name`, taken out of the pool; raises PoolExhausted."""
        if name not in self.specs:
            raise KeyError(name)
        deadline = time.monotonic() + timeout
        self._waiting[name] += 1
        try:
            async with self._changed:
                while True:
                    queue = self._warm[name]
                    while queue:
                        kernel = queue.popleft()
                        if kernel.alive:
                            self._attached.add(kernel)
                            return kernel
                        self._spawn(kernel.shutdown())
                    self._fill(name)
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), remaining)
                    elif self._starting[name]:
                        # The timeout bounds the wait for a free place. A kernel already
                        # starting may be ours: its start has its own timeout, and its
                        # end, success or failure, wakes this loop.
                        await self._changed.wait()
                    else:
                        raise PoolExhausted(self._why())
        finally:
            self._waiting[name] -= 1
            self._fill(name)

    def _why(self) -> str:
        if self.total >= self.max_kernels:
            return f"this node runs its limit of {self.max_kernels} kernels"
        if self.last_error and self.failures_in_row:
            return f"kernels fail to start: {self.last_error}"
        return "no kernel became ready in time"

    async def release(self, kernel: Kernel) -> None:
        """End an attached kernel and free its place."""
        self._attached.discard(kernel)
        await kernel.shutdown()
        self._fill(kernel.name)
        async with self._changed:
            self._changed.notify_all()

    async def close(self) -> None:
        self._closed = True
        kernels = [k for q in self._warm.values() for k in q] + list(self._attached)
        for q in self._warm.values():
            q.clear()
        self._attached.clear()
        await asyncio.gather(*(k.shutdown() for k in kernels), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self.fork_servers:
            await server.close()
