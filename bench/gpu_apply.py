"""GPU optimizer apply speed against the same device's copy bandwidth, measured in one run.

Usage: python bench/gpu_apply.py [--sizes 16M,64M,256M] [--repeat 20] [--json]

For each size, a device-to-device copy of N float32 (``cupy.copyto``: N read, N written)
sets the yardstick in GB/s. Each update rule then runs through the public API
(``opt.apply([g], [w])`` on a ``Variable(..., device="gpu")``), and its effective bandwidth
is the bytes its rule must touch per element (Adam: w, g, m, v read, w, m, v written = 7 x 4
bytes) over the time of one apply, measured with CUDA events around ``repeat`` applies after
a warm-up. ``x copy`` is that over the copy's GB/s (the issue's target for Adam at 64M
floats and above: >= 0.8).

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

TARGET_ADAM_X_COPY = 0.8
TARGET_MIN_ELEMENTS = 64 << 20

# name, class, kwargs, float32 accesses per element of the rule (reads + writes)
CASES: list[tuple[str, str, dict[str, Any], int]] = [
    ("Adam", "Adam", {"learning_rate": 1e-3}, 7),
    ("AdamW", "AdamW", {"learning_rate": 1e-3, "weight_decay": 0.01}, 7),
    ("SGD momentum", "SGD", {"learning_rate": 1e-2, "momentum": 0.9}, 5),
    ("Lion", "Lion", {"learning_rate": 1e-4}, 5),
    ("RMSprop", "RMSprop", {"learning_rate": 1e-3}, 5),
    ("Adagrad", "Adagrad", {"learning_rate": 1e-2}, 5),
]


@dataclass
class Row:
    name: str
    elements: int
    ms: float
    gbytes_per_s: float
    x_copy: float


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
    rows = [Row("copy (d2d)", n, copy_ms, copy_gbs, 1.0)]
    del src, dst
    rng = np.random.default_rng(0)
    for name, cls, kwargs, accesses in CASES:
        w = optim_core.Variable(rng.standard_normal(n, dtype=np.float32), "w", device="gpu")
        g = cp.asarray(rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3))
        opt = getattr(optim_core, cls)(**kwargs)
        ms = _timed_ms(cp, lambda opt=opt, g=g, w=w: opt.apply([g], [w]), repeat)
        gbs = accesses * 4 * n / ms / 1e6
        rows.append(Row(name, n, ms, gbs, gbs / copy_gbs))
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
    print(f"{'elements':>12} {'case':<14} {'ms':>9} {'GB/s':>9} {'x copy':>7}")
    for r in rows:
        print(
            f"{r.elements:>12,} {r.name:<14} {r.ms:>9.3f} {r.gbytes_per_s:>9.1f} "
            f"{r.x_copy:>7.2f}"
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
