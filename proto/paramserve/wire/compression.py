"""Opt-in compression on the wire: float32 tensors travelling as bfloat16 or float16.

Both sides share the rules: only float32 variables are compressed (other dtypes travel as
they are); a gradient or a weight is rounded to nearest even into the wire dtype and
upcast exactly back to float32 on arrival. The request says which wire dtype it opts in to
(``PushHeader.wire_dtype``, ``PullRequest.wire_dtype``), so a tensor of another dtype than
its variable's without that opt-in is still refused as a dtype mismatch.

The casts run as fused numba loops (:mod:`.casts`, loaded on first use), bit for bit
``astype``; without numba, ``astype`` itself runs.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from paramserve.v1 import tensor_pb2 as tpb

from .tensors import SparseRows, TensorValue, dtype_from_proto

# The wire dtypes a request may opt in to, by name (as Client(wire_dtype=...) takes them).
WIRE_DTYPES: dict[str, int] = {"bfloat16": tpb.BFLOAT16, "float16": tpb.FLOAT16}
# The only variable dtype that is compressed.
COMPRESSIBLE = np.dtype("float32")
# Largest finite float16.
FLOAT16_MAX = float(np.finfo(np.float16).max)


def wire_dtype_code(name: str | None) -> int:
    """The proto enum for a wire dtype name (None: ``DTYPE_UNSPECIFIED``, exact float32)."""
    if name is None:
        return tpb.DTYPE_UNSPECIFIED
    if name not in WIRE_DTYPES:
        raise ValueError(
            f"wire_dtype must be one of {sorted(WIRE_DTYPES)} or None (float32, exact). "
            f"Received: {name!r}"
        )
    return WIRE_DTYPES[name]


def wire_dtype_of(code: int) -> np.dtype | None:
    """The NumPy wire dtype a request opted in to (None for ``DTYPE_UNSPECIFIED``);
    ValueError for a code that is not FLOAT16 or BFLOAT16."""
    if code == tpb.DTYPE_UNSPECIFIED:
        return None
    if code not in WIRE_DTYPES.values():
        raise ValueError(
            f"wire_dtype {code} is not supported; expected DTYPE_UNSPECIFIED (0), "
            f"FLOAT16 ({tpb.FLOAT16}) or BFLOAT16 ({tpb.BFLOAT16})"
        )
    return dtype_from_proto(code)


def cast_tensor(value: Any, dtype: np.dtype) -> TensorValue:
    """``value`` (dense, or the values of sparse rows) as ``dtype``, a copy: rounded to
    nearest even when narrowing (float32 to the wire dtype), exact when widening back."""
    if isinstance(value, SparseRows):
        return SparseRows(value.indices, _cast(value.values, dtype))
    return _cast(np.asarray(value), dtype)


def _cast(array: np.ndarray, dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if _kernel_name(array, dtype) is None:
        return array.astype(dtype)
    out = np.empty(array.shape, dtype)
    if not cast_into(array, out):
        return array.astype(dtype)
    return out


# --- the fused casts (numba) -------------------------------------------------------------
_casts: dict[str, Any] = {}


def _kernels() -> Any:
    """The compiled casts of :mod:`.casts`, or None (no numba, or it failed): astype then."""
    if "kernels" not in _casts:
        try:
            from . import casts
        except ImportError:
            _casts["kernels"] = None
        else:
            _casts["kernels"] = casts.load()
    return _casts["kernels"]


_loading = threading.Lock()


def ready_kernels() -> Any:
    """The compiled casts if they are loaded, else None, having started loading them in a
    background thread: for work that has a way without them and should not wait."""
    kernels = _casts.get("kernels", _NOT_LOADED)
    if kernels is not _NOT_LOADED:
        return kernels
    if _loading.acquire(blocking=False):  # released never: one loader per process
        threading.Thread(target=_kernels, name="paramserve-casts-load", daemon=True).start()
    return None


_NOT_LOADED = object()


def prepare_casts() -> bool:
    """Compile the fused casts now, or load them from the cache (seconds the first time on
    a machine, a fraction of a second after), so no request pays for it under a lock;
    True when they are available. Thread-safe."""
    return _kernels() is not None


# --- several cores ----------------------------------------------------------------------
# A cast of at least this many elements (cast_into, round_with_feedback) runs in pieces on
# the threads set_cast_threads chose: the same kernel over contiguous stretches, so the
# result is bit for bit one thread's. Smaller ones stay on the calling thread (waking a
# helper costs tens of microseconds). Pieces are whole multiples of 4,096 elements, about 4
# per thread, so a descheduled thread holds up little.
CAST_MIN_ELEMENTS = 1 << 20
_PIECES_PER_THREAD = 4
# auto_threads() takes at most this many cores: the casts and the optimizer kernels stream
# memory, and on the machines measured more threads than this gained nothing.
AUTO_THREADS_MAX = 4
CAST_THREADS_ENV = "PARAMSERVE_CAST_THREADS"
# (threads, pool of at least threads - 1 helpers or None), or None until chosen (first use).
_threads: tuple[int, ThreadPoolExecutor | None] | None = None
_threads_lock = threading.Lock()
# The helpers, kept when the count goes down (a pool starts threads only as work comes).
_helpers: tuple[ThreadPoolExecutor, int] | None = None
_T = TypeVar("_T")


def set_cast_threads(threads: int = 0) -> int:
    """Run the casts of large arrays on ``threads`` threads, the calling one included
    (process-wide, from the next cast; bit-identical whatever the count). 0: the value of
    ``$PARAMSERVE_CAST_THREADS`` if set, else the cores this process may run on less two (the
    gRPC threads'), at most 4, at least 1: one on a 2-core machine. Returns the count."""
    global _threads, _helpers
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0. Received: {threads!r}")
    if threads == 0:
        threads = _auto_cast_threads()
    with _threads_lock:
        if threads > 1 and (_helpers is None or _helpers[1] < threads - 1):
            if _helpers is not None:
                _helpers[0].shutdown(wait=False)  # its threads finish their pieces, then leave
            _helpers = (ThreadPoolExecutor(threads - 1, "paramserve-cast"), threads - 1)
        _threads = (threads, _helpers[0] if threads > 1 and _helpers is not None else None)
    return threads


def cast_threads() -> int:
    """The threads a large cast runs on (see :func:`set_cast_threads`)."""
    return _cast_pool()[0]


def _auto_cast_threads() -> int:
    setting = os.environ.get(CAST_THREADS_ENV, "").strip()
    if setting:
        try:
            value = int(setting)
        except ValueError:
            value = -1
        if value < 1:
            raise ValueError(f"${CAST_THREADS_ENV} must be an integer >= 1. Received: {setting!r}")
        return value
    return auto_threads()


def auto_threads(cores: int | None = None) -> int:
    """Threads for data kernels beside gRPC: ``cores`` (by default the cores this process may
    run on) less two for the RPC threads, at most :data:`AUTO_THREADS_MAX`, at least 1. The
    rule of the casts here and of the daemon's ``apply_threads = 0``."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        cores = cores or os.cpu_count() or 1
    return max(1, min(cores - 2, AUTO_THREADS_MAX))


def _cast_pool() -> tuple[int, ThreadPoolExecutor | None]:
    chosen = _threads
    if chosen is None:
        set_cast_threads(0)
        chosen = _threads
        assert chosen is not None
    return chosen


def _in_pieces(n: int, work: Callable[[int, int], _T]) -> list[_T]:
    """``[work(start, stop) ...]`` over ``[0, n)`` cut into pieces, run by the calling thread
    and the helpers as each takes the next piece; one call ``work(0, n)`` for a small ``n``
    or one thread. A helper that never started (a pool left by a fork) leaves its share to
    the others."""
    count, pool = _cast_pool()
    if pool is None or n < CAST_MIN_ELEMENTS:
        return [work(0, n)]
    piece = -(-n // (count * _PIECES_PER_THREAD))
    piece = -(-piece // 4096) * 4096
    bounds = [(a, min(a + piece, n)) for a in range(0, n, piece)]
    results: list[Any] = [None] * len(bounds)
    taken = itertools.count()  # next() is atomic under the GIL

    def run() -> None:
        while (i := next(taken)) < len(bounds):
            results[i] = work(*bounds[i])

    helpers = []
    try:
        for _ in range(min(count - 1, len(bounds) - 1)):
            helpers.append(pool.submit(run))
    except RuntimeError:  # the pool was replaced meanwhile: fewer helpers
        pass
    run()
    for helper in helpers:
        if not helper.cancel():
            helper.result()
    return results


def _usable(array: np.ndarray) -> bool:
    return (
        type(array) is np.ndarray
        and array.flags.c_contiguous
        and array.flags.aligned
        and array.dtype.isnative
    )


# (source dtype, target dtype) -> the kernel's name or None: looked up once per pair, as
# ``np.dtype.name`` costs about half a microsecond, paid per variable of a compressed push.
_KERNEL_NAMES: dict[tuple[np.dtype, np.dtype], str | None] = {}
# Wire dtype -> whether it is bfloat16 (else float16), for widen_bytes.
_IS_BF16: dict[np.dtype, bool] = {}


def _kernel_name(src: np.ndarray, dtype: np.dtype) -> str | None:
    """The kernel casting ``src`` to ``dtype`` (a pair float32 <-> bfloat16/float16), or None."""
    if not isinstance(src, np.ndarray) or src.size == 0:
        return None
    key = (src.dtype, dtype)
    name = _KERNEL_NAMES.get(key, False)
    if name is False:
        name = _KERNEL_NAMES[key] = _pair_kernel_name(*key)
    return name


def _pair_kernel_name(src: np.dtype, dtype: np.dtype) -> str | None:
    if src == COMPRESSIBLE:
        op, wire = "round", dtype
    elif dtype == COMPRESSIBLE:
        op, wire = "widen", src
    else:
        return None
    if wire.name not in WIRE_DTYPES or not wire.isnative:
        return None
    return f"{op}_{'bf16' if wire.name == 'bfloat16' else 'f16'}"


def cast_into(src: np.ndarray, dst: np.ndarray) -> bool:
    """``dst[...] = src`` (the same shape) cast as ``astype`` casts, bit for bit, by a fused
    kernel: float32 rounded to bfloat16 or float16, or those widened to float32. False, with
    ``dst`` untouched, when no kernel applies (another pair of dtypes, an array that is not
    C-contiguous, aligned and native, no numba): cast with NumPy then."""
    name = _kernel_name(src, dst.dtype)
    if (
        name is None
        or src.shape != dst.shape
        or not (_usable(src) and _usable(dst) and dst.flags.writeable)
    ):
        return False
    kernels = _kernels()
    if kernels is None:
        return False
    flat_src, flat_dst = src.reshape(-1), dst.reshape(-1)
    kernel = getattr(kernels, name)
    if name.startswith("round"):
        bits_src, bits_dst = flat_src.view(np.uint32), flat_dst.view(np.uint16)
    else:
        bits_src, bits_dst = flat_src.view(np.uint16), flat_dst.view(np.uint32)
    if flat_src.size < CAST_MIN_ELEMENTS:  # on this thread, without the pieces' set-up
        _cast_flat(kernel, bits_src, bits_dst, flat_src, flat_dst)
    else:
        _in_pieces(
            flat_src.size,
            lambda a, b: _cast_flat(
                kernel, bits_src[a:b], bits_dst[a:b], flat_src[a:b], flat_dst[a:b]
            ),
        )
    return True


def _cast_flat(
    kernel: Any, bits_src: np.ndarray, bits_dst: np.ndarray, src: np.ndarray, dst: np.ndarray
) -> None:
    """One cast kernel call (the arrays' bits), then NaNs written as ``astype`` would."""
    if kernel(bits_src, bits_dst):
        _nan_as_numpy(src, dst)


def widen_bytes(data: Any, dst: np.ndarray, wire: np.dtype) -> bool:
    """``dst`` (float32, 1-D) = the ``wire`` dtype (bfloat16 or float16) values in the bytes
    ``data`` (any alignment, ``2 * dst.size`` bytes), exactly; returns whether all of them
    were finite. NumPy does it when the kernels are unavailable."""
    src = np.frombuffer(data, dtype=wire)
    kernels = _kernels()
    if kernels is None or not _usable(dst):
        np.copyto(dst, src, casting="unsafe")
        return bool(np.isfinite(dst).all())
    bf16 = _IS_BF16.get(wire)
    if bf16 is None:
        bf16 = _IS_BF16[wire] = wire.name == "bfloat16"
    kernel = kernels.widen_bf16 if bf16 else kernels.widen_f16
    bad = kernel(src.view(np.uint16), dst.view(np.uint32)) if src.size else 0
    if bad:
        _nan_as_numpy(src, dst)
    return not bad


_COPY_KERNELS = {
    np.dtype(np.float32): ("copy_f32", np.uint32),
    np.dtype(np.float64): ("copy_f64", np.uint64),
}


def copy_checked(data: Any, dst: np.ndarray) -> bool | None:
    """``dst`` (float32 or float64, 1-D, C-contiguous, aligned, writable) = the values in the
    bytes ``data`` (any alignment, ``dst.nbytes`` of them), in one pass that also tells
    whether all of them are finite (True/False); None, with nothing written, when the
    kernels are unavailable or ``dst`` does not suit them (copy and check another way)."""
    found = _COPY_KERNELS.get(dst.dtype)
    kernels = _kernels()
    if found is None or kernels is None or not (_usable(dst) and dst.flags.writeable):
        return None
    name, bits = found
    src = np.frombuffer(data, dtype=bits)
    if src.size != dst.size:
        raise ValueError(f"{src.nbytes} bytes for {dst.nbytes} bytes of {dst.dtype.name}")
    return not getattr(kernels, name)(src, dst.view(bits))


def can_scatter(target: np.ndarray) -> bool:
    """Whether :func:`scatter_bytes` may widen into ``target`` (a float32 array it holds by
    address): the kernels are there and ``target`` is C-contiguous, aligned and writable."""
    return (
        target.dtype == COMPRESSIBLE
        and _usable(target)
        and target.flags.writeable
        and _kernels() is not None
    )


def scatter_bytes(
    data: Any, addresses: np.ndarray, ends: np.ndarray, first: int, wire: np.dtype
) -> bool:
    """Widen the ``wire`` dtype values in ``data`` (whole 2-byte elements), elements
    ``first`` on of a stretch of tensors lying end to end, each into its own float32 array:
    tensor ``k`` holds elements ``ends[k - 1]:ends[k]`` of the stretch (from 0), and its
    array (kept alive by the caller, checked by :func:`can_scatter`) lies at
    ``addresses[k]``. One kernel call for the whole piece, whatever the tensors it spans.
    True when every value was finite; False when some was not (those written, NaNs maybe
    not as ``astype`` writes them: widen such a piece again tensor by tensor)."""
    src = np.frombuffer(data, dtype=np.uint16)
    bf16 = _IS_BF16.get(wire)
    if bf16 is None:
        bf16 = _IS_BF16[wire] = wire.name == "bfloat16"
    kernels = _kernels()
    kernel = kernels.scatter_bf16 if bf16 else kernels.scatter_f16
    return not (kernel(src, addresses, ends, first) if src.size else 0)


def scatter_copy(data: Any, addresses: np.ndarray, ends: np.ndarray, first: int) -> bool:
    """Copy the bytes ``data``, bytes ``first`` on of a stretch of tensors lying end to end,
    each into its own buffer: tensor ``k`` holds bytes ``ends[k - 1]:ends[k]`` of the
    stretch (from 0), its buffer (kept alive by the caller) at ``addresses[k]``. One kernel
    call for the whole piece; False, with nothing written, until the kernels are loaded
    (:func:`ready_kernels`): copy tensor by tensor then."""
    kernels = ready_kernels()
    if kernels is None:
        return False
    src = np.frombuffer(data, dtype=np.uint8)
    if src.size:
        kernels.scatter_copy(src, addresses, ends, first)
    return True


def _nan_as_numpy(src: np.ndarray, dst: np.ndarray) -> None:
    """The elements of ``dst`` cast from a NaN of ``src``, as ``astype`` writes them: NaN
    payloads are the library's choice (ml_dtypes quiets them, NumPy keeps the high bits)."""
    nan = np.isnan(src)
    if nan.any():
        with np.errstate(invalid="ignore"):
            dst[nan] = src[nan].astype(dst.dtype)


def round_with_feedback(
    g: np.ndarray, carried: np.ndarray | None, sent: np.ndarray, left: np.ndarray
) -> int | None:
    """Error feedback's step, fused: ``t = g + carried`` (``g`` when ``carried`` is None),
    ``sent = t`` rounded to ``sent``'s dtype (bfloat16 or float16) and ``left = t - sent``,
    0 where that is not finite; all float32 arrays of one shape, C-contiguous, ``left``
    distinct from the others. Bit for bit NumPy's ``add``, ``astype``, ``subtract``.

    Returns the number of finite sums rounded to Inf (overflow), or None, with nothing
    written, when the kernels do not apply (NumPy's turn).
    """
    name = _kernel_name(g, sent.dtype)
    if (
        name is None
        or name[0] != "r"  # not a rounding ("round_...")
        or left.dtype != COMPRESSIBLE
        or (carried is not None and carried.dtype != COMPRESSIBLE)
    ):
        return None
    shape = g.shape
    for a in (g, sent, left) if carried is None else (g, carried, sent, left):
        if a.shape != shape or not _usable(a):
            return None
    kernels = _kernels()
    if kernels is None:
        return None
    kernel = kernels.feedback_bf16 if name == "round_bf16" else kernels.feedback_f16
    flat_g = g.reshape(-1)
    flat_carried = flat_g if carried is None else carried.reshape(-1)
    flat_sent = sent.reshape(-1)
    flat_left = left.reshape(-1)
    add = carried is not None
    if flat_g.size < CAST_MIN_ELEMENTS:  # on this thread, without the pieces' set-up
        return _feedback_flat(kernel, flat_g, flat_carried, flat_sent, flat_left, add)
    pieces = _in_pieces(
        flat_g.size,
        lambda a, b: _feedback_flat(
            kernel, flat_g[a:b], flat_carried[a:b], flat_sent[a:b], flat_left[a:b], add
        ),
    )
    return sum(pieces)


def _feedback_flat(
    kernel: Any,
    g: np.ndarray,
    carried: np.ndarray,
    sent: np.ndarray,
    left: np.ndarray,
    add: bool,
) -> int:
    """One error-feedback kernel call on flat arrays, NaNs written as ``astype`` would;
    the count of finite sums that overflowed."""
    nan, overflow = kernel(g, carried, sent.view(np.uint16), left, add)
    if nan:
        with np.errstate(invalid="ignore"):  # Inf + -Inf: one of the NaNs to write
            total = np.add(g, carried) if add else g
        _nan_as_numpy(total, sent)
    return int(overflow)
