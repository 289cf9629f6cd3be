"""Per-call overhead of ``optim_core`` Adam on a small model's four tiny variables.

Usage: python bench/small_apply.py [--rounds 15] [--calls 2000] [--baseline-src DIR] [--json]

The model is bench/step.py's ``small`` (an MLP of 9,610 floats in four variables: 64x128,
128, 128x10, 10), float32. At this size the arithmetic is a few microseconds and the rest
of an ``apply`` is Python: gradient checks, per-variable dispatch, scalars, kernel calls.
Cases, timed in interleaved rounds (each round times every case once, in rotating order,
so a busy neighbour on this shared machine slows them alike); figures are medians over
rounds, and ratios are medians of per-round ratios:

* ``kernels only``: the four compiled fused Adam kernels called directly on flat views
  with ready scalars, no Python around them: the floor of a fused apply;
* ``apply``: ``opt.apply(grads, variables)`` of this tree's optim_core (fused kernels);
* ``apply, numpy rule``: the same with ``use_fused_kernels = False``;
* ``apply, baseline``: with ``--baseline-src DIR``, another optim_core source tree (e.g.
  ``git archive main optim_core | tar -x -C /tmp/base`` and ``--baseline-src
  /tmp/base/optim_core``), loaded alongside under another name; the ``vs baseline``
  column is its time over this tree's (above 1: this tree is faster). Both trees first
  run 20 steps on the same inputs and must give bit-identical weights and slots.
"""

from __future__ import annotations

import os

# One thread everywhere, set before numpy/numba are imported.
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from paramserve import optim_core  # noqa: E402
from paramserve.optim_core import fused  # noqa: E402

SMALL_MODEL = {
    "dense/kernel": (64, 128),
    "dense/bias": (128,),
    "out/kernel": (128, 10),
    "out/bias": (10,),
}
CHECK_STEPS = 20


def load_baseline(src: Path) -> ModuleType:
    """Import the optim_core package at ``src`` as ``_baseline_optim_core``."""
    init = src / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline-src {src}: no optim_core package there (no __init__.py)")
    name = "_baseline_optim_core"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(src)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_inputs(seed: int = 0) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Initial weights and one gradient per variable (small, so Adam stays well behaved)."""
    rng = np.random.default_rng(seed)
    init = {n: rng.standard_normal(s, dtype=np.float32) for n, s in SMALL_MODEL.items()}
    grads = [(rng.standard_normal(s, dtype=np.float32) * 1e-3) for s in SMALL_MODEL.values()]
    return init, grads


def make_apply(
    core: ModuleType, init: dict[str, np.ndarray], grads: list[np.ndarray], *, use_fused: bool
) -> tuple[Callable[[], None], Any, list[Any]]:
    """``opt.apply(grads, variables)`` on fresh copies of ``init``: the call, optimizer, vars."""
    variables = [core.Variable(v.copy(), path=n) for n, v in init.items()]
    opt = core.Adam()
    opt.use_fused_kernels = use_fused
    opt.build(variables)
    return (lambda: opt.apply(grads, variables)), opt, variables


def check_same(core: ModuleType, other: ModuleType, init: dict, grads: list) -> None:
    """Both trees give bit-identical weights and optimizer state after CHECK_STEPS steps."""
    states = []
    for module in (core, other):
        step, opt, variables = make_apply(module, init, grads, use_fused=True)
        for _ in range(CHECK_STEPS):
            step()
        states.append([v.value for v in variables] + [v.value for v in opt.variables])
    for a, b in zip(*states, strict=True):
        if a.tobytes() != b.tobytes():
            raise SystemExit("the baseline and this tree disagree: results are not bit-identical")


def kernels_only(opt: Any, variables: list[Any], grads: list[np.ndarray]) -> Callable[[], None]:
    """The four compiled kernels on flat views with this step's scalars: the floor."""
    kernel = fused._kernels().adam
    dt = np.float32
    lr = dt(1e-3)
    alpha = lr * np.sqrt(dt(1) - dt(0.999)) / (dt(1) - dt(0.9))
    scalars = (alpha, dt(1 - 0.9), dt(1 - 0.999), dt(1e-7))
    slots = {v.path: v.value for v in opt.variables}
    calls = []
    for var, g in zip(variables, grads, strict=True):
        prefix = var.path.replace("/", "_")
        m = slots[f"adam/{prefix}_momentum"]
        v = slots[f"adam/{prefix}_velocity"]
        calls.append((var.value.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1)))

    def run() -> None:
        for arrays in calls:
            kernel(*arrays, *scalars)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="calls per case per round")
    parser.add_argument("--baseline-src", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not fused.prepare():
        raise SystemExit("numba is unavailable: the fused kernels (and this benchmark) need it")

    init, grads = make_inputs()
    step, opt, variables = make_apply(optim_core, init, grads, use_fused=True)
    cases: dict[str, Callable[[], None]] = {
        "kernels only": kernels_only(opt, variables, grads),
        "apply": step,
        "apply, numpy rule": make_apply(optim_core, init, grads, use_fused=False)[0],
    }
    if args.baseline_src is not None:
        baseline = load_baseline(args.baseline_src.resolve())
        baseline.fused.prepare()
        check_same(optim_core, baseline, init, grads)
        cases["apply, baseline"] = make_apply(baseline, init, grads, use_fused=True)[0]

    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for fn in cases.values():
        for _ in range(50):
            fn()  # warm-up
    gc.disable()
    try:
        for r in range(args.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn = cases[name]
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.calls)
    finally:
        gc.enable()

    def ratio(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))

    rows = []
    for name in names:
        rows.append(
            {
                "case": name,
                "us_per_call": statistics.median(times[name]) * 1e6,
                "x_kernels_only": ratio(name, "kernels only"),
                "vs_baseline": ratio("apply, baseline", name)
                if "apply, baseline" in times and name == "apply"
                else None,
            }
        )
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"loadavg": load, "rows": rows}, indent=2))
        return
    print(
        f"small model ({sum(int(np.prod(s)) for s in SMALL_MODEL.values()):,} floats, "
        f"4 variables), Adam float32; {args.rounds} rounds x {args.calls} calls; "
        f"load average {load:.2f} on {os.cpu_count()} CPUs"
    )
    print(f"{'case':20s} {'us/call':>9s} {'x kernels only':>15s} {'vs baseline':>12s}")
    for row in rows:
        vs = f"{row['vs_baseline']:.2f}" if row["vs_baseline"] is not None else "-"
        print(
            f"{row['case']:20s} {row['us_per_call']:9.1f} {row['x_kernels_only']:15.2f} {vs:>12s}"
        )


if __name__ == "__main__":
    main()
