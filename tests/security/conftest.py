"""Security tests: in-process async servers on 127.0.0.1:0 (with TLS and/or tokens from
tests/support/credentials), and no tokens from the developer's shell."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def server_defaults() -> dict[str, Any]:
    return {"mode": "async", "grace_s": 0.5}


@pytest.fixture(autouse=True)
def _no_ambient_tokens(monkeypatch) -> None:
    """Tokens of the developer's shell must not leak into these tests."""
    for name in ("PARAMSERVE_TOKEN", "PARAMSERVE_ADMIN_TOKEN", "PARAMSERVE_WORKER_TOKEN"):
        monkeypatch.delenv(name, raising=False)
