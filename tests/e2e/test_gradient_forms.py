"""Gradients as Keras code holds them: lists (refused, with what to pass) and other dtypes
(floats cast to the variable's dtype, or refused with ``strict_dtypes``; non-floats refused)."""

from __future__ import annotations

import numpy as np
import pytest

from paramserve.client import RemoteOptimizer, SparseRows

SHAPES = {"w": (3, 2), "b": (2,)}


def _model(start_server, connect, **options):
    server = start_server(mode="async")
    client = connect(server, **options)
    client.create_model({n: np.zeros(s, np.float32) for n, s in SHAPES.items()}, optimizer="sgd")
    return server, client


def _grads(dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    # float64 values that float32 cannot hold exactly: the cast must be the one applied.
    return {n: (rng.standard_normal(s) / 3).astype(dtype) for n, s in SHAPES.items()}


@pytest.mark.parametrize("method", ["push", "step"])
@pytest.mark.parametrize("container", [list, tuple])
def test_a_list_of_gradients_is_refused_before_sending(start_server, connect, method, container):
    server, client = _model(start_server, connect)
    before = server.state()
    grads = container(_grads(np.float32).values())
    with pytest.raises(TypeError) as caught:
        getattr(client, method)(grads)
    message = str(caught.value)
    assert f"received a {container.__name__} of 2 values" in message
    assert "{name: array}" in message
    assert "apply_gradients(zip(grads, variables))" in message
    server.assert_unchanged(before)


def test_names_must_be_strings_str_subclasses_included(start_server, connect):
    server, client = _model(start_server, connect)
    before = server.state()
    grads = _grads(np.float32)
    with pytest.raises(TypeError, match=r"Variable names must be strings\. Received: 7"):
        client.push({**grads, 7: np.zeros(2, np.float32)})
    server.assert_unchanged(before)

    class Name(str):
        pass

    assert client.push({Name(n): g for n, g in grads.items()}).applied


def test_remote_optimizer_still_pairs_gradients_with_variables(start_server, connect):
    _, client = _model(start_server, connect)
    variables = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    opt = RemoteOptimizer(client)
    opt.build(variables)
    grads = _grads(np.float32)
    # In the reverse of the server's order: pairing is by variable, not position.
    version = opt.apply_gradients([(grads["b"], variables["b"]), (grads["w"], variables["w"])])
    assert version == 1
    lr = np.float32(client.describe().hyperparameters["learning_rate"])
    for name in SHAPES:
        np.testing.assert_array_equal(variables[name], -lr * grads[name])


@pytest.mark.parametrize("gradient_dtype", ["float64", "float16", "bfloat16"])
def test_float_gradients_are_cast_to_the_variables_dtype(start_server, connect, gradient_dtype):
    """The weights after a push of other-dtype gradients equal those after a push of the
    same gradients cast to float32 by the caller, on a second server."""
    dtype = np.dtype(gradient_dtype) if gradient_dtype != "bfloat16" else _bfloat16()
    _, cast_client = _model(start_server, connect)
    _, reference = _model(start_server, connect)
    grads = _grads(np.float64)
    given = {n: g.astype(dtype) for n, g in grads.items()}
    cast_client.push(given)
    reference.push({n: g.astype(np.float32) for n, g in given.items()})
    got, expected = cast_client.pull(), reference.pull()
    assert got.version == expected.version == 1
    for name in SHAPES:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], expected[name], strict=True)


def test_step_and_sparse_rows_are_cast_too(start_server, connect):
    _, cast_client = _model(start_server, connect)
    _, reference = _model(start_server, connect)
    rows = np.array([2, 0])
    values = np.array([[0.1, 0.2], [0.3, 0.7]], np.float64)
    dense_b = _grads(np.float64)["b"]
    got = cast_client.step({"w": SparseRows(rows, values), "b": dense_b})
    expected = reference.step(
        {"w": SparseRows(rows, values.astype(np.float32)), "b": dense_b.astype(np.float32)}
    )
    for name in SHAPES:
        np.testing.assert_array_equal(got[name], expected[name], strict=True)


@pytest.mark.parametrize("method", ["push", "step"])
def test_strict_dtypes_refuses_other_float_dtypes(start_server, connect, method):
    server, client = _model(start_server, connect, strict_dtypes=True)
    before = server.state()
    grads = {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float64)}
    with pytest.raises(TypeError) as caught:
        getattr(client, method)(grads)
    message = str(caught.value)
    assert "'b' is float64, but the variable is float32" in message
    assert "strict_dtypes=True" in message
    assert "Nothing was sent" in message
    server.assert_unchanged(before)
    # Gradients of the variables' own dtype pass.
    client.push({"w": np.ones((3, 2), np.float32)})


def test_strict_dtypes_applies_to_remote_optimizer(start_server, connect):
    _, client = _model(start_server, connect, strict_dtypes=True)
    variables = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    opt = RemoteOptimizer(client)
    opt.build(variables)
    grads = _grads(np.float64)
    with pytest.raises(TypeError, match="'w' is float64, but the variable is float32"):
        opt.apply_gradients([(grads["w"], variables["w"]), (grads["b"], variables["b"])])


@pytest.mark.parametrize("gradient_dtype", ["int32", "int64", "bool", "complex64"])
@pytest.mark.parametrize("strict", [False, True])
def test_non_float_gradients_are_refused(start_server, connect, gradient_dtype, strict):
    server, client = _model(start_server, connect, strict_dtypes=strict)
    before = server.state()
    with pytest.raises(TypeError) as caught:
        client.push({"w": np.ones((3, 2), gradient_dtype)})
    message = str(caught.value)
    assert f"'w' is {np.dtype(gradient_dtype).name}, but the variable is float32" in message
    assert "only floating-point gradients" in message
    server.assert_unchanged(before)


def _bfloat16() -> np.dtype:
    from paramserve.wire import dtype_from_name

    return dtype_from_name("bfloat16")
