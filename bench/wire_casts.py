"""The wire casts per element: NumPy/ml_dtypes ``astype`` against paramserve's fused kernels.

Usage: python bench/wire_casts.py [--sizes 1M,16M] [--repeat 11] [--threads 1,2] [--json]

Rows, each timed both ways on the same arrays in interleaved rounds (a busy neighbour slows
both alike; read the load average in the header):

* ``round bfloat16`` / ``round float16``: float32 to the wire dtype (the server's pull);
* ``widen bfloat16`` / ``widen float16``: back to float32, into an existing array (the
  client's pull into ``out=``; the server's push widens the same way, chunk by chunk);
* ``error feedback bfloat16`` / ``float16``: the client's compressed push of one gradient
  with a carried residual: ``t = g + r``, ``sent = round(t)``, ``r' = t - sent`` (0 where
  not finite). NumPy: add, copyto (round), subtract (widen), the finiteness check; fused:
  :func:`paramserve.wire.round_with_feedback`, one pass.

ns/elem are medians over rounds; both ways are checked to give the same bits first.
Sizes take K/M suffixes in powers of two. ``--threads 1,2,4`` also times the fused casts on
that many threads (``paramserve.wire.set_cast_threads``: arrays of at least
``CAST_MIN_ELEMENTS`` run in pieces), in the same interleaved rounds, with their speed-up
over one thread; the first count is the one the ``fused`` column uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np

from paramserve import wire

BF16 = np.dtype(ml_dtypes.bfloat16)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def _feedback_numpy(g, r, sent, left) -> None:
    """client/compression.py's NumPy route (the one before the fused kernel)."""
    total = np.add(g, r, out=left)
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(sent, total, casting="unsafe")
        np.subtract(total, sent, out=left, dtype=np.float32, casting="unsafe")
        if not np.isfinite(np.add.reduce(left)):
            np.copyto(left, 0.0, where=~np.isfinite(left))


def cases(n: int) -> list[tuple[str, Callable[[], object], Callable[[], object], Callable]]:
    """(name, numpy, fused, outputs to compare) per row, on fresh arrays of ``n`` elements."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    residual = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    rows = []
    for dtype in (BF16, np.dtype(np.float16)):
        name = dtype.name
        a_np, a_fu = np.empty(n, dtype), np.empty(n, dtype)
        rows.append(
            (
                f"round {name}",
                lambda a=a_np: np.copyto(a, x, casting="unsafe"),
                lambda a=a_fu: wire.cast_into(x, a),
                lambda a=a_np, b=a_fu: (a, b),
            )
        )
        narrow = x.astype(dtype)
        w_np, w_fu = np.empty(n, np.float32), np.empty(n, np.float32)
        rows.append(
            (
                f"widen {name}",
                lambda w=w_np, s=narrow: np.copyto(w, s, casting="unsafe"),
                lambda w=w_fu, s=narrow: wire.cast_into(s, w),
                lambda a=w_np, b=w_fu: (a, b),
            )
        )
        s_np, s_fu = np.empty(n, dtype), np.empty(n, dtype)
        l_np, l_fu = np.empty(n, np.float32), np.empty(n, np.float32)
        rows.append(
            (
                f"error feedback {name}",
                lambda s=s_np, lo=l_np: _feedback_numpy(x, residual, s, lo),
                lambda s=s_fu, lo=l_fu: wire.round_with_feedback(x, residual, s, lo),
                lambda a=(s_np, l_np), b=(s_fu, l_fu): (np.concatenate([a[0].view(np.uint16),
                    a[1].view(np.uint16)]), np.concatenate([b[0].view(np.uint16),
                    b[1].view(np.uint16)])),
            )
        )  # fmt: skip
    return rows


def bench(n: int, repeat: int, threads: list[int]) -> list[dict]:
    out = []
    for name, numpy_fn, fused_fn, outputs in cases(n):
        same = True
        for count in threads:
            wire.set_cast_threads(count)
            numpy_fn()
            fused_fn()
            a, b = outputs()
            same &= np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
        times: dict[str, list[float]] = {"numpy": []} | {f"x{t}": [] for t in threads}
        inner = max(1, (16 << 20) // n)
        for r in range(repeat):
            order = [("numpy", 1, numpy_fn)] + [(f"x{t}", t, fused_fn) for t in threads]
            for label, count, fn in order if r % 2 == 0 else order[::-1]:
                wire.set_cast_threads(count)
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[label].append((time.perf_counter() - t0) / inner)
        ns = {k: statistics.median(v) * 1e9 / n for k, v in times.items()}
        fused = ns[f"x{threads[0]}"]
        out.append(
            {
                "size": n,
                "case": name,
                "numpy_ns_per_elem": ns["numpy"],
                "fused_ns_per_elem": fused,
                "speedup": ns["numpy"] / fused,
                "threads": {t: {"ns_per_elem": ns[f"x{t}"], "over_first": fused / ns[f"x{t}"]}
                            for t in threads[1:]},
                "same_bits": bool(same),
            }
        )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,16M", help="comma list, e.g. 1M,16M")
    parser.add_argument("--repeat", type=int, default=11, help="timed rounds per case")
    parser.add_argument(
        "--threads", default="1", help="comma list of cast thread counts, e.g. 1,2,4"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ns = parser.parse_args(argv)
    threads = [int(t) for t in ns.threads.split(",") if t.strip()]
    if not threads or min(threads) < 1:
        parser.error("--threads takes counts >= 1")
    if not wire.prepare_casts():
        print("the fused casts are unavailable (numba missing or failing)", file=sys.stderr)
        return 1
    load = os.getloadavg()[0]
    rows = [
        row
        for s in ns.sizes.split(",")
        if s.strip()
        for row in bench(parse_size(s), ns.repeat, threads)
    ]
    info = {"cpus": os.cpu_count(), "loadavg_start": round(load, 2)}
    info["loadavg_end"] = round(os.getloadavg()[0], 2)
    if ns.json:
        print(json.dumps({"info": info, "rows": rows}, indent=1))
        return 0
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    more = "".join(f" {f'x{t} ns/el':>10} {f'x{t}/x{threads[0]}':>8}" for t in threads[1:])
    head = (
        f"{'size':>10}  {'case':<26} {'numpy ns/el':>11} {'fused ns/el':>11} {'speed-up':>8}"
        f"{more}  same"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        extra = "".join(
            f" {r['threads'][t]['ns_per_elem']:>10.3f} {r['threads'][t]['over_first']:>8.2f}"
            for t in threads[1:]
        )
        print(
            f"{r['size']:>10}  {r['case']:<26} {r['numpy_ns_per_elem']:>11.3f}"
            f" {r['fused_ns_per_elem']:>11.3f} {r['speedup']:>8.2f}{extra}"
            f"  {'yes' if r['same_bits'] else 'NO'}"
        )
    return 0 if all(r["same_bits"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
