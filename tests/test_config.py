"""Every setting is a flag and an environment variable; --help lists them all."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from gateway.config import Config, parse


def test_defaults_match_the_design() -> None:
    c = parse([], environ={})
    assert (c.host, c.port, c.pool_size, c.max_kernels) == ("127.0.0.1", 8888, 2, 50)
    assert (c.resume_grace, c.idle_timeout, c.lifespan) == (60.0, 900.0, 1800.0)
    assert c.sessions_per_client == 5 and c.service_timeout == 30.0
    assert c.message_limit == 1024 * 1024
    # A Plotly figure (about 10 MB with its HTML) fits one message and one execution.
    assert c.output_cap == c.kernel_message_limit == 16 * 1024 * 1024
    assert (c.file_cap, c.session_file_cap) == (10 * 1024 * 1024, 50 * 1024 * 1024)
    assert c.cors == "*"
    assert c.transport_limit > c.message_limit


def test_environment_then_flags() -> None:
    env = {"CELLGATE_PORT": "9000", "CELLGATE_POOL_SIZE": "0", "CELLGATE_CORS_ORIGINS": "https://a.example"}
    c = parse([], environ=env)
    assert (c.port, c.pool_size, c.cors) == (9000, 0, ["https://a.example"])
    assert parse(["--port", "9100"], environ=env).port == 9100


def test_bad_values_are_refused_clearly() -> None:
    with pytest.raises(SystemExit, match="CELLGATE_PORT"):
        parse([], environ={"CELLGATE_PORT": "eighty"})
    with pytest.raises(SystemExit, match="pool-size"):
        parse(["--pool-size", "-1"], environ={})


def test_help_lists_every_setting_with_its_variable() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway", "--help"], capture_output=True, text=True, check=True).stdout
    for f in dataclasses.fields(Config):
        assert "--" + f.name.replace("_", "-") in out
        assert "CELLGATE_" + f.name.upper() in out


def test_the_client_buffer_holds_a_whole_replay() -> None:
    # Otherwise a resume would trip the slow-client bound with the log's own events.
    with pytest.raises(SystemExit, match="client-buffer"):
        parse(["--client-buffer", str(32 << 20)], environ={})
    assert parse(["--client-buffer", str(48 << 20), "--replay-bytes", str(16 << 20)], environ={}).client_buffer


def test_store_settings_are_checked() -> None:
    env = {"CELLGATE_S3_BUCKET": "cells", "CELLGATE_S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    c = parse([], environ=env)
    assert (c.s3_bucket, c.s3_prefix, c.file_delivery, c.presign_expiry) == ("cells", "cellgate", "redirect", 300.0)
    assert c.spool_path.endswith("cellgate-data/spool")
    for flags, complaint in (
        (["--file-delivery", "inline"], "file-delivery"),
        (["--presign-expiry", "0"], "presign-expiry"),
        (["--presign-expiry", str(8 * 86400)], "presign-expiry"),
        (["--s3-prefix", "a b"], "s3-prefix"),
        (["--spool-size", "1000"], "spool-size"),
    ):
        with pytest.raises(SystemExit, match=complaint):
            parse(flags, environ=env)


def test_a_redis_password_is_refused_on_the_command_line_but_taken_from_the_environment() -> None:
    url = "redis://cellgate:hunter2@127.0.0.1:6379/0"
    with pytest.raises(SystemExit, match="CELLGATE_REDIS"):
        parse(["--redis", url], environ={})
    assert parse([], environ={"CELLGATE_REDIS": url}).redis == url
    assert parse(["--redis", "redis://127.0.0.1:6379"], environ={}).redis  # no secret in it
    with pytest.raises(SystemExit, match="redis://"):
        parse(["--redis", "http://127.0.0.1:6379"], environ={})
    with pytest.raises(SystemExit, match="rediss://"):
        parse(["--redis", "redis://127.0.0.1", "--redis-ca-file", "/ca.pem"], environ={})
