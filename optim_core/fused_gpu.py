"""Fused CuPy kernels: one launch per update instead of ~10 element-wise CuPy kernels."""

# Why: on CuPy an xp rule runs one kernel per operation, each reading and writing whole
# arrays in device memory (Adam measured 0.12 of device-to-device copy bandwidth on an H200,
# SGD momentum 0.19). A fused kernel reads w, g and the slots once and writes them once.
#
# Exactness: the kernel bodies (gpu_kernels.py) do, per element, exactly the operations of
# their xp rule in the same order and dtype, each a round-to-nearest intrinsic that is never
# contracted into an FMA, so the results are bit-identical to NumPy's (Ftrl's pow aside, see
# ftrl()). tests/optim/test_gpu_kernels.py checks the same source on the CPU with gcc, and
# tests/optim/test_fused_gpu.py on a GPU.
#
# CuPy is imported on the first can_fuse() call with a CuPy array, never at package import;
# a dtype's kernels are compiled (NVRTC, one module per dtype) on their first use, and CuPy
# caches the binary on disk. If compiling fails, a warning says so and the xp rules run.
#
# The public functions mirror fused.py's (the numba CPU kernels), so an optimizer calls either
# with the same arguments: fused.can_fuse() accepts NumPy arrays only, can_fuse() here CuPy
# arrays only.

from __future__ import annotations

import importlib
import threading
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from . import gpu_kernels
from .backend import is_cupy_array

if TYPE_CHECKING:  # base imports this module
    from .base import Optimizer

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_BLOCK = 256
# One element per thread up to this many blocks (268M elements); past it, the grid-stride
# loop gives each thread several.
_MAX_BLOCKS = 1 << 20

_lock = threading.Lock()
# dtype name -> {kernel name: cupy.RawKernel}, or None when compiling failed.
_kernels: dict[str, dict[str, Any] | None] = {}


def _compile(dtype: str) -> dict[str, Any]:
    cupy = importlib.import_module("cupy")
    module = cupy.RawModule(
        code=gpu_kernels.cuda_source(dtype), options=gpu_kernels.COMPILE_OPTIONS
    )
    # get_function compiles the module (once: CuPy memoizes it per device, and caches the
    # binary on disk) and loads each kernel for the current device.
    return {
        name: module.get_function(gpu_kernels.function_name(name, dtype))
        for name in gpu_kernels.KERNELS
    }


def _load(dtype: np.dtype) -> dict[str, Any] | None:
    """The compiled kernels of ``dtype`` (cached), or None when compiling them failed."""
    name = dtype.name
    if name in _kernels:
        return _kernels[name]
    with _lock:
        if name not in _kernels:
            kernels = None
            try:
                kernels = _compile(name)
            except Exception as exc:
                warnings.warn(
                    f"Fused GPU optimizer kernels ({name}) are disabled: compiling them "
                    f"failed ({exc!r}); the CuPy update rules are used instead.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _kernels[name] = kernels
    return _kernels[name]


def prepare(dtypes: tuple[str, ...] = ("float32", "float64")) -> bool:
    """Compile the kernels of ``dtypes`` now (or load them from CuPy's cache), so no optimizer
    step pays for it later; True when all are available. Imports CuPy. Thread-safe."""
    return all(_load(np.dtype(d)) is not None for d in dtypes)


def prepared(dtypes: tuple[str, ...] = ("float32", "float64")) -> bool:
    """True once the kernels of ``dtypes`` were compiled or loaded (never compiles)."""
    return all(_kernels.get(np.dtype(d).name) is not None for d in dtypes)


def can_fuse(optimizer: Optimizer, *arrays: Any) -> bool:
    """True when a fused GPU kernel may replace the xp rule for ``(variable, gradient, *slots)``.

    Requires ``optimizer.use_fused_kernels``, CuPy arrays (never NumPy) of one shape with
    size > 0, one dtype (float32 or float64), C-contiguous, on the current device, and
    kernels that compiled.
    """
    if not arrays or not optimizer.use_fused_kernels:
        return False
    first = arrays[0]
    if isinstance(first, np.ndarray) or not is_cupy_array(first):
        return False  # NumPy (or anything else) without importing CuPy
    dtype, shape = first.dtype, first.shape
    if dtype not in _DTYPES or first.size == 0:
        return False
    device = first.data.device_id
    for a in arrays:
        if not is_cupy_array(a) or a.dtype != dtype or a.shape != shape:
            return False
        if not a.flags.c_contiguous or a.data.device_id != device:
            return False
    cupy = importlib.import_module("cupy")
    if device != cupy.cuda.runtime.getDevice():
        return False
    return _load(dtype) is not None


def _launch(name: str, arrays: tuple[Any, ...], scalars: tuple[Any, ...]) -> None:
    """Run kernel ``name`` over ``arrays`` (in its argument order) with ``scalars`` cast to
    their dtype, on the current stream."""
    first = arrays[0]
    kernels = _load(first.dtype)
    if kernels is None:
        raise RuntimeError("fused GPU kernels are unavailable; check can_fuse() first")
    dt = first.dtype.type
    n = first.size
    blocks = min(-(-n // _BLOCK), _MAX_BLOCKS)
    values = tuple(s if type(s) is dt else dt(s) for s in scalars)
    kernels[name]((blocks,), (_BLOCK,), (*arrays, *values, np.int64(n)))


def adam(
    w: Any,
    g: Any,
    m: Any,
    v: Any,
    alpha: Any,
    one_minus_b1: Any,
    one_minus_b2: Any,
    eps: Any,
    v_hat: Any = None,
) -> None:
    """Adam (AMSGrad when ``v_hat`` is given) in place: the xp rule of ``adam.py``, fused."""
    scalars = (alpha, one_minus_b1, one_minus_b2, eps)
    if v_hat is None:
        _launch("adam", (w, g, m, v), scalars)
    else:
        _launch("adam_amsgrad", (w, g, m, v, v_hat), scalars)


def sgd(w: Any, g: Any, lr: Any) -> None:
    """Plain SGD in place: ``w -= g*lr``."""
    _launch("sgd", (w, g), (lr,))


def sgd_momentum(w: Any, g: Any, m: Any, momentum: Any, lr: Any, nesterov: bool) -> None:
    """SGD with (Nesterov) momentum in place: the xp rule of ``sgd.py``, fused."""
    _launch("sgd_nesterov" if nesterov else "sgd_momentum", (w, g, m), (momentum, lr))


def weight_decay(w: Any, wd: Any, lr: Any) -> None:
    """Decoupled weight decay in place: ``w = w - w*wd*lr`` (the base class's decay step)."""
    _launch("weight_decay", (w,), (wd, lr))


def ema(average: Any, w: Any, momentum: Any, one_minus_momentum: Any) -> None:
    """The base class's EMA step in place: ``average = momentum*average + (1-momentum)*w``."""
    _launch("ema", (average, w), (momentum, one_minus_momentum))


def lion(
    w: Any,
    g: Any,
    m: Any,
    lr: Any,
    beta_1: Any,
    one_minus_beta_1: Any,
    beta_2: Any,
    one_minus_beta_2: Any,
) -> None:
    """Lion in place: the xp rule of ``lion.py``, fused."""
    _launch("lion", (w, g, m), (lr, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2))


def rmsprop(
    w: Any,
    g: Any,
    velocity: Any,
    lr: Any,
    rho: Any,
    one_minus_rho: Any,
    eps: Any,
    *,
    average_gradient: Any = None,
    momentum: Any = None,
    mu: Any = None,
) -> None:
    """RMSprop in place (centered with ``average_gradient``; with ``momentum`` slots and the
    factor ``mu``): the xp rule of ``rmsprop.py``, fused."""
    scalars = (lr, rho, one_minus_rho, eps)
    if average_gradient is None and momentum is None:
        _launch("rmsprop", (w, g, velocity), scalars)
    elif average_gradient is None:
        _launch("rmsprop_momentum", (w, g, velocity, momentum), (*scalars, mu))
    elif momentum is None:
        _launch("rmsprop_centered", (w, g, velocity, average_gradient), scalars)
    else:
        arrays = (w, g, velocity, average_gradient, momentum)
        _launch("rmsprop_centered_momentum", arrays, (*scalars, mu))


def adagrad(w: Any, g: Any, accumulator: Any, lr: Any, eps: Any) -> None:
    """Adagrad in place: the xp rule of ``adagrad.py``, fused."""
    _launch("adagrad", (w, g, accumulator), (lr, eps))


def adadelta(
    w: Any, g: Any, grad_sq: Any, delta_sq: Any, lr: Any, rho: Any, one_minus_rho: Any, eps: Any
) -> None:
    """Adadelta in place: the xp rule of ``adadelta.py``, fused."""
    _launch("adadelta", (w, g, grad_sq, delta_sq), (lr, rho, one_minus_rho, eps))


def adamax(
    w: Any,
    g: Any,
    m: Any,
    u: Any,
    lr: Any,
    one_minus_b1: Any,
    beta_2: Any,
    one_minus_b1_power: Any,
    eps: Any,
) -> None:
    """Adamax in place: the xp rule of ``adamax.py``, fused."""
    _launch("adamax", (w, g, m, u), (lr, one_minus_b1, beta_2, one_minus_b1_power, eps))


def nadam(w: Any, g: Any, m: Any, v: Any, scalars: tuple[Any, ...]) -> None:
    """Nadam in place: the xp rule of ``nadam.py``, fused. ``scalars`` are, in order, ``lr,
    1-b1, 1-b2, mu_{t+1}, 1-P*mu_{t+1}, 1-mu_t, 1-P, 1-b2^t, eps``."""
    _launch("nadam", (w, g, m, v), scalars)


def ftrl(
    w: Any,
    g: Any,
    accumulator: Any,
    linear: Any,
    lr: Any,
    power: Any,
    l1: Any,
    two_l2: Any,
    l2s2: Any,
) -> None:
    """Ftrl in place: the xp rule of ``ftrl.py``, fused, with one difference: float32 powers
    are computed in float64 and rounded once, so they are correctly rounded (as
    :meth:`Ftrl.update_step` does on CuPy); NumPy's own float32 power is not always
    (tests/optim/ftrl_pow_study.py measures what that means against Keras)."""
    scalars = (lr, power, l1, -l1, two_l2, l2s2)
    _launch("ftrl", (w, g, accumulator, linear), scalars)
