"""On paper: steps/s of S shards x W workers on a 25 or 100 Gbit network, from measured costs.

Usage: python bench/shards_model.py [--figures shards.json] [--elements 16M]
       [--shards 1,2,4,8,16] [--workers 1,8,32] [--networks 25x1,25x8,100x8]

A worker step moves the gradient to the shards and the weights back: ``b * N`` bytes each way
(``b`` = 4, float32), ``b * N / S`` of it through each shard. Four resources bound the job's
aggregate worker steps per second ``R``:

* **shard CPU**: a shard process spends ``c_s`` CPU seconds per GB it moves (gRPC receive and
  send, checks, the optimizer's apply: everything, as measured) and has ``k_s`` cores' worth
  of CPU to spend (gRPC Python's GIL holds one process near one core): ``R <= S * k_s /
  (2 b N c_s)``;
* **shard NIC** (full duplex, ``B`` bytes/s each way, ``h`` shards per host sharing it):
  ``R <= S * B / (h * b * N)``;
* **worker CPU**: ``R <= W * k_w / (2 b N c_w)``;
* **worker NIC**: ``R <= W * B / (b * N)``.

``R`` is the least of the four, and the one that binds is printed: that is where the
bottleneck sits. A sync round adds two small calls and one more apply on the way (CommitRound,
ApplyRound); their CPU is in ``c_s``, their latency (under 1 ms on a data-centre network
plus the apply of ``N / S`` floats) is left out, so sync figures are upper bounds.

``c_s`` and ``c_w`` come from a ``bench/shards.py --json`` run (``--figures``: the median over
its configurations of the job's shard CPU per GB and one worker's CPU per GB, taken from the
rows with S > 1 since a sharded job pays per call on S channels) or from the flags. No network
is measured here; the figures on loopback already include the kernel's TCP work on both ends.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

GBIT = 1e9 / 8  # bytes per second in one Gbit/s


@dataclass(frozen=True)
class Costs:
    """Measured CPU seconds per GB moved, per process kind, and the cores each may use."""

    shard_s_per_gb: float
    worker_s_per_gb: float
    shard_cores: float = 1.0
    worker_cores: float = 1.0


@dataclass(frozen=True)
class Bound:
    """One configuration's modelled aggregate steps/s and the resource that limits it."""

    steps_per_s: float
    limit: str
    bounds: dict[str, float]


def model(
    costs: Costs,
    *,
    elements: int,
    shards: int,
    workers: int,
    link_gbit: float,
    shards_per_host: int = 1,
    wire_bytes: int = 4,
) -> Bound:
    """Aggregate worker steps/s of ``shards`` x ``workers`` at ``elements`` floats per step."""
    one_way = wire_bytes * elements / 1e9  # GB each way per worker step
    link = link_gbit * GBIT / 1e9  # GB/s each way
    bounds = {
        "shard CPU": shards * costs.shard_cores / (2 * one_way * costs.shard_s_per_gb),
        "shard NIC": shards * link / (shards_per_host * one_way),
        "worker CPU": workers * costs.worker_cores / (2 * one_way * costs.worker_s_per_gb),
        "worker NIC": workers * link / one_way,
    }
    limit = min(bounds, key=bounds.__getitem__)
    return Bound(bounds[limit], limit, bounds)


def costs_from_figures(path: Path, shard_cores: float, worker_cores: float) -> Costs:
    """``c_s`` and ``c_w`` from a bench/shards.py JSON: medians over its rows with S > 1
    (all rows when it has none)."""
    rows = json.loads(path.read_text())["results"]
    sharded = [r for r in rows if r["shards"] > 1] or rows
    if not sharded:
        raise SystemExit(f"{path}: no results to take the costs from")
    return Costs(
        shard_s_per_gb=statistics.median(r["server_cpu_s_per_gb"] for r in sharded),
        worker_s_per_gb=statistics.median(r["worker_cpu_s_per_gb"] for r in sharded),
        shard_cores=shard_cores,
        worker_cores=worker_cores,
    )


def _count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _networks(text: str) -> list[tuple[int, int]]:
    """``25x1,100x4``: (link Gbit/s, shard processes per host) pairs."""
    out = []
    for item in text.split(","):
        link, _, per_host = item.strip().partition("x")
        out.append((int(link), int(per_host or 1)))
    return out


def nic_bound_hosts(costs: Costs, link_gbit: float) -> float:
    """Shard processes per host at which, all CPU-bound, they fill the host's link."""
    per_shard = costs.shard_cores / (2 * costs.shard_s_per_gb)  # GB/s each way
    return link_gbit * GBIT / 1e9 / per_shard


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--figures", type=Path, help="a bench/shards.py --json file")
    p.add_argument(
        "--shard-cpu-s-per-gb",
        type=float,
        default=0.7,
        help="c_s without --figures (default 0.7: the 2-core run in docs/benchmarks.md)",
    )
    p.add_argument(
        "--worker-cpu-s-per-gb",
        type=float,
        default=0.55,
        help="c_w without --figures (default 0.55: the same run)",
    )
    p.add_argument("--shard-cores", type=float, default=1.0)
    p.add_argument("--worker-cores", type=float, default=1.0)
    p.add_argument("--elements", type=_count, default=16 << 20, help="float32 per step")
    p.add_argument("--shards", type=_ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--workers", type=_ints, default=[1, 8, 32])
    p.add_argument(
        "--networks",
        type=_networks,
        default=[(25, 1), (25, 8), (100, 8)],
        help="link Gbit/s x shard processes per host (default 25x1,25x8,100x8)",
    )
    args = p.parse_args(argv)

    if args.figures:
        costs = costs_from_figures(args.figures, args.shard_cores, args.worker_cores)
    else:
        costs = Costs(
            args.shard_cpu_s_per_gb, args.worker_cpu_s_per_gb, args.shard_cores,
            args.worker_cores,
        )
    print(
        f"c_s {costs.shard_s_per_gb:.3f} CPU s/GB x {costs.shard_cores:g} core(s) per shard, "
        f"c_w {costs.worker_s_per_gb:.3f} CPU s/GB x {costs.worker_cores:g} core(s) per "
        f"worker; {args.elements:,} float32 each way per worker step"
    )
    for link in sorted({link for link, _ in args.networks}):
        print(
            f"{link} Gbit/s: a host's link binds from {nic_bound_hosts(costs, link):.1f} "
            "CPU-bound shard processes per host"
        )
    cases = [f"{link} Gb, {h}/host" for link, h in args.networks]
    head = f"{'W':>3} {'S':>3} " + " ".join(f"{c:>24}" for c in cases)
    print(head)
    print("-" * len(head))
    for w in args.workers:
        for s in args.shards:
            cells = []
            for link, per_host in args.networks:
                b = model(
                    costs,
                    elements=args.elements,
                    shards=s,
                    workers=w,
                    link_gbit=link,
                    shards_per_host=min(per_host, s),
                )
                cells.append(f"{b.steps_per_s:>8.1f} st/s {b.limit:>10}")
            print(f"{w:>3} {s:>3} " + " ".join(f"{c:>24}" for c in cells))
    print(
        "(st/s: all workers' steps per second; the name after it is the resource that binds: "
        "shard or worker CPU, shard or worker NIC)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
