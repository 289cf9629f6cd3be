"""Flat slabs: same-dtype variables laid end to end in one buffer, each a view of it.

A model of many small variables pays a Python dispatch (and, on a GPU, a kernel launch)
per variable per operation. Packed into a :class:`Slab`, its variables are still ordinary
:class:`Variable` objects (views of the slab, updated in place), but an optimizer whose rule
is element-wise can update the whole slab in one call: pass the slab, with one flat gradient
laid out like it, to :meth:`Optimizer.apply` in place of its variables. The result is bit
for bit the per-variable one (every element goes through the same operations, with the
same per-step scalars), and the optimizer's slots for slab variables are slabs of their own.

>>> variables, slabs = pack([("dense/kernel", w), ("dense/bias", b)])
>>> opt.build(variables)
>>> opt.apply([flat_grad], [slabs[0]])   # == opt.apply([gw, gb], variables)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import backend
from .backend import array_module, to_device
from .variables import Variable


class Slab:
    """Variables of one dtype, end to end (in order) in the flat array ``buffer``.

    ``offsets[i]`` and ``sizes[i]`` are the element range of ``variables[i]``, whose value
    is the view ``buffer[offsets[i]:offsets[i] + sizes[i]].reshape(shape)``.
    """

    __slots__ = ("buffer", "names", "offsets", "shapes", "sizes", "variables")

    def __init__(self, buffer: Any, variables: list[Variable], offsets: list[int]) -> None:
        self.buffer = buffer
        self.variables = variables
        self.offsets = offsets
        self.sizes = [v.size for v in variables]
        self.shapes = [v.shape for v in variables]
        self.names = tuple(v.path for v in variables)

    @property
    def dtype(self) -> np.dtype:
        return self.buffer.dtype

    @property
    def size(self) -> int:
        """Elements in the slab (all its variables)."""
        return int(self.buffer.size)

    def views(self, flat: Any) -> list[Any]:
        """Views of a flat array laid out like this slab, one per variable, in their shapes."""
        return [
            flat[o : o + n].reshape(s)
            for o, n, s in zip(self.offsets, self.sizes, self.shapes, strict=True)
        ]

    def __repr__(self) -> str:
        return f"<Slab {self.dtype.name} variables={len(self.variables)} size={self.size}>"


def pack(
    arrays: Sequence[tuple[str, Any]], *, device: str | None = None, min_variables: int = 2
) -> tuple[list[Variable], list[Slab]]:
    """Variables holding copies of ``arrays`` (``(path, array)`` pairs, in order) and the
    slabs they are views of: one per dtype with at least ``min_variables`` variables, in
    the order of first appearance; the other variables are plain copies.

    ``device`` (``cpu``/``gpu``/None for the arrays' own host memory) is where the copies
    live. Each variable's value is C-contiguous, in native byte order.
    """
    xp = array_module(device) if device is not None else np
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, (_, value) in enumerate(arrays):
        by_dtype.setdefault(np.dtype(value.dtype).newbyteorder("="), []).append(i)
    variables: list[Variable | None] = [None] * len(arrays)
    slabs: list[Slab] = []
    for dtype, members in by_dtype.items():
        if len(members) < min_variables:
            for i in members:
                path, value = arrays[i]
                host = backend.empty(np.shape(value), dtype)
                host[...] = np.asarray(value, dtype=dtype)
                variables[i] = Variable(
                    host if device is None else to_device(host, device), path=path
                )
            continue
        sizes = [int(np.prod(np.shape(arrays[i][1]), dtype=np.int64)) for i in members]
        buffer = backend.empty(sum(sizes), dtype, xp)
        offsets, slab_variables, at = [], [], 0
        for i, size in zip(members, sizes, strict=True):
            path, value = arrays[i]
            view = buffer[at : at + size].reshape(np.shape(value))
            host = np.asarray(value, dtype=dtype)
            view[...] = host if xp is np else xp.asarray(host)
            variable = Variable(view, path=path)
            variables[i] = variable
            slab_variables.append(variable)
            offsets.append(at)
            at += size
        slab = Slab(buffer, slab_variables, offsets)
        for variable in slab_variables:
            variable.slab = slab
        slabs.append(slab)
    return [v for v in variables if v is not None], slabs
