"""Nodes on the Redis registry: the limits hold across nodes, the replay log lives in
Redis, and rediss:// with a CA and an ACL user works. Real redis-servers throughout."""

from __future__ import annotations

import asyncio
import secrets
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis as redis_client
import trustme

from gateway.client import Client, Refused
from gateway.config import Config
from gateway.registry import create_registry
from gateway.registry.base import RegistryUnavailable
from gateway.sessions import register
from tests.conftest import GatewayFactory
from tests.redisserver import RedisServer, redis_server


def settings(server: RedisServer, **extra: Any) -> dict[str, Any]:
    return {"redis": server.url, "redis_prefix": "t-" + secrets.token_hex(4), **extra}


def seqs(c: Client) -> list[int]:
    return [d["seq"] for _, d in c.events if isinstance(d.get("seq"), int)]


async def test_the_per_address_limit_holds_across_nodes(start_gateway: GatewayFactory, redis: RedisServer) -> None:
    shared = settings(redis, sessions_per_client=2)
    a, b = await start_gateway(**shared), await start_gateway(**shared)
    first, second = Client(a.url), Client(a.url)
    await first.connect()
    await second.connect()
    third = Client(b.url)
    with pytest.raises(Refused) as refused:
        await third.connect()
    assert refused.value.code == "capacity_client"
    await first.shutdown()
    await b.wait_sessions(0)
    await third.connect()  # a place came free, whichever node it was on
    for c in (second, third):
        await c.shutdown()
        await c.drop()


async def test_the_replay_log_in_redis_gives_back_what_a_client_missed(
    start_gateway: GatewayFactory, redis: RedisServer
) -> None:
    gw = await start_gateway(**settings(redis))
    async with Client(gw.url) as c:
        await c.execute("import time\nsecret = 41")
        run = await c.execute(
            "for i in range(5):\n    print('tick', i, flush=True)\n    time.sleep(0.1)\nsecret += 1", wait=False
        )
        seen = c.last_seq
        await c.drop()
        await asyncio.sleep(1.0)
        again = Client(gw.url)
        await again.resume(c.token, c.epoch, seen)
        await again.finish(run, start=0)
        replayed = seqs(again)
        assert replayed == list(range(seen + 1, seen + 1 + len(replayed)))  # in order, once, no hole
        assert again.collect(run).stdout == "".join(f"tick {i}\n" for i in range(5))
        assert (await again.execute("secret")).result == {"text/plain": "42"}
        await again.shutdown()
        await again.drop()


async def test_a_trimmed_redis_log_is_announced(start_gateway: GatewayFactory, redis: RedisServer) -> None:
    gw = await start_gateway(**settings(redis, replay_limit=5))
    c = Client(gw.url)
    await c.connect()
    await c.execute("for i in range(3): print(i, flush=True)")
    await c.drop()
    again = Client(gw.url)
    await again.resume(c.token, c.epoch, 1)
    gap = await again.wait_event("error", code="replay_gap", timeout=5)
    newest = gap["last"]
    assert newest >= c.last_seq and gap["first"] == newest - 4
    await again.wait_for(lambda e, d: d.get("seq") == newest, timeout=5)
    assert seqs(again) == list(range(newest - 4, newest + 1))
    await again.shutdown()
    await again.drop()


async def test_health_says_when_redis_is_gone_and_a_node_will_not_start_without_it(
    start_gateway: GatewayFactory,
) -> None:
    with redis_server() as server:
        gw = await start_gateway(**settings(server))
        assert (await gw.health())["registry"] == {"backend": "redis", "reachable": True}
        server.stop()
        async with aiohttp.ClientSession() as http, http.get(gw.url + "/health") as r:
            body = await r.json()
        assert r.status == 503 and body["registry"]["reachable"] is False
        assert "Redis" in body["error"]["message"]
        with pytest.raises(RegistryUnavailable, match="cannot reach Redis"):
            await start_gateway(**settings(server))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 that it signed, as files."""
    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {"ca": where / "ca.pem", "cert": where / "cert.pem", "key": where / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    other = trustme.CA()  # signed nothing this server has
    files["other_ca"] = where / "other-ca.pem"
    other.cert_pem.write_to_path(str(files["other_ca"]))
    return files


async def test_rediss_with_a_ca_file_and_an_acl_user(
    start_gateway: GatewayFactory, tls: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    acl = "~cg:* +@read +@write +@scripting +@transaction +@connection +@keyspace -@dangerous"
    config = [
        "port 0",
        "tls-port {port}",
        f"tls-cert-file {tls['cert']}",
        f"tls-key-file {tls['key']}",
        f"tls-ca-cert-file {tls['ca']}",
        "tls-auth-clients no",
        "user default off",
        f"user cellgate on >s3cret-pass {acl}",
    ]
    url = "rediss://cellgate:s3cret-pass@127.0.0.1:{port}"
    with redis_server(config, url=url, ssl_ca_certs=str(tls["ca"])) as server:
        monkeypatch.setenv("CELLGATE_REDIS", server.url)  # where a password belongs
        gw = await start_gateway(redis=server.url, redis_prefix="cg", redis_ca_file=str(tls["ca"]))
        async with Client(gw.url) as c:
            assert (await c.execute("6 * 7")).result == {"text/plain": "42"}
            seen = c.last_seq
            await c.drop()
            again = Client(gw.url)
            await again.resume(c.token, c.epoch, 0)
            await again.wait_for(lambda e, d: d.get("seq") == seen, timeout=5)
            assert seqs(again) == list(range(1, seen + 1))
            await again.shutdown()
            await again.drop()
        # A server whose certificate the given CA did not sign is refused at start.
        with pytest.raises(RegistryUnavailable, match="certificate"):
            await start_gateway(redis=server.url, redis_prefix="cg", redis_ca_file=str(tls["other_ca"]))
        # The ACL user reaches only its own keys.
        with pytest.raises(RegistryUnavailable, match="permission"):
            await start_gateway(redis=server.url, redis_prefix="other", redis_ca_file=str(tls["ca"]))


@pytest.mark.parametrize(
    "persistence",
    [["appendonly yes", "appendfsync everysec"], []],
    ids=["append-only", "nothing-kept"],
)
async def test_a_redis_restart_mid_run_never_leaves_a_silent_hole(
    start_gateway: GatewayFactory, persistence: list[str]
) -> None:
    with redis_server(persistence) as server:
        gw = await start_gateway(**settings(server))
        async with Client(gw.url) as c, Client(gw.url) as idle:
            await idle.execute("x = 1")  # a session with nothing going on through the restart
            await c.execute("import time")
            code = "for i in range(60):\n    print(f'line {i}', flush=True)\n    time.sleep(0.05)"
            run = await c.execute(code, wait=False)
            await asyncio.sleep(1.0)
            server.stop(signal.SIGKILL)  # mid-run
            await asyncio.sleep(0.5)
            server.start()
            await c.finish(run, timeout=30)
            # The connected client has every line once, in order, with contiguous seqs.
            assert c.collect(run).stdout == "".join(f"line {i}\n" for i in range(60))
            live = seqs(c)
            assert live == list(range(1, len(live) + 1))

            # A client resuming from the start with the epoch it was given: the whole log,
            # or, if the restart lost any of it, replay_gap first and then what is held.
            again = Client(gw.url)
            await again.resume(c.token, c.epoch, 0)
            await again.wait_for(lambda e, d: d.get("seq") == c.last_seq, timeout=10)
            gaps = [d for e, d in again.events if e == "error" and d.get("code") == "replay_gap"]
            if gaps:
                assert again.events[0] == ("error", gaps[0])  # announced before anything replayed
                assert seqs(again) == list(range(gaps[0]["first"], c.last_seq + 1))
                assert gaps[0]["epoch"] != c.epoch
            else:
                assert seqs(again) == list(range(1, c.last_seq + 1))
            if not persistence:
                assert gaps, "a Redis that kept nothing must be announced"
            await again.shutdown()
            await again.drop()

            # The idle session resumes too, with its kernel, and its gap (if any) is told.
            back = Client(gw.url)
            info = await back.resume(idle.token, idle.epoch, idle.last_seq)
            assert info["resumed"] and (info["epoch"] == idle.epoch) == bool(persistence)
            assert (await back.execute("x + 1")).result == {"text/plain": "2"}
            if not persistence:
                assert back.events[0][0] == "error" and back.events[0][1]["code"] == "replay_gap"
            await back.shutdown()
            await back.drop()
        assert await gw.wait_sessions(0) == 0  # ended while its Redis is still there


async def test_jupyter_api_kernels_keep_their_keys_as_long_as_they_may_live(redis: RedisServer) -> None:
    """A Jupyter API kernel may live 12 h: its record and its log must not expire after
    the embed's 35 minutes (on a node, or on a kernel host that writes its log)."""
    prefix = "ttl-" + secrets.token_hex(4)
    config = Config(redis=redis.url, redis_prefix=prefix)
    registry = create_registry(config)
    raw = redis_client.Redis.from_url(redis.url)
    try:
        for kind, at_least in (("", config.lifespan), ("jupyter", config.jupyter_api_lifespan)):
            record, _ = await register(config, registry, "127.0.0.1", None, kind=kind)
            await registry.append(record.id, [("iopub", {"x": 1}, 10)], after=0)
            for key in (f"{prefix}:s:{record.id}", f"{prefix}:l:{record.id}"):
                ttl = raw.ttl(key)
                assert at_least < ttl <= at_least + config.jupyter_api_cull_idle_timeout + 300, (kind, key, ttl)
    finally:
        raw.close()
        await registry.close()
