"""The shared registry: session records and replay logs in Redis, seen by every node.

Keys, under `--redis-prefix` (default `cellgate`):

    <p>:s:<id>        HASH    the session record, plus `last` (newest seq), and the log's
                              `held` entries and their `bytes`; `n:<name>` fields are
                              notes (where a Jupyter API client's replay resumes)
    <p>:t:<digest>    STRING  resume token digest -> session id
    <p>:c:<client>    SET     live session ids per client address (the per-address limit)
    <p>:l:<id>        STREAM  the replay log: entry id `<seq>-0`, fields e (event),
                              d (data, msgpack: binary buffers survive), n (bytes)

Every multi-key change is one Lua script, so it is atomic and costs one round trip:
opening a session under the per-address limit, appending a batch of events (seqs
counted, log trimmed to its bounds), deleting. Records expire on their own a while
after a session's hard lifespan, so a node that dies leaves nothing behind for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import redis.asyncio as redis

from gateway.registry.base import (
    LogEntry,
    LogLost,
    LogRead,
    RegistryUnavailable,
    SessionRecord,
    SessionRegistry,
    token_digest,
)

CREATE = """
local prefix, limit, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if limit >= 0 then
  for _, other in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    if redis.call('EXISTS', prefix .. ':s:' .. other) == 0 then redis.call('SREM', KEYS[3], other) end
  end
  if redis.call('SCARD', KEYS[3]) >= limit then return 0 end
end
local ttl = tonumber(ARGV[4])
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[1], 'last', ARGV[5], 'bytes', 0, 'held', 0, 'sink', '', 'detached', '', unpack(ARGV, 6))
redis.call('SET', KEYS[2], id, 'EX', ttl)
redis.call('SADD', KEYS[3], id)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[3], ttl)
return 1
"""

UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

DELETE = """
local digest, client = unpack(redis.call('HMGET', KEYS[1], 'token_digest', 'client'))
if not digest then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], ARGV[1] .. ':t:' .. digest)
redis.call('SREM', ARGV[1] .. ':c:' .. client, ARGV[2])
return 1
"""

ATTACH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return '' end
local old = redis.call('HGET', KEYS[1], 'sink') or ''
redis.call('HSET', KEYS[1], 'sink', ARGV[1], 'detached', '')
return old
"""

DETACH = """
if redis.call('HGET', KEYS[1], 'sink') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'sink', '', 'detached', ARGV[2])
end
return 1
"""

APPEND = """
local state = redis.call('HMGET', KEYS[1], 'last', 'bytes', 'held')
-- Not there, or not where the writer left it: writes were lost.
if not state[1] or (ARGV[4] ~= '' and tonumber(state[1]) ~= tonumber(ARGV[4])) then return -1 end
local last, bytes, held = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
local limit, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local first = last + 1
for i = 5, #ARGV, 3 do
  last = last + 1
  redis.call('XADD', KEYS[2], last .. '-0', 'e', ARGV[i], 'd', ARGV[i + 1], 'n', ARGV[i + 2])
  bytes = bytes + tonumber(ARGV[i + 2])
end
if held == 0 then  -- a new stream: it expires with its session's record
  local ttl = redis.call('TTL', KEYS[1])
  redis.call('EXPIRE', KEYS[2], ttl > 0 and ttl or tonumber(ARGV[3]))
end
held = held + (#ARGV - 4) / 3
-- Trim the oldest, but always keep the newest entry.
while held > 1 and (held > limit or bytes > budget) do
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  bytes = bytes - tonumber(oldest[2][6])
  redis.call('XDEL', KEYS[2], oldest[1])
  held = held - 1
end
redis.call('HSET', KEYS[1], 'last', last, 'bytes', bytes, 'held', held)
return first
"""

FIELDS = [f.name for f in dataclasses.fields(SessionRecord)]


NOTE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def connect(url: str, ca_file: str = "") -> redis.Redis:
    """A client for `url` (redis:// or rediss://, with an ACL user and password in it if
    needed); `ca_file` is the CA that signed a rediss:// server's certificate."""
    options: dict[str, Any] = {"health_check_interval": 15, "socket_keepalive": True}
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if ca_file:
            options["ssl_ca_certs"] = ca_file
    return redis.from_url(url, **options)


def _encode(record: SessionRecord) -> list[Any]:
    pairs: list[Any] = []
    for name in FIELDS:
        value = getattr(record, name)
        pairs += [name, "" if value is None else value]
    return pairs


def _decode(raw: dict[bytes, bytes]) -> SessionRecord:
    values = {k.decode(): v.decode() for k, v in raw.items()}
    return SessionRecord(
        id=values["id"],
        token_digest=values["token_digest"],
        epoch=values["epoch"],
        kernel_name=values["kernel_name"],
        client=values["client"],
        created=float(values["created"]),
        kernel_id=values["kernel_id"] or None,
        host=values.get("host", ""),
        origin=values.get("origin", ""),
        kind=values.get("kind", ""),
    )


class RedisRegistry(SessionRegistry):
    backend = "redis"

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "cellgate",
        replay_limit: int = 10000,
        replay_bytes: int = 16 * 1024 * 1024,
        ttl: float = 3600.0,
        ttls: dict[str, float] | None = None,
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self.replay_limit = replay_limit
        self.replay_bytes = replay_bytes
        self.ttl = int(ttl)  # seconds a session's keys outlive it at most
        self.ttls = {kind: int(t) for kind, t in (ttls or {}).items()}  # by SessionRecord.kind, where longer
        self._create = client.register_script(CREATE)
        self._update = client.register_script(UPDATE)
        self._delete = client.register_script(DELETE)
        self._append = client.register_script(APPEND)
        self._attach = client.register_script(ATTACH)
        self._detach = client.register_script(DETACH)
        self._note = client.register_script(NOTE)

    async def open(self) -> None:
        try:
            await self.redis.ping()
            # An ACL user may be confined to some keys: check it may use ours.
            await self.redis.exists(self._key("s", "probe"))
        except (redis.RedisError, OSError) as exc:
            where = self.redis.connection_pool.connection_kwargs
            raise RegistryUnavailable(
                f"cannot reach Redis at {where.get('host', where.get('path'))}:{where.get('port', '')}: {exc}"
            ) from exc

    async def reachable(self) -> bool:
        try:
            async with asyncio.timeout(2):
                return bool(await self.redis.ping())
        except (TimeoutError, redis.RedisError, OSError):
            return False

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    async def create(self, record: SessionRecord, per_client: int | None = None) -> bool:
        return await self._make(record, per_client, 0)

    async def restore(self, record: SessionRecord, last: int) -> None:
        await self._make(record, None, last)

    async def _make(self, record: SessionRecord, per_client: int | None, last: int) -> bool:
        with _unavailable():
            keys = [self._key(kind, name) for kind, name in (("s", record.id), ("t", record.token_digest))]
            keys += [self._key("c", record.client), self._key("l", record.id)]
            limit = -1 if per_client is None else per_client
            ttl = self.ttls.get(record.kind, self.ttl)
            args = [self.prefix, limit, record.id, ttl, last, *_encode(record)]
            return bool(await self._create(keys=keys, args=args))

    async def get(self, session_id: str) -> SessionRecord | None:
        with _unavailable():
            raw = await self.redis.hgetall(self._key("s", session_id))
            return _decode(raw) if raw else None

    async def list(self, limit: int) -> list[SessionRecord]:
        # SCAN walks the keyspace in small steps, so a large registry never blocks Redis.
        records: list[SessionRecord] = []
        with _unavailable():
            async for key in self.redis.scan_iter(match=self._key("s", "*"), count=500):
                raw = await self.redis.hgetall(key)
                if raw and b"id" in raw:
                    records.append(_decode(raw))
                if len(records) >= limit:
                    break
        return records

    async def list_client(self, client: str) -> list[SessionRecord]:
        with _unavailable():
            ids = await self.redis.smembers(self._key("c", client))
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id in sorted(ids):
                    pipe.hgetall(self._key("s", session_id.decode()))
                raws = await pipe.execute()
        return [_decode(raw) for raw in raws if raw and b"id" in raw]

    async def note(self, session_id: str, name: str, value: str) -> None:
        with _unavailable():
            await self._note(keys=[self._key("s", session_id)], args=["n:" + name, value])

    async def notes(self, session_id: str) -> dict[str, str]:
        with _unavailable():
            raw = await self.redis.hgetall(self._key("s", session_id))
        return {k.decode()[2:]: v.decode() for k, v in raw.items() if k.startswith(b"n:")}

    async def find(self, token: str) -> SessionRecord | None:
        with _unavailable():
            session_id = await self.redis.get(self._key("t", token_digest(token)))
            return await self.get(session_id.decode()) if session_id else None

    async def update(self, record: SessionRecord) -> None:
        with _unavailable():
            await self._update(keys=[self._key("s", record.id)], args=_encode(record))

    async def delete(self, session_id: str) -> None:
        with _unavailable():
            keys = [self._key("s", session_id), self._key("l", session_id)]
            await self._delete(keys=keys, args=[self.prefix, session_id])

    async def count_client(self, client: str) -> int:
        with _unavailable():
            ids = await self.redis.smembers(self._key("c", client))
            if not ids:
                return 0
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.exists(self._key("s", session_id.decode()))
                return sum(await pipe.execute())

    async def attach(self, session_id: str, sink: str) -> str:
        with _unavailable():
            old = await self._attach(keys=[self._key("s", session_id)], args=[sink])
            return old.decode() if isinstance(old, bytes) else str(old or "")

    async def detach(self, session_id: str, sink: str, when: float) -> None:
        with _unavailable():
            await self._detach(keys=[self._key("s", session_id)], args=[sink, when])

    async def attachment(self, session_id: str) -> tuple[str, float | None]:
        with _unavailable():
            sink, detached, created = await self.redis.hmget(self._key("s", session_id), "sink", "detached", "created")
        if created is None:
            raise KeyError(session_id)
        sink = (sink or b"").decode()
        if sink:
            return sink, None
        return "", float(detached) if detached else float(created)

    async def append(self, session_id: str, events: Sequence[tuple[str, Any, int]], after: int | None) -> int:
        with _unavailable():
            args: list[Any] = [self.replay_limit, self.replay_bytes, self.ttl, "" if after is None else after]
            for event, data, size in events:
                args += [event, msgpack.packb(data, use_bin_type=True, default=str), size]
            first = await self._append(keys=[self._key("s", session_id), self._key("l", session_id)], args=args)
            if first < 0:
                raise LogLost(session_id)
            return first

    async def read(self, session_id: str, after: int) -> LogRead:
        with _unavailable():
            log = self._key("l", session_id)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hmget(self._key("s", session_id), "epoch", "last")
                pipe.xrange(log, "-", "+", count=1)
                pipe.xrange(log, f"{after + 1}-0", "+")
                (epoch, last), oldest, entries = await pipe.execute()
            if epoch is None:
                raise KeyError(session_id)
            last = int(last)
            first = _seq(oldest[0][0]) if oldest else last + 1
            return LogRead(epoch.decode(), first, last, [log_entry(entry_id, f) for entry_id, f in entries])

    def log_key(self, session_id: str) -> str:
        return self._key("l", session_id)

    async def close(self) -> None:
        await self.redis.aclose()


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """Redis errors as the interface's one error for 'cannot be reached'."""
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        raise RegistryUnavailable(f"Redis: {exc}") from exc


def log_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> LogEntry:
    """One entry of a session's log stream, decoded."""
    return LogEntry(_seq(entry_id), fields[b"e"].decode(), msgpack.unpackb(fields[b"d"], raw=False), int(fields[b"n"]))


def _seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])
