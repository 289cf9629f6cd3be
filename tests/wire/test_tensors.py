"""The chunk codec: round trips for every dtype and layout, and strict refusal of bad streams."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from paramserve import wire as t
from paramserve.v1 import tensor_pb2 as tpb
from tests.support.wire import chunk_messages

DTYPES = ["float32", "float64", "float16", np.dtype(ml_dtypes.bfloat16), "int32", "int64"]


def _roundtrip(values: dict, *, chunk_bytes: int, shapes: dict | None = None) -> dict:
    headers = [
        t.sparse_header(k, v, shapes[k]) if isinstance(v, t.SparseRows) else t.header_for(k, v)
        for k, v in values.items()
    ]
    t.check_headers(headers)
    asm = t.TensorAssembler(headers)
    for chunk in chunk_messages(list(values.values()), chunk_bytes=chunk_bytes):
        asm.add(chunk.tensor, chunk.offset, chunk.data)
    return asm.finish()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 7), (2, 0, 3), (4, 3, 2)])
def test_dense_round_trip(dtype: object, shape: tuple) -> None:
    rng = np.random.default_rng(0)
    value = (rng.standard_normal(shape) * 100).astype(dtype)
    out = _roundtrip({"x": value, "y": value.copy()}, chunk_bytes=7)
    for k in ("x", "y"):
        assert out[k].dtype == value.dtype and out[k].shape == value.shape
        np.testing.assert_array_equal(out[k], value)
        assert out[k].flags.writeable


def test_sparse_round_trip_and_big_endian_input() -> None:
    rows = t.SparseRows(np.array([3, 0, 3]), np.arange(6, dtype=">f4").reshape(3, 2))
    out = _roundtrip({"emb": rows}, chunk_bytes=5, shapes={"emb": (4, 2)})["emb"]
    np.testing.assert_array_equal(out.indices, [3, 0, 3])
    np.testing.assert_array_equal(out.values, np.arange(6, dtype=np.float32).reshape(3, 2))


def test_chunks_are_bounded_and_slices_not_copies() -> None:
    value = np.arange(10_000, dtype=np.float32)
    pieces = list(t.iter_chunks([value], chunk_bytes=4096))
    assert all(len(p) <= 4096 for _, _, p in pieces)
    assert sum(len(p) for _, _, p in pieces) == value.nbytes
    assert np.shares_memory(np.frombuffer(pieces[1][2], dtype=np.uint8), value)


def _headers(n: int = 8) -> list[tpb.TensorHeader]:
    return [t.header_for("a", np.zeros(n, np.float32)), t.header_for("b", np.zeros(n, np.float32))]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: setattr(h[0], "byte_length", 4), "does not match"),
        (lambda h: setattr(h[0], "dtype", 99), "unknown dtype"),
        (lambda h: setattr(h[1], "name", "a"), "appears twice"),
        (lambda h: setattr(h[0], "name", ""), "empty name"),
        (lambda h: h[0].shape.__setitem__(0, -8), "negative"),
    ],
)
def test_bad_headers_are_refused(mutate: object, message: str) -> None:
    headers = _headers()
    mutate(headers)
    with pytest.raises(t.WireError, match=message):
        t.check_headers(headers)


def test_size_limit() -> None:
    with pytest.raises(t.WireError, match="over the limit"):
        t.check_headers(_headers(1000), max_tensor_bytes=100)


def test_out_of_order_repeated_early_end_and_overflow_are_refused() -> None:
    data = bytes(16)
    asm = t.TensorAssembler(_headers(8))
    asm.add(0, 0, data)
    with pytest.raises(t.WireError, match="out of order or repeated"):
        asm.add(0, 0, data)  # repeated
    asm2 = t.TensorAssembler(_headers(8))
    with pytest.raises(t.WireError, match="out of order"):
        asm2.add(0, 16, data)  # skipped ahead
    asm3 = t.TensorAssembler(_headers(8))
    asm3.add(0, 0, data)
    with pytest.raises(t.WireError, match="ended early"):
        asm3.add(1, 0, data)  # tensor 0 incomplete
    asm4 = t.TensorAssembler(_headers(8))
    asm4.add(0, 0, bytes(32))
    asm4.add(1, 0, bytes(16))
    with pytest.raises(t.WireError, match="ended early"):
        asm4.finish()
    asm5 = t.TensorAssembler(_headers(8))
    with pytest.raises(t.WireError, match="header declared"):
        asm5.add(0, 0, bytes(72))  # past both tensors (64 bytes)
    with pytest.raises(t.WireError, match="only 2 declared"):
        asm5.add(5, 0, data)
    asm6 = t.TensorAssembler(_headers(8))
    asm6.add(0, 0, bytes(32))
    asm6.add(1, 0, bytes(32))
    with pytest.raises(t.WireError, match="after tensor"):
        asm6.add(0, 32, data)
