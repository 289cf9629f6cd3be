"""Real in-process servers on 127.0.0.1:0 and raw-stub helpers (no SDK) for transport tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from paramserve import wire
from paramserve.server.app import RunningServer, create_server
from paramserve.server.config import ServerConfig
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from paramserve.v1 import tensor_pb2 as tpb

TIMEOUT_S = 20.0
SGD_JSON = json.dumps({"class_name": "SGD", "config": {"learning_rate": 0.5}})


def initial_variables() -> dict[str, np.ndarray]:
    return {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([0.5, -0.5], dtype=np.float32),
    }


def grads_for(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), scale, dtype=np.float32),
        "b": np.array([scale, 2 * scale], dtype=np.float32),
    }


def create_model_requests(
    variables: dict[str, np.ndarray],
    *,
    optimizer_json: str = SGD_JSON,
    name: str = "m",
    chunk_bytes: int = wire.CHUNK_BYTES,
) -> Iterator[pb.CreateModelRequest]:
    headers = [wire.header_for(n, v) for n, v in variables.items()]
    yield pb.CreateModelRequest(
        header=pb.CreateModelHeader(
            model_name=name, optimizer_json=optimizer_json, variables=headers
        )
    )
    for chunk in wire.chunk_messages(list(variables.values()), chunk_bytes=chunk_bytes):
        yield pb.CreateModelRequest(chunk=chunk)
    yield pb.CreateModelRequest(end=tpb.StreamEnd())


def push_requests(
    grads: dict[str, wire.TensorValue],
    *,
    worker_id: str = "w0",
    sequence: int = 1,
    base_version: int = 0,
    headers: list[tpb.TensorHeader] | None = None,
) -> list[pb.PushRequest]:
    if headers is None:
        headers = [wire.header_for(n, v) for n, v in grads.items()]
    items = [
        pb.PushRequest(
            header=pb.PushHeader(
                worker_id=worker_id, sequence=sequence, base_version=base_version, tensors=headers
            )
        )
    ]
    items += [pb.PushRequest(chunk=c) for c in wire.chunk_messages(list(grads.values()))]
    return [*items, pb.PushRequest(end=tpb.StreamEnd())]


def read_stream(items) -> tuple[int, dict[str, wire.TensorValue]]:
    """Decode a TensorStreamItem stream (header then chunks) into (version, tensors)."""
    it = iter(items)
    first = next(it)
    assert first.WhichOneof("item") == "header"
    headers = list(first.header.tensors)
    assembler = wire.TensorAssembler(headers)
    for item in it:
        assembler.add(item.chunk.tensor, item.chunk.offset, item.chunk.data)
    return first.header.version, assembler.finish()


def pull(stub, **kwargs) -> tuple[int, dict[str, wire.TensorValue]]:
    return read_stream(stub.Pull(pb.PullRequest(**kwargs), timeout=TIMEOUT_S))


class Harness:
    """One running server plus a raw stub to it."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.address)
        self.stub = pb_grpc.ParameterServerStub(self.channel)

    def create(self, variables: dict[str, np.ndarray] | None = None, **kwargs):
        variables = initial_variables() if variables is None else variables
        return self.stub.CreateModel(create_model_requests(variables, **kwargs), timeout=TIMEOUT_S)

    def push(self, grads, **kwargs) -> pb.PushResponse:
        return self.stub.Push(iter(push_requests(grads, **kwargs)), timeout=TIMEOUT_S)

    def pull(self, **kwargs):
        return pull(self.stub, **kwargs)

    def state(self) -> tuple[int, dict[str, np.ndarray]]:
        """Version and a copy of every weight (the 'before' of an error test)."""
        version, values = self.pull()
        return version, {k: np.array(v) for k, v in values.items()}

    def assert_unchanged(self, before: tuple[int, dict[str, np.ndarray]]) -> None:
        """The server still answers, at the same version with bit-identical weights."""
        version, values = self.state()
        assert version == before[0]
        assert values.keys() == before[1].keys()
        for name, value in values.items():
            np.testing.assert_array_equal(value, before[1][name], strict=True)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def start_server(tmp_path) -> Iterator[Callable[..., Harness]]:
    """Factory: ``start_server(**config_fields)`` -> Harness; everything stops at teardown."""
    harnesses: list[Harness] = []

    def start(**changes) -> Harness:
        config = ServerConfig(host="127.0.0.1", port=0, grace_s=1.0).replace(mode="async")
        harness = Harness(create_server(config.replace(**changes)))
        harnesses.append(harness)
        return harness

    yield start
    for harness in harnesses:
        harness.close()
        harness.server.stop(0)


@pytest.fixture
def harness(start_server) -> Harness:
    """An async-mode server with the two-variable SGD model created."""
    h = start_server()
    h.create()
    return h


def expect_error(code: grpc.StatusCode, call: Callable[[], object], *, match: str = "") -> str:
    """Run ``call``; assert it fails with ``code`` and a message containing ``match``."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    assert match.lower() in (err.details() or "").lower(), err.details()
    return err.details()
