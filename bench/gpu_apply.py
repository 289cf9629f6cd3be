"""GPU optimizer apply speed against the same device's copy bandwidth, measured in one run.

Usage: python bench/gpu_apply.py [--sizes 16M,64M,256M] [--repeat 20] [--json]

For each size, a device-to-device copy of N float32 (``cupy.copyto``: N read, N written)
sets the yardstick in GB/s. Each update rule then runs through the public API
(``opt.apply([g], [w])`` on a ``Variable(..., device="gpu")``), and its effective bandwidth
is the bytes its rule must touch per element (Adam: w, g, m, v read, w, m, v written = 7 x 4
bytes) over the time of one apply, measured with CUDA events around ``repeat`` applies after
a warm-up. ``x copy`` is that over the copy's GB/s (the issue's target for Adam at 64M
floats and above: >= 0.8). ``fused`` counts the fused kernels one apply launches
(``optim_core/fused_gpu.py``; 0: the rule ran as separate CuPy operations, as the
``(xp rule)`` rows do on purpose, for comparison).

Without CuPy or a usable device it prints why and exits 0 (nothing to measure); the GPU
tests skip the same way.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from paramserve import optim_core
from paramserve.optim_core import fused_gpu

TARGET_ADAM_X_COPY = 0.8
TARGET_MIN_ELEMENTS = 64 << 20

# name, class, kwargs, float32 accesses per element of the rule (reads + writes), fused
CASES: list[tuple[str, str, dict[str, Any], int, bool]] = [
    ("Adam", "Adam", {"learning_rate": 1e-3}, 7, True),
    ("Adam (xp rule)", "Adam", {"learning_rate": 1e-3}, 7, False),
    ("Adam amsgrad", "Adam", {"learning_rate": 1e-3, "amsgrad": True}, 9, True),
    ("AdamW", "AdamW", {"learning_rate": 1e-3, "weight_decay": 0.01}, 7, True),
    ("SGD", "SGD", {"learning_rate": 1e-2}, 3, True),
    ("SGD momentum", "SGD", {"learning_rate": 1e-2, "momentum": 0.9}, 5, True),
    ("SGD mom. (xp)", "SGD", {"learning_rate": 1e-2, "momentum": 0.9}, 5, False),
    ("SGD nesterov", "SGD", {"learning_rate": 1e-2, "momentum": 0.9, "nesterov": True}, 5, True),
    ("Lion", "Lion", {"learning_rate": 1e-4}, 5, True),
    ("RMSprop", "RMSprop", {"learning_rate": 1e-3}, 5, True),
    (
        "RMSprop c+mom",
        "RMSprop",
        {"learning_rate": 1e-3, "centered": True, "momentum": 0.9},
        9,
        True,
    ),
    ("Adagrad", "Adagrad", {"learning_rate": 1e-2}, 5, True),
    ("Adadelta", "Adadelta", {"learning_rate": 1.0}, 7, True),
    ("Adamax", "Adamax", {"learning_rate": 1e-3}, 7, True),
    ("Nadam", "Nadam", {"learning_rate": 1e-3}, 7, True),
    ("Ftrl", "Ftrl", {"learning_rate": 1e-2}, 7, True),
    ("Adam + EMA", "Adam", {"learning_rate": 1e-3, "use_ema": True}, 10, True),
]


@dataclass
class Row:
    name: str
    elements: int
    ms: float
    gbytes_per_s: float
    x_copy: float
    fused: int


def _fused_launches(opt: Any, g: Any, w: Any) -> int:
    """The fused kernels one ``opt.apply([g], [w])`` launches (it runs that apply)."""
    launches = 0
    launch = fused_gpu._launch

    def counted(*args: Any) -> None:
        nonlocal launches
        launches += 1
        launch(*args)

    fused_gpu._launch = counted
    try:
        opt.apply([g], [w])
    finally:
        fused_gpu._launch = launch
    return launches

def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _timed_ms(cp: Any, fn: Any, repeat: int) -> float:
    """Median milliseconds of ``fn()`` on the device (CUDA events), after one warm-up call."""
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def bench_size(cp: Any, n: int, repeat: int) -> list[Row]:
    """The copy and every case at ``n`` float32 elements."""
    src = cp.random.standard_normal(n, dtype=cp.float32)
    dst = cp.empty_like(src)
    copy_ms = _timed_ms(cp, functools.partial(cp.copyto, dst, src), repeat)
    copy_gbs = 2 * 4 * n / copy_ms / 1e6
    rows = [Row("copy (d2d)", n, copy_ms, copy_gbs, 1.0, 0)]
    del src, dst
    cp.random.seed(0)
    for name, cls, kwargs, accesses, fused in CASES:
        w = optim_core.Variable(cp.random.standard_normal(n, dtype=cp.float32), "w")
        g = cp.random.standard_normal(n, dtype=cp.float32) * np.float32(1e-3)
        opt = getattr(optim_core, cls)(**kwargs)
        opt.use_fused_kernels = fused
        launches = _fused_launches(opt, g, w)  # also the warm-up (a first compile, if any)
        ms = _timed_ms(cp, lambda opt=opt, g=g, w=w: opt.apply([g], [w]), repeat)
        gbs = accesses * 4 * n / ms / 1e6
        rows.append(Row(name, n, ms, gbs, gbs / copy_gbs, launches))
        del w, g, opt
        cp.get_default_memory_pool().free_all_blocks()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--sizes", default="16M,64M,256M", help="comma list, K/M suffixes")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)

    if not optim_core.gpu_available():
        reason = "no usable GPU (CuPy missing, or no CUDA device answers): nothing to measure"
        print(json.dumps({"skipped": reason}) if args.json else f"gpu_apply: {reason}")
        return 0
    cp = optim_core.array_module("gpu")
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    rows = [r for s in args.sizes.split(",") for r in bench_size(cp, parse_size(s), args.repeat)]
    adam = [r for r in rows if r.name == "Adam" and r.elements >= TARGET_MIN_ELEMENTS]
    met = bool(adam) and all(r.x_copy >= TARGET_ADAM_X_COPY for r in adam)
    if args.json:
        print(json.dumps({"device": device, "rows": [asdict(r) for r in rows], "met": met}))
        return 0
    print(f"device: {device}")
    print(f"{'elements':>12} {'case':<14} {'ms':>9} {'GB/s':>9} {'x copy':>7} {'fused':>5}")
    for r in rows:
        print(
            f"{r.elements:>12,} {r.name:<14} {r.ms:>9.3f} {r.gbytes_per_s:>9.1f} "
            f"{r.x_copy:>7.2f} {r.fused:>5}"
        )
    if adam:
        worst = min(r.x_copy for r in adam)
        print(
            f"RESULT adam_x_copy (>= {TARGET_MIN_ELEMENTS >> 20}M floats): {worst:.3f} "
            f"(target >= {TARGET_ADAM_X_COPY}) {'MET' if met else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
