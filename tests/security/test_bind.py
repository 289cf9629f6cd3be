"""Loopback by default; one clear WARNING per missing protection on a non-loopback address."""

from __future__ import annotations

import logging

import pytest

from paramserve.client import Client
from paramserve.server.app import is_loopback
from paramserve.server.config import ServerConfig
from tests.support.credentials import ADMIN_TOKEN, write_tokens_file


def _warnings(caplog) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "paramserve.server.app" and r.levelno >= logging.WARNING
    ]


def test_default_host_is_loopback():
    assert ServerConfig().host == "127.0.0.1"
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))


def test_loopback_bind_does_not_warn(start_server, caplog):
    caplog.set_level(logging.WARNING)
    start_server()
    assert _warnings(caplog) == []


def test_open_bind_warns_once_about_tls_and_once_about_tokens(start_server, caplog):
    caplog.set_level(logging.WARNING)
    server = start_server(host="0.0.0.0")
    warnings = _warnings(caplog)
    assert len(warnings) == 2
    no_tls, no_auth = (w.getMessage() for w in warnings)
    assert "without TLS" in no_tls and "--tls-cert" in no_tls and "\n" not in no_tls
    assert "without authentication" in no_auth and "--tokens-file" in no_auth
    assert "PARAMSERVE_ADMIN_TOKEN" in no_auth and "\n" not in no_auth
    assert [w.event for w in warnings] == ["insecure_no_tls", "insecure_no_auth"]
    # It serves (we only ever connect through loopback).
    with Client(f"127.0.0.1:{server.port}", wait_for_ready=False, timeout_s=10) as client:
        assert client.status().version == 0


@pytest.mark.parametrize("protected", ["tls", "tokens", "both"])
def test_open_bind_warns_only_about_what_is_missing(start_server, caplog, pki, tmp_path, protected):
    caplog.set_level(logging.WARNING)
    changes: dict = {}
    if protected in ("tls", "both"):
        changes.update(tls_cert=pki.server_cert, tls_key=pki.server_key)
    if protected in ("tokens", "both"):
        changes.update(tokens_file=write_tokens_file(tmp_path / "t.toml"))
    server = start_server(host="0.0.0.0", **changes)
    events = [w.event for w in _warnings(caplog)]
    expected = {"tls": ["insecure_no_auth"], "tokens": ["insecure_no_tls"], "both": []}
    assert events == expected[protected]
    tls = {"tls_ca": pki.ca} if protected != "tokens" else {}
    with Client(
        f"127.0.0.1:{server.port}", wait_for_ready=False, timeout_s=10, token=ADMIN_TOKEN, **tls
    ) as client:
        assert client.status().version == 0
