"""Array backends: NumPy by default, CuPy on request or when a GPU is usable.

CuPy is imported only inside these functions, never when the package is imported,
so a machine without CUDA never pays for (or trips over) it.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Literal

import numpy as np

Device = Literal["auto", "cpu", "gpu"]

# The device names resolve_device takes (a server's --device too).
DEVICES = ("auto", "cpu", "gpu")


@functools.cache
def _cupy_or_none() -> ModuleType | None:
    """Import CuPy and check that a device answers; None when either fails."""
    try:
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        cupy.zeros(1, dtype=cupy.float32).sum().item()
    except Exception:
        return None
    return cupy


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device runs a kernel."""
    return _cupy_or_none() is not None


def resolve_device(device: str = "auto") -> str:
    """Map ``auto|cpu|gpu`` to ``cpu`` or ``gpu``; ``gpu`` without a usable GPU raises."""
    if device not in DEVICES:
        raise ValueError(f"`device` must be one of {DEVICES}. Received: device={device!r}")
    if device == "cpu":
        return "cpu"
    if device == "gpu":
        if not gpu_available():
            raise RuntimeError(
                "device='gpu' was requested but no usable GPU was found: install the `gpu` "
                "extra (CuPy) and check that a CUDA device is visible, or use device='cpu'."
            )
        return "gpu"
    return "gpu" if gpu_available() else "cpu"


def array_module(device: str = "cpu") -> ModuleType:
    """Return ``numpy`` or ``cupy`` for a device name (``auto`` is resolved first)."""
    if resolve_device(device) == "gpu":
        cupy = _cupy_or_none()
        assert cupy is not None
        return cupy
    return np


def is_cupy_array(x: Any) -> bool:
    """True for a CuPy ndarray, decided without importing CuPy."""
    if isinstance(x, np.ndarray):  # the common case, answered without the module lookup
        return False
    return type(x).__module__.split(".", 1)[0] == "cupy"


def get_array_module(x: Any) -> ModuleType:
    """The array module (numpy or cupy) that owns ``x``."""
    if isinstance(x, np.ndarray):
        return np
    if is_cupy_array(x):
        return importlib.import_module("cupy")
    return np


def to_device(x: Any, device: str = "cpu", dtype: Any = None) -> Any:
    """Copy ``x`` to ``device`` (``cpu``: NumPy, ``gpu``: CuPy); no copy if already there."""
    xp = array_module(device)
    if xp is np:
        return to_numpy(x) if dtype is None else to_numpy(x).astype(dtype, copy=False)
    return xp.asarray(x, dtype=dtype)


def to_numpy(x: Any) -> np.ndarray:
    """A host NumPy view or copy of ``x`` (CuPy arrays are copied to the host)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


# Host buffers of the optimizer state start on a cache line: the fused kernels' vector loads
# then never straddle two lines (measured: Adam on 1M float32 about 10% faster than with the
# 16-byte alignment NumPy gives by default).
HOST_ALIGNMENT = 64


def zeros(shape: Any, dtype: Any, xp: ModuleType = np) -> Any:
    """``xp.zeros(shape, dtype)``; on the host, starting at a multiple of
    :data:`HOST_ALIGNMENT` bytes (a view into a slightly larger buffer)."""
    if xp is not np:
        return xp.zeros(shape, dtype=dtype)
    out = empty(shape, dtype)
    out[...] = 0
    return out


def empty(shape: Any, dtype: Any, xp: ModuleType = np) -> Any:
    """``xp.empty(shape, dtype)``, aligned on the host as :func:`zeros`."""
    if xp is not np:
        return xp.empty(shape, dtype=dtype)
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, dtype=np.uint8)
    start = -raw.__array_interface__["data"][0] % HOST_ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)
