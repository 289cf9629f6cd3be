"""Runs the fused GPU kernels' CUDA C bodies on the CPU, so they are tested without a GPU.

The same strings NVRTC compiles (optim_core/gpu_kernels.py: the per-dtype header, the
helpers and every loop body) are wrapped in plain C loops, with CUDA's round-to-nearest
intrinsics defined as the C operators they stand for (``__fadd_rn(a, b)`` is ``a + b`` in
float), and compiled with gcc without FMA contraction or fast math. A C float operation on
x86-64 (SSE) is one correctly rounded IEEE operation, as the intrinsic is on the GPU, so a
kernel here gives the bits the GPU gives (Ftrl's float64 ``pow`` aside: glibc's here, CUDA's
there, both within an ulp of float64 before the rounding to float32).

:func:`kernels_on_cpu` swaps these in for CuPy inside ``fused_gpu`` (its ``can_fuse`` takes
NumPy arrays, its launches run the C loops), so every optimizer runs its real GPU dispatch
(the scalars it computes, the argument order) on NumPy arrays.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserve.optim_core import fused, fused_gpu, gpu_kernels

GCC = shutil.which("gcc")
GCC_FLAGS = ("-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-std=c99")

needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed")

# CUDA's intrinsics as C: each one correctly rounded IEEE operation in its dtype.
_C_PRELUDE = """
#include <math.h>
#define PS_DEVICE static inline
#define __fadd_rn(a, b) ((float)(a) + (float)(b))
#define __fsub_rn(a, b) ((float)(a) - (float)(b))
#define __fmul_rn(a, b) ((float)(a) * (float)(b))
#define __fdiv_rn(a, b) ((float)(a) / (float)(b))
#define __fsqrt_rn(a) sqrtf(a)
#define __dadd_rn(a, b) ((double)(a) + (double)(b))
#define __dsub_rn(a, b) ((double)(a) - (double)(b))
#define __dmul_rn(a, b) ((double)(a) * (double)(b))
#define __ddiv_rn(a, b) ((double)(a) / (double)(b))
#define __dsqrt_rn(a) sqrt(a)
"""


def c_source(dtype: str) -> str:
    """Every kernel of ``dtype`` as a C function looping over ``i < n``."""
    parts = [_C_PRELUDE, gpu_kernels.DTYPE_HEADERS[dtype], gpu_kernels.HELPERS]
    for name, kernel in gpu_kernels.KERNELS.items():
        params = gpu_kernels.parameters(kernel)
        parts.append(
            f"void {gpu_kernels.function_name(name, dtype)}({params}) {{\n"
            "    for (long long i = 0; i < n; ++i) {\n"
            f"{gpu_kernels.body(kernel, ' ' * 8)}\n"
            "    }\n"
            "}\n"
        )
    return "\n".join(parts)


# The helpers (NumPy's maximum, sign and clip) alone, over arrays.
_HELPER_LOOPS = """
void np_maximum_loop(const T* a, const T* b, T* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = np_maximum(a[i], b[i]);
}
void np_sign_loop(const T* x, T* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = np_sign(x[i]);
}
void np_clip_loop(const T* x, const T lo, const T hi, T* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = np_clip(x[i], lo, hi);
}
"""


def helpers_source(dtype: str) -> str:
    """The helpers of ``dtype`` with a C loop over arrays for each."""
    return "\n".join([_C_PRELUDE, gpu_kernels.DTYPE_HEADERS[dtype], gpu_kernels.HELPERS]) + (
        _HELPER_LOOPS
    )


@functools.cache
def library(dtype: str, *, helpers: bool = False) -> ctypes.CDLL:
    """The C kernels of ``dtype`` (or the helpers' loops), compiled once per process into a
    temporary directory."""
    if GCC is None:
        pytest.skip("gcc is not installed")
    directory = Path(tempfile.mkdtemp(prefix="paramserve-gpu-kernels-"))
    source = directory / f"kernels_{dtype}.c"
    source.write_text(helpers_source(dtype) if helpers else c_source(dtype))
    target = directory / f"kernels_{dtype}.so"
    proc = subprocess.run(
        [GCC, *GCC_FLAGS, str(source), "-o", str(target), "-lm"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return ctypes.CDLL(str(target))


_CTYPES = {"float32": ctypes.c_float, "float64": ctypes.c_double}


@functools.cache
def function(name: str, dtype: str) -> Any:
    """The C function of kernel ``name`` for ``dtype``, with its argument types."""
    kernel = gpu_kernels.KERNELS[name]
    func = getattr(library(dtype), gpu_kernels.function_name(name, dtype))
    func.argtypes = [
        *[ctypes.c_void_p] * len(kernel.arrays),
        *[_CTYPES[dtype]] * len(kernel.scalars),
        ctypes.c_longlong,
    ]
    func.restype = None
    return func


def launch(name: str, arrays: tuple[np.ndarray, ...], scalars: tuple[Any, ...]) -> None:
    """``fused_gpu._launch`` on the CPU: kernel ``name`` over NumPy arrays, in place."""
    kernel = gpu_kernels.KERNELS[name]
    assert len(arrays) == len(kernel.arrays) and len(scalars) == len(kernel.scalars), name
    first = arrays[0]
    dtype = first.dtype
    for a in arrays:
        assert isinstance(a, np.ndarray), name
        assert a.dtype == dtype and a.shape == first.shape and a.flags.c_contiguous, name
    # The scalars as _launch passes them: cast to the dtype (a no-op for the right type).
    values = [s if type(s) is dtype.type else dtype.type(s) for s in scalars]
    function(name, dtype.name)(*(a.ctypes.data for a in arrays), *values, first.size)


def can_fuse_on_cpu(optimizer: Any, *arrays: Any) -> bool:
    """``fused_gpu.can_fuse``'s conditions, with NumPy arrays standing for CuPy ones."""
    if not arrays or not optimizer.use_fused_kernels:
        return False
    first = arrays[0]
    if not isinstance(first, np.ndarray) or first.dtype.name not in gpu_kernels.DTYPE_HEADERS:
        return False
    if first.size == 0:
        return False
    return all(
        isinstance(a, np.ndarray)
        and a.dtype == first.dtype
        and a.shape == first.shape
        and a.flags.c_contiguous
        for a in arrays
    )


@contextlib.contextmanager
def kernels_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Within: the numba kernels off, and ``fused_gpu`` running its C kernels on NumPy arrays;
    yields a counter of launches by kernel name."""
    launches: Counter[str] = Counter()

    def counted(name: str, arrays: tuple[Any, ...], scalars: tuple[Any, ...]) -> None:
        launches[name] += 1
        launch(name, arrays, scalars)

    with monkeypatch.context() as patch:
        patch.setattr(fused, "can_fuse", lambda *args: False)
        patch.setattr(fused_gpu, "can_fuse", can_fuse_on_cpu)
        patch.setattr(fused_gpu, "_launch", counted)
        yield launches
