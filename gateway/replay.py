"""Replaying a session's log to a client that resumes: what it missed, in order, once;
and a hole, if there is one, always announced first."""

from __future__ import annotations

from typing import Any, Protocol

from gateway.errors import CellgateError
from gateway.metrics import Metrics
from gateway.registry import SessionRegistry


class Sink(Protocol):
    async def send(self, event: str, data: dict[str, Any]) -> None: ...


async def replay(
    registry: SessionRegistry,
    session_id: str,
    epoch: str,
    sink: Sink,
    after: int,
    client_epoch: str | None,
    metrics: Metrics,
) -> int:
    """Send `sink` every logged event after seq `after`; the newest seq in the log."""
    same_epoch = client_epoch == epoch
    read = await registry.read(session_id, after if same_epoch else 0)
    # Another epoch, a seq never sent, or trimmed entries: a hole, told as such.
    if not same_epoch or after > read.last or read.first > after + 1:
        metrics.errors.labels("replay_gap").inc()
        gap = CellgateError(
            "replay_gap", "some events cannot be replayed", epoch=read.epoch, first=read.first, last=read.last
        )
        await sink.send("error", gap.as_dict())
    for entry in read.entries:
        await sink.send(entry.event, {**entry.data, "seq": entry.seq})
    return read.last
