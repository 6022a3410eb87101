"""Files and permalinks through either blob store: the same tests pass on both.

The S3 side is moto's server over HTTP (tests/s3server.py). Tests that need S3 to go
away (an outage, a spool that outlives its process) pause that server for real.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import botocore.exceptions
import pytest

from gateway.client import Client
from gateway.stores import StoreUnavailable
from gateway.stores.s3 import S3Store
from tests.conftest import Gateway, GatewayFactory
from tests.s3server import REGION, S3Server, s3_server

FILES = (
    "open('data.bin', 'wb').write(bytes(range(256)))\n"
    "open('page.html', 'w').write('<script>document.title = 1</script>')\n"
    "open('pic.svg', 'w').write('<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"alert(1)\"/>')\n"
)


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Settings for a node on this test's store; every node started with them shares it."""
    settings: dict[str, Any] = {"store_dir": str(tmp_path / "data")}
    if request.param == "s3":
        settings |= request.getfixturevalue("s3").settings()
    return settings


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def fetch(http: aiohttp.ClientSession, gw: Gateway, url: str) -> tuple[int, bytes, dict[str, str]]:
    """Follows a redirect the way a browser does: to S3, without the gateway's headers."""
    async with http.get(gw.url + url) as r:
        return r.status, await r.read(), dict(r.headers)


async def test_files_open_on_every_node_and_permalinks_after_a_restart(
    start_gateway: GatewayFactory, store_settings: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    a = await start_gateway(**store_settings)
    b = await start_gateway(**store_settings)
    async with Client(a.url) as c:
        run = await c.execute(FILES + "print('ran')")
        files = {f["name"]: f for f in await c.wait_files(run)}
        permalink = await c.wait_event("permalink", msg_id=run.msg_id)
    assert set(files) == {"data.bin", "page.html", "pic.svg"}
    for f in files.values():
        assert f["url"].startswith("/files/") and "Amz" not in f["url"]  # nothing in the log expires
    for node in (a, b):
        status, body, headers = await fetch(http, node, files["data.bin"]["url"])
        assert (status, body, headers["Content-Type"]) == (200, bytes(range(256)), "application/octet-stream")
        # Active content is a download, whoever serves the bytes.
        for name, mime in (("page.html", "text/html"), ("pic.svg", "image/svg+xml")):
            status, body, headers = await fetch(http, node, files[name]["url"])
            assert status == 200 and headers["Content-Type"].startswith(mime)
            assert headers["Content-Disposition"] == f'attachment; filename="{name}"'
    status, body, _ = await fetch(http, b, files["data.bin"]["url"].rsplit("/", 2)[0] + "/nothing/data.bin")
    assert status == 404 and b'"not_found"' in body

    await a.server.close()  # the node that stored it goes away; a new one starts
    c_node = await start_gateway(**store_settings)
    async with http.get(c_node.url + f"/permalink/{permalink['id']}") as r:
        assert r.status == 200 and (await r.json())["code"].startswith(FILES)
    async with http.get(c_node.url + permalink["url"]) as r:
        assert r.status == 200 and "print('ran')" in await r.text()


async def test_caps_links_and_retention_hold_on_either_store(
    start_gateway: GatewayFactory, store_settings: dict[str, Any], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    secret = tmp_path / "server-only.txt"
    secret.write_text("server secret")
    gw = await start_gateway(file_cap=1000, session_file_cap=1500, file_retention=2, **store_settings)
    async with Client(gw.url) as c:
        run = await c.execute(
            f"import os\nos.symlink({str(secret)!r}, 'leak.txt')\n"
            "open('big.bin', 'wb').write(b'x' * 2000)\nopen('small.bin', 'wb').write(b'y' * 900)"
        )
        files = {f["name"]: f for f in await c.wait_files(run)}
        permalink = await c.wait_event("permalink", msg_id=run.msg_id)
        more = await c.execute("open('more.bin', 'wb').write(b'z' * 900)")  # 1,800 > the session's 1,500
        (over,) = await c.wait_files(more)
        await c.shutdown()
    assert set(files) == {"big.bin", "small.bin"}  # the planted link is not followed
    assert files["big.bin"]["url"] is None and files["big.bin"]["error"]["code"] == "file_too_large"
    assert over["url"] is None and over["error"]["code"] == "file_too_large"
    status, body, _ = await fetch(http, gw, files["small.bin"]["url"])
    assert (status, body) == (200, b"y" * 900)
    await asyncio.sleep(3.1)  # past the retention (S3 keeps whole seconds)
    status, body, _ = await fetch(http, gw, files["small.bin"]["url"])
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    async with http.get(gw.url + permalink["url"]) as r:
        assert r.status == 200  # permalinks are kept unless configured otherwise


async def test_a_late_resume_gets_links_that_still_work(
    start_gateway: GatewayFactory, store_settings: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(presign_expiry=1, **store_settings)
    async with Client(gw.url) as c:
        run = await c.execute("open('late.txt', 'w').write('still here')")
        await c.wait_files(run)
        await c.drop()
        await asyncio.sleep(2.5)  # past the presigned URL's expiry
        start = len(c.events)
        await c.resume(seq=0)
        replayed = await c.wait_event("files", timeout=10, start=start, msg_id=run.msg_id)
        status, body, _ = await fetch(http, gw, replayed["files"][0]["url"])
        assert (status, body) == (200, b"still here")
        await c.shutdown()


async def test_s3_links_redirect_to_a_fresh_presigned_url_or_go_through_the_gateway(
    start_gateway: GatewayFactory, s3: S3Server, http: aiohttp.ClientSession
) -> None:
    redirecting = await start_gateway(presign_expiry=120, **s3.settings())
    proxying = await start_gateway(file_delivery="proxy", **s3.settings())
    for gw in (redirecting, proxying):
        async with Client(gw.url) as c:
            run = await c.execute("open('t.csv', 'w').write('a,b')")
            (entry,) = await c.wait_files(run)
            await c.shutdown()
        async with http.get(gw.url + entry["url"], allow_redirects=False) as r:
            if gw is redirecting:
                assert r.status == 302 and r.headers["Cache-Control"] == "no-store"
                location = r.headers["Location"]
                assert location.startswith(s3.url) and "X-Amz-Expires=120" in location
            else:
                assert r.status == 200 and await r.read() == b"a,b"
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["Content-Security-Policy"] == "sandbox"


def stored_entries(c: Client, msg_id: str) -> list[dict[str, Any]]:
    return [f for e, d in c.events if e == "files" and d["msg_id"] == msg_id for f in d["files"] if f["url"]]


async def wait_stored(c: Client, msg_id: str, names: set[str], timeout: float = 30) -> dict[str, list[str]]:
    """name -> every URL the client was given for it, once every name has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got: dict[str, list[str]] = {}
        for f in stored_entries(c, msg_id):
            got.setdefault(f["name"], []).append(f["url"])
        if set(got) >= names:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"not all of {names} were stored: {stored_entries(c, msg_id)}")


async def test_an_s3_outage_loses_no_file_and_stores_none_twice(
    start_gateway: GatewayFactory, s3: S3Server, http: aiohttp.ClientSession
) -> None:
    settings = s3.settings()
    gw = await start_gateway(store_timeout=1, **settings)
    async with Client(gw.url) as c:
        before = await c.execute("open('before.txt', 'w').write('0')")
        assert [f["url"] is not None for f in await c.wait_files(before)] == [True]
        with s3.paused():
            runs = []
            for i in range(3):  # executions go on and stream while S3 is away
                run = await c.execute(f"print('run {i}')\nopen('during-{i}.txt', 'w').write('{i}' * 1000)")
                assert run.stdout == f"run {i}\n"
                (entry,) = await c.wait_files(run, timeout=10)
                assert entry["url"] is None and entry["error"]["code"] == "store_failed"
                runs.append(run)
            async with http.post(gw.url + "/service", json={"code": "open('svc.txt', 'w').write('s')"}) as r:
                body = await r.json()
            assert r.status == 200 and body["success"] and body["files"][0]["url"] is None
        for i, run in enumerate(runs):
            got = await wait_stored(c, run.msg_id, {f"during-{i}.txt"})
            assert len(got[f"during-{i}.txt"]) == 1  # told once
            status, data, _ = await fetch(http, gw, got[f"during-{i}.txt"][0])
            assert (status, data) == (200, str(i).encode() * 1000)
        await c.shutdown()
    # Every file is in the bucket exactly once: before, three during, and the /service one.
    expected = sorted([b"0", b"s", *(str(i).encode() * 1000 for i in range(3))])
    for _ in range(150):
        if sorted(stored := s3.objects(settings["s3_prefix"] + "/files").values()) == expected:
            break
        await asyncio.sleep(0.2)
    assert sorted(stored) == expected


async def test_the_spool_outlives_its_process_and_says_when_it_is_full(
    start_gateway: GatewayFactory, s3: S3Server, tmp_path: Path
) -> None:
    settings = s3.settings() | {"spool_dir": str(tmp_path / "spool"), "store_timeout": 1}
    # Room for three blobs: this run's permalink and two of its three files.
    gw = await start_gateway(file_cap=4096, spool_size=3 * 4096, **settings)
    with s3.paused():
        async with Client(gw.url) as c:
            run = await c.execute("for n in 'abc':\n    open(n + '.txt', 'w').write(n * 100)")
            files = {f["name"]: f["error"]["message"] for f in await c.wait_files(run, timeout=15)}
            assert len(files) == 3
            full = [name for name, message in files.items() if "spool is full" in message]
            assert len(full) == 1  # told, never dropped in silence
            await c.drop()
        await gw.server.close()  # the node stops with two files still waiting
    await start_gateway(**settings)  # its successor uploads them
    waited = {n: n.encode() * 100 for n in "abc" if f"{n}.txt" not in full}
    spool = tmp_path / "spool"
    for _ in range(150):
        stored = sorted(s3.objects(settings["s3_prefix"] + "/files").values())
        if stored == sorted(waited.values()) and not list(spool.iterdir()):  # the permalink went too
            break
        await asyncio.sleep(0.2)
    assert stored == sorted(waited.values()) and list(spool.iterdir()) == []


def policy(name: str, bucket: str, prefix: str) -> str:
    text = (Path(__file__).parent.parent / "infra" / name).read_text()
    return text.replace("BUCKET", bucket).replace("PREFIX", prefix)


async def test_the_documented_least_privilege_policy_is_all_a_node_needs(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    # moto checks IAM policies once its first 7 calls (the set-up below) are done.
    with s3_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "7"}, bucket="cellgate-iam") as server:
        setup = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        server.client(**setup).create_bucket(Bucket=server.bucket)
        iam = boto3.client("iam", endpoint_url=server.url, region_name=REGION, **setup)
        keys = {}
        for user, document in (
            ("gateway", policy("s3-gateway-policy.json", server.bucket, "cg")),
            (
                "admin",
                json.dumps(
                    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
                ),
            ),
        ):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=document)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        admin = server.client(**keys["admin"])
        # The documented lifecycle rule is one S3 accepts.
        rules = json.loads(policy("s3-lifecycle.json", server.bucket, "cg"))
        admin.put_bucket_lifecycle_configuration(Bucket=server.bucket, LifecycleConfiguration=rules)

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["gateway"]["aws_access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["gateway"]["aws_secret_access_key"])
        # moto cannot check a presigned URL under IAM; the bytes go through the node here.
        gw = await start_gateway(file_delivery="proxy", **server.settings(prefix="cg"))
        async with Client(gw.url) as c:
            run = await c.execute("open('t.txt', 'w').write('least privilege')")
            (entry,) = await c.wait_files(run)
            await c.shutdown()
        status, body, _ = await fetch(http, gw, entry["url"])
        assert (status, body) == (200, b"least privilege")
        async with http.post(gw.url + "/permalink", json={"code": "1"}) as r:
            assert r.status == 201
            pid = (await r.json())["id"]
        async with http.get(gw.url + f"/permalink/{pid}") as r:
            assert r.status == 200
        status, body, _ = await fetch(http, gw, entry["url"].rsplit("/", 2)[0] + "/missing/t.txt")
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"

        # What the policy leaves out, S3 refuses: a listing, and anything outside the prefix,
        # where S3's 403 for a key the node may not see still reads as "no such blob".
        gateway_client = server.client(**keys["gateway"])
        with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
            gateway_client.list_objects_v2(Bucket=server.bucket)
        admin.put_object(Bucket=server.bucket, Key="elsewhere/files/x/y.txt", Body=b"not yours")
        outside = S3Store(server.bucket, "elsewhere", server.url, REGION, timeout=5)
        try:
            assert await outside.head("files/x/y.txt") is None
            with pytest.raises(StoreUnavailable):
                await outside.put("files/x/z.txt", b"no", "text/plain")
        finally:
            await outside.close()
