"""Fused numba CPU kernels: one pass over memory per update instead of ~10 NumPy temporaries."""

# Why: a NumPy update rule such as Adam's makes about ten full-size temporaries and
# reads/writes each of them once, and temporaries above glibc's mmap threshold are
# page-faulted afresh every call; that reaches ~0.1-0.2 of the memory floor. A numba
# loop reads w, g and the slots once and writes them once (~1.0 of the floor).
#
# Exactness: each kernel does, per element, exactly the operations of its xp rule in the
# same order and the same dtype, with no fast-math and no FMA contraction, so the results
# are bit-identical to NumPy's (tests/optim/test_fused.py checks it). error_model="numpy"
# gives IEEE division (inf/nan, no ZeroDivisionError check) and lets LLVM vectorise.
#
# numba is imported lazily, on the first can_fuse() call (or prepare()), never at package
# import. If it is missing or fails to compile, can_fuse() answers False and the xp rules run.
# The compiled kernels are cached per user (cache_dir()), never inside the installed package.
#
# Several cores (set_threads): a large variable's kernel runs on pieces of the flat arrays
# at once, the calling thread and pool threads taking the next piece as they finish one
# (nogil kernels, so they run in parallel). Every element goes through the same serial
# kernel, so the results are bit-identical whatever the thread count. A Python thread pool
# rather than numba's parallel=True: numba's OpenMP layer collapses when the machine is
# oversubscribed (measured 10-100x slower than serial at load 16 on 2 cores: its threads
# wait at a barrier for a descheduled one), its workqueue layer is not thread-safe, and
# parallel kernels cost extra compiles; here a thread that is late only leaves its pieces
# to the others.

from __future__ import annotations

import itertools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # base imports this module
    from .base import Optimizer

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# --- kernels: plain Python over flat 1-D arrays, compiled by _load() -----------------------
# Each loop body repeats its optimizer's xp rule operation by operation; keep them in step.


def _adam_kernel(w, g, m, v, alpha, omb1, omb2, eps):
    # m += (g - m)*omb1; v += (g*g - v)*omb2; w -= (m*alpha)/(sqrt(v) + eps)
    for i in range(w.shape[0]):
        gi = g[i]
        mi = m[i] + (gi - m[i]) * omb1
        vi = v[i] + (gi * gi - v[i]) * omb2
        m[i] = mi
        v[i] = vi
        w[i] = w[i] - (mi * alpha) / (np.sqrt(vi) + eps)


def _adam_amsgrad_kernel(w, g, m, v, v_hat, alpha, omb1, omb2, eps):
    # As _adam_kernel, with v_hat = maximum(v_hat, v) (NaN-propagating) used in place of v.
    for i in range(w.shape[0]):
        gi = g[i]
        mi = m[i] + (gi - m[i]) * omb1
        vi = v[i] + (gi * gi - v[i]) * omb2
        m[i] = mi
        v[i] = vi
        vh = v_hat[i]
        if vi > vh or vi != vi:
            vh = vi
        v_hat[i] = vh
        w[i] = w[i] - (mi * alpha) / (np.sqrt(vh) + eps)


def _sgd_kernel(w, g, lr):
    # w -= g*lr
    for i in range(w.shape[0]):
        w[i] = w[i] - g[i] * lr


def _sgd_momentum_kernel(w, g, m, mu, lr):
    # m = m*mu - g*lr; w += m
    for i in range(w.shape[0]):
        mi = m[i] * mu - g[i] * lr
        m[i] = mi
        w[i] = w[i] + mi


def _sgd_nesterov_kernel(w, g, m, mu, lr):
    # m = m*mu - g*lr; w += m*mu - g*lr (with the new m)
    for i in range(w.shape[0]):
        gl = g[i] * lr
        mi = m[i] * mu - gl
        m[i] = mi
        w[i] = w[i] + (mi * mu - gl)


def _weight_decay_kernel(w, wd, lr):
    # w = w - w*wd*lr (base.py's decoupled weight decay)
    for i in range(w.shape[0]):
        w[i] = w[i] - w[i] * wd * lr


def _ema_kernel(average, w, mu, one_minus_mu):
    # average = mu*average + (1 - mu)*w (base.py's EMA of the model variables)
    for i in range(w.shape[0]):
        average[i] = mu * average[i] + one_minus_mu * w[i]


# Argument kinds per kernel: "w" writable array, "g" read-only-capable array, "s" scalar.
_SIGNATURES = {
    "adam": (_adam_kernel, "wgwwssss"),
    "adam_amsgrad": (_adam_amsgrad_kernel, "wgwwwssss"),
    "sgd": (_sgd_kernel, "wgs"),
    "sgd_momentum": (_sgd_momentum_kernel, "wgwss"),
    "sgd_nesterov": (_sgd_nesterov_kernel, "wgwss"),
    "weight_decay": (_weight_decay_kernel, "wss"),
    "ema": (_ema_kernel, "wgss"),
}

_lock = threading.Lock()
_state: dict[str, Any] = {}


def cache_dir() -> Path:
    """Where compiled kernels are cached: ``$NUMBA_CACHE_DIR`` if set, else the user's
    cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``) under ``paramserve/numba``."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paramserve" / "numba"


def _compile(cache: bool) -> SimpleNamespace:
    import numba
    from numba import types

    if cache and not numba.config.CACHE_DIR:
        # numba's default is a __pycache__ beside this file, inside the installed package.
        numba.config.CACHE_DIR = str(cache_dir())

    compiled = {}
    for name, (func, kinds) in _SIGNATURES.items():
        sigs = []
        for dtype in _DTYPES:
            scalar = numba.from_dtype(dtype)
            # A read-only signature for the gradient also accepts writable arrays, so
            # np.frombuffer gradients run without a copy.
            arg = {
                "w": types.Array(scalar, 1, "C"),
                "g": types.Array(scalar, 1, "C", readonly=True),
                "s": scalar,
            }
            sigs.append(types.void(*(arg[k] for k in kinds)))
        compiled[name] = numba.njit(
            sigs, cache=cache, error_model="numpy", fastmath=False, nogil=True
        )(func)
    return SimpleNamespace(**compiled)


def _load() -> SimpleNamespace | None:
    """The compiled kernels (cached), or None when numba is missing or fails."""
    if "kernels" in _state:
        return _state["kernels"]
    with _lock:
        if "kernels" not in _state:
            kernels: SimpleNamespace | None = None
            try:
                kernels = _compile(cache=True)
            except ImportError:
                pass
            except Exception:
                # No writable cache location, or a broken numba/LLVM: try once without the
                # on-disk cache; failing that, warn and let the NumPy rules run.
                try:
                    kernels = _compile(cache=False)
                except Exception as exc:
                    warnings.warn(
                        f"Fused optimizer kernels are disabled: numba failed ({exc!r}); "
                        "the NumPy update rules are used instead.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _state["kernels"] = kernels
    return _state["kernels"]


def available() -> bool:
    """True when numba imports and the kernels compiled (compiles them on first call)."""
    return _load() is not None


def prepare() -> bool:
    """Compile the kernels now, or load them from the cache (seconds on a first call), so
    no optimizer step pays for it later; True when they are available. Thread-safe."""
    return _load() is not None


def prepared() -> bool:
    """True once the kernels were compiled or loaded (never compiles)."""
    return _state.get("kernels") is not None


# --- several cores ---------------------------------------------------------------------
# Variables below this many elements run on the calling thread alone: waking pool threads
# costs tens of microseconds, and small arrays sit in one core's cache.
DEFAULT_MIN_ELEMENTS = 1 << 20
# Pieces are at least this many elements (256 KiB of float32 per array) and about
# 8 per thread, so a thread that is descheduled holds up little.
_MIN_PIECE = 1 << 16
_PIECES_PER_THREAD = 8

# (threads, min_elements, pool of at least threads - 1 helpers or None): replaced as one.
_parallel: tuple[int, int, ThreadPoolExecutor | None] = (1, DEFAULT_MIN_ELEMENTS, None)
# The helper threads, kept when the count goes down (a pool starts its threads as pieces are
# handed out, so a smaller count uses fewer of them), replaced by a larger pool when it rises.
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def set_threads(threads: int = 1, *, min_elements: int = DEFAULT_MIN_ELEMENTS) -> None:
    """Run the fused kernels on ``threads`` cores for variables of at least ``min_elements``
    elements (1, the default: the calling thread alone). Process-wide; the results are
    bit-identical to one thread's. Takes effect for the next kernel call."""
    global _parallel, _pool, _pool_workers
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1. Received: {threads!r}")
    if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 1:
        raise ValueError(f"min_elements must be an integer >= 1. Received: {min_elements!r}")
    with _lock:
        if threads - 1 > _pool_workers:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its threads finish the pieces they hold, then leave
            _pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="optim-kernel")
            _pool_workers = threads - 1
        _parallel = (threads, min_elements, _pool if threads > 1 else None)


def threads() -> tuple[int, int]:
    """``(threads, min_elements)`` as :func:`set_threads` set them."""
    return _parallel[0], _parallel[1]


def _run(kernel: Any, arrays: tuple[np.ndarray, ...], scalars: tuple[Any, ...]) -> None:
    """``kernel(*arrays, *scalars)`` on flat arrays, in pieces on several threads when the
    arrays are large enough and :func:`set_threads` asked for more than one."""
    n = arrays[0].shape[0]
    count, min_elements, pool = _parallel
    if pool is None or n < max(min_elements, 2 * _MIN_PIECE):
        kernel(*arrays, *scalars)
        return
    piece = max(_MIN_PIECE, -(-n // (count * _PIECES_PER_THREAD)))
    piece = -(-piece // 1024) * 1024  # whole cache lines and pages per piece
    pieces = -(-n // piece)
    taken = itertools.count()  # next() is atomic under the GIL

    def work() -> None:
        while (i := next(taken)) < pieces:
            start = i * piece
            kernel(*(a[start : start + piece] for a in arrays), *scalars)

    helpers = []
    try:
        for _ in range(min(count - 1, pieces - 1)):
            helpers.append(pool.submit(work))
    except RuntimeError:  # the pool was shut down by set_threads meanwhile: fewer helpers
        pass
    work()
    for helper in helpers:
        if not helper.cancel():  # one that never started has nothing left to do
            helper.result()


def can_fuse(optimizer: Optimizer, *arrays: Any) -> bool:
    """True when a fused kernel may replace the xp rule for ``(variable, gradient, *slots)``.

    Requires ``optimizer.use_fused_kernels``, NumPy arrays (never CuPy) of one shape with
    size > 0, one dtype (float32 or float64, native byte order), C-contiguous and aligned,
    and all but ``arrays[1]`` (the gradient, which may be read-only) writable.
    """
    if not arrays or not optimizer.use_fused_kernels:
        return False
    first = arrays[0]
    if not isinstance(first, np.ndarray) or first.dtype not in _DTYPES or first.size == 0:
        return False
    dtype, shape = first.dtype, first.shape
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
            return False
        flags = a.flags
        if not (flags.c_contiguous and flags.aligned) or (i != 1 and not flags.writeable):
            return False
    return _load() is not None


def _flat(a: np.ndarray) -> np.ndarray:
    # A view of a C-contiguous array, so the kernel writes land in the caller's array.
    if type(a) is np.ndarray and a.ndim == 1:
        return a  # already flat: the array itself, no view to make
    if type(a) is not np.ndarray:  # np.memmap and other subclasses
        a = a.view(np.ndarray)
    return a.reshape(-1)


def _cast(dt: Any, x: Any) -> Any:
    """``dt(x)``; ``x`` itself when it already is a ``dt`` scalar (the same value)."""
    return x if type(x) is dt else dt(x)


def _kernels() -> SimpleNamespace:
    kernels = _load()
    if kernels is None:
        raise RuntimeError("fused kernels are unavailable; check can_fuse() first")
    return kernels


def adam(
    w: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    alpha: Any,
    one_minus_b1: Any,
    one_minus_b2: Any,
    eps: Any,
    v_hat: np.ndarray | None = None,
) -> None:
    """Adam (AMSGrad when ``v_hat`` is given) in place: the xp rule of ``adam.py``, fused."""
    k = _kernels()
    dt = w.dtype.type
    scalars = (_cast(dt, alpha), _cast(dt, one_minus_b1), _cast(dt, one_minus_b2), _cast(dt, eps))
    if v_hat is None:
        _run(k.adam, (_flat(w), _flat(g), _flat(m), _flat(v)), scalars)
    else:
        _run(k.adam_amsgrad, (_flat(w), _flat(g), _flat(m), _flat(v), _flat(v_hat)), scalars)


def sgd(w: np.ndarray, g: np.ndarray, lr: Any) -> None:
    """Plain SGD in place: ``w -= g*lr``."""
    _run(_kernels().sgd, (_flat(w), _flat(g)), (w.dtype.type(lr),))


def sgd_momentum(
    w: np.ndarray, g: np.ndarray, m: np.ndarray, momentum: Any, lr: Any, nesterov: bool
) -> None:
    """SGD with (Nesterov) momentum in place: the xp rule of ``sgd.py``, fused."""
    k = _kernels()
    dt = w.dtype.type
    kernel = k.sgd_nesterov if nesterov else k.sgd_momentum
    _run(kernel, (_flat(w), _flat(g), _flat(m)), (dt(momentum), dt(lr)))


def weight_decay(w: np.ndarray, wd: Any, lr: Any) -> None:
    """Decoupled weight decay in place: ``w = w - w*wd*lr`` (the base class's decay step)."""
    dt = w.dtype.type
    _run(_kernels().weight_decay, (_flat(w),), (dt(wd), dt(lr)))


def ema(average: np.ndarray, w: np.ndarray, momentum: Any, one_minus_momentum: Any) -> None:
    """The base class's EMA step in place: ``average = momentum*average + (1-momentum)*w``."""
    dt = w.dtype.type
    _run(_kernels().ema, (_flat(average), _flat(w)), (dt(momentum), dt(one_minus_momentum)))
