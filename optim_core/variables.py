"""Named arrays that optimizers update in place: model variables and optimizer slots."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import get_array_module, is_cupy_array, to_device, to_numpy

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_float_dtype(dtype: Any, what: str) -> None:
    """Refuse non-floating dtypes with a message that says what is supported."""
    if np.dtype(dtype).name not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} must have a floating dtype ({', '.join(FLOAT_DTYPES)}). "
            f"Received: dtype={np.dtype(dtype).name}"
        )


class Variable:
    """An array with a Keras-style ``name`` and ``path``, updated in place by optimizers.

    ``value`` is the NumPy or CuPy array itself: wrapping a NumPy array does not copy it,
    so the caller's array sees every update. ``path`` is the variable's full name
    (``"dense/kernel"``); ``name`` is its last component (``"kernel"``), as in Keras,
    where weight-decay exclusion matches ``name`` and slot names derive from ``path``.
    """

    # ``slab``: the :class:`~paramserve.optim_core.slabs.Slab` this variable's value is a view
    # of (set by ``slabs.pack``), else None.
    __slots__ = ("name", "path", "slab", "value")

    def __init__(
        self,
        value: Any,
        name: str | None = None,
        *,
        path: str | None = None,
        dtype: Any = None,
        device: str | None = None,
    ) -> None:
        if device is not None:
            value = to_device(value, device, dtype)
        elif not (isinstance(value, np.ndarray) or is_cupy_array(value)):
            value = np.array(value, dtype=dtype if dtype is not None else np.float32)
        elif dtype is not None and value.dtype != np.dtype(dtype):
            value = value.astype(dtype)
        if path is None:
            path = name if name is not None else "variable"
        if name is None:
            name = path.rsplit("/", 1)[-1]
        self.value = value
        self.name = name
        self.path = path
        self.slab: Any = None

    # --- array-like surface, so update rules read like Keras code -------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return self.value.ndim

    @property
    def size(self) -> int:
        return int(self.value.size)

    @property
    def xp(self) -> Any:
        """The array module (numpy or cupy) holding this variable."""
        value = self.value
        return np if isinstance(value, np.ndarray) else get_array_module(value)

    def numpy(self) -> np.ndarray:
        """A host NumPy copy of the value."""
        return np.array(to_numpy(self.value), copy=True)

    def assign(self, value: Any) -> None:
        """Overwrite the value in place (casting to this variable's dtype)."""
        self.value[...] = value

    def assign_add(self, value: Any) -> None:
        """``value += x`` in place (same rounding as ``value = value + x``, no temporary)."""
        self.xp.add(self.value, value, out=self.value)

    def assign_sub(self, value: Any) -> None:
        """``value -= x`` in place (same rounding as ``value = value - x``, no temporary)."""
        self.xp.subtract(self.value, value, out=self.value)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = to_numpy(self.value)
        return arr if dtype is None else arr.astype(dtype)

    def _v(self, other: Any) -> Any:
        return other.value if isinstance(other, Variable) else other

    def __add__(self, o: Any) -> Any:
        return self.value + self._v(o)

    def __radd__(self, o: Any) -> Any:
        return self._v(o) + self.value

    def __sub__(self, o: Any) -> Any:
        return self.value - self._v(o)

    def __rsub__(self, o: Any) -> Any:
        return self._v(o) - self.value

    def __mul__(self, o: Any) -> Any:
        return self.value * self._v(o)

    def __rmul__(self, o: Any) -> Any:
        return self._v(o) * self.value

    def __truediv__(self, o: Any) -> Any:
        return self.value / self._v(o)

    def __rtruediv__(self, o: Any) -> Any:
        return self._v(o) / self.value

    def __neg__(self) -> Any:
        return -self.value

    def __repr__(self) -> str:
        return f"<Variable path={self.path!r} shape={self.shape} dtype={self.dtype.name}>"


class IndexedSlices:
    """A sparse row gradient: ``values[i]`` is the gradient of row ``indices[i]``.

    It means what a Keras ``IndexedSlices`` gradient means: the dense gradient that is
    zero on rows not listed, with the values of repeated indices summed.
    """

    __slots__ = ("indices", "values")

    def __init__(self, indices: Any, values: Any) -> None:
        self.indices = indices
        self.values = values

    def __repr__(self) -> str:
        return f"IndexedSlices(rows={len(self.indices)}, values_shape={tuple(self.values.shape)})"


def densify(grad: IndexedSlices | tuple, variable: Variable) -> Any:
    """Validate a sparse row gradient against ``variable`` and return it as a dense array."""
    indices, values = (grad.indices, grad.values) if isinstance(grad, IndexedSlices) else grad
    xp = variable.xp
    if variable.ndim < 1:
        raise ValueError(
            f"A sparse (indices, values) gradient needs a variable of rank >= 1; "
            f"variable {variable.path!r} is a scalar."
        )
    indices = xp.asarray(indices)
    values = xp.asarray(values)
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise ValueError(
            f"Sparse gradient indices for {variable.path!r} must be a 1-D integer array. "
            f"Received: shape={tuple(indices.shape)}, dtype={indices.dtype.name}"
        )
    expected = (int(indices.shape[0]), *variable.shape[1:])
    if tuple(values.shape) != expected:
        raise ValueError(
            f"Sparse gradient values for {variable.path!r} must have shape {expected} "
            f"(one row per index). Received: shape={tuple(values.shape)}"
        )
    rows = variable.shape[0]
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= rows):
        raise ValueError(
            f"Sparse gradient indices for {variable.path!r} must be in [0, {rows}). "
            f"Received: min={int(indices.min())}, max={int(indices.max())}"
        )
    dense = xp.zeros(variable.shape, dtype=variable.dtype)
    values = values.astype(variable.dtype, copy=False)
    if xp is np:
        np.add.at(dense, indices, values)
    else:  # CuPy: scatter_add handles repeated indices atomically.
        import cupyx

        cupyx.scatter_add(dense, indices, values)
    return dense
