"""The HTTP API: /service, /permalink, /p, /health, /metrics, OpenAPI, CORS, JSON errors."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway, GatewayFactory


@pytest.fixture
async def http(gw: Gateway) -> AsyncIterator[aiohttp.ClientSession]:
    # A plain session: pytest-aiohttp's client would close the shared server after the test.
    async with aiohttp.ClientSession(base_url=gw.url + "/") as session:
        yield session


async def test_service_runs_code_and_returns_everything(http: aiohttp.ClientSession) -> None:
    r = await http.post(
        "/service",
        json={
            "code": "import sys\nprint('out')\nprint('err', file=sys.stderr)\nopen('r.txt','w').write('file!')\n40 + 2"
        },
    )
    assert r.status == 200
    body = await r.json()
    assert body["success"] is True
    assert body["stdout"] == "out\n" and body["stderr"] == "err\n"
    assert {
        "msg_type": "execute_result",
        "content": {"data": {"text/plain": "42"}, "metadata": {}, "execution_count": 0},
    } in body["outputs"] or any(
        o["msg_type"] == "execute_result" and o["content"]["data"]["text/plain"] == "42" for o in body["outputs"]
    )
    assert [f["name"] for f in body["files"]] == ["r.txt"]
    got = await http.get(body["files"][0]["url"])
    assert await got.read() == b"file!"
    assert body["permalink"]["url"].startswith("/p/")
    assert "error" not in body


async def test_service_accepts_a_form(http: aiohttp.ClientSession) -> None:
    r = await http.post("/service", data={"code": "print(3 * 3)"})
    assert (await r.json())["stdout"] == "9\n"


async def test_service_reports_code_errors(http: aiohttp.ClientSession) -> None:
    body = await (await http.post("/service", json={"code": "raise ValueError('nope')"})).json()
    assert body["success"] is False
    assert body["error"]["ename"] == "ValueError" and body["error"]["evalue"] == "nope"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"json": {"no": "code"}}, 400, "bad_message"),
        ({"json": {"code": 5}}, 400, "bad_message"),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_message"),
        ({"json": ["code"]}, 400, "bad_message"),
    ],
)
async def test_service_bad_input(http: aiohttp.ClientSession, payload: dict[str, Any], status: int, code: str) -> None:
    r = await http.post("/service", **payload)
    assert r.status == status
    assert (await r.json())["error"]["code"] == code


async def test_service_too_large(http: aiohttp.ClientSession, gw: Gateway) -> None:
    r = await http.post("/service", json={"code": "#" * (gw.config.message_limit + 1)})
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "too_large"


async def test_service_timeout(start_gateway: GatewayFactory, aiohttp_client: Any) -> None:
    gw = await start_gateway(service_timeout=1.5)
    http = await aiohttp_client(gw.server)
    r = await http.post("/service", json={"code": "import time\ntime.sleep(30)"})
    assert r.status == 504
    assert (await r.json())["error"]["code"] == "timeout"
    assert (await gw.health())["sessions"] == 0  # the kernel was reclaimed


async def test_service_over_capacity(start_gateway: GatewayFactory, aiohttp_client: Any) -> None:
    gw = await start_gateway(sessions_per_client=1, service_timeout=10)
    http = await aiohttp_client(gw.server)
    slow = asyncio.ensure_future(http.post("/service", json={"code": "import time\ntime.sleep(2)"}))
    for _ in range(100):
        if (await gw.health())["sessions"]:
            break
        await asyncio.sleep(0.02)
    r = await http.post("/service", json={"code": "1"})
    assert r.status == 429
    assert (await r.json())["error"]["code"] == "capacity_client"
    assert (await slow).status == 200


async def test_permalink_roundtrip(http: aiohttp.ClientSession) -> None:
    r = await http.post("/permalink", json={"code": "print('shared')", "language": "python"})
    assert r.status == 201
    made = await r.json()
    again = await (await http.post("/permalink", json={"code": "print('shared')"})).json()
    assert again["id"] == made["id"]
    got = await (await http.get(f"/permalink/{made['id']}")).json()
    assert got["code"] == "print('shared')" and got["language"] == "python"
    page = await http.get(f"/p/{made['id']}")
    assert page.status == 200 and page.content_type == "text/html"
    text = await page.text()
    assert _page_code(text) == "print('shared')"
    # It runs through the embed, loaded from the server's root, not from under /p/.
    assert '<script src="/static/cellgate.js"></script>' in text


def _page_code(text: str) -> str:
    found = re.search(r'<script type="application/json" id="cellgate-code">(.*?)</script>', text, re.S)
    assert found, "the page carries its code"
    return json.loads(found.group(1))


async def test_permalink_page_escapes_code(http: aiohttp.ClientSession) -> None:
    code = "</script><script>alert(1)</script><!--"
    made = await (await http.post("/permalink", json={"code": code})).json()
    text = await (await http.get(f"/p/{made['id']}")).text()
    assert "<script>alert(1)" not in text and "<!--" not in text
    assert _page_code(text) == code


async def test_unknown_permalink_is_json_404(http: aiohttp.ClientSession) -> None:
    for path in ("/permalink/AAAAAAAAAAAAAAAAAAAA", "/permalink/../../etc", "/p/nope"):
        r = await http.get(path)
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"


async def test_unknown_route_and_file_are_json_404(http: aiohttp.ClientSession) -> None:
    for path in ("/nothing-here", "/files/abc/def.txt"):
        r = await http.get(path)
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"


async def test_health(http: aiohttp.ClientSession) -> None:
    body = await (await http.get("/health")).json()
    assert body["status"] == "ok" and body["protocol"] == "cellgate/1"
    assert "isolation" in body and "kernels" in body


async def test_health_fails_when_kernels_cannot_start(start_gateway: GatewayFactory, aiohttp_client: Any) -> None:
    from kernels.kernel import KernelSpec
    from kernels.pool import KernelPool

    broken = KernelPool({"python3": KernelSpec(name="no-such-kernel-spec")}, size=1, max_kernels=2)
    broken.start()
    gw = await start_gateway(kernel_pool=broken)
    http = await aiohttp_client(gw.server)
    for _ in range(100):
        r = await http.get("/health")
        if r.status != 200:
            break
        await asyncio.sleep(0.1)
    assert r.status == 503
    body = await r.json()
    assert body["status"] == "unavailable" and body["error"]["message"]
    await broken.close()


async def metrics(http: aiohttp.ClientSession) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = await (await http.get("/metrics")).text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_what_happened(http: aiohttp.ClientSession) -> None:
    shell_in = ("cellgate_messages_total", frozenset({("channel", "shell"), ("direction", "to_kernel")}))
    runs = ("cellgate_execution_seconds_count", frozenset())
    bad = ("cellgate_errors_total", frozenset({("code", "bad_message")}))
    before = await metrics(http)
    for _ in range(3):
        assert (await http.post("/service", json={"code": "1"})).status == 200
    for _ in range(2):
        assert (await http.post("/service", json={"nope": 1})).status == 400
    after = await metrics(http)
    assert after[shell_in] - before.get(shell_in, 0) == 3
    assert after[runs] - before.get(runs, 0) == 3
    assert after[bad] - before.get(bad, 0) == 2
    assert after[("cellgate_kernels", frozenset({("state", "warm")}))] >= 0


async def test_openapi_describes_every_route(http: aiohttp.ClientSession, gw: Gateway) -> None:
    doc = await (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    routes = {
        r.resource.canonical
        for r in gw.server.app.router.routes()
        if r.resource is not None and not r.resource.canonical.startswith(("/socket.io", "/static"))
    }
    assert routes <= set(doc["paths"]), routes - set(doc["paths"])


async def test_index_page_and_the_embed_bundle(http: aiohttp.ClientSession) -> None:
    r = await http.get("/")
    text = await r.text()
    assert r.status == 200 and '<script src="/static/cellgate.js"></script>' in text
    assert 'id="examples"' in text
    # The stable names: a short cache and an ETag that answers 304 once nothing changed.
    r = await http.get("/static/cellgate.js", headers={"Origin": "https://blog.example"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/javascript")
    assert r.headers["Cache-Control"] == "public, max-age=300"
    assert r.headers["Access-Control-Allow-Origin"] == "*"  # an ES module import needs CORS
    body = await r.read()
    again = await http.get("/static/cellgate.js", headers={"If-None-Match": r.headers["ETag"]})
    assert again.status == 304
    # What it loads is named by its content and cached for good.
    frame = re.search(rb"cellgate-frame-[A-Z0-9]{8}\.js", body)
    assert frame, "the bundle names its output frame's script"
    r = await http.get("/static/" + frame.group().decode())
    assert r.status == 200 and r.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    r = await http.get("/static/cellgate.mjs")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/javascript")
    for path in ("/static/page.html", "/static/nope.js", "/static/..%2Fconfig.py"):
        r = await http.get(path)
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_cors_is_open_by_default(http: aiohttp.ClientSession) -> None:
    r = await http.options(
        "/service", headers={"Origin": "https://blog.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
    r = await http.get("/health", headers={"Origin": "https://blog.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = await http.get("/socket.io/?EIO=4&transport=polling", headers={"Origin": "https://blog.example"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] in ("*", "https://blog.example")


async def test_cors_can_be_narrowed(start_gateway: GatewayFactory, aiohttp_client: Any) -> None:
    gw = await start_gateway(cors_origins="https://ok.example")
    http = await aiohttp_client(gw.server)
    r = await http.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = await http.get("/health", headers={"Origin": "https://ok.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    r = await http.get("/socket.io/?EIO=4&transport=polling", headers={"Origin": "https://evil.example"})
    assert r.status == 400


async def test_public_url_makes_links_absolute(start_gateway: GatewayFactory, aiohttp_client: Any) -> None:
    gw = await start_gateway(public_url="https://cells.example/")
    http = await aiohttp_client(gw.server)
    body = await (await http.post("/service", json={"code": "open('a.txt','w').write('a')"})).json()
    assert body["permalink"]["url"].startswith("https://cells.example/p/")
    assert body["files"][0]["url"].startswith("https://cells.example/files/")
