"""The SDK's wire details: pre-encoded chunks equal protobuf's bytes; no gRPC retries."""

from __future__ import annotations

import numpy as np
import pytest

from paramserve import wire as tensors
from paramserve.client import Client
from paramserve.client.channel import ChannelSettings, method_path
from paramserve.client.resend import RESENT_METHODS
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb
from paramserve.wire import SERVICE_NAME as SERVICE
from tests.support.asserts import assert_same


@pytest.mark.parametrize(
    ("tensor", "offset", "size"),
    [(0, 0, 0), (0, 0, 5), (1, 0, 300), (7, 1 << 40, 1), (2**32 - 1, 2**63, 3)],
)
def test_encoded_chunks_are_protobufs_bytes_and_decode_back(tensor, offset, size):
    data = np.arange(size, dtype=np.uint8).tobytes()
    raw = tensors.encode_chunk_item(tensor, offset, memoryview(data))
    chunk = tpb.TensorChunk(tensor=tensor, offset=offset, data=data)
    assert raw == pb.PushRequest(chunk=chunk).SerializeToString()
    assert raw == tpb.TensorStreamItem(chunk=chunk).SerializeToString()
    t, o, view = tensors.decode_chunk_item(raw)
    assert (t, o, bytes(view)) == (tensor, offset, data)


def test_decoder_leaves_anything_else_to_protobuf():
    header = tpb.TensorStreamItem(header=tpb.TensorStreamHeader(version=3)).SerializeToString()
    assert tensors.decode_chunk_item(header) is None
    raw = tensors.encode_chunk_item(1, 2, b"abc")
    assert tensors.decode_chunk_item(raw[:-1]) is None  # truncated
    assert tensors.decode_chunk_item(raw + b"\x20\x01") is None  # trailing field
    assert tensors.decode_chunk_item(b"\x12\x02\x20\x01") is None  # unknown chunk field
    assert tensors.decode_chunk_item(b"\x12\x04\x08\x01\x08\x02") is None  # field twice
    assert tensors.decode_chunk_item(b"") is None


def test_grpc_retries_are_off_and_only_safe_methods_are_resent():
    """gRPC's retry filter is not in the channel (it aborts the process or truncates client
    streams when it replays them; see channel.py): the SDK resends, for these methods only."""
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    assert RESENT_METHODS.issubset(m.name for m in service.methods)
    assert not RESENT_METHODS & {
        "CreateModel", "DeleteModel", "SetHyperparameters", "SetOptimizerState",
        "CreateSnapshot", "RestoreSnapshot", "UploadSnapshot",
    }  # fmt: skip
    options = dict(ChannelSettings().options())
    assert options["grpc.enable_retries"] == 0 and options["grpc.keepalive_time_ms"] > 0
    assert "grpc.service_config" not in options
    assert "grpc.per_rpc_retry_buffer_size" not in options
    assert method_path("Push") == f"/{SERVICE}/Push"


def test_multi_chunk_tensors_travel_both_ways(start_server, connect):
    """Pushes in 64 KiB chunks; a 9 MiB variable comes back in several server chunks."""
    server = start_server(mode="async")
    client = connect(server, chunk_bytes=64 << 10)
    big = np.random.default_rng(0).normal(size=(1536, 1536)).astype(np.float32)
    client.create_model({"big": big, "small": np.zeros(3, np.float32)}, "sgd")
    assert_same(client.pull(["big"]), {"big": big})
    grad = np.random.default_rng(1).normal(size=big.shape).astype(np.float32)
    client.push({"big": grad})
    expected = big - np.float32(0.01) * grad
    assert_same(client.pull(["big"]), {"big": expected})
    client.push({"big": np.asfortranarray(grad)})  # non-contiguous input is made contiguous
    assert_same(client.pull(["big"]), {"big": expected - np.float32(0.01) * grad})


def test_client_options_are_checked():
    with pytest.raises(ValueError, match="chunk_bytes"):
        Client(chunk_bytes=64 << 20)
    with pytest.raises(ValueError, match="timeout_s"):
        Client(timeout_s=0)
