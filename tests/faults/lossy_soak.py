"""Pushes through the lossy proxy from fresh worker processes: surfaced errors and aborts.

``python -m tests.faults.lossy_soak --runs 7 --big 30 --small 30``: starts a ``paramserve
serve`` daemon (async) and a :class:`~tests.support.lossy_proxy.LossyProxy` in front of it,
then runs a worker process per run that pushes ``--big`` 4 MiB and ``--small`` 64 KiB
gradients (and a Step every ``--step-every`` pushes) through the proxy, one after another,
and prints one JSON line per run: the worker's exit status (-6 is SIGABRT), the errors it
saw (code and message, each push tried once), the cuts, and any ``ILLEGAL STATE`` line
from gRPC's C core. ``--client-dir DIR`` loads ``paramserve.client`` from another checkout
(e.g. ``git archive main client | tar -x -C /tmp/old``) to measure an older SDK;
``--variant`` overrides channel arguments of the SDK under test (gRPC retries off, no retry
policy, another retry buffer size), and ``GRPC_TRACE=retry GRPC_VERBOSITY=debug`` with
``--save-stderr DIR`` keeps each worker's trace of gRPC's retry filter.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.lossy_proxy import CutPlan, LossyProxy, random_plan
from tests.support.processes import REPO, ServerProcess, clean_env

BIG = 1 << 20  # float32 elements: 4 MiB
SMALL = 16 << 10  # 64 KiB


def _load_client(client_dir: str | None) -> Any:
    if client_dir:
        init = Path(client_dir) / "__init__.py"
        spec = importlib.util.spec_from_file_location(
            "paramserve.client", init, submodule_search_locations=[str(init.parent)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["paramserve.client"] = module
        spec.loader.exec_module(module)
    import paramserve.client as client

    return client


VARIANTS = {
    # gRPC retries off altogether (no transparent retries either).
    "no-retries": {"grpc.enable_retries": 0},
    # Retries on (transparent retries), but no retryPolicy in the service config.
    "no-policy": {"grpc.service_config": '{"methodConfig": []}'},
    # Retries on with a retry buffer large enough to hold every push (never committed early).
    "big-buffer": {"grpc.per_rpc_retry_buffer_size": 256 << 20},
    # Retries on with a tiny retry buffer (every push committed at once).
    "tiny-buffer": {"grpc.per_rpc_retry_buffer_size": 1024},
}


def _apply_variant(sdk: Any, variant: str | None) -> None:
    """Override channel arguments of the SDK under test (for finding what triggers what)."""
    if not variant:
        return
    changes = VARIANTS[variant]
    settings = sdk.channel.ChannelSettings
    original = settings.options

    def options(self: Any) -> list[tuple[str, Any]]:
        kept = [(k, v) for k, v in original(self) if k not in changes]
        return kept + list(changes.items())

    settings.options = options


def worker(args: argparse.Namespace) -> None:
    """One run: pushes through ``args.address``; prints a JSON summary on stdout."""
    sdk = _load_client(args.client_dir)
    _apply_variant(sdk, args.variant)
    rng = np.random.default_rng(args.seed)
    big = rng.standard_normal(BIG).astype(np.float32)
    small = rng.standard_normal(SMALL).astype(np.float32)
    errors: list[dict[str, str]] = []
    done = {"push": 0, "step": 0}
    kinds = ["big"] * args.big + ["small"] * args.small
    rng.shuffle(kinds)
    started = time.monotonic()
    with sdk.Client(args.address, timeout_s=args.timeout_s) as client:
        for i, kind in enumerate(kinds):
            grads = {"big": big} if kind == "big" else {"small": small}
            calls = [("push", lambda g=grads: client.push(g))]
            if args.step_every and i % args.step_every == 0:
                calls.append(("step", lambda: client.step({"small": small}, names=["small"])))
            for name, call in calls:
                try:
                    call()
                    done[name] += 1
                except sdk.ParamServeError as exc:
                    errors.append({"call": name, "code": exc.code.name, "message": exc.message})
    summary = {"done": done, "errors": errors, "seconds": round(time.monotonic() - started, 2)}
    print(json.dumps(summary), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="driver", choices=["driver", "worker"])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--big", type=int, default=30)
    parser.add_argument("--small", type=int, default=30)
    parser.add_argument("--step-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--up-max", type=int, default=8 << 20)
    parser.add_argument("--down-max", type=int, default=128 << 10)
    parser.add_argument("--client-dir")
    parser.add_argument(
        "--refused",
        action="store_true",
        help="upload cuts reset the stream with RST_STREAM(REFUSED_STREAM) before closing",
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("--save-stderr", help="folder for each run's stderr (GRPC_TRACE=...)")
    parser.add_argument("--address")
    args = parser.parse_args(argv)
    if args.role == "worker":
        worker(args)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(["--port", "0", "--mode", "async"], cwd=Path(tmp))
        try:
            _create_model(server.address, args.client_dir)
            for run in range(args.runs):
                seed = args.seed * 1000 + run

                def plan(rng: random.Random) -> CutPlan:
                    if args.refused:
                        return CutPlan(up_at=rng.randrange(args.up_max), rst_stream=7, reset=False)
                    return random_plan(rng, up_max=args.up_max, down_max=args.down_max)

                proxy = LossyProxy(("127.0.0.1", server.port), seed=seed, plan=plan)
                with proxy:
                    command = [
                        sys.executable, "-X", "faulthandler", "-m", "tests.faults.lossy_soak",
                        "worker",
                        "--address", proxy.address, "--seed", str(seed),
                        "--big", str(args.big), "--small", str(args.small),
                        "--step-every", str(args.step_every), "--timeout-s", str(args.timeout_s),
                    ]  # fmt: skip
                    if args.client_dir:
                        command += ["--client-dir", args.client_dir]
                    if args.variant:
                        command += ["--variant", args.variant]
                    started = time.monotonic()
                    proc = subprocess.run(
                        command, capture_output=True, text=True, env=clean_env(), cwd=REPO,
                        timeout=600,
                    )  # fmt: skip
                    seconds = time.monotonic() - started
                if args.save_stderr:
                    Path(args.save_stderr, f"run-{run}.stderr").write_text(proc.stderr)
                illegal = [ln for ln in proc.stderr.splitlines() if "ILLEGAL STATE" in ln]
                summary: dict[str, Any] = {}
                if proc.returncode == 0 and proc.stdout.strip():
                    summary = json.loads(proc.stdout.strip().splitlines()[-1])
                print(
                    json.dumps(
                        {
                            "run": run,
                            "rc": proc.returncode,
                            "seconds": round(seconds, 1),
                            "connections": proxy.connections,
                            "cuts": len(proxy.cuts),
                            "cuts_up": sum(c.direction == "up" for c in proxy.cuts),
                            "cuts_down": sum(c.direction == "down" for c in proxy.cuts),
                            "done": summary.get("done"),
                            "errors": len(summary.get("errors", [])),
                            "error_kinds": sorted(
                                {f"{e['code']}: {e['message'][:70]}" for e in summary["errors"]}
                            )
                            if summary
                            else None,
                            "illegal_state": illegal[:1],
                            "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
                        }
                    ),
                    flush=True,
                )
        finally:
            server.terminate()
    return 0


def _create_model(address: str, client_dir: str | None) -> None:
    code = (
        "import sys, numpy as np\n"
        "from tests.faults.lossy_soak import _load_client, BIG, SMALL\n"
        "sdk = _load_client(sys.argv[2] or None)\n"
        "with sdk.Client(sys.argv[1]) as c:\n"
        "    c.create_model({'big': np.zeros(BIG, np.float32),\n"
        "                    'small': np.zeros(SMALL, np.float32)}, 'sgd')\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, address, client_dir or ""],
        check=True, env=clean_env(), cwd=REPO, timeout=120,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
