"""The server's own work per small Step, without gRPC: this tree against a baseline revision.

Usage: python bench/step_handler.py [--baseline-rev main] [--pairs 3] [--rounds 7] [--calls 3000]

bench/step.py measures whole steps over TCP, where gRPC's own per-call work (the poller
thread, HTTP/2, protobuf) is about half of the server's CPU and a shared machine moves
every figure. This isolates what paramserve's code adds: a child process starts a real
in-process server (``create_server``: async, one replica, Adam), sends one ``Client.step``
of bench/step.py's ``small`` model (four variables, 9,610 floats) to capture a real
``StepRequest``, then calls the servicer's ``Step`` handler directly on it (a new sequence
each call, so every call is applied) and reports the handler thread's CPU time per call:
gradient checks, the push through the aggregator, optim_core's apply, the read and the
reply message, metrics included.

The baseline is another revision of this repository (``git archive REV`` of optim_core,
server, client and proto, extracted once per commit under the temp directory and imported
in place of the installed package). Children of this tree and of the baseline alternate,
``--pairs`` times, in turns; each reports the median over ``--rounds`` rounds, and the
ratio column is baseline over this tree per pair (above 1: this tree does less work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL_MODEL = {
    "dense/kernel": (64, 128),
    "dense/bias": (128,),
    "out/kernel": (128, 10),
    "out/bias": (10,),
}
# Where each package of paramserve lives in a source tree (pyproject's package-dir).
PACKAGE_DIRS = {
    "optim_core": "optim_core",
    "server": "server",
    "client": "client",
    "v1": "proto/paramserve/v1",
    "wire": "proto/paramserve/wire",
}


def child(rounds: int, calls: int) -> None:
    """Time the Step handler in this process; print the per-round microseconds as JSON."""
    import numpy as np

    from paramserve.client import Client
    from paramserve.server import servicer as sv
    from paramserve.server.aggregation import AggregationConfig
    from paramserve.server.app import create_server
    from paramserve.server.config import ServerConfig

    captured: dict[str, object] = {}
    handler = sv.ParameterServerServicer.Step

    def capture(self: object, request: object, context: object) -> object:
        captured["servicer"], captured["request"] = self, request
        return handler(self, request, context)

    sv.ParameterServerServicer.Step = capture  # type: ignore[method-assign]
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        device="cpu",
        optimizer="adam",
        aggregation=AggregationConfig(mode="async", replicas=1),
        checkpoint_dir=None,
        snapshot_on_exit=False,
    )
    server = create_server(config)
    rng = np.random.default_rng(0)
    init = {n: rng.standard_normal(s, dtype=np.float32) for n, s in SMALL_MODEL.items()}
    grads = {n: rng.standard_normal(s, dtype=np.float32) * 1e-3 for n, s in SMALL_MODEL.items()}
    try:
        with Client(f"127.0.0.1:{server.port}", worker_id="bench", timeout_s=60) as client:
            client.create_model(init, optimizer="adam")
            client.step(grads)
        servicer, request = captured["servicer"], captured["request"]

        class Context:
            """What the handler asks of a gRPC context."""

            def time_remaining(self) -> float:
                return 60.0

            def is_active(self) -> bool:
                return True

            def abort_with_status(self, status: object) -> None:
                raise RuntimeError(f"the Step failed: {status}")

        context = Context()
        sequence = request.push.sequence  # type: ignore[attr-defined]

        def call() -> None:
            nonlocal sequence
            sequence += 1
            request.push.sequence = sequence  # type: ignore[attr-defined]
            handler(servicer, request, context)

        for _ in range(300):
            call()
        per_round = []
        for _ in range(rounds):
            start = time.thread_time()
            for _ in range(calls):
                call()
            per_round.append((time.thread_time() - start) / calls * 1e6)
    finally:
        server.stop(0)
    print(json.dumps(per_round))


def baseline_tree(rev: str) -> Path:
    """A directory importable as ``paramserve`` at ``rev`` (extracted once per commit)."""
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    root = Path(tempfile.gettempdir()) / f"paramserve-bench-tree-{sha[:12]}"
    package = root / "paramserve"
    if not package.is_dir():
        src = root / "src"
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", sha, "optim_core", "server", "client", "proto"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        staging = root / "paramserve.partial"
        staging.mkdir(exist_ok=True)
        for name, where in PACKAGE_DIRS.items():
            link = staging / name
            if not link.exists():
                link.symlink_to(src / where)
        staging.rename(package)
    return root


def run_child(args: argparse.Namespace, pythonpath: Path | None) -> list[float]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--rounds",
            str(args.rounds),
            "--calls",
            str(args.calls),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="main", help="git revision to compare with")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.rounds, args.calls)
        return
    base = baseline_tree(args.baseline_rev)
    run_child(argparse.Namespace(rounds=1, calls=10), base)  # compile its kernels first
    print(
        f"Step handler CPU per small step (us), this tree vs {args.baseline_rev}; "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print(f"{'pair':>4s} {'this tree':>10s} {'baseline':>10s} {'baseline/this':>14s}")
    ratios = []
    for pair in range(args.pairs):
        order = [None, base] if pair % 2 == 0 else [base, None]
        medians = {}
        for path in order:
            medians[path] = statistics.median(run_child(args, path))
        ratio = medians[base] / medians[None]
        ratios.append(ratio)
        print(f"{pair + 1:4d} {medians[None]:10.1f} {medians[base]:10.1f} {ratio:14.2f}")
    print(f"median ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
