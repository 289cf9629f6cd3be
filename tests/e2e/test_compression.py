"""Fewer bytes on the wire: gradients and weights as bfloat16 or float16, opted in."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from paramserve.client import Float16OverflowError, InvalidArgumentError
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


def _drift(start_server, connect, *, call: str, feedback: bool, pushes: int) -> float:
    """|sum of the gradients the server applied - sum of the true ones| after ``pushes``
    compressed pushes of 1/3, which bfloat16 cannot represent (SGD, learning rate 1)."""
    client = connect(start_server(mode="async"), wire_dtype="bfloat16", error_feedback=feedback)
    client.create_model({"w": np.zeros(8, np.float32)}, "sgd")
    client.set_hyperparameters(learning_rate=1.0)
    third = np.full(8, 1 / 3, np.float32)
    for _ in range(pushes):
        getattr(client, call)({"w": third})
    # Every applied value is a multiple of 2**-9 below 64: the sums are exact in float32.
    applied = -client.pull(wire_dtype=None)["w"].astype(np.float64)
    true = pushes * np.float64(third[0])
    return float(np.max(np.abs(applied - true)))


@pytest.mark.parametrize("call", ["push", "step"])
def test_error_feedback_keeps_the_sum_within_one_rounding(start_server, connect, call):
    one_rounding = 2.0**-9  # a bfloat16 ulp between 0.25 and 0.5
    pushes = 100
    with_feedback = _drift(start_server, connect, call=call, feedback=True, pushes=pushes)
    without = _drift(start_server, connect, call=call, feedback=False, pushes=pushes)
    assert with_feedback <= one_rounding
    # Without feedback every push adds the same rounding error: the bias accumulates.
    bias = float(np.float64(np.float32(1 / 3).astype(BF16)) - np.float64(np.float32(1 / 3)))
    assert without == pytest.approx(pushes * abs(bias), rel=1e-6)
    assert without > 30 * one_rounding


def test_residual_is_kept_only_for_taken_pushes_and_reset_on_restore(start_server, connect):
    client = connect(start_server(mode="async", nonfinite="reject"), wire_dtype="bfloat16")
    client.create_model({"w": np.zeros(4, np.float32)}, "sgd")
    third = np.full(4, 1 / 3, np.float32)
    client.push({"w": third})
    residual = client.error_feedback.residual("w")
    _same(residual, third - third.astype(BF16).astype(np.float32))
    snap = client.snapshot()
    with pytest.raises(InvalidArgumentError):  # refused: the residual stays as it was
        client.push({"w": np.array([np.nan, 0, 0, 0], np.float32)})
    _same(client.error_feedback.residual("w"), residual)
    client.restore(snap)
    assert client.error_feedback.residual("w") is None


@pytest.mark.parametrize("call", ["push", "step"])
def test_bfloat16_overflow_is_a_nonfinite_gradient(start_server, connect, call):
    """float32's largest values round to Inf in bfloat16: the server sees Inf after the
    upcast and its non-finite policy applies as to any Inf gradient."""
    big = np.array([np.finfo(np.float32).max, 1.0], np.float32)
    assert np.isinf(big.astype(BF16)[0])
    client = connect(start_server(mode="async", nonfinite="reject"), wire_dtype="bfloat16")
    client.create_model({"w": np.zeros(2, np.float32)}, "sgd")
    before = client.pull(wire_dtype=None)
    with pytest.raises(InvalidArgumentError) as caught:
        getattr(client, call)({"w": big})
    assert caught.value.reason == "NONFINITE_GRADIENT"
    assert_same(client.pull(wire_dtype=None), before)
    skipping = connect(start_server(mode="async", nonfinite="skip"), wire_dtype="bfloat16")
    skipping.create_model({"w": np.zeros(2, np.float32)}, "sgd")
    assert not skipping.push({"w": big}).applied


def test_float16_overflow_is_refused_before_sending(start_server, connect):
    client = connect(start_server(mode="async"), wire_dtype="float16")
    client.create_model({"w": np.zeros(3, np.float32)}, "sgd")
    with pytest.raises(Float16OverflowError, match="beyond float16's largest 65504"):
        client.push({"w": np.array([1.0, -70000.0, 2.0], np.float32)})
    with pytest.raises(ValueError, match="Nothing was sent"):
        client.step({"w": np.array([1e30, 0, 0], np.float32)})
    assert client.status().version == 0
    # 65519 still rounds to 65504; bfloat16 carries what float16 cannot.
    assert client.push({"w": np.array([65519.0, 0, 0], np.float32)}).applied
    assert client.push({"w": np.array([1e30, 0, 0], np.float32)}, wire_dtype="bfloat16").applied


def test_remote_optimizer_follows_the_client(start_server, connect):
    from paramserve.client import RemoteOptimizer

    server = start_server(mode="async")
    admin = connect(server)
    weights = _weights()
    admin.create_model(weights, "adam")
    client = connect(server, wire_dtype="bfloat16", error_feedback=False)
    for step_max_bytes in (0, 1 << 20):  # push + pull, then one Step
        variables = {n: v.copy() for n, v in weights.items()}
        opt = RemoteOptimizer(client, step_max_bytes=step_max_bytes)
        opt.pull(variables)
        grads = _grads(step_max_bytes)
        opt.apply_gradients((grads[n], variables[n]) for n in variables)
        exact = admin.pull()
        for name, value in variables.items():
            _same(value, exact[name].astype(BF16).astype(np.float32))


@pytest.mark.parametrize("step_max_bytes", [0, 1 << 20])
def test_torch_adapter_follows_its_client(start_server, connect, step_max_bytes):
    torch = pytest.importorskip("torch")
    from paramserve.client.torch import RemoteOptimizer

    server = start_server(mode="async")
    torch.manual_seed(0)
    model = torch.nn.Linear(30, 20)
    client = connect(server, wire_dtype="bfloat16")
    opt = RemoteOptimizer(
        model.named_parameters(), client, optimizer="sgd", step_max_bytes=step_max_bytes
    )
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 30)).sum().backward()
        opt.step()
    exact = connect(server).pull()
    for name, param in model.named_parameters():
        _same(param.detach().numpy(), exact[name].astype(BF16).astype(np.float32))


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
def test_error_feedback_fused_equals_numpys(monkeypatch, wire_dtype):
    """The fused kernel (sum, round, residual in one pass) runs, and sends and keeps the very
    bits NumPy's astype route does."""
    from paramserve.client import compression as client_compression
    from paramserve.wire import compression

    if not compression.prepare_casts():
        pytest.skip("numba casts unavailable")
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal((300, 7)).astype(np.float32) for _ in range(4)]
    grads[2][0, :3] = [np.inf, np.nan, 1e30]

    def run() -> list[np.ndarray]:
        feedback = client_compression.ErrorFeedback()
        out = []
        for g in grads:
            values, made = feedback.compress(["w"], [g], wire_dtype)
            out.append(values[0].copy())
            feedback.finish(made, taken=True)
        return [*out, feedback.residual("w").copy()]

    calls: list[int] = []
    real = client_compression.round_with_feedback

    def counted(*args):
        calls.append(1)
        return real(*args)

    if wire_dtype == "float16":
        grads[2][0, 2] = 1.0  # finite and too large for float16 is refused, tested above
    monkeypatch.setattr(client_compression, "round_with_feedback", counted)
    fused = run()
    assert len(calls) == len(grads)
    monkeypatch.setitem(compression._casts, "kernels", None)  # NumPy's astype route
    plain = run()
    assert len(calls) == 2 * len(grads)  # asked, and declined without the kernels
    for a, b in zip(fused, plain, strict=True):
        assert a.dtype == b.dtype
        assert np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
def test_many_small_variables_pulled_compressed_are_the_rounded_weights(
    start_server, connect, wire_dtype
):
    """A model of many tiny variables, scalars and another dtype among them: the server
    rounds each slab's stretch in one cast (and the worker packs its error feedback) and
    every weight is still the float32 one rounded, pull after pull, by Pull and by Step."""
    dtype = np.dtype(BF16 if wire_dtype == "bfloat16" else np.float16)
    rng = np.random.default_rng(11)
    weights: dict[str, np.ndarray] = {
        f"v{i:03d}": rng.standard_normal(i % 5 + 1).astype(np.float32) for i in range(200)
    }
    weights["s"] = np.array(0.3, np.float32)
    weights["d"] = np.arange(3, dtype=np.float64) / 3
    weights["m"] = rng.standard_normal((4, 3)).astype(np.float32)
    client = connect(start_server(mode="async"))
    client.create_model(weights, "adam")
    out = {n: np.empty_like(v) for n, v in weights.items()}
    for seed in range(3):
        grads = {
            n: (np.random.default_rng(seed).standard_normal(v.shape) * 1e-2).astype(v.dtype)
            for n, v in weights.items()
        }
        client.push(grads, wire_dtype=wire_dtype)
        exact = client.pull()
        pulled = client.pull(wire_dtype=wire_dtype)
        into = client.pull(out=out, wire_dtype=wire_dtype)
        for name, value in exact.items():
            want = value if value.dtype != np.float32 else value.astype(dtype).astype(np.float32)
            _same(pulled[name], want)
            _same(into[name], want)
        some = client.pull(["v007", "d", "s"], wire_dtype=wire_dtype)
        _same(some["v007"], pulled["v007"])
        _same(some["s"], pulled["s"])
    stepped = client.step({"v001": np.zeros(2, np.float32)}, wire_dtype=wire_dtype)
    exact = client.pull(wire_dtype=None)
    for name, value in exact.items():
        want = value if value.dtype != np.float32 else value.astype(dtype).astype(np.float32)
        _same(stepped[name], want)


def test_large_compressed_steps_on_several_cast_threads_are_exact(start_server, connect):
    """With ``apply_threads=3`` the daemon rounds a large compressed pull, and this process's
    SDK its error feedback, in pieces on three threads: bit for bit NumPy's single pass."""
    from paramserve import wire

    n = wire.compression.CAST_MIN_ELEMENTS + 4099
    rng = np.random.default_rng(11)
    weights = {"w": rng.standard_normal(n).astype(np.float32)}
    before = wire.cast_threads()
    try:
        compressed = connect(start_server(mode="async", apply_threads=3), wire_dtype="bfloat16")
        exact = connect(start_server(mode="async", apply_threads=3))
        assert wire.cast_threads() == 3
        for client in (compressed, exact):
            client.create_model(weights, "adam")
        residual = np.zeros(n, np.float32)
        for seed in range(3):
            g = (np.random.default_rng(seed).standard_normal(n) * 1e-2).astype(np.float32)
            compressed.push({"w": g})
            total = g + residual
            sent = total.astype(BF16)
            residual = total - sent.astype(np.float32)
            exact.push({"w": sent.astype(np.float32)})
        assert_same(compressed.pull(wire_dtype=None), exact.pull())
        rounded = compressed.pull()["w"]
        assert_same({"w": rounded}, {"w": exact.pull()["w"].astype(BF16).astype(np.float32)})
    finally:
        wire.set_cast_threads(before)
