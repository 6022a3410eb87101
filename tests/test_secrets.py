"""Kernels never see the server's secrets; logs never show tokens or kernel keys."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import ClientFactory, Gateway


async def test_kernel_environment_has_no_server_secrets(
    connect: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set before the kernel starts: the shared pool may already hold warm kernels, so
    # check the allow-list itself and a kernel's real environment.
    from kernels.environment import kernel_environment

    monkeypatch.setenv("CELLGATE_REDIS", "redis://:hunter2@10.0.0.1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("MY_API_TOKEN", "tok")
    env = kernel_environment("/w", "/s", "/c")
    assert not [k for k in env if any(w in k for w in ("CELLGATE", "AWS", "TOKEN", "REDIS", "SECRET"))]
    c = await connect()
    run = await c.execute("import os\nsorted(os.environ)")
    names = eval(run.result["text/plain"])  # a list of strings printed by the kernel
    assert not [n for n in names if n.startswith(("CELLGATE", "AWS")) or "TOKEN" in n or "SECRET" in n]


async def test_kernel_never_gets_its_key_to_the_client(connect: ClientFactory, gw: Gateway) -> None:
    c = await connect()
    await c.execute("1")
    key = gw.kernel_of(c)._manager.session.key.decode()
    assert key
    assert all(key not in repr(d) for _, d in c.events)


async def test_logs_never_contain_tokens_or_keys(
    connect: ClientFactory, gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    c = await connect()
    await c.execute("import os; os._exit(1)", wait=False)
    await c.wait_event("kernel", state="dead", timeout=10)
    await c.execute("1", timeout=30)
    key = gw.kernel_of(c)._manager.session.key.decode()
    await c.drop()
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert c.token not in text
    assert key not in text
