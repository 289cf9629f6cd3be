"""Checking pushed gradients against the model, and combining several pushes into one.

Pure functions used by :class:`~paramserve.server.store.ModelStore`: they read the
variable specs and never touch model state, so a push is fully checked before anything
changes. Dense gradients are validated without copying; combining writes into one fresh
buffer per variable, summing left to right in the variable dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from paramserve.optim_core import IndexedSlices, Slab, array_module, to_device
from paramserve.wire import SparseRows

from .aggregation import REDUCTIONS
from .errors import InvalidArgument, NotFound, limit_exceeded

# What a push with NaN or Inf gets (the store's and --nonfinite's choices).
NONFINITE_POLICIES = ("reject", "skip", "allow")
# Elements checked per block by all_finite: a 128 KiB scratch, and blocks that stay in cache.
FINITE_BLOCK_ELEMENTS = 1 << 17


def all_finite(values: np.ndarray) -> bool:
    """Whether every element of ``values`` is finite, in one read and bounded scratch memory.

    ``np.isfinite(g).all()`` allocates a boolean array as large as the gradient (16 MiB for
    16M floats); this checks a C-contiguous array block by block into one small scratch
    buffer, stopping at the first bad block. Other layouts take the plain route.
    """
    if values.size <= FINITE_BLOCK_ELEMENTS or not values.flags.c_contiguous:
        # Small (any layout: the scratch is small too) or not C-contiguous: the plain route.
        return bool(np.isfinite(values).all())
    flat = values.reshape(-1)
    scratch = np.empty(FINITE_BLOCK_ELEMENTS, dtype=bool)
    for start in range(0, flat.size, FINITE_BLOCK_ELEMENTS):
        block = flat[start : start + FINITE_BLOCK_ELEMENTS]
        ok = scratch[: block.size]
        np.isfinite(block, out=ok)
        if not ok.all():
            return False
    return True


class FiniteChecked(dict):
    """Gradients by name, plus the names (``finite``) already found free of NaN and Inf.

    The gRPC layer scans dense tensors chunk by chunk while they arrive
    (:class:`~paramserve.server.streams.FiniteScan`), overlapping the scan with the transfer
    while each chunk is still in cache; :func:`check_push` then skips those tensors instead
    of reading them all again.
    """

    def __init__(
        self,
        values: Mapping[str, Any],
        *,
        finite: frozenset[str],
        packed: Sequence[tuple[tuple[str, ...], np.ndarray]] = (),
    ) -> None:
        super().__init__(values)
        self.finite = finite
        # ``(names, flat)``: the gradients of these variables (in this order) are views of
        # the one flat array (as received: end to end), so a slab of exactly these
        # variables can be checked and applied through it whole (see check_slab_push).
        self.packed = packed


class PreparedPush(dict):
    """Checked gradients by name (see :func:`check_push`), plus ``slabs``: the flat gradient
    of each slab whose variables all have theirs in it (those variables are not among the
    names)."""

    def __init__(self, values: Mapping[str, Any] = (), *, slabs: dict[Any, Any] | None = None):
        super().__init__(values)
        self.slabs: dict[Any, Any] = slabs or {}


def _same_dtype(got: np.dtype, expected: np.dtype) -> bool:
    """Equal dtypes, treating byte orders alike (the caller converts those)."""
    return got == expected or (
        got.name == expected.name and got.newbyteorder("=") == expected.newbyteorder("=")
    )


def _native(array: np.ndarray) -> np.ndarray:
    """The array in native byte order (a copy only for byte-swapped input)."""
    if array.dtype.isnative:
        return array
    return array.astype(array.dtype.newbyteorder("="))


def _describe_names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{shown}{more}"


def _dtype_mismatch(name: str, got: np.dtype, expected: np.dtype) -> InvalidArgument:
    return InvalidArgument(
        f"gradient for {name!r} has dtype {got.name}, expected {expected.name}",
        reason="DTYPE_MISMATCH",
        metadata={"variable": name, "expected": expected.name, "got": got.name},
        violations=[(f"tensors[{name}].dtype", f"expected {expected.name}")],
    )


def _check_sparse(name: str, rows: SparseRows, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if not shape:
        raise InvalidArgument(
            f"gradient for {name!r} has sparse rows, but the variable is a scalar "
            "(sparse rows need a variable of rank >= 1)",
            metadata={"variable": name},
            violations=[(f"tensors[{name}].layout", "sparse rows need a variable of rank >= 1")],
        )
    indices, values = rows.indices, rows.values
    if not isinstance(indices, np.ndarray) or not isinstance(values, np.ndarray):
        raise InvalidArgument(
            f"sparse gradient for {name!r} must hold NumPy arrays; got indices of type "
            f"{type(indices).__name__} and values of type {type(values).__name__}"
        )
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise InvalidArgument(
            f"sparse gradient for {name!r} needs 1-D integer indices; got dtype "
            f"{indices.dtype.name} with shape {tuple(indices.shape)}",
            metadata={"variable": name},
            violations=[(f"tensors[{name}]", "row indices must be 1-D integers")],
        )
    if not _same_dtype(values.dtype, dtype):
        raise _dtype_mismatch(name, values.dtype, dtype)
    expected = (int(indices.shape[0]), *shape[1:])
    if tuple(values.shape) != expected:
        raise InvalidArgument(
            f"sparse gradient for {name!r} has values of shape {tuple(values.shape)}, "
            f"expected {expected} (one row of the variable's shape {shape} per index)",
            reason="SHAPE_MISMATCH",
            metadata={"variable": name, "expected": list(expected), "got": list(values.shape)},
            violations=[(f"tensors[{name}].shape", f"expected {list(expected)} for these rows")],
        )
    if indices.size:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= shape[0]:
            raise InvalidArgument(
                f"sparse gradient for {name!r} has row indices in [{low}, {high}], "
                f"expected indices in [0, {shape[0]})",
                metadata={"variable": name},
                violations=[(f"tensors[{name}]", f"row indices must be in [0, {shape[0]})")],
            )


def check_push(
    grads: Mapping[str, Any],
    specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    *,
    nonfinite: str,
    device: str,
    max_tensor_bytes: int,
) -> dict[str, Any] | None:
    """Validate every gradient, then return them ready for ``combine``/``apply``.

    ``specs`` maps each variable name to its ``(dtype, shape)``. All structural checks
    run on every tensor first, then finiteness, so nothing is half-accepted. Returns
    None when a gradient is non-finite under the ``skip`` policy.
    """
    if not isinstance(grads, Mapping) or not grads:
        raise InvalidArgument(
            "a push needs at least one gradient; got none",
            violations=[("tensors", "must not be empty")],
        )
    known_finite = grads.finite if isinstance(grads, FiniteChecked) else frozenset()
    unknown = [n for n in grads if n not in specs]
    if unknown:
        raise NotFound(
            f"unknown variable(s) {_describe_names(unknown)}; the model has "
            f"{len(specs)} variables: {_describe_names(list(specs))}",
            reason="UNKNOWN_VARIABLE",
            metadata={"variable": unknown[0]},
        )
    # NumPy scalars (a gradient of a 0-d variable computed locally) become 0-d arrays.
    grads = {n: np.asarray(g) if isinstance(g, np.generic) else g for n, g in grads.items()}
    for name, grad in grads.items():
        dtype, shape = specs[name]
        if isinstance(grad, SparseRows):
            _check_sparse(name, grad, dtype, shape)
            size = grad.values.nbytes + grad.indices.nbytes
        elif isinstance(grad, np.ndarray):
            if not _same_dtype(grad.dtype, dtype):
                raise _dtype_mismatch(name, grad.dtype, dtype)
            if tuple(grad.shape) != shape:
                raise InvalidArgument(
                    f"gradient for {name!r} has shape {tuple(grad.shape)}, expected {shape}",
                    reason="SHAPE_MISMATCH",
                    metadata={"variable": name, "expected": list(shape), "got": list(grad.shape)},
                    violations=[(f"tensors[{name}].shape", f"expected {list(shape)}")],
                )
            size = grad.nbytes
        else:
            raise InvalidArgument(
                f"gradient for {name!r} must be a NumPy array or SparseRows; "
                f"got {type(grad).__name__}"
            )
        if size > max_tensor_bytes:
            raise limit_exceeded(
                f"gradient for {name!r} is {size} bytes, over the limit of "
                f"{max_tensor_bytes} bytes (max_tensor_bytes)",
                limit="max_tensor_bytes",
                limit_value=max_tensor_bytes,
                requested=size,
                variable=name,
            )
    if nonfinite != "allow":
        for name, grad in grads.items():
            if name in known_finite:
                continue
            values = grad.values if isinstance(grad, SparseRows) else grad
            if not all_finite(values):
                if nonfinite == "skip":
                    return None
                raise InvalidArgument(
                    f"gradient for {name!r} contains NaN or Inf values "
                    "(the server's non-finite policy is 'reject')",
                    reason="NONFINITE_GRADIENT",
                    metadata={"variable": name, "policy": nonfinite},
                )
    prepared: dict[str, Any] = {}
    for name, grad in grads.items():
        if isinstance(grad, SparseRows):
            indices = to_device(np.asarray(grad.indices, dtype=np.int64), device)
            prepared[name] = IndexedSlices(indices, to_device(_native(grad.values), device))
        else:
            prepared[name] = to_device(_native(grad), device)
    return prepared


def check_slab_push(
    grads: Mapping[str, Any],
    slabs: Mapping[tuple[str, ...], Slab],
    specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    *,
    nonfinite: str,
    device: str,
    max_tensor_bytes: int,
) -> PreparedPush | None:
    """:func:`check_push` in bulk for the slabs a push carries whole.

    ``grads.packed`` names flat gradients laid out like whole slabs of the model
    (``slabs``, by their variables' names): each is checked once (dtype, size, the largest
    variable against ``max_tensor_bytes``, NaN/Inf in one vectorised pass unless the stream
    scan vouched for all its variables) instead of variable by variable; the other
    gradients go through :func:`check_push`. Returns None when the ``skip`` policy drops
    the push.
    """
    known_finite = grads.finite if isinstance(grads, FiniteChecked) else frozenset()
    whole: dict[Slab, np.ndarray] = {}
    for names, flat in getattr(grads, "packed", ()):
        slab = slabs.get(names)
        if (
            slab is not None
            and isinstance(flat, np.ndarray)
            and _same_dtype(flat.dtype, slab.dtype)
            and flat.shape == (slab.size,)
        ):
            whole[slab] = flat
    if not whole:
        prepared = check_push(
            grads,
            specs,
            nonfinite=nonfinite,
            device=device,
            max_tensor_bytes=max_tensor_bytes,
        )
        return None if prepared is None else PreparedPush(prepared)
    covered = sum(len(slab.names) for slab in whole)
    if covered == len(grads):
        rest: dict[str, Any] = {}
    else:
        names = set().union(*(slab.names for slab in whole))
        rest = {n: g for n, g in grads.items() if n not in names}
    for slab in whole:
        itemsize = slab.dtype.itemsize
        largest = max(slab.sizes) * itemsize
        if largest > max_tensor_bytes:
            name = slab.names[slab.sizes.index(max(slab.sizes))]
            raise limit_exceeded(
                f"gradient for {name!r} is {largest} bytes, over the limit of "
                f"{max_tensor_bytes} bytes (max_tensor_bytes)",
                limit="max_tensor_bytes",
                limit_value=max_tensor_bytes,
                requested=largest,
                variable=name,
            )
    prepared: dict[str, Any] = {}
    if rest:
        checked = check_push(
            FiniteChecked(rest, finite=known_finite),
            specs,
            nonfinite=nonfinite,
            device=device,
            max_tensor_bytes=max_tensor_bytes,
        )
        if checked is None:
            return None
        prepared = checked
    if nonfinite != "allow":
        for slab, flat in whole.items():
            if known_finite and known_finite.issuperset(slab.names):
                continue
            if all_finite(flat):
                continue
            if nonfinite == "skip":
                return None
            name = next(
                n
                for n, view in zip(slab.names, slab.views(flat), strict=True)
                if not all_finite(view)
            )
            raise InvalidArgument(
                f"gradient for {name!r} contains NaN or Inf values "
                "(the server's non-finite policy is 'reject')",
                reason="NONFINITE_GRADIENT",
                metadata={"variable": name, "policy": nonfinite},
            )
    return PreparedPush(
        prepared, slabs={s: to_device(_native(f), device) for s, f in whole.items()}
    )


def _scatter_add(out: Any, indices: Any, values: Any) -> None:
    """``out[indices] += values`` with repeated indices accumulated one by one."""
    if isinstance(out, np.ndarray):
        np.add.at(out, indices, values)
    else:  # CuPy: only reached on a GPU store, so cupyx is importable.
        import cupyx

        cupyx.scatter_add(out, indices, values)


def _sum_parts(parts: list[Any], dtype: np.dtype, shape: tuple[int, ...], xp: Any) -> tuple:
    """Sum contributions left to right; returns ``(result, owned)`` (owned: a fresh buffer)."""
    if all(isinstance(p, IndexedSlices) for p in parts):
        if len(parts) == 1:
            return parts[0], False
        indices = xp.concatenate([p.indices for p in parts])
        values = xp.concatenate([p.values for p in parts])
        return IndexedSlices(indices, values), True
    first = parts[0]
    if len(parts) == 1:
        return first, False
    if isinstance(first, IndexedSlices):
        out = xp.zeros(shape, dtype=dtype)
        _scatter_add(out, first.indices, first.values)
        rest = parts[1:]
    elif isinstance(parts[1], IndexedSlices):
        out = first.copy()
        rest = parts[1:]
    else:
        # The fresh buffer (out= keeps 0-d results arrays); the rest accumulate in place.
        out = xp.add(first, parts[1], out=xp.empty_like(first))
        rest = parts[2:]
    for part in rest:
        if isinstance(part, IndexedSlices):
            _scatter_add(out, part.indices, part.values)
        else:
            xp.add(out, part, out=out)
    return out, True


def _scaled(value: Any, factor: Any, owned: bool, *, divide: bool, xp: Any) -> Any:
    """``value / factor`` or ``value * factor``, in place when ``value`` is our own buffer."""
    if isinstance(value, IndexedSlices):
        values = _scaled(value.values, factor, owned, divide=divide, xp=xp)
        return IndexedSlices(value.indices, values)
    op = xp.divide if divide else xp.multiply
    return op(value, factor, out=value if owned else xp.empty_like(value))


def combine(
    pushes: Sequence[Mapping[str, Any]],
    specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    *,
    reduction: str,
    scale: float = 1.0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Reduce prepared pushes (``check_push`` output) into one gradient per variable.

    Per variable, in list order: dense + dense is summed left to right in the variable
    dtype, sparse + sparse concatenates rows, a mix becomes dense. ``mean`` then divides
    by ``len(pushes)`` (a push without the variable counts as zero) and ``scale`` != 1
    multiplies, both in the variable dtype. A lone contribution is passed through
    without a copy.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}. Received: {reduction!r}")
    if not pushes:
        raise ValueError("combine() needs at least one push")
    if len(pushes) == 1 and scale == 1.0:
        return pushes[0]  # a lone contribution passes through (as each variable's would)
    xp = array_module(device)
    # Slabs every push carries whole are combined whole (the same element-wise sums); a
    # slab only some carry whole is split into its variables' views in those.
    slab_sets = [getattr(p, "slabs", None) or {} for p in pushes]
    common = [s for s in slab_sets[0] if all(s in other for other in slab_sets[1:])]
    if any(slab_sets):
        split = []
        for push, slabs in zip(pushes, slab_sets, strict=True):
            extra = [s for s in slabs if s not in common]
            if extra:
                push = dict(push)
                for s in extra:
                    push.update(zip(s.names, s.views(slabs[s]), strict=True))
            split.append(push)
        pushes = split
    out_slabs: dict[Any, Any] = {}
    for slab in common:
        value, owned = _sum_parts([s[slab] for s in slab_sets], slab.dtype, (slab.size,), xp)
        if reduction == "mean" and len(pushes) > 1:
            value = _scaled(value, slab.dtype.type(len(pushes)), owned, divide=True, xp=xp)
            owned = True
        if scale != 1.0:
            value = _scaled(value, slab.dtype.type(scale), owned, divide=False, xp=xp)
        out_slabs[slab] = value
    names: dict[str, None] = {}
    for push in pushes:
        names.update(dict.fromkeys(push))
    out: dict[str, Any] = {}
    for name in names:
        dtype, shape = specs[name]
        parts = [push[name] for push in pushes if name in push]
        value, owned = _sum_parts(parts, dtype, shape, xp)
        if reduction == "mean" and len(pushes) > 1:
            value = _scaled(value, dtype.type(len(pushes)), owned, divide=True, xp=xp)
            owned = True
        if scale != 1.0:
            value = _scaled(value, dtype.type(scale), owned, divide=False, xp=xp)
        out[name] = value
    return PreparedPush(out, slabs=out_slabs) if out_slabs else out
