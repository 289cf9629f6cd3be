"""Error feedback over packed gradients: the small dense float32 gradients of a push are
rounded in one fused pass over one flat buffer, and send and keep the very bits the
per-variable pass does (which ``PACK_MAX_ELEMENTS = 0`` forces), over many pushes, whether
the server took them or not."""

from __future__ import annotations

import numpy as np
import pytest

from paramserve import wire
from paramserve.client import Float16OverflowError
from paramserve.client import compression as cc

pytestmark = pytest.mark.skipif(not wire.prepare_casts(), reason="numba casts unavailable")

BIG = cc.PACK_MAX_ELEMENTS + 3  # one element too many to be packed


def _grads(seed: int) -> tuple[list[str], list[object]]:
    """Many tiny tensors and the odd ones: scalars, empty, non-contiguous, other dtypes,
    sparse rows, one over the packing limit; NaN and Inf in one."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    values: list[object] = []
    for i in range(300):
        names.append(f"t{i:03d}")
        values.append((rng.standard_normal(i % 7 + 1) * 10.0 ** (i % 5 - 3)).astype(np.float32))
    wide = (rng.standard_normal((8, 6)) * 1e-2).astype(np.float32)
    nan = rng.standard_normal(33).astype(np.float32)
    nan[[1, 5, 9]] = [np.nan, np.inf, -np.inf]
    extra = {
        "scalar": np.array(rng.standard_normal(), dtype=np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "strided": wide[:, ::2],  # not contiguous
        "f64": rng.standard_normal(5),
        "i32": np.arange(4, dtype=np.int32),
        "rows": wire.SparseRows(
            np.array([0, 2], dtype=np.int64), rng.standard_normal((2, 3)).astype(np.float32)
        ),
        "big": (rng.standard_normal(BIG) * 1e-3).astype(np.float32),
        "nan": nan,
        "neg0": np.array([-0.0, 0.0, -1e-45], dtype=np.float32),
    }
    for k, (name, value) in enumerate(extra.items()):
        at = 37 * k % len(names)
        names.insert(at, name)
        values.insert(at, value)
    return names, values


def _bits(value: object) -> tuple:
    if isinstance(value, wire.SparseRows):
        return ("rows", _bits(value.indices), _bits(value.values))
    a = np.asarray(value)
    return (a.dtype.str, a.shape, a.tobytes())


def _run(monkeypatch, pack: bool, wire_dtype: str, *, enabled: bool = True) -> list:
    """Pushes of five steps' gradients (the third refused), then a reset and one more."""
    if not pack:
        monkeypatch.setattr(cc, "PACK_MAX_ELEMENTS", 0)
    feedback = cc.ErrorFeedback(enabled=enabled)
    seen = []
    for step in range(6):
        if step == 5:
            feedback.reset()
        names, values = _grads(step)
        sent, made = feedback.compress(names, values, wire_dtype)
        seen.append([_bits(v) for v in sent])
        feedback.finish(made, taken=step != 2)
        residuals = [feedback.residual(n) for n in names]
        seen.append([None if r is None else _bits(r) for r in residuals])
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("wire_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("enabled", [True, False])
def test_packed_equals_per_variable_bit_for_bit(monkeypatch, wire_dtype, enabled):
    packed = _run(monkeypatch, True, wire_dtype, enabled=enabled)
    plain = _run(monkeypatch, False, wire_dtype, enabled=enabled)
    assert packed == plain


def test_one_kernel_call_for_many_small_gradients(monkeypatch):
    calls: list[int] = []
    real = cc.round_with_feedback

    def counted(g, *args):
        calls.append(g.size)
        return real(g, *args)

    monkeypatch.setattr(cc, "round_with_feedback", counted)
    names = [f"v{i}" for i in range(1000)]
    values = [np.full(3, i, np.float32) for i in range(1000)]
    feedback = cc.ErrorFeedback()
    for _ in range(3):
        sent, made = feedback.compress(names, values, "bfloat16")
        feedback.finish(made, taken=True)
    assert calls == [3000] * 3
    assert all(s.shape == (3,) for s in sent)
    assert feedback.residual("v5").shape == (3,)


def test_residual_kept_only_when_taken_and_reset_forgets(monkeypatch):
    names = ["a", "b", "c"]
    values = [np.full(4, 1 / 3, np.float32), np.full(2, 1 / 7, np.float32), np.float32(0.1)]
    values[2] = np.asarray(values[2])
    feedback = cc.ErrorFeedback()
    _, made = feedback.compress(names, values, "bfloat16")
    feedback.finish(made, taken=False)
    assert all(feedback.residual(n) is None for n in names)
    _, made = feedback.compress(names, values, "bfloat16")
    feedback.finish(made, taken=True)
    kept = {n: feedback.residual(n).copy() for n in names}
    assert kept["a"].shape == (4,) and kept["c"].shape == ()
    assert np.all(kept["a"] != 0)
    _, made = feedback.compress(names, values, "bfloat16")
    feedback.finish(made, taken=False)  # refused: the residuals stay as they were
    for n in names:
        assert feedback.residual(n).tobytes() == kept[n].tobytes()
    feedback.reset()
    assert all(feedback.residual(n) is None for n in names)


def test_subsets_and_packed_pushes_mix_as_per_variable_ones(monkeypatch):
    """Pushes of a subset of the variables (packed, or one alone) between full ones: each
    variable's residual is its own, as in the per-variable pass."""

    def run(pack: bool) -> list:
        if not pack:
            monkeypatch.setattr(cc, "PACK_MAX_ELEMENTS", 0)
        feedback = cc.ErrorFeedback()
        rng = np.random.default_rng(5)
        names = [f"v{i}" for i in range(20)]
        seen = []
        for step, pick in enumerate(
            [names[:7], names, names[:7], names, names[3:4], names, names[::2]]
        ):
            values = [(rng.standard_normal(5) / 3).astype(np.float32) for _ in pick]
            sent, made = feedback.compress(pick, values, "float16")
            feedback.finish(made, taken=step != 5)
            seen.append([s.tobytes() for s in sent])
            seen.append(
                [
                    None if r is None else r.tobytes()
                    for n in names
                    if (r := feedback.residual(n)) is not None
                ]
            )
        monkeypatch.undo()
        return seen

    assert run(True) == run(False)


def test_float16_overflow_in_a_packed_gradient_names_it():
    names = [f"v{i}" for i in range(10)]
    values = [np.ones(3, np.float32) for _ in names]
    values[6] = np.array([1.0, 7e4, 2.0], np.float32)
    with pytest.raises(Float16OverflowError, match="'v6'"):
        cc.ErrorFeedback().compress(names, values, "float16")
    with pytest.raises(Float16OverflowError, match="'v6'"):
        cc.ErrorFeedback(enabled=False).compress(names, values, "float16")


def test_a_taken_push_keeps_its_residuals_after_its_layout_was_dropped(monkeypatch):
    """More layouts than are kept, pushed while one push is in flight: that push, taken,
    still keeps its residuals (the same bits as the per-variable pass)."""

    def run(pack: bool) -> list:
        if not pack:
            monkeypatch.setattr(cc, "PACK_MAX_ELEMENTS", 0)
        feedback = cc.ErrorFeedback()
        names = ["a", "b", "c"]
        values = [np.full(3, 1 / 3, np.float32), np.full(2, 1 / 7, np.float32), np.ones(1)]
        _, in_flight = feedback.compress(names, values, "bfloat16")
        for k in range(cc._LAYOUTS_MAX + 1):  # other layouts push their turn meanwhile
            others = [f"x{k}", f"y{k}"]
            _, made = feedback.compress(others, [np.full(k + 1, 0.1, np.float32)] * 2, "bfloat16")
            feedback.finish(made, taken=True)
        feedback.finish(in_flight, taken=True)
        kept = [feedback.residual(n) for n in ("a", "b", "c", "x0")]
        monkeypatch.undo()
        return [None if r is None else r.tobytes() for r in kept]

    packed = run(True)
    assert packed[:2] == run(False)[:2] and packed[0] is not None and packed[2] is None
