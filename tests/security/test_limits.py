"""Every configurable limit is enforced with RESOURCE_EXHAUSTED and a message naming it, and no
2 GiB cap of our own stands in the way of a large tensor (it travels as a stream of chunks)."""

from __future__ import annotations

import json
import os
import threading
import time

import grpc
import numpy as np
import pytest

from paramserve import wire
from paramserve.client import Client
from paramserve.server.config import ServerConfig
from paramserve.server.limits import Limits as ServerLimits
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import parameter_server_pb2_grpc as pb_grpc
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.waiting import count_waiters, wait_until
from tests.support.wire import TIMEOUT_S, chunk_messages

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
HOLD_DEADLINE_S = 120.0  # calls held in flight end when the test lets them, not by deadline
SGD = json.dumps({"class_name": "SGD", "config": {"learning_rate": 0.5}})
GIB = 1 << 30


def _create_requests(variables: dict[str, np.ndarray], optimizer_json: str = SGD):
    header = pb.CreateModelHeader(
        model_name="m",
        optimizer_json=optimizer_json,
        variables=[wire.header_for(n, v) for n, v in variables.items()],
    )
    yield pb.CreateModelRequest(header=header)
    for chunk in chunk_messages(list(variables.values()), chunk_bytes=16 << 10):
        yield pb.CreateModelRequest(chunk=chunk)
    yield pb.CreateModelRequest(end=tpb.StreamEnd())


def _expect(code: grpc.StatusCode, call, *, match: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    assert match in info.value.details(), info.value.details()
    return info.value.details()


class Raw:
    """A raw stub to a server (no SDK: requests the SDK would never build)."""

    def __init__(self, server) -> None:
        self.server = server
        self.address = server.address
        self.channel = grpc.insecure_channel(server.address)
        self.stub = pb_grpc.ParameterServerStub(self.channel)

    def create(self, variables, optimizer_json=SGD):
        return self.stub.CreateModel(_create_requests(variables, optimizer_json), timeout=TIMEOUT_S)

    def status(self):
        return self.stub.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT_S)

    def weights(self) -> tuple[int, dict[str, np.ndarray]]:
        with Client(self.address, wait_for_ready=False) as client:
            pulled = client.pull()
            return pulled.version, {k: np.array(v) for k, v in pulled.items()}


@pytest.fixture
def raw(start_server):
    opened = []

    def make(**limits):
        r = Raw(start_server(**limits))
        opened.append(r)
        return r

    yield make
    for r in opened:
        r.channel.close()


def test_message_size_limit(raw):
    r = raw(max_message_bytes=64 << 10)
    w = np.zeros(64 << 10, np.float32)  # 256 KiB: fine in chunks
    r.create({"w": w})
    before = r.weights()
    header = pb.PushHeader(worker_id="x", sequence=1, tensors=[wire.header_for("w", w)])
    oversized = tpb.TensorChunk(tensor=0, offset=0, data=bytes(w.nbytes))  # one 256 KiB message
    end = pb.PushRequest(end=tpb.StreamEnd())
    push = [pb.PushRequest(header=header), pb.PushRequest(chunk=oversized), end]
    _expect(EXHAUSTED, lambda: r.stub.Push(iter(push), timeout=TIMEOUT_S), match="larger than max")
    big_unary = pb.PullRequest(names=[f"n{i:07d}" for i in range(20_000)])
    _expect(EXHAUSTED, lambda: list(r.stub.Pull(big_unary, timeout=TIMEOUT_S)), match="max")
    assert r.weights()[0] == before[0]
    # The SDK with chunks that fit works against the same server, both ways.
    with Client(r.address, chunk_bytes=32 << 10, wait_for_ready=False) as client:
        client.push({"w": np.ones_like(w)})
        assert client.pull().version == before[0] + 1


def test_tensor_size_limit(raw):
    r = raw(max_tensor_bytes=1024)
    _expect(
        EXHAUSTED,
        lambda: r.create({"w": np.zeros(257, np.float32)}),
        match="max_tensor_bytes=1024",
    )
    r.create({"w": np.zeros((16, 16), np.float32)})  # exactly 1024 bytes
    before = r.weights()
    # Sparse rows can declare more bytes than the variable: refused from the header alone.
    header = tpb.TensorHeader(
        name="w",
        dtype=wire.dtype_to_proto("float32"),
        shape=[16, 16],
        layout=tpb.LAYOUT_SPARSE_ROWS,
        num_rows=100,
        byte_length=100 * (8 + 64),
    )
    push = [pb.PushRequest(header=pb.PushHeader(worker_id="x", sequence=1, tensors=[header]))]
    _expect(
        EXHAUSTED,
        lambda: r.stub.Push(iter(push), timeout=TIMEOUT_S),
        match="over the server's limit of max_tensor_bytes=1024",
    )
    version, values = r.weights()
    assert version == before[0]
    np.testing.assert_array_equal(values["w"], before[1]["w"])


def test_request_size_limit(raw):
    r = raw(max_request_bytes=1500)
    variables = {"a": np.zeros(256, np.float32), "b": np.zeros(256, np.float32)}
    _expect(EXHAUSTED, lambda: r.create(variables), match="max_request_bytes=1500")
    assert r.status().has_model is False


def test_variable_count_limit(raw):
    r = raw(max_variables=2)
    variables = {f"v{i}": np.zeros(2, np.float32) for i in range(3)}
    _expect(EXHAUSTED, lambda: r.create(variables), match="max_variables=2")
    assert r.status().has_model is False
    r.create({"v0": np.zeros(2, np.float32), "v1": np.zeros(2, np.float32)})


def test_state_size_limit(raw, tmp_path):
    r = raw(max_state_bytes=3000, checkpoint_dir=tmp_path / "ckpt")
    adam = json.dumps({"class_name": "Adam", "config": {}})
    # 1 KiB of weights is fine for SGD, but Adam's two slots make it 3 KiB.
    _expect(
        EXHAUSTED,
        lambda: r.create({"w": np.zeros(256, np.float32)}, adam),
        match="(max_state_bytes)",
    )
    assert r.status().has_model is False
    upload = [pb.UploadSnapshotRequest(header=pb.UploadSnapshotHeader(size_bytes=4000))]
    _expect(
        EXHAUSTED,
        lambda: r.stub.UploadSnapshot(iter(upload), timeout=TIMEOUT_S),
        match="max_state_bytes=3000",
    )


def test_concurrent_call_limit(raw):
    """Calls in flight past max_concurrent_streams are refused, not queued without end."""
    r = raw(max_concurrent_streams=2)
    r.create({"w": np.zeros(2, np.float32)})
    waiting = count_waiters(r.server.core.store)
    held: list[object] = []

    def hold() -> None:
        with grpc.insecure_channel(r.address) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            try:  # waits for version 1, which only the test makes (below)
                items = list(stub.Pull(pb.PullRequest(min_version=1), timeout=HOLD_DEADLINE_S))
                held.append(items[0].header.version)
            except grpc.RpcError as err:
                held.append(err.code())

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: waiting() == 2)  # both holders are in flight, parked on the server
    _expect(EXHAUSTED, r.status, match="Concurrent RPC limit exceeded")
    # Version 1, applied in-process (an RPC would be refused now): the holders get it.
    store = r.server.core.store
    store.apply(store.validate_push({"w": np.ones(2, np.float32)}))
    for t in threads:
        t.join(TIMEOUT_S)
    assert held == [1, 1]  # they were the two in flight, and were answered
    # The slots free up once the server has ended the holders' calls: it answers again.
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            assert r.status().has_model
            break
        except grpc.RpcError as err:
            assert err.code() == EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.05)


# -- no 2 GiB cap ------------------------------------------------------------------------


def test_default_limits_allow_tensors_over_2_gib():
    limits = ServerLimits()
    assert limits.max_tensor_bytes > 3 * GIB
    assert limits.max_request_bytes > 3 * GIB
    assert limits.max_state_bytes > 3 * GIB


def _huge_header(nbytes: int) -> tpb.TensorHeader:
    return tpb.TensorHeader(
        name="w",
        dtype=wire.dtype_to_proto("float32"),
        shape=[nbytes // 4],
        layout=tpb.LAYOUT_DENSE,
        byte_length=nbytes,
    )


def test_a_3_gib_header_passes_validation():
    header = _huge_header(3 * GIB)
    wire.check_headers([header], max_tensor_bytes=ServerLimits().max_tensor_bytes)
    assert wire.expected_bytes(header) == 3 * GIB
    # Chunk offsets past 2 and 4 GiB survive the raw chunk codec both ways.
    for offset in (2 * GIB + 4, 5 * GIB):
        raw = wire.encode_chunk_item(0, offset, b"abcd")
        tensor, got, data = wire.decode_chunk_item(raw)
        assert (tensor, got, bytes(data)) == (0, offset, b"abcd")


def test_a_3_gib_create_model_is_accepted_until_its_data_runs_out(raw):
    """The server takes the 3 GiB header (no RESOURCE_EXHAUSTED), then reports the stream
    that ended without data; nothing is created. Only virtual memory is reserved."""
    r = raw()
    header = pb.CreateModelHeader(
        model_name="m", optimizer_json=SGD, variables=[_huge_header(3 * GIB)]
    )
    first = tpb.TensorChunk(tensor=0, offset=0, data=bytes(4 << 20))
    requests = [pb.CreateModelRequest(header=header), pb.CreateModelRequest(chunk=first)]
    _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda: r.stub.CreateModel(iter(requests), timeout=TIMEOUT_S),
        match="ended early",
    )
    assert r.status().has_model is False


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("PARAMSERVE_TEST_HUGE") != "1",
    reason="needs ~8 GiB RAM and ~20 s: set PARAMSERVE_TEST_HUGE=1",
)
def test_a_real_2_1_gib_tensor_round_trip(start_server):
    n = (2 * GIB + 100 * (1 << 20)) // 4
    server = start_server()
    with Client(server.address, wait_for_ready=False, timeout_s=300) as client:
        w = np.zeros(n, np.float32)
        client.create_model(
            {"w": w}, optimizer={"class_name": "SGD", "config": {"learning_rate": 0.5}}
        )
        del w
        g = np.ones(n, np.float32)
        assert client.push({"w": g}).version == 1
        del g
        pulled = client.pull()
        assert pulled.version == 1 and pulled["w"].shape == (n,)
        assert np.all(pulled["w"] == np.float32(-0.5))


def test_limits_reach_the_server_config():
    config = ServerConfig().replace(max_tensor_bytes="3GiB", max_concurrent_streams=7)
    assert config.limits.max_tensor_bytes == 3 * GIB
    assert config.limits.max_concurrent_streams == 7
