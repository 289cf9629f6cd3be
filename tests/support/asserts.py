"""Comparisons the suite makes bit for bit, and expected gRPC errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
import pytest


def assert_same(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Same names in the same order, and per name the same dtype, shape and bits."""
    assert list(actual) == list(expected)
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert a.tobytes() == e.tobytes(), f"{name}: max |diff| {np.max(np.abs(a - e))}"


def assert_state_equal(a: tuple[int, list], b: tuple[int, list]) -> None:
    """Two ``(version, [(slot name, array), ...])`` optimizer states, bit for bit."""
    assert a[0] == b[0]
    assert [k for k, _ in a[1]] == [k for k, _ in b[1]]
    for (_, x), (_, y) in zip(a[1], b[1], strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def expect_error(code: grpc.StatusCode, call: Callable[[], object], *, match: str = "") -> str:
    """Run ``call``; assert it fails with ``code`` and a message containing ``match``."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    assert match.lower() in (err.details() or "").lower(), err.details()
    return err.details()
