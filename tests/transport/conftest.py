"""Transport tests: in-process async servers on 127.0.0.1:0 spoken to with raw stubs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.servers import LocalServer


@pytest.fixture
def server_defaults() -> dict[str, Any]:
    return {"mode": "async", "grace_s": 1.0}


@pytest.fixture
def harness(start_server) -> LocalServer:
    """An async-mode server with the two-variable SGD model created."""
    h = start_server()
    h.create()
    return h
