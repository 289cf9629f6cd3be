"""Fewer bytes on the wire: gradients and weights as bfloat16 or float16, opted in."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from paramserve.client import InvalidArgumentError
from paramserve.client.streams import request_stream
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.asserts import assert_same

BF16 = np.dtype(ml_dtypes.bfloat16)
N = 1000


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((N // 10, 10)).astype(np.float32),
        "b": rng.standard_normal(7).astype(np.float32),
    }


def _grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((N // 10, 10)) * 1e-2).astype(np.float32),
        "b": (rng.standard_normal(7) * 3).astype(np.float32),
    }


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("call", ["push", "step"])
def test_compressed_push_equals_a_float32_push_of_the_rounded_gradient(
    start_server, connect, wire_dtype, call
):
    """Bit for bit, Adam's slots included: the server upcasts and applies in float32."""
    dtype = np.dtype(BF16 if wire_dtype == "bfloat16" else np.float16)
    compressed = connect(start_server(mode="async"), error_feedback=False)
    exact = connect(start_server(mode="async"))
    for client in (compressed, exact):
        client.create_model(_weights(), "adam")
    for seed in range(3):
        grads = _grads(seed)
        rounded = {n: g.astype(dtype).astype(np.float32) for n, g in grads.items()}
        getattr(compressed, call)(grads, wire_dtype=wire_dtype)
        getattr(exact, call)(rounded)
    assert_same(compressed.pull(), exact.pull())
    assert_same(compressed.optimizer_state(), exact.optimizer_state())

    assert compressed.pull()["w"].dtype == np.float32


def test_client_setting_and_per_call_override(start_server, connect):
    server = start_server(mode="async")
    client = connect(server, wire_dtype="bfloat16", error_feedback=False)
    client.create_model({"w": np.zeros(4, np.float32)}, "sgd")
    client.set_hyperparameters(learning_rate=1.0)
    third = np.full(4, 1 / 3, np.float32)
    client.push({"w": third})  # the client's bfloat16
    _same(client.pull(wire_dtype=None)["w"], -third.astype(BF16).astype(np.float32))
    client.push({"w": third}, wire_dtype=None)  # exact for this call
    expected = -third.astype(BF16).astype(np.float32) - third
    _same(client.pull(wire_dtype=None)["w"], expected)
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        client.push({"w": third}, wire_dtype="int8")
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        connect(server, wire_dtype="float64")


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
def test_pulled_weights_are_the_servers_rounded(start_server, connect, wire_dtype):
    dtype = np.dtype(BF16 if wire_dtype == "bfloat16" else np.float16)
    client = connect(start_server(mode="async"))
    client.create_model({**_weights(), "d": np.arange(3, dtype=np.float64) / 3}, "adam")
    client.push(_grads(1))
    exact = client.pull()
    pulled = client.pull(wire_dtype=wire_dtype)
    assert pulled.version == exact.version
    _same(pulled["w"], exact["w"].astype(dtype).astype(np.float32))
    _same(pulled["b"], exact["b"].astype(dtype).astype(np.float32))
    _same(pulled["d"], exact["d"])  # float64 travels as it is
    # Into the caller's arrays, and selected rows.
    out = {"w": np.empty_like(exact["w"])}
    into = client.pull(["w"], out=out, wire_dtype=wire_dtype)
    assert into["w"] is out["w"]
    _same(out["w"], pulled["w"])
    rows = client.pull(rows={"w": [3, 0]}, wire_dtype=wire_dtype)["w"]
    _same(rows.values, pulled["w"][[3, 0]])
    # A step's weights too.
    stepped = client.step({"b": np.zeros(7, np.float32)}, wire_dtype=wire_dtype)
    _same(stepped["w"], client.pull(wire_dtype=None)["w"].astype(dtype).astype(np.float32))


def test_a_bfloat16_gradient_without_opt_in_is_a_dtype_mismatch(start_server, connect):
    client = connect(start_server(mode="async"))
    client.create_model({"w": np.zeros(4, np.float32)}, "sgd")
    before = client.pull()
    header = pb.PushHeader(worker_id="raw", sequence=1, session="s", tensors=[_bf16_header("w", 4)])
    request = pb.StepRequest(push=header)
    request.gradients.add().data = np.ones(4, BF16).tobytes()
    with pytest.raises(InvalidArgumentError) as caught:
        client._call("Step", client._stub.Step, request, None)
    assert caught.value.reason == "DTYPE_MISMATCH"
    assert "wire_dtype=BFLOAT16" in str(caught.value)
    # The same as a streamed Push.
    first = pb.PushRequest(header=header).SerializeToString()
    with pytest.raises(InvalidArgumentError) as caught:
        client._send_stream(
            "Push",
            client._push,
            lambda: request_stream(first, [np.ones(4, BF16)], chunk_bytes=1024),
            None,
        )
    assert caught.value.reason == "DTYPE_MISMATCH"
    # float16 on the wire while the push opted in to bfloat16: still refused.
    header.wire_dtype = tpb.BFLOAT16
    header.tensors[0].dtype = tpb.FLOAT16
    request = pb.StepRequest(push=header)
    request.gradients.add().data = np.ones(4, np.float16).tobytes()
    with pytest.raises(InvalidArgumentError) as caught:
        client._call("Step", client._stub.Step, request, None)
    assert caught.value.reason == "DTYPE_MISMATCH"
    # An unsupported opt-in is refused by name.
    request.push.wire_dtype = tpb.INT32
    with pytest.raises(InvalidArgumentError, match="wire_dtype 5 is not supported"):
        client._call("Step", client._stub.Step, request, None)
    assert_same(client.pull(), before)


def _bf16_header(name: str, n: int) -> tpb.TensorHeader:
    return tpb.TensorHeader(name=name, dtype=tpb.BFLOAT16, shape=[n], byte_length=2 * n)


def _same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()
