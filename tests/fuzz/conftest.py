"""Three live daemons (one per non-finite policy) shared by the fuzz suite (its summary line is
printed by tests/fuzz/report.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from paramserve.v1 import parameter_server_pb2 as pb

from .live import TIMEOUT_S, LiveServer, State

POLICIES = ("reject", "skip", "allow")


@dataclass
class Servers:
    """``by_policy[p]``: a server with nonfinite=p. Only the 'reject' one keeps snapshots."""

    by_policy: dict[str, LiveServer]
    # A valid snapshot file of the 'reject' server and the state it holds.
    snapshot_bytes: bytes
    snapshot_state: State

    def __getitem__(self, policy: str) -> LiveServer:
        return self.by_policy[policy]

    def __repr__(self) -> str:  # short: hypothesis prints the fixture in failure reports
        return f"<Servers {sorted(self.by_policy)}>"


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    # Our own folder: pytest's numbered temp folders are pruned by other pytest sessions.
    tmp = Path(tempfile.mkdtemp(prefix="paramserve-fuzz-"))
    started = {
        p: LiveServer.start(p, tmp, nonfinite=p, snapshots=(p == "reject")) for p in POLICIES
    }
    try:
        for server in started.values():
            server.connect()
            server.create_model()
        reject = started["reject"]
        info = reject.stub.CreateSnapshot(pb.CreateSnapshotRequest(), timeout=TIMEOUT_S)
        data = b"".join(
            c.data
            for c in reject.stub.DownloadSnapshot(
                pb.DownloadSnapshotRequest(id=info.id), timeout=TIMEOUT_S
            )
        )
        yield Servers(started, data, reject.state())
        for server in started.values():
            server.assert_healthy()
    finally:
        codes = {name: server.stop() for name, server in started.items()}
        shutil.rmtree(tmp, ignore_errors=True)
    assert codes == dict.fromkeys(POLICIES, 0), f"exit statuses after SIGTERM: {codes}"


@pytest.fixture(autouse=True)
def _servers_survive(request) -> Iterator[None]:
    """After every test that used them: each server alive, SERVING, nothing logged as error."""
    yield
    if "servers" in request.fixturenames:
        for server in request.getfixturevalue("servers").by_policy.values():
            server.assert_healthy()
