"""Fused casts between float32 and the wire dtypes (bfloat16, float16), compiled by numba.

Bit for bit what ``astype`` gives (ml_dtypes for bfloat16, NumPy for float16): rounding to
nearest even with subnormals, overflow to Inf, Inf kept; widening exact. Where an input holds
a NaN, its NaN bits are left to that library (the fix-up below), so they match too.

Why: ``astype`` to bfloat16 and back costs about as much as the halved bytes save (about
1 ns per element to round, 0.4-0.8 to widen, and the client's error feedback made four
passes over memory); these loops make one pass, and the client's error feedback (sum,
round, residual) is one loop too. The daemon also copies received float32 and float64
chunks into place with one of them, counting NaNs and Infs on the way (a copy and a
NumPy ``isfinite`` pass otherwise).

Only :mod:`paramserve.wire.compression` imports this module, on first use, as it imports
numba. If numba is missing or fails to compile, :func:`load` answers None and the callers
keep NumPy's ``astype``. Compiled kernels are cached per user, as the optimizer kernels
(the same folder as ``paramserve.optim_core.fused.cache_dir``).
"""

from __future__ import annotations

import os
import threading
import warnings
from types import SimpleNamespace
from typing import Any

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

U16, U32, U64 = np.uint16, np.uint32, np.uint64

# --- bit twiddling on float32 bits (uint32), NaN excluded ---------------------------------


@numba.njit(inline="always")
def _bf16_bits(u):  # pragma: no cover - compiled
    # Round to nearest even: add 0x7FFF plus the lowest kept bit, drop the low 16 bits.
    # A carry into the exponent is the right result (up to Inf).
    return (u + U32(0x7FFF) + ((u >> U32(16)) & U32(1))) >> U32(16)


@numba.njit(inline="always")
def _f16_bits(u):  # pragma: no cover - compiled
    # float32 bits to float16 bits, round to nearest even (NumPy's npy_floatbits_to_halfbits).
    a = u & U32(0x7FFFFFFF)
    sign = (u >> U32(16)) & U32(0x8000)
    if a > U32(0x7F800000):  # NaN: the top 10 bits of its payload, kept a NaN (NumPy's)
        h = U32(0x7C00) + ((a & U32(0x7FFFFF)) >> U32(13))
        if h == U32(0x7C00):
            h = U32(0x7C01)
    elif a >= U32(0x477FF000):  # rounds to 65536 or more, or Inf: Inf
        h = U32(0x7C00)
    elif a >= U32(0x38800000):  # a normal float16: rebias the exponent, round 13 bits off
        h = (a - U32(0x38000000) + U32(0xFFF) + ((a >> U32(13)) & U32(1))) >> U32(13)
    elif a < U32(0x33000000):  # below half the smallest subnormal (or exactly half): zero
        h = U32(0)
    else:  # a subnormal float16: the 24-bit significand shifted right, rounded to even
        m = (a & U32(0x7FFFFF)) | U32(0x800000)
        s = U32(126) - (a >> U32(23))
        h = (m + ((U32(1) << (s - U32(1))) - U32(1)) + ((m >> s) & U32(1))) >> s
    return h | sign


@numba.njit(inline="always")
def _bf16_round(u):  # pragma: no cover - compiled
    # ml_dtypes: a NaN becomes the quiet NaN 0x7FC0 with its sign.
    if (u & U32(0x7FFFFFFF)) > U32(0x7F800000):
        return ((u >> U32(16)) & U32(0x8000)) | U32(0x7FC0)
    return _bf16_bits(u)


@numba.njit(inline="always")
def _f16_widen(h):  # pragma: no cover - compiled
    # float16 bits (as uint32) to float32 bits, exactly (NumPy's npy_halfbits_to_floatbits).
    sign = (h & U32(0x8000)) << U32(16)
    a = h & U32(0x7FFF)
    if a >= U32(0x7C00):  # Inf, NaN (payload kept)
        f = U32(0x7F800000) | ((a & U32(0x3FF)) << U32(13))
    elif a >= U32(0x400):  # normal
        f = (a << U32(13)) + U32(0x38000000)
    else:  # subnormal or zero: a * 2**-24, exact in float32
        f = np.float32(np.float32(a) * np.float32(5.9604644775390625e-08)).view(np.uint32)
    return f | sign


# --- kernels: flat 1-D arrays, compiled with explicit signatures by _compile() -----------


def _round_bf16_kernel(src, dst):
    # dst = bfloat16 bits of float32 bits src; returns the number of NaNs met.
    nan = 0
    for i in range(src.shape[0]):
        u = src[i]
        nan += (u & U32(0x7FFFFFFF)) > U32(0x7F800000)
        dst[i] = U16(_bf16_round(u))
    return nan


def _round_f16_kernel(src, dst):
    nan = 0
    for i in range(src.shape[0]):
        u = src[i]
        nan += (u & U32(0x7FFFFFFF)) > U32(0x7F800000)
        dst[i] = U16(_f16_bits(u))
    return nan


def _widen_bf16_kernel(src, dst):
    # dst = float32 bits of bfloat16 bits src; returns the number of NaNs and Infs met.
    bad = 0
    for i in range(src.shape[0]):
        h = src[i]
        bad += (h & U16(0x7F80)) == U16(0x7F80)
        dst[i] = U32(h) << U32(16)
    return bad


def _widen_f16_kernel(src, dst):
    bad = 0
    for i in range(src.shape[0]):
        h = U32(src[i])
        bad += (h & U32(0x7C00)) == U32(0x7C00)
        dst[i] = _f16_widen(h)
    return bad


def _copy_f32_kernel(src, dst):
    # dst = src (float32 bits, any alignment of src); returns the number of NaNs and Infs.
    bad = 0
    for i in range(src.shape[0]):
        u = src[i]
        bad += (u & U32(0x7F800000)) == U32(0x7F800000)
        dst[i] = u
    return bad


def _copy_f64_kernel(src, dst):
    bad = 0
    for i in range(src.shape[0]):
        u = src[i]
        bad += (u & U64(0x7FF0000000000000)) == U64(0x7FF0000000000000)
        dst[i] = u
    return bad


@intrinsic
def _u32_at(typingctx, address):  # pragma: no cover - compiled
    # A uint32 pointer from an integer address (of an array the caller keeps alive).
    pointer = types.CPointer(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(types.int64), codegen


@intrinsic
def _copy_bytes(typingctx, dst, src, count):  # pragma: no cover - compiled
    # memcpy(dst, src, count) between integer addresses (of buffers the caller keeps alive
    # and that do not overlap): LLVM's memcpy, so the kernel stays cacheable.
    byte_pointer = types.CPointer(types.uint8)

    def codegen(context, builder, signature, args):
        ptr = context.get_value_type(byte_pointer)
        to, frm = builder.inttoptr(args[0], ptr), builder.inttoptr(args[1], ptr)
        cgutils.raw_memcpy(builder, to, frm, args[2], 1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


# The scatter kernels take elements first .. first + len(src) of a stretch of tensors lying
# end to end in the stream, each going to its own array: tensor k holds elements
# ends[k - 1] .. ends[k] of the stretch (from 0) and its array starts at addresses[k].


@numba.njit(inline="always")
def _scatter_piece(ends, e, k, left):  # pragma: no cover - compiled
    # From tensor k on, the tensor holding stretch element e: (k, its first element, how
    # many of the ``left`` elements still to place go to it).
    while ends[k] <= e:
        k += 1
    start = ends[k - 1] if k > 0 else 0
    return k, start, min(ends[k] - e, left)


def _scatter_bf16_kernel(src, addresses, ends, first):
    # Widen bfloat16 into float32 arrays; returns the number of NaNs and Infs met.
    bad = 0
    n = src.shape[0]
    k = 0
    i = 0
    while i < n:
        k, start, take = _scatter_piece(ends, first + i, k, n - i)
        dst = numba.carray(_u32_at(addresses[k]), ends[k] - start)
        off = first + i - start
        for j in range(take):
            h = src[i + j]
            bad += (h & U16(0x7F80)) == U16(0x7F80)
            dst[off + j] = U32(h) << U32(16)
        i += take
    return bad


def _scatter_f16_kernel(src, addresses, ends, first):
    # Widen float16 into float32 arrays; returns the number of NaNs and Infs met.
    bad = 0
    n = src.shape[0]
    k = 0
    i = 0
    while i < n:
        k, start, take = _scatter_piece(ends, first + i, k, n - i)
        dst = numba.carray(_u32_at(addresses[k]), ends[k] - start)
        off = first + i - start
        for j in range(take):
            h = U32(src[i + j])
            bad += (h & U32(0x7C00)) == U32(0x7C00)
            dst[off + j] = _f16_widen(h)
        i += take
    return bad


def _scatter_copy_kernel(src, addresses, ends, first):
    # Copy bytes (elements are bytes here) into byte buffers, e.g. pulled float32 weights
    # into the worker's arrays; returns 0.
    n = src.shape[0]
    base = src.ctypes.data
    k = 0
    i = 0
    while i < n:
        k, start, take = _scatter_piece(ends, first + i, k, n - i)
        _copy_bytes(addresses[k] + first + i - start, base + i, take)
        i += take
    return 0


def _feedback_bf16_kernel(g, carried, sent, left, use_carried):
    # t = g + carried (or g); sent = round(t); left = t - widen(sent), 0 where not finite.
    # Returns (NaNs met in t, finite t sent as Inf).
    nan = 0
    overflow = 0
    for i in range(g.shape[0]):
        t = g[i] + carried[i] if use_carried else g[i]
        u = np.float32(t).view(np.uint32)
        a = u & U32(0x7FFFFFFF)
        nan += a > U32(0x7F800000)
        h = _bf16_round(u)
        sent[i] = U16(h)
        overflow += (a < U32(0x7F800000)) & ((h & U32(0x7FFF)) == U32(0x7F80))
        r = t - np.uint32(h << U32(16)).view(np.float32)
        finite = (np.float32(r).view(np.uint32) & U32(0x7F800000)) != U32(0x7F800000)
        left[i] = r if finite else np.float32(0.0)
    return nan, overflow


def _feedback_f16_kernel(g, carried, sent, left, use_carried):
    nan = 0
    overflow = 0
    for i in range(g.shape[0]):
        t = g[i] + carried[i] if use_carried else g[i]
        u = np.float32(t).view(np.uint32)
        a = u & U32(0x7FFFFFFF)
        nan += a > U32(0x7F800000)
        h = _f16_bits(u)
        sent[i] = U16(h)
        overflow += (a < U32(0x7F800000)) & ((h & U32(0x7FFF)) == U32(0x7C00))
        r = t - np.uint32(_f16_widen(h)).view(np.float32)
        finite = (np.float32(r).view(np.uint32) & U32(0x7F800000)) != U32(0x7F800000)
        left[i] = r if finite else np.float32(0.0)
    return nan, overflow


_lock = threading.Lock()
_state: dict[str, Any] = {}


def _compile(cache: bool) -> SimpleNamespace:
    if cache and not numba.config.CACHE_DIR:  # ($NUMBA_CACHE_DIR, when set, is already there)
        # numba's default is a __pycache__ beside this file, inside the installed package;
        # the user's cache folder instead, the optimizer kernels' (the wire layer may not
        # import optim_core, so the path is spelled here as well).
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        numba.config.CACHE_DIR = os.path.join(base, "paramserve", "numba")
    f32 = types.Array(types.float32, 1, "C")
    f32_in = types.Array(types.float32, 1, "C", readonly=True)
    u32 = types.Array(types.uint32, 1, "C")
    u32_in = types.Array(types.uint32, 1, "C", readonly=True)
    u16 = types.Array(types.uint16, 1, "C")
    u64 = types.Array(types.uint64, 1, "C")
    # Received chunks copied into place: any alignment of the source.
    u32_any = types.Array(types.uint32, 1, "C", readonly=True, aligned=False)
    u64_any = types.Array(types.uint64, 1, "C", readonly=True, aligned=False)
    # Received chunks are views of the message bytes at any offset: unaligned reads.
    u16_in = types.Array(types.uint16, 1, "C", readonly=True, aligned=False)
    counts = types.UniTuple(types.int64, 2)
    i64_in = types.Array(types.int64, 1, "C", readonly=True)
    scatter = types.int64(u16_in, i64_in, i64_in, types.int64)
    u8_in = types.Array(types.uint8, 1, "C", readonly=True)
    signatures = {
        "round_bf16": (_round_bf16_kernel, types.int64(u32_in, u16)),
        "round_f16": (_round_f16_kernel, types.int64(u32_in, u16)),
        "widen_bf16": (_widen_bf16_kernel, types.int64(u16_in, u32)),
        "widen_f16": (_widen_f16_kernel, types.int64(u16_in, u32)),
        "feedback_bf16": (
            _feedback_bf16_kernel,
            counts(f32_in, f32_in, u16, f32, types.boolean),
        ),
        "feedback_f16": (_feedback_f16_kernel, counts(f32_in, f32_in, u16, f32, types.boolean)),
        "scatter_bf16": (_scatter_bf16_kernel, scatter),
        "scatter_f16": (_scatter_f16_kernel, scatter),
        "scatter_copy": (
            _scatter_copy_kernel,
            types.int64(u8_in, i64_in, i64_in, types.int64),
        ),
        "copy_f32": (_copy_f32_kernel, types.int64(u32_any, u32)),
        "copy_f64": (_copy_f64_kernel, types.int64(u64_any, u64)),
    }
    compiled = {}
    for name, (func, signature) in signatures.items():
        jit = numba.njit([signature], cache=cache, error_model="numpy", fastmath=False, nogil=True)
        compiled[name] = jit(func)
    return SimpleNamespace(**compiled)


def load() -> SimpleNamespace | None:
    """The compiled kernels (from the cache after the first time), or None when numba fails."""
    if "kernels" in _state:
        return _state["kernels"]
    with _lock:
        if "kernels" not in _state:
            kernels: SimpleNamespace | None = None
            try:
                kernels = _compile(cache=True)
            except Exception:
                try:  # no writable cache location, say: once more without it
                    kernels = _compile(cache=False)
                except Exception as exc:
                    warnings.warn(
                        f"Fused wire casts are disabled: numba failed ({exc!r}); NumPy's "
                        "astype is used instead.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _state["kernels"] = kernels
    return _state["kernels"]
