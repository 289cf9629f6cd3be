"""A live daemon in a subprocess, raw stubs to it, and a fingerprint of its whole state.

The server runs as ``python -m paramserve.server serve --port 0`` so that a crash, a hang or
a traceback on its stderr is observable; requests go through the raw generated stub (or as raw
bytes), never the SDK, so anything can be sent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.processes import ServerProcess

from . import spec

TIMEOUT_S = 10.0
SERVICE = "paramserve.v1.ParameterServer"

# Generated cases per family, for the summary line (see conftest.pytest_terminal_summary).
CASES: Counter[str] = Counter()
REJECTED: Counter[str] = Counter()
CODES: Counter[str] = Counter()


def record(family: str, code: grpc.StatusCode) -> None:
    CASES[family] += 1
    CODES[code.name] += 1
    if code is not grpc.StatusCode.OK:
        REJECTED[family] += 1


@dataclass(frozen=True)
class State:
    """Everything a request could change, compared bit for bit."""

    version: int
    weights: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    # worker_id -> (last_sequence, pushes); workers only seen (never recorded) are left out.
    workers: dict[str, tuple[int, int]]
    hyperparameters: dict[str, float]
    optimizer_json: str
    # Snapshot ids and every file in the checkpoint directory (no leftover temp files).
    snapshots: tuple[str, ...] = ()
    files: tuple[str, ...] = ()

    def differences(self, other: State) -> list[str]:
        out = []
        for name in ("version", "workers", "snapshots", "files"):
            if getattr(self, name) != getattr(other, name):
                out.append(f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}")
        if not _same_floats(self.hyperparameters, other.hyperparameters):
            out.append(f"hyperparameters: {self.hyperparameters} != {other.hyperparameters}")
        if json.loads(self.optimizer_json) != json.loads(other.optimizer_json):
            out.append("optimizer_json differs")
        for name in ("weights", "optimizer_state"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine.keys() != theirs.keys():
                out.append(f"{name} keys: {sorted(mine)} != {sorted(theirs)}")
                continue
            out += [f"{name}[{k!r}] differs" for k in mine if not _same_array(mine[k], theirs[k])]
        return out

    def evolve(self, **changes: Any) -> State:
        return replace(self, **changes)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _same_floats(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        np.float64(a[k]).tobytes() == np.float64(b[k]).tobytes() for k in a
    )


def read_tensor_stream(items: Iterable[tpb.TensorStreamItem]) -> tuple[int, dict[str, Any]]:
    """Decode a Pull reply (header then chunks) without the SDK's assembler."""
    it = iter(items)
    first = next(it)
    headers = list(first.header.tensors)
    payloads = [bytearray() for _ in headers]
    for item in it:
        assert item.chunk.offset == len(payloads[item.chunk.tensor])
        payloads[item.chunk.tensor] += item.chunk.data
    out = {h.name: spec.decode(h, bytes(p)) for h, p in zip(headers, payloads, strict=True)}
    return first.header.version, out


@dataclass(repr=False)
class LiveServer:
    """One ``paramserve serve`` subprocess (tests.support's :class:`ServerProcess`) with a raw
    stub to it."""

    name: str
    nonfinite: str
    server: ServerProcess
    checkpoint_dir: Path | None
    address: str = ""
    # The state after the last checked case (saves one read per case), and the last sequence
    # number handed out for pushes.
    cached_state: State | None = None
    sequence: int = 0
    channel: grpc.Channel = field(init=False)
    stub: pb_grpc.ParameterServerStub = field(init=False)

    def __repr__(self) -> str:  # short: hypothesis prints the fixture in failure reports
        return f"<LiveServer {self.name} at {self.address}>"

    @classmethod
    def start(cls, name: str, tmp: Path, *, nonfinite: str, snapshots: bool) -> LiveServer:
        """Start the daemon without waiting for it (:meth:`connect` waits)."""
        checkpoint_dir = tmp / f"{name}-checkpoints" if snapshots else None
        args = ["--mode", "async", "--nonfinite", nonfinite, "--grace-s", "2"]
        args += ["--no-snapshot-on-exit", *spec.LIMIT_FLAGS]
        if checkpoint_dir is not None:
            args += ["--checkpoint-dir", str(checkpoint_dir)]
        server = ServerProcess(args, cwd=tmp, wait=False)
        return cls(name, nonfinite, server, checkpoint_dir)

    @property
    def process(self) -> subprocess.Popen:
        return self.server.proc

    def connect(self, timeout_s: float = 60.0) -> None:
        """Wait for the daemon to listen, then open the channel."""
        self.server.wait_listening(timeout_s)
        self.address = self.server.address
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.ParameterServerStub(self.channel)

    def stderr(self) -> str:
        return self.server.stderr

    # -- raw calls -------------------------------------------------------------------------

    def raw(self, method: str, kind: str):
        """A callable sending bytes as they are (no serializer) to ``method``."""
        path = f"/{SERVICE}/{method}"
        factory = {
            "unary_unary": self.channel.unary_unary,
            "unary_stream": self.channel.unary_stream,
            "stream_unary": self.channel.stream_unary,
        }[kind]
        return factory(path, request_serializer=None, response_deserializer=None)

    def create_model(self) -> None:
        self.stub.CreateModel(iter(spec.create_messages()), timeout=TIMEOUT_S)

    # -- state -----------------------------------------------------------------------------

    def state(self) -> State:
        version, weights = read_tensor_stream(self.stub.Pull(pb.PullRequest(), timeout=TIMEOUT_S))
        state_version, optimizer_state = read_tensor_stream(
            self.stub.Pull(pb.PullRequest(scope=pb.PULL_SCOPE_OPTIMIZER_STATE), timeout=TIMEOUT_S)
        )
        assert state_version == version
        status = self.stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S)
        assert status.version == version
        workers = {
            w.worker_id: (w.last_sequence, w.pushes)
            for w in status.workers
            if w.last_sequence or w.pushes
        }
        described = self.stub.Describe(pb.DescribeRequest(), timeout=TIMEOUT_S)
        snapshots: tuple[str, ...] = ()
        files: tuple[str, ...] = ()
        if self.checkpoint_dir is not None:
            listed = self.stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=TIMEOUT_S)
            snapshots = tuple(s.id for s in listed.snapshots)
            files = tuple(sorted(os.listdir(self.checkpoint_dir)))
        return State(
            version=version,
            weights=weights,
            optimizer_state=optimizer_state,
            workers=workers,
            hyperparameters=dict(described.hyperparameters),
            optimizer_json=described.optimizer_json,
            snapshots=snapshots,
            files=files,
        )

    # -- health ----------------------------------------------------------------------------

    def assert_healthy(self) -> None:
        """Alive, health SERVING, and no traceback or ERROR line on stderr so far."""
        assert self.process.poll() is None, f"server {self.name} died:\n{self.stderr()[-4000:]}"
        health = health_pb2_grpc.HealthStub(self.channel)
        for service in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert not self.problems(), "\n".join(self.problems())[-4000:]

    def problems(self) -> list[str]:
        """Log lines with an error, a warning or a traceback (the log is one JSON object a line)."""
        out = []
        for line in self.stderr().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {"level": "unstructured", "message": line}
            if entry.get("level") not in ("debug", "info") or "traceback" in entry:
                out.append(line)
        return out

    def stop(self) -> int:
        """SIGTERM, then the exit status (the process must exit within a bounded time)."""
        try:
            return self.server.stop(timeout_s=30)
        finally:
            if hasattr(self, "channel"):
                self.channel.close()


# Codes only the daemon answers with: each must carry a google.rpc.Status with an ErrorInfo.
# (gRPC itself may end a call with RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED or
# UNAVAILABLE, without details.)
DAEMON_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
    }
)


def check_details(exc: grpc.RpcError) -> None:
    """A failed call's google.rpc.Status, if any, matches it and holds one paramserve ErrorInfo."""
    status = rpc_status.from_call(exc)  # raises ValueError if its code or message differ
    if status is None:
        assert exc.code() not in DAEMON_CODES, f"{exc.code()} without details: {exc.details()}"
        return
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == "paramserve.v1" and re.fullmatch(r"[A-Z][A-Z0-9_]*", info.reason), info


def call_code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str, Any]:
    """``(code, details, reply)``; a server-streaming reply is drained into a list. A failure's
    error details are checked (:func:`check_details`)."""
    try:
        reply = fn(*args, **kwargs)
        if isinstance(reply, grpc.Call) and hasattr(reply, "__iter__"):
            reply = list(reply)
        return grpc.StatusCode.OK, "", reply
    except grpc.RpcError as exc:
        check_details(exc)
        return exc.code(), exc.details() or "", None
