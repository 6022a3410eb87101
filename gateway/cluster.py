"""What gateway nodes and kernel hosts tell each other through Redis.

    <p>:hosts            SET     kernel host ids
    <p>:host:<id>        STRING  a host's heartbeat (JSON: free places, kernel counts,
                                 isolation), expiring EXPIRY s after its last beat
    <p>:hs:<id>          SET     the sessions a host owns
    <p>:in:<id>          STREAM  client messages for a host's sessions: s (session),
                                 c (channel, or "open"), m (the message, msgpack)
    <p>:nodes            SET     gateway node ids
    <p>:node:<id>        STRING  a gateway node's heartbeat (JSON: sessions, draining),
                                 expiring the same way
    <p>:drain:<id>       STRING  an admin's request that node <id> drain
    <p>:bye:<id>         STRING  why a kernel host stopped (drained), for the node that
                                 reaps it to tell the clients
    <p>:reap:<id>        STRING  held by the one node that reaps a dead host

Client messages reach a host through its own stream, in the order each node sent them
(one script each, which reads the session's current host and refuses a session that
has ended). Everything a host
sends a client goes through the session's replay log (gateway/registry/redis.py),
which the node holding the client's socket follows (gateway/follower.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgpack
import redis.asyncio as redis

from gateway.errors import CellgateError

BEAT = 1.0  # seconds between heartbeats
EXPIRY = 5  # seconds after its last heartbeat that a node or host counts as dead
INBOX_MAX = 100_000  # entries kept in a host's stream (it reads them as they come)

SEND = """
local state = redis.call('HMGET', KEYS[1], 'host', 'rt', 'ra')
local host = state[1]
if not host or host == '' then return 0 end
local rate, burst = tonumber(ARGV[6]), tonumber(ARGV[7])
if rate > 0 then  -- the session's token bucket (gateway/ratelimit.py)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local tokens = math.min(burst, (tonumber(state[2]) or burst) + (now - (tonumber(state[3]) or now)) * rate)
  if tokens < 1 then
    redis.call('HSET', KEYS[1], 'rt', tokens, 'ra', now)
    return 2
  end
  redis.call('HSET', KEYS[1], 'rt', tokens - 1, 'ra', now)
end
redis.call('XADD', ARGV[1] .. ':in:' .. host, 'MAXLEN', '~', ARGV[2], '*', 's', ARGV[3], 'c', ARGV[4], 'm', ARGV[5])
return 1
"""


class Cluster:
    def __init__(self, client: redis.Redis, prefix: str, rate: float = 0.0, burst: int = 0) -> None:
        self.redis = client
        self.prefix = prefix
        self.rate, self.burst = rate, burst  # client messages per session (gateway/ratelimit.py)
        self._send = client.register_script(SEND)
        self._given: dict[str, tuple[float | None, int]] = {}  # host -> (its beat, sessions given since)

    def key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}:{kind}:{name}" if name else f"{self.prefix}:{kind}"

    # -- heartbeats -----------------------------------------------------------------------

    async def host_beat(self, host_id: str, report: dict[str, Any]) -> bool:
        """Beat; False if the host had been taken for dead (and its sessions given to
        others) since its last beat."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.key("reap", host_id))
            pipe.set(self.key("host", host_id), json.dumps({**report, "at": time.time()}), ex=EXPIRY)
            pipe.sadd(self.key("hosts"), host_id)
            reaped, _, _ = await pipe.execute()
        if reaped:
            await self.redis.delete(self.key("reap", host_id))
        return not reaped

    async def host_gone(self, host_id: str, reason: str = "") -> None:
        """A host that stops says so at once, instead of letting its beat expire, and
        why, for its sessions' clients."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if reason:
                pipe.set(self.key("bye", host_id), reason, ex=300)
            pipe.delete(self.key("host", host_id))
            await pipe.execute()

    async def farewell(self, host_id: str) -> str | None:
        reason = await self.redis.get(self.key("bye", host_id))
        return reason.decode() if reason else None

    async def node_beat(self, node_id: str, report: dict[str, Any] | None = None) -> bool:
        """Beat; True if an admin asked this node to drain since the last beat."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.key("node", node_id), json.dumps({**(report or {}), "at": time.time()}), ex=EXPIRY)
            pipe.sadd(self.key("nodes"), node_id)
            pipe.getdel(self.key("drain", node_id))
            _, _, asked = await pipe.execute()
        return asked is not None

    async def node_gone(self, node_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.key("node", node_id))
            pipe.srem(self.key("nodes"), node_id)
            await pipe.execute()

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """The live gateway nodes with their last reports (forgetting dead ones)."""
        ids = sorted(i.decode() for i in await self.redis.smembers(self.key("nodes")))
        reports = await self.redis.mget([self.key("node", i) for i in ids]) if ids else []
        dead = [i for i, r in zip(ids, reports, strict=True) if r is None]
        if dead:
            await self.redis.srem(self.key("nodes"), *dead)
        return {i: json.loads(r) for i, r in zip(ids, reports, strict=True) if r is not None}

    async def ask_drain(self, node_id: str) -> bool:
        """Ask a live node to drain (it sees it at its next beat); False if none such."""
        if not await self.node_alive(node_id):
            return False
        await self.redis.set(self.key("drain", node_id), "1", ex=EXPIRY * 4)
        return True

    async def node_alive(self, node_id: str) -> bool:
        return bool(await self.redis.exists(self.key("node", node_id)))

    async def hosts(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The live hosts with their last reports, and the ids of hosts that died."""
        ids = sorted(i.decode() for i in await self.redis.smembers(self.key("hosts")))
        reports = await self.redis.mget([self.key("host", i) for i in ids]) if ids else []
        live = {i: json.loads(r) for i, r in zip(ids, reports, strict=True) if r is not None}
        return live, [i for i in ids if i not in live]

    async def pick_host(self) -> str:
        """The live host with the most free kernel places (a draining host has none),
        less the sessions this node gave it since its last heartbeat: a heartbeat is up
        to a second old, and a burst of new sessions would otherwise all go to one host."""
        live, _ = await self.hosts()
        open_hosts = {i: r for i, r in live.items() if not r.get("draining")}
        if not open_hosts:
            raise CellgateError("capacity_node", "no kernel host is taking new kernels")

        def given(i: str) -> int:
            beat, count = self._given.get(i, (None, 0))
            return count if beat == open_hosts[i].get("at") else 0

        host = max(open_hosts, key=lambda i: (open_hosts[i].get("free", 0) - given(i), i))
        self._given = {i: self._given[i] for i in open_hosts if i in self._given}  # forget dead hosts
        self._given[host] = (open_hosts[host].get("at"), given(host) + 1)
        return host

    # -- sessions and their messages --------------------------------------------------------

    async def assign(self, session_id: str, host_id: str) -> None:
        await self.redis.sadd(self.key("hs", host_id), session_id)

    async def unassign(self, session_id: str, host_id: str) -> None:
        await self.redis.srem(self.key("hs", host_id), session_id)

    async def send(self, session_id: str, channel: str, msg: Any, counted: bool = True) -> bool:
        """Queue a client message for the host that owns the session now (read in the
        same step, so a session moved off a dead host follows at once); False if the
        session has ended, CellgateError rate_limited past the session's rate."""
        keys = [self.key("s", session_id)]
        rate = self.rate if counted else 0
        args = [self.prefix, INBOX_MAX, session_id, channel, msgpack.packb(msg, use_bin_type=True), rate, self.burst]
        sent = await self._send(keys=keys, args=args)
        if sent == 2:
            raise CellgateError("rate_limited", "too many messages: slow down and send again")
        return bool(sent)

    async def receive(self, host_id: str, after: str, block_ms: int) -> list[tuple[str, str, str, Any]]:
        """Client messages for this host after stream id `after`: (id, session, channel, message)."""
        answer = await self.redis.xread({self.key("in", host_id): after}, block=block_ms, count=500)
        out = []
        for _, entries in answer or []:
            for entry_id, f in entries:
                out.append((entry_id.decode(), f[b"s"].decode(), f[b"c"].decode(), msgpack.unpackb(f[b"m"], raw=False)))
        return out

    # -- a host that died ------------------------------------------------------------------

    async def claim(self, host_id: str, node_id: str) -> list[str] | None:
        """The sessions of dead host `host_id`, if this node is the one to reap it."""
        if not await self.redis.set(self.key("reap", host_id), node_id, nx=True, ex=300):
            return None
        return [s.decode() for s in await self.redis.smembers(self.key("hs", host_id))]

    async def forget_host(self, host_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.srem(self.key("hosts"), host_id)
            pipe.delete(self.key("hs", host_id), self.key("in", host_id))
            await pipe.execute()
