"""Fixtures for the PyTorch adapter's tests: real servers on loopback port 0, tiny modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from paramserve.client import Client
from paramserve.server.app import RunningServer, create_server
from paramserve.server.config import ServerConfig


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """``start_server(**settings)``: an in-process server (async unless told), stopped after."""
    servers: list[RunningServer] = []

    def start(**overrides: object) -> RunningServer:
        settings: dict[str, object] = {
            "port": 0,
            "mode": "async",
            "checkpoint_dir": tmp_path / f"checkpoints-{len(servers)}",
            "snapshot_on_exit": False,
            "log_level": "warning",
        }
        settings.update(overrides)
        server = create_server(ServerConfig().replace(**settings))  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace_s=0)


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    """``connect(server, **client_options)``: a Client, closed after the test."""
    clients: list[Client] = []

    def open_client(server: RunningServer, **options: object) -> Client:
        options.setdefault("timeout_s", 30.0)
        client = Client(server.address, **options)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()
