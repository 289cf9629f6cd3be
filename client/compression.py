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
from typing import Any

import numpy as np

from paramserve.wire import COMPRESSIBLE, FLOAT16_MAX, SparseRows, TensorValue, dtype_from_name


class Float16OverflowError(ValueError):
    """A finite gradient too large for float16 (|g| > 65504): refused before sending."""


class ErrorFeedback:
    """Per-variable rounding residuals of one client's compressed pushes (thread-safe).

    :meth:`compress` returns what to send and the residuals it would leave;
    :meth:`commit` keeps them once the push was acknowledged, so a refused or failed push
    leaves the residuals as they were. :meth:`reset` forgets them all.
    """

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._residuals: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def residual(self, name: str) -> np.ndarray | None:
        """The residual the next compressed push of ``name`` adds (None: none kept)."""
        with self._lock:
            return self._residuals.get(name)

    def reset(self) -> None:
        """Forget every residual (a new model, a restore)."""
        with self._lock:
            self._residuals.clear()

    def compress(
        self, names: Sequence[str], values: Sequence[TensorValue], wire_dtype: str
    ) -> tuple[list[TensorValue], dict[str, np.ndarray]]:
        """``values`` with each dense float32 gradient (plus its residual) rounded to
        ``wire_dtype``, and the new residuals by name; other values pass unchanged.

        float16: a finite value that would round beyond the largest float16 (65504) is a
        :class:`Float16OverflowError`, before anything is sent; NaN and Inf travel as they
        are, for the server's non-finite policy to judge.
        """
        dtype = dtype_from_name(wire_dtype)
        out: list[TensorValue] = []
        pending: dict[str, np.ndarray] = {}
        for name, value in zip(names, values, strict=True):
            if isinstance(value, SparseRows) or value.dtype != COMPRESSIBLE:
                out.append(value)
                continue
            total = value
            if self.enabled:
                residual = self.residual(name)
                if residual is not None and residual.shape == value.shape:
                    total = value + residual
            with np.errstate(over="ignore", invalid="ignore"):  # Inf is judged below
                sent = total.astype(dtype)
                if wire_dtype == "float16":
                    _check_float16(name, total, sent)
                out.append(sent)
                if self.enabled:
                    left = total - sent.astype(COMPRESSIBLE)
                    # NaN and Inf leave no residual (it would poison the next pushes).
                    np.copyto(left, 0.0, where=~np.isfinite(left))
                    pending[name] = left
        return out, pending

    def commit(self, pending: dict[str, np.ndarray]) -> None:
        """Keep the residuals of a push the server acknowledged."""
        if pending:
            with self._lock:
                self._residuals.update(pending)


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


def widen(value: Any) -> Any:
    """A compressed weight (dense or rows) exactly widened to float32."""
    if isinstance(value, SparseRows):
        return SparseRows(value.indices, value.values.astype(COMPRESSIBLE))
    return value.astype(COMPRESSIBLE)
