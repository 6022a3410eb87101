"""Files the code writes are stored and linked; links the kernel plants are refused."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp

from gateway.client import Client, Refused
from tests.conftest import ClientFactory, Gateway, GatewayFactory


async def fetch(gw: Gateway, url: str) -> tuple[int, bytes, str]:
    async with aiohttp.ClientSession() as http, http.get(gw.url + url) as r:
        return r.status, await r.read(), r.headers.get("Content-Type", "")


async def test_written_files_are_reported_and_served(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    run = await c.execute(
        "import os\nos.makedirs('out', exist_ok=True)\n"
        "open('out/data.csv', 'w').write('a,b\\n1,2\\n')\n"
        "open('blob.bin', 'wb').write(bytes(range(256)))\n"
    )
    files = {f["name"]: f for f in await c.wait_files(run)}
    assert set(files) == {"out/data.csv", "blob.bin"}
    assert files["out/data.csv"]["size"] == 8 and files["out/data.csv"]["mime"] == "text/csv"
    status, body, ctype = await fetch(gw, files["blob.bin"]["url"])
    assert status == 200 and body == bytes(range(256))
    assert ctype == "application/octet-stream"
    status, body, ctype = await fetch(gw, files["out/data.csv"]["url"])
    assert body == b"a,b\n1,2\n" and ctype.startswith("text/csv")
    # URLs are unguessable: a random token per file.
    token = files["blob.bin"]["url"].split("/")[2]
    assert len(token) >= 22


async def test_only_new_or_changed_files_are_reported(connect: ClientFactory) -> None:
    c = await connect()
    first = await c.execute("open('a.txt', 'w').write('1')\nopen('b.txt', 'w').write('2')")
    assert {f["name"] for f in await c.wait_files(first)} == {"a.txt", "b.txt"}
    second = await c.execute("open('b.txt', 'w').write('22')")
    assert [f["name"] for f in await c.wait_files(second)] == ["b.txt"]
    third = await c.execute("x = 1")
    run_events = [e for e, d in c.events if e == "files" and d["msg_id"] == third.msg_id]
    assert run_events == []


async def test_symlinks_planted_by_the_kernel_are_not_followed(connect: ClientFactory, gw: Gateway, tmp_path) -> None:
    secret = tmp_path / "server-only.txt"
    secret.write_text("server secret")
    c = await connect()
    run = await c.execute(
        "import os\n"
        f"os.symlink({str(secret)!r}, 'leak.txt')\n"
        "os.symlink('/proc/self/environ', 'environ')\n"
        "os.symlink('/etc', 'etcdir')\n"
        "open('real.txt', 'w').write('fine')\n"
    )
    files = await c.wait_files(run)
    assert [f["name"] for f in files] == ["real.txt"]
    for f in files:
        _, body, _ = await fetch(gw, f["url"])
        assert b"server secret" not in body


async def test_hard_links_to_outside_files_are_refused(connect: ClientFactory) -> None:
    c = await connect()
    # A hard link into the working directory from a file of the kernel's outside it (the
    # host refuses links to files a kernel does not own). Where the working directory
    # is a filesystem of its own (the disk quota), the host refuses the link itself.
    run = await c.execute(
        "import os\noutside = os.path.join(os.environ['IPYTHONDIR'], 'profile_default', 'outside.txt')\n"
        "open(outside, 'w').write('elsewhere')\n"
        "try:\n    os.link(outside, 'linked.txt')\nexcept OSError as e:\n    print(e.strerror)\n"
        "open('ok.txt','w').write('ok')"
    )
    files = {f["name"]: f for f in await c.wait_files(run)}
    assert files["ok.txt"]["url"]
    if run.stdout != "Invalid cross-device link\n":
        assert files["linked.txt"]["url"] is None and files["linked.txt"]["error"]["code"] == "bad_filename"
    else:
        assert "linked.txt" not in files


async def test_per_file_cap(start_gateway: GatewayFactory, transport: list[str]) -> None:
    from gateway.client import Client

    gw = await start_gateway(file_cap=1000, session_file_cap=1500)
    c = Client(gw.url, transports=transport)
    await c.connect()
    run = await c.execute("open('big.bin','wb').write(b'x' * 2000)\nopen('small.bin','wb').write(b'y' * 900)")
    files = {f["name"]: f for f in await c.wait_files(run)}
    assert files["big.bin"]["url"] is None and files["big.bin"]["error"]["code"] == "file_too_large"
    assert files["small.bin"]["url"]
    # The session cap: 900 used of 1500, so another 900 does not fit.
    run = await c.execute("open('more.bin','wb').write(b'z' * 900)")
    more = (await c.wait_files(run))[0]
    assert more["url"] is None and more["error"]["code"] == "file_too_large"
    await c.drop()
    await gw.end_sessions()


async def test_workdir_is_removed_when_the_session_ends(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    workdir = (await c.execute("open('x','w').write('x')\nimport os\nos.getcwd()")).result["text/plain"].strip("'")
    assert os.path.isdir(workdir)
    await c.shutdown()
    assert not os.path.exists(workdir)


async def test_upload_over_socket(connect: ClientFactory) -> None:
    c = await connect()
    ack = await c.upload("input.txt", b"uploaded bytes")
    assert ack["ok"] and ack["size"] == 14
    run = await c.execute("print(open('input.txt').read())")
    assert run.stdout == "uploaded bytes\n"
    # The client's own upload is not reported back as a generated file.
    assert not [d for e, d in c.events if e == "files"]
    for bad in ("../escape", "a/b", "", "."):
        try:
            await c.upload(bad, b"x")
        except Refused as exc:
            assert exc.code == "bad_filename"
        else:
            raise AssertionError(f"upload name {bad!r} was accepted")


async def test_upload_does_not_write_through_a_planted_symlink(connect: ClientFactory, tmp_path) -> None:
    target = tmp_path / "victim.txt"
    target.write_text("original")
    c = await connect()
    await c.execute(f"import os\nos.symlink({str(target)!r}, 'trap.txt')")
    try:
        await c.upload("trap.txt", b"overwritten")
    except Refused as exc:
        assert exc.code == "bad_filename"
    else:
        raise AssertionError("upload wrote through a symlink")
    assert target.read_text() == "original"


async def test_upload_over_http(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    form = aiohttp.FormData()
    form.add_field("file", b"a,b\n", filename="table.csv", content_type="text/csv")
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url + "/upload", data=form, headers={"Authorization": f"Bearer {c.token}"}) as r:
            assert r.status == 200
            assert (await r.json())["files"] == [{"name": "table.csv", "size": 4}]
        form = aiohttp.FormData()
        form.add_field("file", b"x", filename="t.csv")
        async with http.post(gw.url + "/upload", data=form, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "token_invalid"
    run = await c.execute("print(open('table.csv').read(), end='')")
    assert run.stdout == "a,b\n"


async def test_a_failed_store_is_retried_and_told(start_gateway: GatewayFactory, tmp_path) -> None:
    from gateway.client import Client

    store = tmp_path / "store"
    gw = await start_gateway(store_dir=str(store))
    blocker = store / "files"
    blocker.write_text("a file where the store wants a directory")  # every put fails for now
    c = Client(gw.url)
    await c.connect()
    run = await c.execute("open('late.txt', 'w').write('eventually')")
    first = (await c.wait_files(run))[0]
    assert first["url"] is None and first["error"]["code"] == "store_failed"
    blocker.unlink()  # the store recovers
    start = len(c.events)
    later = await c.wait_event("files", timeout=20, start=start, msg_id=run.msg_id)
    entry = later["files"][0]
    assert entry["name"] == "late.txt" and entry["url"] and "error" not in entry
    status, body, _ = await fetch(gw, entry["url"])
    assert status == 200 and body == b"eventually"
    await c.drop()
    await gw.end_sessions()


async def test_stored_files_go_after_their_retention_and_permalinks_stay(
    start_gateway: GatewayFactory, transport: list[str]
) -> None:
    gw = await start_gateway(file_retention=1.0)
    async with Client(gw.url, transports=transport) as c, aiohttp.ClientSession() as http:
        run = await c.execute("open('kept.txt', 'w').write('soon gone')")
        (stored,) = await c.wait_files(run)
        permalink = run.permalink["url"]
        async with http.get(gw.url + stored["url"]) as r:
            assert r.status == 200
        status, body = 200, {}
        for _ in range(60):  # swept every quarter of the retention
            async with http.get(gw.url + stored["url"]) as r:
                status, body = r.status, await r.read()
            if status == 404:
                break
            await asyncio.sleep(0.1)
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        async with http.get(gw.url + permalink) as r:
            assert r.status == 200  # permalinks are kept unless configured otherwise
