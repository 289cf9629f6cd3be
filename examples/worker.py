"""A training worker for the README's tour: logistic regression on this worker's own data.

    .venv/bin/python examples/worker.py --address 127.0.0.1:50051 --worker-id worker-0

The worker creates the model (idempotent: every worker may try, the same definition is
accepted again). A worker token may not create models: then it checks, with ``describe()``,
that an admin created the model with the variables it trains, and joins. It then pulls the
server's weights, pushes gradients and prints its progress. ``--steps 0`` only creates (or
checks) the model: an admin does that with an admin token before the workers start.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

from paramserve.client import (
    Client,
    FailedPreconditionError,
    ParamServeError,
    PermissionDeniedError,
)

FEATURES = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:50051", help="server host:port")
    p.add_argument("--worker-id", default="worker-0", help="this worker's id (one per worker)")
    p.add_argument("--seed", type=int, default=0, help="picks this worker's data")
    p.add_argument("--steps", type=int, default=300, help="steps to train; 0: create and exit")
    p.add_argument("--log-every", type=int, default=100, help="print progress every N steps")
    p.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each call")
    p.add_argument(
        "--wait-for-server-s",
        type=float,
        default=30.0,
        help="wait up to this long for a server that is still starting (0: fail at once)",
    )
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA that signed the server's cert")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="client key (mutual TLS)")
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding a worker or admin token (default: $PARAMSERVE_TOKEN)",
    )
    return p.parse_args(argv)


def initial_weights() -> dict[str, np.ndarray]:
    return {"w": np.zeros((FEATURES, 1), np.float32), "b": np.zeros(1, np.float32)}


def ensure_model(client: Client) -> None:
    """Create the model, or, when this token may not, check that it exists as expected."""
    try:
        client.create_model(
            initial_weights(), optimizer={"class_name": "Adam", "config": {"learning_rate": 0.05}}
        )
        return
    except PermissionDeniedError:
        pass  # a worker token: an admin creates the model
    variables = {v.name: (tuple(v.shape), v.dtype) for v in client.describe().variables}
    expected = {name: (a.shape, a.dtype.name) for name, a in initial_weights().items()}
    if variables != expected:
        sys.exit(f"the server's model is {variables}, this worker trains {expected}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = args.token_file.read_text().strip() if args.token_file else None
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((512, FEATURES)).astype(np.float32)
    y = (x @ np.arange(-4, 4, dtype=np.float32)[:, None] > 0).astype(np.float32)

    with Client(
        args.address,
        worker_id=args.worker_id,
        timeout_s=args.timeout_s,
        wait_for_server_s=args.wait_for_server_s,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token=token,
    ) as client:
        ensure_model(client)
        if args.steps == 0:
            print(f"{args.worker_id}: the model is on the server")
            return 0
        weights = client.pull()  # always train from the server's weights, never your own
        for step in range(args.steps):
            z = np.clip(x @ weights["w"] + weights["b"], -30, 30)
            p = 1 / (1 + np.exp(-z))
            grads = {"w": x.T @ (p - y) / len(x), "b": (p - y).mean(axis=0)}
            # Sync mode: push returns once the round is applied. FAILED_PRECONDITION means
            # the server moved on without this push (a restore): pull and recompute.
            with contextlib.suppress(FailedPreconditionError):
                client.push(grads)
            weights = client.pull()
            if step % args.log_every == 0 or step == args.steps - 1:
                loss = -np.mean(y * np.log(p + 1e-7) + (1 - y) * np.log(1 - p + 1e-7))
                print(
                    f"{args.worker_id} step {step} version {weights.version} loss {loss:.4f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ParamServeError as exc:  # unreachable, refused: the message says what to check
        sys.exit(f"worker: {exc}")
