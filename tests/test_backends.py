"""The backend interfaces: every registry and every blob store passes the same tests.

Each fixture is parametrized over a table of backends; a new backend joins by adding
its factory to the table, and every test below then runs against it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.registry import MemoryRegistry, SessionRecord, SessionRegistry
from gateway.registry.base import LogLost, new_token, token_digest
from gateway.registry.redis import RedisRegistry, connect
from gateway.stores import BlobStore, LocalStore
from gateway.stores.s3 import S3Store
from tests.s3server import REGION

REGISTRIES: dict[str, Callable[[pytest.FixtureRequest], SessionRegistry]] = {
    "memory": lambda request: MemoryRegistry(replay_limit=5, replay_bytes=10_000),
    "redis": lambda request: RedisRegistry(
        connect(request.getfixturevalue("redis").url),
        prefix="t-" + secrets.token_hex(4),  # a prefix per test: no test sees another's keys
        replay_limit=5,
        replay_bytes=10_000,
    ),
}
STORES: dict[str, Callable[[pytest.FixtureRequest, Path], BlobStore]] = {
    "local": lambda request, tmp: LocalStore(str(tmp / "blobs")),
    "s3": lambda request, tmp: S3Store(
        request.getfixturevalue("s3").bucket,
        prefix=tmp.name,  # a prefix per test: no test sees another's blobs
        endpoint_url=request.getfixturevalue("s3").url,
        region=REGION,
        timeout=5,
    ),
}


@pytest.fixture(params=list(REGISTRIES))
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[SessionRegistry]:
    reg = REGISTRIES[request.param](request)
    yield reg
    await reg.close()


@pytest.fixture(params=list(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    s = STORES[request.param](request, tmp_path)
    yield s
    await s.close()


def record(token: str, client: str = "1.2.3.4") -> SessionRecord:
    return SessionRecord(
        id=token[:8],
        token_digest=token_digest(token),
        epoch="e1",
        kernel_name="python3",
        client=client,
        created=time.time(),
    )


async def test_registry_finds_by_token_not_by_digest(registry: SessionRegistry) -> None:
    token = new_token()
    await registry.create(record(token))
    found = await registry.find(token)
    assert found is not None and found.id == token[:8]
    assert await registry.find(token_digest(token)) is None
    assert await registry.find("nope") is None


async def test_registry_counts_clients_and_deletes(registry: SessionRegistry) -> None:
    a, b = new_token(), new_token()
    await registry.create(record(a))
    await registry.create(record(b))
    assert await registry.count_client("1.2.3.4") == 2
    await registry.delete(a[:8])
    assert await registry.count_client("1.2.3.4") == 1
    assert await registry.find(a) is None and await registry.get(a[:8]) is None


async def test_registry_limits_sessions_per_client_atomically(registry: SessionRegistry) -> None:
    # Ten opens at once from one address, limit three: exactly three get in.
    tokens = [new_token() for _ in range(10)]
    made = await asyncio.gather(*(registry.create(record(t, client="5.6.7.8"), per_client=3) for t in tokens))
    assert sorted(made) == [False] * 7 + [True] * 3
    assert await registry.count_client("5.6.7.8") == 3
    refused = [t for t, ok in zip(tokens, made, strict=True) if not ok]
    assert all([await registry.find(t) is None for t in refused])
    assert await registry.create(record(new_token(), client="9.9.9.9"), per_client=3)  # another address
    kept = next(t for t, ok in zip(tokens, made, strict=True) if ok)
    await registry.delete(kept[:8])
    assert await registry.create(record(new_token(), client="5.6.7.8"), per_client=3)  # a place came free


async def test_registry_update(registry: SessionRegistry) -> None:
    token = new_token()
    rec = record(token)
    await registry.create(rec)
    rec.kernel_id = "k1"
    await registry.update(rec)
    assert (await registry.get(rec.id)).kernel_id == "k1"


async def test_log_seqs_and_trimming(registry: SessionRegistry) -> None:
    token = new_token()
    rec = record(token)
    await registry.create(rec)
    empty = await registry.read(rec.id, 0)
    assert (empty.first, empty.last, empty.entries) == (1, 0, [])
    seqs = [await registry.append(rec.id, [("iopub", {"n": i}, 100)], after=i) for i in range(3)]
    assert seqs == [1, 2, 3]
    assert await registry.append(rec.id, [("iopub", {"n": i}, 100) for i in range(3, 8)], after=3) == 4  # one batch
    read = await registry.read(rec.id, 0)
    assert (read.epoch, read.first, read.last) == ("e1", 4, 8)  # replay_limit=5 keeps 4..8
    assert [e.seq for e in read.entries] == [4, 5, 6, 7, 8]
    assert [e.data["n"] for e in (await registry.read(rec.id, 6)).entries] == [6, 7]
    assert (await registry.read(rec.id, 8)).entries == []


async def test_store_roundtrip_and_missing(store: BlobStore) -> None:
    before = time.time()
    await store.put("files/abc/x.png", b"\x89PNG", "image/png")
    blob = await store.get("files/abc/x.png")
    assert blob is not None and blob.data == b"\x89PNG" and blob.content_type == "image/png"
    info = await store.head("files/abc/x.png")
    assert info is not None and (info.content_type, info.size) == ("image/png", 4)
    assert before - 2 <= info.modified <= time.time() + 2  # S3 keeps whole seconds
    assert await store.get("files/abc/missing") is None
    assert await store.head("files/abc/missing") is None
    await store.put("files/abc/x.png", b"new", "image/png")
    assert (await store.get("files/abc/x.png")).data == b"new"


async def test_store_refuses_bad_keys(store: BlobStore) -> None:
    for key in ("../etc/passwd", "files/../../x", "/abs", "files//x", "files/a b"):
        with pytest.raises(ValueError):
            await store.put(key, b"x", "text/plain")
        assert await store.get(key) is None


async def test_log_is_bounded_in_bytes(registry: SessionRegistry) -> None:
    rec = record(new_token())
    await registry.create(rec)
    for i in range(3):
        await registry.append(rec.id, [("iopub", {"n": i}, 4000)], after=i)  # budget 10,000: two fit
    read = await registry.read(rec.id, 0)
    assert [e.data["n"] for e in read.entries] == [1, 2] and read.first == 2
    await registry.append(rec.id, [("iopub", {"n": "huge"}, 50_000)], after=3)  # the newest stays, alone
    read = await registry.read(rec.id, 0)
    assert [e.data["n"] for e in read.entries] == ["huge"] and read.last == 4


async def test_store_expires_what_is_older_than_asked_and_only_under_its_prefix(store: BlobStore) -> None:
    if not store.sweeps:
        pytest.skip("this store expires blobs by its own rules (an S3 lifecycle rule)")
    await store.put("files/t1/old.txt", b"old", "text/plain")
    await store.put("permalinks/p1", b"{}", "application/json")
    await asyncio.sleep(0.05)
    cutoff = time.time()
    await asyncio.sleep(0.05)
    await store.put("files/t2/new.txt", b"new", "text/plain")
    assert await store.expire("files", cutoff) == 1
    assert await store.get("files/t1/old.txt") is None
    assert (await store.get("files/t2/new.txt")).data == b"new"
    assert (await store.get("permalinks/p1")).data == b"{}"  # another prefix: untouched
    assert await store.expire("files", cutoff) == 0


async def test_store_presigns_a_download_or_leaves_serving_to_the_gateway(store: BlobStore) -> None:
    await store.put("files/t/page.html", b"<script>1</script>", "text/html")
    info = await store.head("files/t/page.html")
    assert info is not None
    url = await store.presign("files/t/page.html", info, "page.html", True, 60)
    if url is None:
        return  # the gateway serves this store's bytes itself (tests/test_stores.py)
    assert "X-Amz-Expires=60" in url
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200 and await r.read() == b"<script>1</script>"
        assert r.headers["Content-Type"] == "text/html"
        assert r.headers["Content-Disposition"] == 'attachment; filename="page.html"'


async def test_log_keeps_binary_buffers_and_nested_data(registry: SessionRegistry) -> None:
    rec = record(new_token())
    await registry.create(rec)
    data = {
        "header": {"msg_id": "m1", "msg_type": "comm_msg"},
        "content": {"data": {"values": [1, 2.5, None, True, "é"]}},
        "buffers": [b"\x00\xff\x10", b""],
    }
    events = [("iopub", data, 64), ("files", {"msg_id": "m1", "files": []}, 32)]
    assert await registry.append(rec.id, events, after=0) == 1
    entries = (await registry.read(rec.id, 0)).entries
    assert [(e.seq, e.event, e.data) for e in entries] == [
        (1, "iopub", data),
        (2, "files", {"msg_id": "m1", "files": []}),
    ]


async def test_a_session_that_is_gone_has_no_log(registry: SessionRegistry) -> None:
    rec = record(new_token())
    await registry.create(rec)
    await registry.delete(rec.id)
    with pytest.raises(LogLost):  # a writer that still has it finds out
        await registry.append(rec.id, [("iopub", {}, 1)], after=None)
    with pytest.raises(KeyError):
        await registry.read(rec.id, 0)
    rec.kernel_id = "k"
    await registry.update(rec)  # nothing to update: it stays gone
    assert await registry.get(rec.id) is None and await registry.count_client(rec.client) == 0


async def test_a_log_that_lost_writes_is_detected_and_restored_as_a_new_epoch(registry: SessionRegistry) -> None:
    rec = record(new_token())
    await registry.create(rec)
    assert await registry.append(rec.id, [("iopub", {"n": i}, 10) for i in range(3)], after=0) == 1
    # The writer had logged up to 5, the log says 3: two writes were lost.
    with pytest.raises(LogLost):
        await registry.append(rec.id, [("iopub", {"n": 5}, 10)], after=5)
    assert (await registry.read(rec.id, 0)).last == 3  # nothing appended
    rec.epoch = "e2"
    await registry.restore(rec, last=5)
    assert await registry.append(rec.id, [("iopub", {"n": 6}, 10)], after=5) == 6  # seqs go on
    read = await registry.read(rec.id, 0)
    assert (read.epoch, read.first, read.last, [e.seq for e in read.entries]) == ("e2", 6, 6, [6])
    token_record = await registry.get(rec.id)
    assert token_record is not None and token_record.epoch == "e2" and await registry.count_client(rec.client) == 1


async def test_the_registry_knows_which_client_holds_a_session(registry: SessionRegistry) -> None:
    rec = record(new_token())
    rec.host = "host-1"
    await registry.create(rec)
    assert (await registry.get(rec.id)).host == "host-1"
    sink, since = await registry.attachment(rec.id)
    assert sink == "" and since == pytest.approx(rec.created)  # never attached: since it opened
    assert await registry.attach(rec.id, "node-a sid1") == ""
    assert await registry.attachment(rec.id) == ("node-a sid1", None)
    assert await registry.attach(rec.id, "node-b sid2") == "node-a sid1"  # the newest wins
    await registry.detach(rec.id, "node-a sid1", 100.0)  # the old one going changes nothing
    assert await registry.attachment(rec.id) == ("node-b sid2", None)
    await registry.detach(rec.id, "node-b sid2", 200.0)
    assert await registry.attachment(rec.id) == ("", 200.0)
    await registry.delete(rec.id)
    with pytest.raises(KeyError):
        await registry.attachment(rec.id)
