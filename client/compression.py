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
    round_with_feedback,
)


class Float16OverflowError(ValueError):
    """A finite gradient too large for float16 (|g| > 65504): refused before sending."""


@dataclass
class Compressed:
    """What :meth:`ErrorFeedback.compress` made for one push: the residuals it would leave
    and the buffers it used, handed back to :meth:`ErrorFeedback.finish`."""

    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    sent: dict[str, np.ndarray] = field(default_factory=dict)


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

    def residual(self, name: str) -> np.ndarray | None:
        """The residual the next compressed push of ``name`` adds (None: none kept)."""
        with self._lock:
            return self._residuals.get(name)

    def reset(self) -> None:
        """Forget every residual (a new model, a restore)."""
        with self._lock:
            self._residuals.clear()

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
        for name, value in zip(names, values, strict=True):
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

    def finish(self, made: Compressed, *, taken: bool) -> None:
        """A push is over: keep its residuals if the server ``taken`` it (applied, or a
        duplicate of one applied), and its buffers for the next push."""
        with self._lock:
            for name, sent in made.sent.items():
                self._spare[(name, "sent")] = sent
            for name, left in made.residuals.items():
                if taken:
                    left, self._residuals[name] = self._residuals.get(name), left
                if left is not None:
                    self._spare[(name, "residual")] = left


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
