"""The fused wire casts equal ``astype`` bit for bit: rounding float32 to bfloat16 (ml_dtypes)
and float16 (NumPy), widening back, and the client's error-feedback step.

Every float32 bit pattern was checked once offline (all 2**32, both dtypes, NaNs included);
here: every pattern with its exponent, sign and the low mantissa bits that decide rounding
(ties, subnormals, overflow), random patterns, and all 65,536 16-bit patterns to widen.
"""

from __future__ import annotations

import os
import threading

import ml_dtypes
import numpy as np
import pytest

from paramserve import wire

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
WIRE = [BF16, F16]

pytestmark = pytest.mark.skipif(not wire.prepare_casts(), reason="numba casts unavailable")


def _edge_bits() -> np.ndarray:
    """float32 bit patterns where rounding to 16 bits is decided: every exponent and sign
    with mantissas at and around the ties of bfloat16 (16 low bits) and float16 (13 low bits,
    more for its subnormals), plus NaN payloads that lose all their kept bits."""
    mantissas = {0, 1, 2, 0x7FFFFF, 0x7FFFFE, 0x400000, 0x400001, 0x3FFFFF, 0x7FE000, 0x7FF000}
    for shift in range(10, 24):  # ties and their neighbours at every shift a subnormal uses
        tie = 1 << (shift - 1)
        for kept in (0, 1 << shift, 3 << shift, 0x7FFFFF & ~((1 << shift) - 1)):
            mantissas.update({kept | tie, kept | (tie - 1), kept | (tie + 1)})
    m = np.array(sorted(mantissas), dtype=np.uint32) & np.uint32(0x7FFFFF)
    e = np.arange(256, dtype=np.uint32) << np.uint32(23)
    bits = (e[:, None] | m[None, :]).reshape(-1)
    return np.concatenate([bits, bits | np.uint32(0x80000000)])


def _random_bits(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)
    # Half of them in float16's range, where its rounding is decided bit by bit.
    exponents = rng.integers(100, 145, n // 2, dtype=np.uint32) << np.uint32(23)
    bits[: n // 2] = (bits[: n // 2] & np.uint32(0x807FFFFF)) | exponents
    return bits


def _ref(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(all="ignore"):
        return values.astype(dtype)


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    uint = np.dtype(f"u{a.dtype.itemsize}")
    diff = np.nonzero(a.view(uint) != b.view(uint))[0]
    assert diff.size == 0, f"{diff.size} differ, first at {diff[:5]}"


@pytest.mark.parametrize("dtype", WIRE, ids=str)
@pytest.mark.parametrize("source", ["edges", "random"])
def test_rounding_equals_astype(dtype: np.dtype, source: str) -> None:
    bits = _edge_bits() if source == "edges" else _random_bits(1 << 20)
    values = bits.view(np.float32)
    out = np.empty(values.shape, dtype)
    assert wire.cast_into(values, out)
    _same_bits(out, _ref(values, dtype))
    _same_bits(wire.cast_tensor(values.reshape(-1, 2), dtype), _ref(values, dtype).reshape(-1, 2))


@pytest.mark.parametrize("dtype", WIRE, ids=str)
def test_widening_every_16_bit_pattern(dtype: np.dtype) -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(dtype)
    expected = values.astype(np.float32)
    out = np.empty(values.shape, np.float32)
    assert wire.cast_into(values, out)
    _same_bits(out, expected)
    _same_bits(wire.cast_tensor(values, np.float32), expected)
    # From bytes at an odd address (a chunk inside a received message), finite flag.
    raw = b"x" + values.tobytes()
    out[:] = 0
    assert not wire.widen_bytes(memoryview(raw)[1:], out, dtype)
    _same_bits(out, expected)
    finite = np.isfinite(expected)
    part = np.empty(int(finite.sum()), np.float32)
    assert wire.widen_bytes(values[finite].tobytes(), part, dtype)
    _same_bits(part, expected[finite])


def test_what_the_kernels_leave_to_numpy() -> None:
    values = np.arange(12, dtype=np.float32)
    # Not contiguous, byte-swapped, another pair of dtypes, empty: False, nothing written.
    out = np.zeros(6, BF16)
    assert not wire.cast_into(values[::2], out)
    assert not wire.cast_into(values.astype(">f4"), np.zeros(12, BF16))
    assert not wire.cast_into(values, np.zeros(12, np.float64))
    assert not wire.cast_into(values[:0], np.zeros(0, BF16))
    assert not out.any()
    # ... while cast_tensor still casts them, with NumPy.
    _same_bits(wire.cast_tensor(values[::2], BF16), values[::2].astype(BF16))
    rows = wire.SparseRows(np.array([1, 0]), values[:4].reshape(2, 2))
    cast = wire.cast_tensor(rows, F16)
    _same_bits(cast.values, values[:4].reshape(2, 2).astype(F16))


def _feedback_numpy(g, carried, dtype):
    """The error-feedback step as NumPy does it (client/compression.py's fallback)."""
    with np.errstate(all="ignore"):
        total = g if carried is None else np.add(g, carried)
        sent = total.astype(dtype)
        left = np.subtract(total, sent, dtype=np.float32, casting="unsafe")
    left[~np.isfinite(left)] = 0
    overflow = int((np.isinf(sent) & np.isfinite(total)).sum())
    return sent, left, overflow


@pytest.mark.parametrize("dtype", WIRE, ids=str)
@pytest.mark.parametrize("carry", [True, False])
def test_fused_error_feedback_equals_numpy(dtype: np.dtype, carry: bool) -> None:
    edges = _edge_bits().view(np.float32)
    g = np.concatenate([edges, _random_bits(1 << 18, seed=1).view(np.float32)])
    rng = np.random.default_rng(2)
    carried = None
    if carry:
        carried = (rng.standard_normal(g.size) * 1e-3).astype(np.float32)
        carried[::97] = np.inf
        carried[::101] = np.nan
        carried[::103] = 7e4  # float16 overflow from the sum alone
    sent = np.empty(g.shape, dtype)
    left = np.empty(g.shape, np.float32)
    overflow = wire.round_with_feedback(g, carried, sent, left)
    want_sent, want_left, want_overflow = _feedback_numpy(g, carried, dtype)
    _same_bits(sent, want_sent)
    _same_bits(left, want_left)
    assert overflow == want_overflow
    assert np.isfinite(left).all()


@pytest.mark.parametrize("dtype", WIRE, ids=str)
@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 4096])
def test_assembler_widens_chunks_as_they_arrive(dtype: np.dtype, chunk_bytes: int) -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((50, 9)).astype(np.float32).astype(dtype)
    b = rng.standard_normal(33).astype(np.float32).astype(dtype)
    b[5] = np.inf
    c = np.arange(4, dtype=np.float32)
    values = [a, b, c]
    headers = [wire.header_for(n, v) for n, v in zip("abc", values, strict=True)]
    target = np.zeros(a.shape, np.float32)
    asm = wire.TensorAssembler(
        headers, widen=[True, True, False], into=[target.reshape(-1).view(np.uint8), None, None]
    )
    for i, offset, piece in wire.iter_chunks(values, chunk_bytes=chunk_bytes):
        asm.add(i, offset, bytes(piece))
    out = asm.finish()
    _same_bits(out["a"], a.astype(np.float32))
    assert np.shares_memory(out["a"], target)
    _same_bits(out["b"], b.astype(np.float32))
    _same_bits(out["c"], c)
    assert asm.widened_finite() == {"a"}
    with pytest.raises(ValueError, match="only dense bfloat16 or float16"):
        wire.TensorAssembler(headers, widen=[False, False, True])


def _same(a: np.ndarray, b: np.ndarray) -> None:
    """:func:`_same_bits` for any shape, scalars included."""
    assert a.shape == b.shape
    _same_bits(a.reshape(-1), b.reshape(-1))


def _packed_chunks(values: dict[str, np.ndarray], chunk_bytes: int) -> list:
    """``(tensor, offset, data)`` of each packed chunk of ``values``, as a receiver decodes
    them from the encoded messages."""
    return [
        wire.decode_chunk_item(raw)
        for raw in wire.encoded_chunk_items(list(values.values()), chunk_bytes=chunk_bytes)
    ]


def _many_small(dtype: np.dtype, seed: int = 5) -> dict[str, np.ndarray]:
    """Many tiny tensors of ``dtype`` (sizes 1 to 7, a scalar among them), a float32 one and
    an int64 one between them, and a larger 2-D one."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(40):
        if i == 13:
            out["f32"] = rng.standard_normal(5).astype(np.float32)
        if i == 27:
            out["i64"] = np.arange(3, dtype=np.int64)
        shape = () if i == 4 else (i % 7 + 1,)
        out[f"t{i:02d}"] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    out["big"] = rng.standard_normal((31, 9)).astype(np.float32).astype(dtype)
    return out


@pytest.mark.parametrize("dtype", WIRE, ids=str)
@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 64, 4096])
def test_packed_chunks_widen_many_small_tensors_in_the_shared_buffer(
    dtype: np.dtype, chunk_bytes: int
) -> None:
    values = _many_small(dtype)
    names = list(values)
    headers = [wire.header_for(n, v) for n, v in values.items()]
    widen = [v.dtype == dtype for v in values.values()]
    # One tensor widened into a float32 array of its own, the others in the shared buffer.
    target = np.zeros(values["t20"].shape, np.float32)
    into = [target.reshape(-1).view(np.uint8) if n == "t20" else None for n in names]
    layout = wire.StreamLayout(
        headers, widen=[w and n != "t20" for w, n in zip(widen, names, strict=True)]
    )
    # The widened tensors lying end to end make one run between the others.
    wide = [True, False, True, False, True, False, True]  # f32, t20, i64 between them
    assert [r[3] is not None for r in layout.runs] == wide
    asm = wire.TensorAssembler(headers, into=into, widen=widen, layout=layout)
    for chunk in _packed_chunks(values, chunk_bytes):
        asm.add(*chunk)
    out = asm.finish()
    assert list(out) == names
    for n, v in values.items():
        want = v.astype(np.float32) if v.dtype == dtype else v
        _same(out[n], want)
        assert out[n].shape == v.shape
    assert np.shares_memory(out["t20"], target)
    assert asm.widened_finite() == {n for n, w in zip(names, widen, strict=True) if w}
    assert all(asm.widens(i) == w for i, w in enumerate(widen))


@pytest.mark.parametrize("chunk_bytes", [3, 64, 1 << 20])
def test_a_nan_in_one_packed_widened_tensor_leaves_it_out_of_the_finite_ones(
    chunk_bytes: int,
) -> None:
    values = _many_small(BF16)
    values["t17"] = values["t17"].copy()
    values["t17"][-1] = np.nan
    headers = [wire.header_for(n, v) for n, v in values.items()]
    widen = [v.dtype == BF16 for v in values.values()]
    asm = wire.TensorAssembler(headers, widen=widen)
    for chunk in _packed_chunks(values, chunk_bytes):
        asm.add(*chunk)
    out = asm.finish()
    assert np.isnan(out["t17"][-1])
    finite = asm.widened_finite()
    assert "t17" not in finite
    # Those vouched for are finite (the ones sharing a chunk with t17 may be left out:
    # the server's check reads those again).
    assert all(np.isfinite(out[n]).all() for n in finite)
    assert "big" in finite


def test_client_pull_widens_packed_chunks_into_out_arrays() -> None:
    from paramserve.client.streams import ReplyLayouts, receive_tensors
    from paramserve.v1 import tensor_pb2 as tpb

    values = _many_small(BF16)
    headers = [wire.header_for(n, v) for n, v in values.items()]
    header = tpb.TensorStreamItem(header=tpb.TensorStreamHeader(tensors=headers, version=3))
    layouts = ReplyLayouts()
    wide = {n: np.zeros(v.shape, np.float32) for n, v in values.items() if v.dtype == BF16}
    wide["f32"] = np.zeros(5, np.float32)  # float32 on the wire: not widened, left as sent
    for chunk_bytes in (5, 7, 1 << 16):
        items = [header, *_packed_chunks(values, chunk_bytes)]
        got = receive_tensors(items, layouts=layouts, widen_into=wide)
        assert got.version == 3
        for n, v in values.items():
            if v.dtype == BF16:
                assert got[n] is wide[n]
                _same(got[n], v.astype(np.float32))
            else:
                np.testing.assert_array_equal(got[n], v)
        assert got["f32"] is not wide["f32"]
        for a in wide.values():
            a[...] = 0


def test_server_stream_widens_into_flat_float32_segments() -> None:
    from paramserve.server.streams import FiniteScan, scan_segments

    values = _many_small(BF16)
    headers = [wire.header_for(n, v) for n, v in values.items()]
    widen = [v.dtype == BF16 for v in values.values()]
    layout = wire.StreamLayout(headers, widen=widen)
    segments = scan_segments(layout)
    assert [s.widened for s in segments] == [True, False, True, True]
    assert all(s.dtype == np.float32 for s in segments)
    asm = wire.TensorAssembler(headers, layout=layout)
    scan = FiniteScan(segments)
    for chunk in _packed_chunks(values, 100):
        asm.add(*chunk)
        scan.update(asm.receive_buffer, asm.received)
    out = asm.finish()
    assert scan.finite() == {"f32"}  # the widened ones are vouched for by the widening
    for seg in segments:
        flat = seg.flat(asm.receive_buffer)
        want = np.concatenate([values[n].astype(np.float32).reshape(-1) for n in seg.order])
        _same(flat, want)
        for n in seg.order:
            assert np.shares_memory(out[n], flat)


@pytest.mark.parametrize("dtype", WIRE, ids=str)
@pytest.mark.parametrize("chunk_bytes", [1, 3, 8, 64, 1 << 16])
def test_widening_into_many_arrays_of_their_own_takes_one_call_per_piece(
    dtype: np.dtype, chunk_bytes: int, monkeypatch
) -> None:
    """Tensors widened into arrays of their own that lie end to end in the stream are one
    run: each chunk's piece of them is widened by one kernel call, bit for bit what widening
    tensor by tensor gives (a piece with a NaN or Inf, or cut inside an element, goes tensor
    by tensor); empty tensors, scalars and a strided out array among them."""
    from paramserve.wire import compression
    from paramserve.wire import tensors as wire_tensors

    values = _many_small(dtype)
    values["empty"] = np.zeros((0, 4), np.float32).astype(dtype)
    odd = values["t20"]
    odd[0] = np.nan
    values["t31"][:] = -np.inf
    names = list(values)
    headers = [wire.header_for(n, v) for n, v in values.items()]
    widen = [v.dtype == dtype for v in values.values()]
    targets = {n: np.full(v.shape, 7.0, np.float32) for n, v in values.items()}
    into = [
        targets[n].reshape(-1).view(np.uint8) if w else None
        for n, w in zip(names, widen, strict=True)
    ]
    layout = wire.StreamLayout(headers)
    runs = layout.runs_into(into, widen)
    scatters = [r for r in runs if type(r[2]) is wire_tensors._Scatter]
    assert len(scatters) == 3  # split by the float32 and int64 tensors between
    calls: list[int] = []
    real = compression.scatter_bytes

    def counted(data, *args):
        calls.append(len(data))
        return real(data, *args)

    monkeypatch.setattr(compression, "scatter_bytes", counted)
    asm = wire.TensorAssembler(headers, into=into, widen=widen, layout=layout, runs=runs)
    chunks = _packed_chunks(values, chunk_bytes)
    for chunk in chunks:
        asm.add(*chunk)
    out = asm.finish()
    for name, value in values.items():
        if value.dtype == dtype:
            assert not value.size or np.shares_memory(out[name], targets[name])
            _same(targets[name], value.astype(np.float32))
        else:
            _same(out[name], value)
    if chunk_bytes >= 64:
        assert calls and len(calls) <= len(chunks) * len(scatters)
    finite = asm.widened_finite()
    assert "t20" not in finite and "t31" not in finite and "t00" in finite


@pytest.mark.parametrize("kernels", ["loaded", "not yet"])
@pytest.mark.parametrize("chunk_bytes", [1, 3, 8, 64, 1 << 16])
def test_copying_into_many_buffers_of_their_own_is_one_run(
    kernels: str, chunk_bytes: int, monkeypatch
) -> None:
    """Tensors received into buffers of their own (a pull into ``out=`` arrays) that lie end
    to end in the stream are one run from SCATTER_COPY_MIN on, each chunk's piece copied
    by one kernel call, or tensor by tensor while the kernels are not loaded; either way
    every byte lands in its own buffer, whatever the chunks' cuts (inside elements, across
    tensors), with tensors of mixed dtypes, scalars, empty ones and a shorter stretch (the
    tensors received into the shared buffer between split them) left tensor by tensor."""
    from paramserve.wire import compression
    from paramserve.wire import tensors as wire_tensors

    if kernels == "not yet":
        monkeypatch.setitem(compression._casts, "kernels", None)  # as before the load ends
    values = _many_small(np.dtype(np.float32), seed=9)
    values["empty"] = np.zeros((0, 3), np.float64)
    values["f64"] = np.linspace(-1, 1, 11)
    values["t26"] = values["t26"].astype(np.float16)
    names = list(values)
    own = {n for n in names if n not in ("f32", "t30")}  # these two go to the shared buffer
    headers = [wire.header_for(n, v) for n, v in values.items()]
    targets = {n: np.full(v.shape, 7, v.dtype) for n, v in values.items()}
    into = [targets[n].reshape(-1).view(np.uint8) if n in own else None for n in names]
    layout = wire.StreamLayout(headers)
    runs = layout.runs_into(into)
    scatters = [r[2] for r in runs if type(r[2]) is wire_tensors._Scatter]
    # Stretches: t00..t12 (13: too few), t13..t29 with i64 (18: one run, t26 float16
    # among them), t31..t39 with big, empty, f64 (12: too few).
    assert [len(s.runs) for s in scatters] == [18]
    assert wire_tensors.SCATTER_COPY_MIN == 16
    calls: list[bool] = []
    real = compression.scatter_copy

    def counted(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(compression, "scatter_copy", counted)
    asm = wire.TensorAssembler(headers, into=into, layout=layout, runs=runs)
    chunks = _packed_chunks(values, chunk_bytes)
    for chunk in chunks:
        asm.add(*chunk)
    out = asm.finish()
    for name, value in values.items():
        if name in own:
            _same(targets[name], value)
        else:
            _same(out[name], value)
    assert calls and all(calls) == (kernels == "loaded")
    if chunk_bytes >= 64:
        assert len(calls) <= len(chunks) * len(scatters)


@pytest.fixture
def cast_threads():
    """Set the casts' thread count for one test, then put the process's count back."""
    before = wire.cast_threads()
    yield wire.set_cast_threads
    wire.set_cast_threads(before)


def _large_values(seed: int) -> np.ndarray:
    """Over CAST_MIN_ELEMENTS float32 values, edges, NaN payloads and Inf included, of a
    length that is no multiple of any piece size."""
    from paramserve.wire import compression

    n = compression.CAST_MIN_ELEMENTS + 12_345
    edges = _edge_bits()
    return np.concatenate([edges, _random_bits(n - edges.size, seed=seed)]).view(np.float32)


@pytest.mark.parametrize("dtype", WIRE, ids=str)
def test_large_casts_in_pieces_on_several_threads_equal_astype(cast_threads, dtype) -> None:
    values = _large_values(seed=3)
    expected = _ref(values, dtype)
    for threads in (3, 1):
        assert cast_threads(threads) == threads
        out = np.empty(values.shape, dtype)
        assert wire.cast_into(values, out)
        _same_bits(out, expected)
        back = np.empty(values.shape, np.float32)
        assert wire.cast_into(expected, back)
        _same_bits(back, expected.astype(np.float32))
    # The pieces ran on the helpers as well: the pool started its threads.
    assert any(t.name.startswith("paramserve-cast") for t in threading.enumerate())


@pytest.mark.parametrize("dtype", WIRE, ids=str)
def test_large_error_feedback_in_pieces_equals_numpy(cast_threads, dtype) -> None:
    g = _large_values(seed=4)
    carried = (np.random.default_rng(5).standard_normal(g.size) * 1e-3).astype(np.float32)
    carried[::997] = np.inf
    carried[::1009] = np.nan
    carried[::1013] = 7e4  # float16 overflow from the sum alone
    want_sent, want_left, want_overflow = _feedback_numpy(g, carried, dtype)
    cast_threads(4)
    sent = np.empty(g.shape, dtype)
    left = np.empty(g.shape, np.float32)
    assert wire.round_with_feedback(g, carried, sent, left) == want_overflow
    _same_bits(sent, want_sent)
    _same_bits(left, want_left)


def test_cast_threads_setting(cast_threads, monkeypatch) -> None:
    from paramserve.wire import compression

    with pytest.raises(ValueError, match="integer >= 0"):
        cast_threads(-1)
    with pytest.raises(ValueError, match="integer >= 0"):
        cast_threads(True)
    monkeypatch.setenv(compression.CAST_THREADS_ENV, "3")
    assert cast_threads(0) == 3 and wire.cast_threads() == 3
    monkeypatch.setenv(compression.CAST_THREADS_ENV, "zero")
    with pytest.raises(ValueError, match="PARAMSERVE_CAST_THREADS"):
        cast_threads(0)
    monkeypatch.delenv(compression.CAST_THREADS_ENV)
    cores = len(os.sched_getaffinity(0))
    assert cast_threads(0) == max(1, min(cores - 2, compression.AUTO_THREADS_MAX))
    assert [wire.auto_threads(c) for c in (1, 2, 3, 4, 6, 16)] == [1, 1, 1, 2, 4, 4]
