"""The suite's shared fixtures (a pytest plugin, loaded by tests/conftest.py).

Servers in this process (``start_server``, with per-folder defaults from ``server_defaults``),
server and worker processes (``procs``, ``start_process``), clients (``connect``) and the test
CA (``pki``). Everything a fixture starts is stopped at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from paramserve.client import Client

from .credentials import Pki, make_pki
from .processes import Processes, ServerProcess
from .servers import LocalServer, LocalServers


@pytest.fixture
def server_defaults() -> dict[str, Any]:
    """Configuration fields every ``start_server`` call starts from; a folder's conftest
    overrides this fixture to give its tests their own defaults."""
    return {}


@pytest.fixture
def start_server(server_defaults: dict[str, Any]) -> Iterator[Callable[..., LocalServer]]:
    """``start_server(**config_fields)``: a running in-process server on 127.0.0.1:0 (see
    :class:`~tests.support.servers.LocalServer`), stopped after the test."""
    servers = LocalServers(server_defaults)
    try:
        yield servers.start
    finally:
        servers.stop_all()


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    """``connect(server, **client_options)``: a Client, closed after the test."""
    clients: list[Client] = []

    def open_client(server: Any, **options: Any) -> Client:
        options.setdefault("timeout_s", 30.0)
        client = Client(server.address, **options)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """Start servers (``procs.server(*flags)``) and workers; all are killed at teardown."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


@pytest.fixture
def start_process(procs: Processes) -> Callable[..., ServerProcess]:
    """``start_process(*flags, log_format="json")``: a running server subprocess on port 0,
    killed after the test if alive."""
    return procs.server


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test CA and certificates, made once per session."""
    return make_pki(tmp_path_factory.mktemp("pki"))
