"""Prometheus metrics of one gateway node (own registry, so apps in one process don't mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
