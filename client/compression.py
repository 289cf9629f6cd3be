"""Compressed gradients with error feedback, and compressed weights back to float32.

With ``Client(wire_dtype="bfloat16" | "float16")`` the dense float32 gradients of a push
travel rounded to that dtype. Rounding alone would bias training (a gradient of 1/3 always
arrives as 0.333984375), so the worker keeps, per variable, what rounding dropped (the
residual ``g + e - round(g + e)``) and adds it into that variable's next compressed push:
over many pushes the sum of what the server applied stays within one rounding of the sum
of the true gradients.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from paramserve.wire import (
    COMPRESSIBLE,
    FLOAT16_MAX,
    SparseRows,
    TensorValue,
    cast_into,
    cast_tensor,
    dtype_from_name,
    prepare_casts,
    round_with_feedback,
)

# Dense float32 gradients of at most this many elements are packed end to end into one flat
# buffer per push, so the fused error-feedback pass runs once over all of them instead of
# once per variable (the per-call cost, microseconds, dominates for small variables); larger
# ones are rounded where they lie (packing would copy them once more).
PACK_MAX_ELEMENTS = 1 << 16
# Packed layouts (sets of names and shapes) kept per client; more are dropped, oldest first.
_LAYOUTS_MAX = 8


class Float16OverflowError(ValueError):
    """A finite gradient too large for float16 (|g| > 65504): refused before sending."""


@dataclass
class Compressed:
    """What :meth:`ErrorFeedback.compress` made for one push: the residuals it would leave
    and the buffers it used, handed back to :meth:`ErrorFeedback.finish`."""

    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    sent: dict[str, np.ndarray] = field(default_factory=dict)
    # Packed pushes: (layout, gradients' flat buffer, sent's, residuals' or None).
    packs: list[tuple[_Layout, _Flat, _Flat, _Flat | None]] = field(default_factory=list)


class _Layout:
    """Where the packed gradients of one push lie in its flat buffers: ``names[k]`` (of
    ``shapes[k]``) is elements ``starts[k]:starts[k+1]``."""

    def __init__(self, key: tuple[Any, ...], names: tuple[str, ...], shapes: tuple[Any, ...]):
        self.key = key
        self.names = names
        self.shapes = shapes
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        self.starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        self.size = self.starts[-1]


class _Flat:
    """One flat buffer of a :class:`_Layout` and its views, one per name (built once)."""

    __slots__ = ("array", "views")

    def __init__(self, layout: _Layout, dtype: np.dtype) -> None:
        self.array = np.empty(layout.size, dtype)
        starts = layout.starts
        self.views = {
            name: self.array[starts[k] : starts[k + 1]].reshape(shape)
            for k, (name, shape) in enumerate(zip(layout.names, layout.shapes, strict=True))
        }


class ErrorFeedback:
    """Per-variable rounding residuals of one client's compressed pushes (thread-safe).

    :meth:`compress` returns what to send; :meth:`finish` keeps the new residuals once the
    push was acknowledged (a refused or failed push leaves them as they were) and keeps the
    buffers for the next push, so a step at 16M floats page-faults no new memory.
    :meth:`reset` forgets every residual. Pushes of one variable made at the same time
    from several threads of one client each add the same residual; push a variable from
    one thread at a time for exact feedback.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._residuals: dict[str, np.ndarray] = {}
        self._spare: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        # Packed pushes: layouts by key, their spare flat buffers, and the flat buffer whose
        # views hold the residuals of a layout's names (``_packed[key]``), current while
        # ``_synced[key] == _version`` (every change of ``_residuals`` counts a version).
        self._layouts: dict[tuple[Any, ...], _Layout] = {}
        self._flat_spare: dict[tuple[Any, str], _Flat] = {}
        self._packed: dict[tuple[Any, ...], _Flat] = {}
        self._synced: dict[tuple[Any, ...], int] = {}
        self._version = 0

    def residual(self, name: str) -> np.ndarray | None:
        """The residual the next compressed push of ``name`` adds (None: none kept)."""
        with self._lock:
            return self._residuals.get(name)

    def reset(self) -> None:
        """Forget every residual (a new model, a restore)."""
        with self._lock:
            self._residuals.clear()
            self._packed.clear()
            self._synced.clear()
            self._version += 1

    def _buffer(self, name: str, kind: str, like: np.ndarray, dtype: np.dtype) -> np.ndarray:
        with self._lock:
            spare = self._spare.pop((name, kind), None)
        if spare is None or spare.shape != like.shape or spare.dtype != dtype:
            spare = np.empty(like.shape, dtype)
        return spare

    def compress(
        self, names: Sequence[str], values: Sequence[TensorValue], wire_dtype: str
    ) -> tuple[list[TensorValue], Compressed]:
        """``values`` with each dense float32 gradient (plus its residual) rounded to
        ``wire_dtype``; other values pass unchanged. Pass the second result to
        :meth:`finish` once the push is over.

        float16: a finite value that would round beyond the largest float16 (65504) is a
        :class:`Float16OverflowError`, before anything is sent; NaN and Inf travel as they
        are, for the server's non-finite policy to judge.
        """
        dtype = dtype_from_name(wire_dtype)
        out: list[TensorValue] = []
        made = Compressed()
        packed = self._compress_packed(names, values, dtype, wire_dtype, made)
        for i, (name, value) in enumerate(zip(names, values, strict=True)):
            if packed is not None and packed[i] is not None:
                out.append(packed[i])
                continue
            if isinstance(value, SparseRows) or value.dtype != COMPRESSIBLE:
                out.append(value)
                continue
            if not value.flags.c_contiguous:  # (ascontiguousarray makes a scalar 1-D)
                value = np.ascontiguousarray(value)
            sent = self._buffer(name, "sent", value, dtype)
            residual = None
            if self.enabled:
                left = self._buffer(name, "residual", value, COMPRESSIBLE)
                residual = self.residual(name)
                if residual is not None and residual.shape != value.shape:
                    residual = None
                # One fused pass (sum, round, residual) where the kernels run.
                overflow = round_with_feedback(value, residual, sent, left)
                if overflow is not None:
                    if overflow and wire_dtype == "float16":
                        total = value if residual is None else np.add(value, residual)
                        _check_float16(name, total, sent)
                    out.append(sent)
                    made.sent[name] = sent
                    made.residuals[name] = left
                    continue
            elif cast_into(value, sent):
                if wire_dtype == "float16":
                    _check_float16(name, value, sent)
                out.append(sent)
                made.sent[name] = sent
                continue
            # NumPy's way, the same bits: without the kernels, or for arrays they do not take.
            total = value if residual is None else np.add(value, residual, out=left)
            with np.errstate(over="ignore", invalid="ignore"):  # Inf is judged below
                np.copyto(sent, total, casting="unsafe")
                if wire_dtype == "float16":
                    _check_float16(name, total, sent)
                out.append(sent)
                made.sent[name] = sent
                if self.enabled:
                    np.subtract(total, sent, out=left, dtype=COMPRESSIBLE, casting="unsafe")
                    # NaN and Inf leave no residual (it would poison the next pushes).
                    if not np.isfinite(np.add.reduce(left.reshape(-1))):
                        np.copyto(left, 0.0, where=~np.isfinite(left))
                    made.residuals[name] = left
        return out, made

    def _compress_packed(
        self,
        names: Sequence[str],
        values: Sequence[TensorValue],
        dtype: np.dtype,
        wire_dtype: str,
        made: Compressed,
    ) -> list[Any] | None:
        """The small dense float32 gradients among ``values`` (two or more) packed into one
        flat buffer and compressed by one kernel call: per value, its compressed view, or
        None for the values left to :meth:`compress`'s per-variable loop; None when nothing
        was packed. Bit for bit what that loop gives, as the kernels work element by element.
        """
        picked = [
            i
            for i, v in enumerate(values)
            if type(v) is np.ndarray and v.dtype == COMPRESSIBLE and v.size <= PACK_MAX_ELEMENTS
        ]
        if len(picked) < 2 or not prepare_casts():
            return None
        packed_names = tuple(names[i] for i in picked)
        key = (dtype, packed_names, tuple(values[i].shape for i in picked))
        with self._lock:
            layout = self._layouts.get(key)
            if layout is None:
                if len(self._layouts) >= _LAYOUTS_MAX:
                    oldest = next(iter(self._layouts))
                    del self._layouts[oldest]
                    self._packed.pop(oldest, None)
                    self._synced.pop(oldest, None)
                    for kind in ("g", "sent", "residual"):
                        self._flat_spare.pop((oldest, kind), None)
                layout = self._layouts[key] = _Layout(key, packed_names, key[2])
            grads = self._flat_spare.pop((key, "g"), None)
            sent = self._flat_spare.pop((key, "sent"), None)
            left = self._flat_spare.pop((key, "residual"), None) if self.enabled else None
            carried: np.ndarray | None = None
            if self.enabled:
                current = self._packed.get(key)
                if current is not None and self._synced.get(key) == self._version:
                    carried = current.array  # the residuals of the last packed push, in place
                else:
                    kept = [self._residuals.get(n) for n in packed_names]
                    if any(r is not None for r in kept):
                        shapes = key[2]
                        if not all(
                            r is not None and r.shape == s
                            for r, s in zip(kept, shapes, strict=True)
                        ):
                            return None  # some with a residual, some without: one by one
                        carried = np.concatenate(kept, axis=None)  # a copy: read-only here
        if grads is None:
            grads = _Flat(layout, COMPRESSIBLE)
        if sent is None:
            sent = _Flat(layout, dtype)
        if self.enabled and left is None:
            left = _Flat(layout, COMPRESSIBLE)
        np.concatenate([values[i] for i in picked], axis=None, out=grads.array)
        if left is not None:
            overflow = round_with_feedback(grads.array, carried, sent.array, left.array)
            if overflow is None:
                return None
            if overflow and wire_dtype == "float16":
                total = grads.array if carried is None else np.add(grads.array, carried)
                self._check_packed(layout, total, sent)
        else:
            if not cast_into(grads.array, sent.array):
                return None
            if wire_dtype == "float16":
                self._check_packed(layout, grads.array, sent)
        made.packs.append((layout, grads, sent, left))
        result: list[Any] = [None] * len(values)
        views = sent.views
        for i, name in zip(picked, packed_names, strict=True):
            result[i] = views[name]
        return result

    @staticmethod
    def _check_packed(layout: _Layout, total: np.ndarray, sent: _Flat) -> None:
        """:func:`_check_float16` for each packed name, in order (the first one raises)."""
        overflow = np.isinf(sent.array) & np.isfinite(total)
        if not overflow.any():
            return
        starts = layout.starts
        for k, name in enumerate(layout.names):
            a, b = starts[k], starts[k + 1]
            if overflow[a:b].any():
                _check_float16(name, total[a:b], sent.array[a:b])

    def finish(self, made: Compressed, *, taken: bool) -> None:
        """A push is over: keep its residuals if the server ``taken`` it (applied, or a
        duplicate of one applied), and its buffers for the next push."""
        with self._lock:
            for name, sent in made.sent.items():
                self._spare[(name, "sent")] = sent
            for name, left in made.residuals.items():
                if taken:
                    left, self._residuals[name] = self._residuals.get(name), left
                    self._version += 1
                # (a view of a packed flat buffer is that buffer's, never a spare of its own)
                if left is not None and left.base is None:
                    self._spare[(name, "residual")] = left
            for layout, grads, sent_flat, left_flat in made.packs:
                key = layout.key
                if key not in self._layouts:  # its layout was dropped meanwhile: no spares
                    if taken and left_flat is not None:
                        self._residuals.update(left_flat.views)
                        self._version += 1
                    continue
                self._flat_spare[(key, "g")] = grads
                self._flat_spare[(key, "sent")] = sent_flat
                if left_flat is None:
                    continue
                if taken:
                    left_flat, self._packed[key] = self._packed.get(key), left_flat
                    self._residuals.update(self._packed[key].views)
                    self._version += 1
                    self._synced[key] = self._version
                if left_flat is not None:
                    self._flat_spare[(key, "residual")] = left_flat


def _check_float16(name: str, total: np.ndarray, sent: np.ndarray) -> None:
    overflow = np.isinf(sent) & np.isfinite(total)
    if overflow.any():
        worst = float(np.abs(total[overflow]).max())
        raise Float16OverflowError(
            f"Gradient for variable {name!r} has finite values up to {worst:.6g} in magnitude "
            f"({int(overflow.sum())} elements), beyond float16's largest {FLOAT16_MAX:g}: "
            "they would arrive as Inf. Nothing was sent. Scale the loss down, clip the "
            "gradients, or use wire_dtype='bfloat16' (float32's range) or None."
        )


def widen(value: Any, *, into: np.ndarray | None = None) -> Any:
    """A compressed weight (dense or rows) exactly widened to float32 (``into``: written
    into that float32 array of the same shape, which is returned)."""
    if into is not None and not isinstance(value, SparseRows):
        if not cast_into(value, into):
            np.copyto(into, value, casting="unsafe")
        return into
    return cast_tensor(value, COMPRESSIBLE)
