"""Prometheus metrics of one gateway node or kernel host (own registry, so apps in one
process don't mix)."""

from __future__ import annotations

import re
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.errors import CODES

ORIGIN = re.compile(r"^https?://[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?$")


class Origins:
    """The embedding page's Origin as a label, with bounded cardinality: the first
    `limit` well-formed origins by name, any later one as "other", and "none" or
    "invalid" for a missing or malformed header (anyone can send any Origin)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[str] = set()

    def label(self, origin: str | None) -> str:
        if not origin:
            return "none"
        origin = origin.lower()
        if not ORIGIN.match(origin):
            return "invalid"
        if origin in self._known:
            return origin
        if len(self._known) < self.limit:
            self._known.add(origin)
            return origin
        return "other"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, origins: int = 50) -> None:
        self.origins = Origins(origins)
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("cellgate_sessions", "Live sessions on this node", ["state"], registry=r)
        self.kernels = Gauge("cellgate_kernels", "Kernels on this node", ["state"], registry=r)
        self.messages = Counter("cellgate_messages_total", "Messages relayed", ["direction", "channel"], registry=r)
        self.execution = Histogram(
            "cellgate_execution_seconds",
            "execute_request to execute_reply",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.errors = Counter("cellgate_errors_total", "Errors told to clients", ["code"], registry=r)
        for code in CODES:  # every code from zero, so that rate() sees the first one
            self.errors.labels(code)
        self.dropped = Counter(
            "cellgate_output_dropped_bytes_total", "Kernel output dropped past a budget or limit", registry=r
        )
        self.kernel_dropped = Counter(
            "cellgate_kernel_messages_dropped_total", "Kernel messages dropped as malformed", ["channel"], registry=r
        )
        self.slow_clients = Counter(
            "cellgate_slow_clients_total", "Clients disconnected for reading too slowly", registry=r
        )
        self.spool_bytes = Gauge("cellgate_spool_bytes", "Bytes waiting in the spool for the blob store", registry=r)
        self.spool_items = Gauge("cellgate_spool_items", "Blobs waiting in the spool for the blob store", registry=r)
        self.store_failures = Counter(
            "cellgate_store_failures_total", "Blob store writes that failed (each is retried)", registry=r
        )
        self.sessions_opened = Counter(
            "cellgate_sessions_opened_total", "Sessions opened, by embedding page origin", ["origin"], registry=r
        )
        self.executions = Counter(
            "cellgate_executions_total", "execute_requests relayed, by embedding page origin", ["origin"], registry=r
        )
        self.registry_up = Gauge(
            "cellgate_registry_up", "1 while the session registry (Redis) answers, else 0", registry=r
        )
        self.registry_ping = Gauge(
            "cellgate_registry_ping_seconds", "How long the session registry took to answer a ping", registry=r
        )
        self.draining = Gauge("cellgate_draining", "1 while this process drains before it stops", registry=r)
        self.kernel_hosts = Gauge(
            "cellgate_kernel_hosts", "Kernel hosts this node sees, by state", ["state"], registry=r
        )

    async def observe_registry(self, registry: Any) -> None:
        """Whether the registry answers now, and how fast: read at each scrape."""
        started = time.monotonic()
        self.registry_up.set(1 if await registry.reachable() else 0)
        self.registry_ping.set(time.monotonic() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
