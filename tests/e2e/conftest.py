"""Fixtures for end-to-end tests: real servers on loopback port 0, spawned worker processes."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from paramserve.client import Client
from paramserve.server.app import RunningServer, create_server
from paramserve.server.config import ServerConfig


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """``start_server(mode=..., replicas=...)``: a running server, stopped after the test."""
    servers: list[RunningServer] = []

    def start(**overrides: object) -> RunningServer:
        settings: dict[str, object] = {
            "port": 0,
            "checkpoint_dir": tmp_path / f"checkpoints-{len(servers)}",
            "snapshot_on_exit": False,
            "log_level": "warning",
        }
        settings.update(overrides)
        server = create_server(ServerConfig().replace(**settings))
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


@pytest.fixture(scope="session")
def worker_pool() -> Iterator[ProcessPoolExecutor]:
    """Three spawned worker processes shared by the suite (spawning costs ~1 s each)."""
    with ProcessPoolExecutor(max_workers=3, mp_context=mp.get_context("spawn")) as pool:
        yield pool
