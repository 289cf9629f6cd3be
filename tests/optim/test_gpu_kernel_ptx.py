"""The fused GPU kernels' CUDA source, compiled by NVRTC (the compiler CuPy uses) or nvcc to
PTX on the CPU: it compiles, and no floating-point operation in it can be contracted.

Skipped where neither is found (NVRTC from an nvidia-cuda-nvrtc wheel or the system's
libnvrtc; nvcc on PATH or in /usr/local/cuda).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from paramserve.optim_core import gpu_kernels

DTYPES = ["float32", "float64"]


def _nvrtc_library() -> ctypes.CDLL | None:
    """libnvrtc, from the nvidia-cuda-nvrtc wheel or the system, or None."""
    candidates = []
    try:
        import nvidia  # the namespace package of NVIDIA's CUDA wheels

        for root in nvidia.__path__:
            candidates += sorted(Path(root).glob("*/lib/libnvrtc.so*"))
    except ImportError:
        pass
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if ".alt." in path.name:
            continue
        try:
            # NVRTC opens its builtins library by name: load it first, from beside it.
            for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):
                if ".alt." not in builtins.name:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    return None


def _ptx_with_nvrtc(lib: ctypes.CDLL, source: str, options: tuple[str, ...]) -> str:
    program = ctypes.c_void_p()
    assert (
        lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernels.cu", 0, None, None)
        == 0
    )
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        result = lib.nvrtcCompileProgram(program, len(options), opts)
        log_size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        lib.nvrtcGetProgramLog(program, log)
        assert result == 0, log.value.decode(errors="replace")
        size = ctypes.c_size_t()
        assert lib.nvrtcGetPTXSize(program, ctypes.byref(size)) == 0
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(program, ptx) == 0
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _ptx_with_nvcc(nvcc: str, source: str, options: tuple[str, ...], tmp: Path) -> str:
    cu = tmp / "kernels.cu"
    cu.write_text(source)
    ptx = tmp / "kernels.ptx"
    proc = subprocess.run(
        [nvcc, "-ptx", *options, str(cu), "-o", str(ptx)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return ptx.read_text()


def _compilers() -> list[Any]:
    out = []
    lib = _nvrtc_library()
    if lib is not None:
        out.append(pytest.param(lib, id="nvrtc"))
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None
    )
    if nvcc:
        out.append(pytest.param(nvcc, id="nvcc"))
    if not out:
        out.append(pytest.param(None, id="none", marks=pytest.mark.skip("no NVRTC or nvcc")))
    return out


FLOAT_OP = re.compile(r"^\s*(add|sub|mul|div|sqrt|fma|mad)(\.[\w.]+)?\.f(32|64)\b", re.M)


def _entries(ptx: str) -> dict[str, str]:
    """Each kernel's PTX, by name."""
    pieces = re.split(r"(?=^\.visible \.entry )", ptx, flags=re.M)
    out = {}
    for piece in pieces:
        match = re.match(r"\.visible \.entry (\w+)", piece)
        if match:
            out[match.group(1)] = piece
    return out


@pytest.mark.parametrize("fmad", ["--fmad=false", "--fmad=true"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compiler", _compilers())
def test_cuda_source_compiles_without_contraction(
    compiler: Any, dtype: str, fmad: str, tmp_path: Path
) -> None:
    """Every floating-point add, sub, mul, div and sqrt in a kernel's PTX carries an explicit
    ``.rn`` (ptxas never fuses those), and there is no ``fma``: with the options fused_gpu
    passes, and even with contraction on (the intrinsics alone prevent it), except in Ftrl,
    whose inlined ``pow`` is CUDA's library code (its own FMAs live in a called function)."""
    options = tuple(o for o in gpu_kernels.COMPILE_OPTIONS if not o.startswith("--fmad"))
    options = (*options, fmad, "-arch=compute_80")
    source = gpu_kernels.cuda_source(dtype)
    if isinstance(compiler, str):
        ptx = _ptx_with_nvcc(compiler, source, options, tmp_path)
    else:
        ptx = _ptx_with_nvrtc(compiler, source, options)
    entries = _entries(ptx)
    assert set(entries) == {gpu_kernels.function_name(n, dtype) for n in gpu_kernels.KERNELS}
    for name, text in entries.items():
        if fmad == "--fmad=true" and name == gpu_kernels.function_name("ftrl", dtype):
            continue
        ops = [m.group(0).strip() for m in FLOAT_OP.finditer(text.split("\n}\n", 1)[0])]
        assert ops, name
        for op in ops:
            assert ".rn" in op and not op.startswith(("fma", "mad")), (name, op)
