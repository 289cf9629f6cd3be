"""Optimizer apply throughput against Adam's memory floor (fused vs NumPy), 1 or more threads."""

# Usage: python bench/optimizer_apply.py [--sizes 1M,16M,64M] [--threads 1,2] [--repeat N]
#                                        [--min-elements N] [--json]
#
# The floor is a numba loop with Adam's own access pattern (read w, g, m, v; write w, m, v:
# 28 bytes per float32 element) and trivial arithmetic; STREAM triad is the wrong yardstick.
# The floor and "Adam kernel, direct" (fused.adam on bare arrays) run on the very arrays
# of the "Adam fused" case; every other row goes through the public API,
# ``opt.apply([g], [w])``, on its own arrays, so it includes the base class's per-call work.
# All cases of one size are timed in interleaved rounds (each round times every case once,
# the floor included), so a busy neighbour on the machine slows floor and rules alike.
# "x floor" is the median over rounds of floor time / case time; "x floor BW" scales it by
# the bytes each rule must move at least (its own access pattern) over the floor's 28, so
# rules lighter than Adam (SGD, RMSprop, Adagrad: 20 bytes) can be judged too. "best x
# floor" compares the fastest call of each, which is what bursts of other processes on a
# shared machine disturb least; read "loadavg" in the header before trusting a figure.
# Sizes take K/M/G suffixes in powers of two (16M = 16 * 2**20 elements).
#
# --threads (default 1): every case, the floor included, runs at each count of threads
# (optim_core.set_kernel_threads from --min-elements up; the floor loop is cut into the same
# pieces), all counts interleaved in the same rounds. "x floor" compares with the floor at
# the same count, "x 1 thread" with the same case on one thread. NumPy rules always run on
# one thread (only the fused kernels are cut into pieces).

from __future__ import annotations

import os

# One thread everywhere, set before numpy/numba are imported (--threads uses optim_core's own
# pool, not numba's or BLAS's threads).
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from paramserve import optim_core  # noqa: E402
from paramserve.optim_core import fused  # noqa: E402

DTYPE = np.float32

# (row label, optimizer class name, constructor kwargs, fused on?, float32 accesses/element)
CASES: list[tuple[str, str, dict[str, Any], bool, int]] = [
    ("Adam fused", "Adam", {}, True, 7),
    ("Adam numpy", "Adam", {}, False, 7),
    ("AdamW fused", "AdamW", {}, True, 7),
    ("SGD momentum fused", "SGD", {"momentum": 0.9}, True, 5),
    ("SGD momentum numpy", "SGD", {"momentum": 0.9}, False, 5),
    ("SGD nesterov fused", "SGD", {"momentum": 0.9, "nesterov": True}, True, 5),
    ("RMSprop", "RMSprop", {}, True, 5),
    ("Adagrad", "Adagrad", {}, True, 5),
]


@dataclass
class Row:
    """One measured line of the table."""

    name: str
    size: int
    path: str  # "fused", "numpy", "floor", or why it did not run
    elems_per_s: float | None
    ratio_to_floor: float | None
    gbytes_per_s: float | None
    bw_ratio_to_floor: float | None
    best_ratio_to_floor: float | None  # fastest case call / fastest floor call
    threads: int = 1
    speedup_vs_1_thread: float | None = None  # median over rounds of t(1 thread) / t


def parse_size(text: str) -> int:
    """``1M`` -> 1048576; plain integers are taken as they are."""
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def _floor_kernel() -> Callable[..., None]:
    import numba
    from numba import types

    arr = types.Array(types.float32, 1, "C")

    @numba.njit(
        types.void(arr, arr, arr, arr, types.float32),
        error_model="numpy",
        fastmath=False,
        nogil=True,
    )
    def adam_pattern(w, g, m, v, s):  # read w, g, m, v; write w, m, v
        # Keeps v >= 0 and all values normal, so Adam can run on the same arrays after it.
        for i in range(w.shape[0]):
            gi = g[i]
            mi = m[i] * s + gi
            vi = v[i] * s + gi * gi
            m[i] = mi
            v[i] = vi
            w[i] = w[i] - mi * s

    return adam_pattern


def fused_taken(opt: Any, g: np.ndarray, w: np.ndarray) -> bool:
    """Run one apply with ``fused.can_fuse`` wrapped; True when it answered yes."""
    answers: list[bool] = []
    original = fused.can_fuse

    def spy(*args: Any) -> bool:
        answer = original(*args)
        answers.append(answer)
        return answer

    fused.can_fuse = spy
    try:
        opt.apply([g], [w])
    finally:
        fused.can_fuse = original
    return any(answers)


@dataclass
class _Case:
    name: str
    path: str
    accesses: int  # float32 loads + stores per element the rule needs at least
    fn: Callable[[], None]
    times: list[float]


def _floor_and_direct(opt: Any, w: np.ndarray, g: np.ndarray) -> list[_Case]:
    """The floor loop and the bare Adam kernel, on the very arrays of the fused Adam case.

    Same arrays, same pages: whether an array got transparent huge pages (NumPy asks for
    them; the kernel grants them as it can) changes its speed, so the floor must not run
    on other allocations than the rule it judges.
    """
    floor = _floor_kernel()
    slots = {v.name.rsplit("_", 1)[-1]: v.value for v in opt.variables}
    m, v = slots["momentum"], slots["velocity"]
    s = DTYPE(0.5)
    # Through fused._run: cut into pieces on several threads as the kernels are.
    cases = [
        _Case("floor (Adam pattern)", "floor", 7, lambda: fused._run(floor, (w, g, m, v), (s,)), [])
    ]
    if fused.available():
        args = (DTYPE(1e-3), DTYPE(1 - 0.9), DTYPE(1 - 0.999), DTYPE(1e-7))
        cases.append(
            _Case("Adam kernel, direct", "fused", 7, lambda: fused.adam(w, g, m, v, *args), [])
        )
    return cases


def _api_case(
    name: str,
    cls: str,
    kwargs: dict[str, Any],
    use_fused: bool,
    accesses: int,
    g: np.ndarray,
    rng: np.random.Generator,
) -> tuple[_Case, Any, np.ndarray]:
    """An optimizer built on its own variable, applied through ``opt.apply([g], [w])``."""
    w = rng.standard_normal(g.size, dtype=DTYPE)
    opt = getattr(optim_core, cls)(**kwargs)
    opt.use_fused_kernels = use_fused
    try:
        opt.build([w])
        path = "fused" if fused_taken(opt, g, w) else "numpy"
    except NotImplementedError:
        return _Case(name, "not implemented", accesses, lambda: None, []), opt, w
    return _Case(name, path, accesses, lambda: opt.apply([g], [w]), []), opt, w


def bench_size(n: int, repeat: int, counts: list[int], min_elements: int) -> list[Row]:
    """All rows for one size. Cases (at every thread count) are timed in interleaved rounds,
    so that a noisy neighbour slows the floor and the rules alike; ratios are medians of
    per-round ratios."""
    rng = np.random.default_rng(0)
    inner = max(1, (16 * 2**20) // n)
    g = rng.standard_normal(n, dtype=DTYPE)
    api = [_api_case(*spec, g, rng) for spec in CASES]
    _, adam_opt, adam_w = api[0]  # CASES[0] is the fused Adam case
    cases = _floor_and_direct(adam_opt, adam_w, g) + [case for case, _, _ in api]
    timed = [c for c in cases if c.path != "not implemented"]
    times: dict[tuple[str, int], list[float]] = {(c.name, t): [] for c in timed for t in counts}
    for c in timed:
        c.fn()  # warm-up: JIT compile, first-touch page faults of slots
    runs = [(c, t) for c in timed for t in counts]
    for r in range(repeat):
        k = r % len(runs)
        for c, t in runs[k:] + runs[:k]:
            fused.set_threads(t, min_elements=min_elements)
            t0 = time.perf_counter()
            for _ in range(inner):
                c.fn()
            times[(c.name, t)].append((time.perf_counter() - t0) / inner)
    fused.set_threads(1)

    rows = []
    for t in counts:
        floor = times[(cases[0].name, t)]
        for c in cases:
            mine = times.get((c.name, t))
            if not mine:
                rows.append(Row(c.name, n, c.path, None, None, None, None, None, t))
                continue
            eps = n / statistics.median(mine)
            ratio = statistics.median(f / x for f, x in zip(floor, mine, strict=True))
            bps = eps * c.accesses * np.dtype(DTYPE).itemsize
            best = min(floor) / min(mine)
            one = times.get((c.name, 1))
            speedup = (
                statistics.median(a / b for a, b in zip(one, mine, strict=True)) if one else None
            )
            bw = ratio * c.accesses / 7
            rows.append(Row(c.name, n, c.path, eps, ratio, bps / 1e9, bw, best, t, speedup))
    del cases, timed, api, adam_opt, adam_w
    gc.collect()
    return rows


def format_table(rows: list[Row]) -> str:
    """A fixed-width table, one block per size."""
    head = f"{'size':>10}  {'case':<22} {'path':<16} {'threads':>7} {'Gelem/s':>8}"
    head += f" {'x floor':>8} {'GB/s':>7} {'x floor BW':>10} {'best x floor':>12}"
    head += f" {'x 1 thread':>10}"
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and r.size != last:
            lines.append("")
        last = r.size
        if r.elems_per_s is None:
            lines.append(f"{r.size:>10}  {r.name:<22} {r.path:<16} {r.threads:>7}")
            continue
        speedup = "" if r.speedup_vs_1_thread is None else f"{r.speedup_vs_1_thread:.2f}"
        lines.append(
            f"{r.size:>10}  {r.name:<22} {r.path:<16} {r.threads:>7}"
            f" {r.elems_per_s / 1e9:>8.3f} {r.ratio_to_floor:>8.2f} {r.gbytes_per_s:>7.2f}"
            f" {r.bw_ratio_to_floor:>10.2f} {r.best_ratio_to_floor:>12.2f} {speedup:>10}"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1M,16M,64M", help="comma-separated, e.g. 1M,16M")
    parser.add_argument("--repeat", type=int, default=11, help="timed repeats per case")
    parser.add_argument(
        "--threads", default="1", help="comma-separated thread counts, e.g. 1,2 (default: 1)"
    )
    parser.add_argument(
        "--min-elements",
        type=int,
        default=fused.DEFAULT_MIN_ELEMENTS,
        help="smallest variable cut into pieces when threads > 1 (default: optim_core's)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(argv)
    sizes = [parse_size(s) for s in ns.sizes.split(",") if s.strip()]
    counts = sorted({int(t) for t in ns.threads.split(",") if t.strip()})

    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_start": round(os.getloadavg()[0], 2),
        "fused_available": fused.available(),
        "threads": counts,
        "min_elements": ns.min_elements,
        "repeat": ns.repeat,
        "dtype": np.dtype(DTYPE).name,
    }
    rows: list[Row] = []
    for n in sizes:
        rows.extend(bench_size(n, ns.repeat, counts, ns.min_elements))
        if not ns.json:
            print(f"# done {n} elements", file=sys.stderr, flush=True)
    # Other processes share the memory bus: a high load average means noisy figures.
    info["loadavg_end"] = round(os.getloadavg()[0], 2)
    if ns.json:
        print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=1))
    else:
        print(" ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in info.items()))
        print(format_table(rows))
        adam = [
            r
            for r in rows
            if r.name == "Adam fused" and r.ratio_to_floor is not None and r.threads == counts[0]
        ]
        ratios = {str(r.size): round(r.ratio_to_floor, 3) for r in adam}
        print("RESULT adam_fused_x_floor " + json.dumps(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
