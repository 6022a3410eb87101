"""The embedded registry: everything in this process's memory."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from gateway.registry.base import LogEntry, LogLost, LogRead, SessionRecord, SessionRegistry, token_digest


class MemoryRegistry(SessionRegistry):
    def __init__(self, replay_limit: int = 10000, replay_bytes: int = 16 * 1024 * 1024) -> None:
        self.replay_limit = replay_limit
        self.replay_bytes = replay_bytes
        self._bytes: dict[str, int] = {}
        self._records: dict[str, SessionRecord] = {}
        self._by_token: dict[str, str] = {}
        self._logs: dict[str, deque[LogEntry]] = {}
        self._last: dict[str, int] = {}
        self._clients: Counter[str] = Counter()
        self._sinks: dict[str, tuple[str, float | None]] = {}
        self._notes: dict[str, dict[str, str]] = {}

    async def create(self, record: SessionRecord, per_client: int | None = None) -> bool:
        # No await between the count and the add: atomic within the event loop.
        if per_client is not None and self._clients[record.client] >= per_client:
            return False
        self._records[record.id] = dataclasses.replace(record)
        self._by_token[record.token_digest] = record.id
        self._logs[record.id] = deque()
        self._last[record.id] = 0
        self._bytes[record.id] = 0
        self._clients[record.client] += 1
        return True

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        return dataclasses.replace(record) if record else None

    async def list(self, limit: int) -> list[SessionRecord]:
        return [dataclasses.replace(r) for r in itertools.islice(self._records.values(), limit)]

    async def list_client(self, client: str) -> list[SessionRecord]:
        return [dataclasses.replace(r) for r in self._records.values() if r.client == client]

    async def note(self, session_id: str, name: str, value: str) -> None:
        if session_id in self._records:
            self._notes.setdefault(session_id, {})[name] = value

    async def notes(self, session_id: str) -> dict[str, str]:
        return dict(self._notes.get(session_id, {}))

    async def find(self, token: str) -> SessionRecord | None:
        session_id = self._by_token.get(token_digest(token))
        return await self.get(session_id) if session_id else None

    async def update(self, record: SessionRecord) -> None:
        if record.id in self._records:
            self._records[record.id] = dataclasses.replace(record)

    async def delete(self, session_id: str) -> None:
        record = self._records.pop(session_id, None)
        if record is None:
            return
        self._by_token.pop(record.token_digest, None)
        self._logs.pop(session_id, None)
        self._last.pop(session_id, None)
        self._bytes.pop(session_id, None)
        self._sinks.pop(session_id, None)
        self._notes.pop(session_id, None)
        self._clients[record.client] -= 1
        if self._clients[record.client] <= 0:
            del self._clients[record.client]

    async def count_client(self, client: str) -> int:
        return self._clients.get(client, 0)

    async def attach(self, session_id: str, sink: str) -> str:
        old = self._sinks.get(session_id, ("", None))[0]
        if session_id in self._records:
            self._sinks[session_id] = (sink, None)
        return old

    async def detach(self, session_id: str, sink: str, when: float) -> None:
        if session_id in self._records and self._sinks.get(session_id, ("", None))[0] == sink:
            self._sinks[session_id] = ("", when)

    async def attachment(self, session_id: str) -> tuple[str, float | None]:
        if session_id not in self._records:
            raise KeyError(session_id)
        return self._sinks.get(session_id, ("", self._records[session_id].created))

    async def append(self, session_id: str, events: Sequence[tuple[str, Any, int]], after: int | None) -> int:
        log = self._logs.get(session_id)
        if log is None or (after is not None and self._last[session_id] != after):
            raise LogLost(session_id)
        first = self._last[session_id] + 1
        total = self._bytes[session_id]
        for seq, (event, data, size) in enumerate(events, first):
            log.append(LogEntry(seq, event, data, size))
            total += size
        self._last[session_id] = first + len(events) - 1
        # Trim the oldest, but always keep the newest entry.
        while len(log) > 1 and (len(log) > self.replay_limit or total > self.replay_bytes):
            total -= log.popleft().size
        self._bytes[session_id] = total
        return first

    async def restore(self, record: SessionRecord, last: int) -> None:
        await self.delete(record.id)
        await self.create(record)
        self._last[record.id] = last

    async def read(self, session_id: str, after: int) -> LogRead:
        record = self._records.get(session_id)
        log = self._logs.get(session_id)
        if record is None or log is None:
            raise KeyError(session_id)
        last = self._last[session_id]
        first = log[0].seq if log else last + 1
        # Seqs in the log are contiguous, so the first wanted entry is found by index.
        start = max(0, after + 1 - first)
        entries = list(itertools.islice(log, start, None)) if after < last else []
        return LogRead(record.epoch, first, last, entries)
