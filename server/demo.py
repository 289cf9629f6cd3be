"""`paramserve demo`: a server and worker processes training a real classifier end to end;
`paramserve worker`: one such worker against a server running elsewhere (compose, k8s).

An in-process server (sync mode by default, one replica per worker) and N worker
processes train a two-hidden-layer MLP, written in plain NumPy with hand-written
backprop, on 2-D spirals sharded across the workers. Each worker uses
:class:`~paramserve.client.RemoteOptimizer` exactly as it would a local Keras optimizer.
The demo then takes a snapshot, trains on, restores the snapshot and trains the same
steps again: in sync mode the replay must reproduce the weights bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from paramserve.client import (
    AbortedError,
    AlreadyExistsError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    ModelDescription,
    NotFoundError,
    ParamServeError,
    PermissionDeniedError,
    RemoteOptimizer,
    UnavailableError,
)
from paramserve.wire import DEFAULT_ADDRESS

from .auth import SecurityConfigError
from .client_flags import add_tls_token_flags, client_security, job_address

HIDDEN_UNITS = 64
CLASSES = 3
POINTS_PER_CLASS = 1000
DEFAULT_LEARNING_RATES = {"sgd": 0.1}  # everything else: 0.01
REPORT_TIMEOUT_S = 120.0
DEMO_DESCRIPTION = (
    "Start a parameter server in this process and worker processes that train a small "
    "classifier on it, then take a snapshot, restore it and check that the replayed steps "
    "give the same weights; no server or credentials needed."
)


# --- the model: data, parameters, forward and backward pass ------------------------------
def spirals(seed: int, *, points_per_class: int = POINTS_PER_CLASS, noise: float = 0.25):
    """Interleaved 2-D spiral arms, one class per arm, shuffled: ``(x float32, labels)``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(CLASSES):
        radius = np.linspace(0.05, 1.0, points_per_class)
        angle = np.linspace(4 * c, 4 * (c + 1), points_per_class)
        angle += rng.normal(0, noise, points_per_class)
        xs.append(np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1))
        ys.append(np.full(points_per_class, c))
    order = rng.permutation(CLASSES * points_per_class)
    return np.concatenate(xs).astype(np.float32)[order], np.concatenate(ys)[order]


def init_params(seed: int) -> dict[str, np.ndarray]:
    """He-initialised weights of a 2 -> 64 -> 64 -> 3 MLP, in model order."""
    rng = np.random.default_rng(seed)

    def kernel(fan_in: int, fan_out: int) -> np.ndarray:
        return rng.normal(0, np.sqrt(2 / fan_in), (fan_in, fan_out)).astype(np.float32)

    return {
        "dense_1/kernel": kernel(2, HIDDEN_UNITS),
        "dense_1/bias": np.zeros(HIDDEN_UNITS, np.float32),
        "dense_2/kernel": kernel(HIDDEN_UNITS, HIDDEN_UNITS),
        "dense_2/bias": np.zeros(HIDDEN_UNITS, np.float32),
        "output/kernel": kernel(HIDDEN_UNITS, CLASSES),
        "output/bias": np.zeros(CLASSES, np.float32),
    }


def forward_backward(
    params: Sequence[np.ndarray], x: np.ndarray, labels: np.ndarray
) -> tuple[float, float, list[np.ndarray]]:
    """Mean softmax cross-entropy, accuracy, and gradients in ``params`` order."""
    w1, b1, w2, b2, w3, b3 = params
    z1 = x @ w1 + b1
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w2 + b2
    a2 = np.maximum(z2, 0)
    logits = a2 @ w3 + b3
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    n = len(x)
    picked = probs[np.arange(n), labels]
    loss = float(-np.log(np.maximum(picked, 1e-12)).mean())
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    d3 = probs
    d3[np.arange(n), labels] -= 1
    d3 /= n
    d2 = (d3 @ w3.T) * (z2 > 0)
    d1 = (d2 @ w2.T) * (z1 > 0)
    grads = [x.T @ d1, d1.sum(0), a1.T @ d2, d2.sum(0), a2.T @ d3, d3.sum(0)]
    return loss, accuracy, grads


# --- worker processes -----------------------------------------------------------------------
def _train_steps(client: Client, optimizer: RemoteOptimizer, params: list[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray], *, seed: int, index: int,
                 batch_size: int, steps: int, report: Any) -> None:  # fmt: skip
    """``steps`` training steps of one worker; ``report(version, loss, accuracy)`` after each."""
    x, labels = data
    for _ in range(steps):
        # The batch depends only on (worker, version): a replay is identical.
        rng = np.random.default_rng([seed, index, client.base_version])
        rows = rng.integers(0, len(x), batch_size)
        loss, accuracy, grads = forward_backward(params, x[rows], labels[rows])
        version = optimizer.apply_gradients(zip(grads, params, strict=True))
        report(version, loss, accuracy)


def _worker_main(address: str, index: int, workers: int, seed: int, batch_size: int,
                 commands: Any, reports: Any, wire_dtype: str | None = None) -> None:  # fmt: skip
    """One training process: waits for commands, trains, reports every step."""
    try:
        x, labels = spirals(seed)
        x, labels = x[index::workers], labels[index::workers]
        named = init_params(seed)
        params = list(named.values())
        worker_id = f"demo-worker-{index}"
        with Client(address, worker_id=worker_id, timeout_s=60.0, wire_dtype=wire_dtype) as client:
            optimizer = RemoteOptimizer(client)  # was: optim_core.Adam(...)
            # Paired by name (two biases share a shape), then the server's weights first.
            optimizer.pull(named)
            while (command := commands.get()) is not None:
                kind, steps = command
                if kind == "pull":
                    optimizer.pull(params)
                _train_steps(
                    client, optimizer, params, (x, labels), seed=seed, index=index,
                    batch_size=batch_size, steps=steps,
                    report=lambda *step: reports.put(("step", index, *step)),
                )  # fmt: skip
                reports.put(("done", index, client.base_version, 0.0, 0.0))
    except BaseException:
        reports.put(("error", index, traceback.format_exc(), 0.0, 0.0))


class _Workers:
    """The worker processes, driven phase by phase through command queues."""

    def __init__(self, address: str, args: argparse.Namespace) -> None:
        ctx = mp.get_context("spawn")
        self.count = args.workers
        self.reports = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(self.count)]
        self.processes = [
            ctx.Process(
                target=_worker_main,
                args=(
                    address,
                    i,
                    self.count,
                    args.seed,
                    args.batch_size,
                    q,
                    self.reports,
                    args.wire_dtype,
                ),
                name=f"demo-worker-{i}",
                daemon=True,
            )
            for i, q in enumerate(self.commands)
        ]
        for p in self.processes:
            p.start()

    def run(self, kind: str, steps: int, on_step: Any) -> None:
        """Send one command to every worker and wait until all have finished it."""
        for q in self.commands:
            q.put((kind, steps))
        done = 0
        while done < self.count:
            try:
                tag, index, value, loss, accuracy = self.reports.get(timeout=REPORT_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError("a worker stopped reporting") from None
            if tag == "error":
                raise RuntimeError(f"worker {index} failed:\n{value}")
            if tag == "done":
                done += 1
            else:
                on_step(index, value, loss, accuracy)

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


# --- the demo ---------------------------------------------------------------------------
class _Progress:
    """Prints the mean batch loss and accuracy of the workers every few steps, and keeps
    every worker's (phase, worker, version, loss, accuracy) for the plot."""

    def __init__(self, every: int, workers: int) -> None:
        self.window = every * workers
        self.losses: list[float] = []
        self.accuracies: list[float] = []
        self.updates = 0
        self.phase = "train"
        self.records: list[tuple[str, int, int, float, float]] = []

    def reset(self, phase: str) -> None:
        self.losses.clear()
        self.accuracies.clear()
        self.updates = 0
        self.phase = phase

    def __call__(self, worker: int, version: int, loss: float, accuracy: float) -> None:
        self.updates += 1
        self.records.append((self.phase, worker, version, loss, accuracy))
        self.losses.append(loss)
        self.accuracies.append(accuracy)
        if len(self.losses) >= self.window:
            print(
                f"  version {version:5d}   batch loss {np.mean(self.losses):.4f}   "
                f"batch accuracy {np.mean(self.accuracies):6.1%}",
                flush=True,
            )
            self.losses.clear()
            self.accuracies.clear()


def _evaluate(client: Client, x: np.ndarray, labels: np.ndarray) -> tuple[int, float, float]:
    weights = client.pull()
    # By name: a sharded job lists its variables shard by shard, not in model order.
    params = [weights[name] for name in init_params(0)]
    loss, accuracy, _ = forward_backward(params, x, labels)
    return weights.version, loss, accuracy


def _optimizer_config(name: str, learning_rate: float | None) -> dict[str, Any]:
    lr = learning_rate if learning_rate is not None else DEFAULT_LEARNING_RATES.get(name, 0.01)
    return {"class_name": name, "config": {"learning_rate": lr}}


def _phase(workers: _Workers, progress: _Progress, kind: str, steps: int, phase: str) -> float:
    """Run one phase on every worker; returns the model updates per second it achieved."""
    progress.reset(phase)
    started = time.perf_counter()
    workers.run(kind, steps, progress)
    return progress.updates / (time.perf_counter() - started)


def plot_history(
    records: Sequence[tuple[str, int, int, float, float]],
    evaluations: Sequence[tuple[int, float, float]],
    path: Path,
    title: str,
) -> bool:
    """Draw the workers' batch loss and accuracy against the server's model version, the
    full-data evaluations as points, into a PNG at ``path``; False when matplotlib is missing.
    The replay after the restore is drawn dashed over the steps it repeats."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    workers = sorted({worker for _, worker, *_ in records})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, (axis, label) in enumerate(zip(axes, ("loss", "accuracy"), strict=True)):
        for worker in workers:
            colour = colours[worker % len(colours)]
            for replay in (False, True):
                points = sorted(
                    (version, (loss, accuracy)[column])
                    for phase, w, version, loss, accuracy in records
                    if w == worker and (phase == "replay") == replay
                )
                if points:
                    axis.plot(
                        *zip(*points, strict=True), color=colour, linewidth=0.9,
                        linestyle="--" if replay else "-", alpha=0.8,
                        label=f"worker {worker}" + (" (replay)" if replay else ""),
                    )  # fmt: skip
        if evaluations:
            versions = [version for version, *_ in evaluations]
            values = [evaluation[1 + column] for evaluation in evaluations]
            axis.plot(versions, values, "ko", markersize=4, label="all data")
        axis.set(xlabel="server model version", ylabel=f"batch {label}")
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_title(title, fontsize=10)
    axes[1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return True


def _train(address: str, args: argparse.Namespace) -> bool:
    x, labels = spirals(args.seed)
    after = max(1, args.steps // 2)
    progress = _Progress(max(1, args.steps // 8), args.workers)
    with Client(address, timeout_s=60.0) as admin:
        admin.create_model(init_params(args.seed), _optimizer_config(args.optimizer, args.lr))
        version0, loss0, acc0 = _evaluate(admin, x, labels)
        print(f"model created: full-data loss {loss0:.4f}, accuracy {acc0:.1%}", flush=True)
        workers = _Workers(address, args)
        try:
            wire = f", {args.wire_dtype} on the wire" if args.wire_dtype else ""
            print(f"training {args.steps} steps on {args.workers} workers ({args.mode}{wire})")
            rate = _phase(workers, progress, "train", args.steps, "train")
            version, loss1, acc1 = _evaluate(admin, x, labels)
            print(f"version {version}: full-data loss {loss1:.4f}, accuracy {acc1:.1%} "
                  f"({rate:.0f} pushes/s, worker start-up included)", flush=True)  # fmt: skip
            snap = admin.snapshot()
            print(f"snapshot {snap.id} ({snap.size_bytes} bytes) at version {snap.version}")
            print(f"training {after} more steps")
            rate = _phase(workers, progress, "train", after, "train")
            first = admin.pull()
            print(f"version {first.version} ({rate:.0f} pushes/s)")
            restored = admin.restore(snap.id)
            print(f"restored {restored.id}: back to version {admin.status().version}")
            print(f"training the same {after} steps again")
            _phase(workers, progress, "pull", after, "replay")
            second = admin.pull()
            version, loss2, acc2 = _evaluate(admin, x, labels)
        finally:
            workers.close()
    print(f"version {version}: full-data loss {loss2:.4f}, accuracy {acc2:.1%}")
    ok = loss2 < loss0 and second.version == first.version
    if args.mode == "sync" and args.wire_dtype is not None:
        # The workers' error-feedback residuals are theirs, not in the snapshot: the replay
        # starts from other residuals, so it is close but not bit for bit.
        gap = max(float(np.max(np.abs(first[n] - second[n]))) for n in first)
        print(f"replay after restore: weights within {gap:.3g} (error feedback residuals "
              "live in the workers, not in the snapshot)")  # fmt: skip
    elif args.mode == "sync":
        identical = all(np.array_equal(first[n], second[n]) for n in first)
        print("replay after restore: " + ("weights identical" if identical else "WEIGHTS DIFFER"))
        ok = ok and identical
    if args.plot is not None:
        evaluations = [(version0, loss0, acc0), (snap.version, loss1, acc1), (version, loss2, acc2)]
        title = f"{args.workers} workers, {args.mode} mode, {args.optimizer}"
        if plot_history(progress.records, evaluations, args.plot, title):
            print(f"loss curve: {args.plot}")
        else:
            print("loss curve: not drawn, matplotlib is not installed "
                  "(pip install 'paramserve[demo]')")  # fmt: skip
    print("demo " + ("passed" if ok else "FAILED"))
    return ok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paramserve demo", description=DEMO_DESCRIPTION)
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--steps", type=int, default=150, help="steps before the snapshot")
    p.add_argument("--optimizer", default="adam", help="optim_core optimizer name")
    p.add_argument("--lr", type=float, default=None, help="learning rate (adam: 0.01)")
    p.add_argument(
        "--mode",
        choices=("sync", "async", "stale"),
        default="sync",
        help="the server's aggregation mode (default sync)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="per worker and step")
    p.add_argument("--seed", type=int, default=0, help="data and initial weights (default 0)")
    p.add_argument(
        "--wire-dtype", choices=("bfloat16", "float16"), default=None,
        help="the workers' gradients and pulled weights travel in this dtype (default float32)",
    )  # fmt: skip
    p.add_argument(
        "--plot", type=Path, default=Path("paramserve-demo.png"), metavar="PNG",
        help="where to write the loss and accuracy curves (default ./paramserve-demo.png)",
    )  # fmt: skip
    p.add_argument("--no-plot", dest="plot", action="store_const", const=None,
                   help="do not draw the curves")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; exit status 0 when training and the restore check succeed."""
    args = build_parser().parse_args(argv)
    if args.workers < 1 or args.steps < 1:
        print("paramserve demo: --workers and --steps must be >= 1", file=sys.stderr)
        return 2
    from paramserve.server.aggregation import AggregationConfig
    from paramserve.server.app import create_server
    from paramserve.server.config import ServerConfig

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="paramserve-demo-") as checkpoint_dir:
        config = ServerConfig(
            port=0,
            aggregation=AggregationConfig(mode=args.mode, replicas=args.workers, reduction="mean"),
            checkpoint_dir=Path(checkpoint_dir),
            snapshot_on_exit=False,
            log_level="warning",
        )
        server = create_server(config)
        print(f"server on {server.address} (mode {args.mode}, {args.workers} replicas)")
        try:
            ok = _train(server.address, args)
        finally:
            server.stop(grace_s=1.0)
    return 0 if ok else 1


# --- `paramserve worker`: one worker against an external server ----------------------------
WORKER_DESCRIPTION = (
    "Train the demo's MLP as one worker of a running paramserve server, then print its "
    "full-data loss and accuracy. Without tokens on the server, the first worker creates the "
    "model and the others join it. With tokens, creating the model is an admin's call: run "
    "this command once with an admin token and --steps 0 (or create the model with the SDK), "
    "then start the workers with worker tokens; a worker that finds no model stops with a "
    "message saying so, or waits for it with --wait-for-model-s."
)
MODEL_POLL_S = 1.0  # how often a worker waiting for the model asks for it again


class _WorkerStop(Exception):
    """A condition that ends `paramserve worker` with a message and exit status 1."""


def build_worker_parser() -> argparse.ArgumentParser:
    """The flags of `paramserve worker`."""
    p = argparse.ArgumentParser(
        prog="paramserve worker", description=WORKER_DESCRIPTION, allow_abbrev=False
    )
    p.add_argument(
        "--address",
        default=os.environ.get("PARAMSERVE_ADDRESS", DEFAULT_ADDRESS),
        help="server host:port, or every shard's host:port of a sharded job, comma-separated, "
        f"shard 0 first (default $PARAMSERVE_ADDRESS or {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--rank", type=int, default=0, help="this worker's index in [0, --workers) (default 0)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="workers sharing the data, each training on its 1/N (default 1)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=100,
        help="training steps to run (default 100; 0: only create or check the model, then exit)",
    )
    p.add_argument(
        "--optimizer",
        default="adam",
        help="optim_core optimizer name, used when this worker creates the model (default adam)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate, used when this worker creates the model (adam: 0.01, sgd: 0.1)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="examples per step (default 64)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the data and initial weights (default 0)"
    )
    p.add_argument(
        "--wire-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="gradients and pulled weights travel in this dtype (default float32, exact)",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=120.0,
        help="deadline of each call (default 120); a server never reached fails at once "
        "unless $PARAMSERVE_WAIT_FOR_SERVER_S asks to wait",
    )
    p.add_argument(
        "--log-every", type=int, default=10, help="print progress every N steps (default 10)"
    )
    p.add_argument(
        "--wait-for-model-s",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when the server has no model and this worker's token may not create one, wait "
        "up to this long for an admin to create it (default 0: stop at once with a message)",
    )
    add_tls_token_flags(p, token_role="a worker (or admin)")
    return p


def _step_with_retry(client: Client, optimizer: RemoteOptimizer, params: list[np.ndarray],
                     data: tuple[np.ndarray, np.ndarray], args: argparse.Namespace,
                     report: Any) -> None:  # fmt: skip
    """One step; a push the server refused as stale (a round closed without us, a restore
    or a restart) is recomputed from fresh weights, as any worker must."""
    while True:
        try:
            _train_steps(
                client, optimizer, params, data, seed=args.seed, index=args.rank,
                batch_size=args.batch_size, steps=1, report=report,
            )  # fmt: skip
            return
        except (FailedPreconditionError, AbortedError) as exc:
            print(f"worker {args.rank}: {exc}; pulling fresh weights", flush=True)
            optimizer.pull(params)


def _describe_or_none(client: Client) -> ModelDescription | None:
    try:
        return client.describe()
    except NotFoundError:
        return None


def _check_demo_model(
    description: ModelDescription, named: dict[str, np.ndarray], args: argparse.Namespace
) -> None:
    """Stop unless the server's model is the demo's MLP; say so when its optimizer is not
    the one asked for (the model's own is used)."""
    theirs = [(v.name, tuple(v.shape)) for v in description.variables]
    ours = [(name, value.shape) for name, value in named.items()]
    if sorted(theirs) != sorted(ours):  # a sharded job lists them shard by shard
        raise _WorkerStop(
            f"the model on {args.address} is not the demo's MLP (its variables: "
            f"{', '.join(f'{n}{list(s)}' for n, s in theirs)}); paramserve worker trains only "
            "the model it creates itself"
        )
    used = str(description.optimizer.get("class_name", ""))
    if used and used.lower() != args.optimizer.lower():
        print(f"note: the model trains with {used}, not --optimizer {args.optimizer}: the "
              "optimizer is chosen by whoever creates the model", flush=True)  # fmt: skip


def _no_model_message(args: argparse.Namespace, waited: bool) -> str:
    state = f"still has no model after {args.wait_for_model_s:g} s" if waited else "has no model"
    return (
        f"the server at {args.address} {state}, and this worker's token may not create one: "
        "creating the model is admin-only. Create it first with an admin token, for example "
        "`paramserve worker --steps 0 --token-file <admin token file>` (same --seed, "
        "--optimizer, --lr), then start the workers; or pass --wait-for-model-s SECONDS to "
        "wait for it"
    )


def _unreachable_message(args: argparse.Namespace, exc: ParamServeError) -> str:
    if args.tls_ca is None and args.tls_cert is None:
        hint = (
            "this worker talks plaintext: a server started with --tls-cert needs --tls-ca "
            "(and --tls-cert/--tls-key when it has --tls-client-ca)"
        )
    else:
        hint = (
            "check that --tls-ca is the CA that signed the server's certificate, that the "
            "host in --address is named in that certificate, and --tls-cert/--tls-key if the "
            "server requires client certificates"
        )
    return f"no answer from a server at {args.address} ({exc}); is it running there? {hint}"


def _join_model(client: Client, named: dict[str, np.ndarray], args: argparse.Namespace,
                worker_id: str) -> None:  # fmt: skip
    """Make sure the demo's model is on the server before training.

    A model that exists is only checked (``Describe`` is a worker call). Without one this
    worker creates it (idempotent: of several workers racing, one creates it, the others find
    it); if its token may not (a worker token: ``CreateModel`` is admin-only) it waits up to
    ``--wait-for-model-s`` for an admin to create it, then stops with a message.
    """
    waiting_since = None
    while True:
        description = _describe_or_none(client)
        if description is not None:
            _check_demo_model(description, named, args)
            print(f"{worker_id}: model already there on {args.address}", flush=True)
            return
        if waiting_since is None:
            try:
                with warnings.catch_warnings():
                    # Another worker created it with other weights: they are pulled next.
                    warnings.filterwarnings("ignore", message="The model .* already exists")
                    config = _optimizer_config(args.optimizer, args.lr)
                    created = client.create_model(named, config).created
            except AlreadyExistsError as exc:
                raise _WorkerStop(
                    f"the model on {args.address} was created with another definition "
                    f"({exc.message}); give every worker the same --seed, --optimizer and --lr"
                ) from None
            except PermissionDeniedError:
                if args.wait_for_model_s <= 0:
                    raise _WorkerStop(_no_model_message(args, waited=False)) from None
                print(f"{worker_id}: no model on {args.address} yet, and this worker's token "
                      f"may not create it; waiting up to {args.wait_for_model_s:g} s for an "
                      "admin to create it", flush=True)  # fmt: skip
                waiting_since = time.monotonic()
                continue
            print(f"{worker_id}: model {'created' if created else 'already there'} on "
                  f"{args.address}", flush=True)  # fmt: skip
            return
        left = waiting_since + args.wait_for_model_s - time.monotonic()
        if left <= 0:
            raise _WorkerStop(_no_model_message(args, waited=True))
        time.sleep(min(MODEL_POLL_S, left))


def _train_worker(args: argparse.Namespace, security: dict[str, Any]) -> None:
    x, labels = spirals(args.seed)
    data = (x[args.rank :: args.workers], labels[args.rank :: args.workers])
    named = init_params(args.seed)
    params = list(named.values())
    worker_id = f"demo-worker-{args.rank}"
    options = {"timeout_s": args.timeout_s, "wire_dtype": args.wire_dtype, **security}
    with Client(job_address(args.address), worker_id=worker_id, **options) as client:
        try:
            _join_model(client, named, args, worker_id)
        except (UnavailableError, DeadlineExceededError) as exc:  # the first call failed
            raise _WorkerStop(_unreachable_message(args, exc)) from None
        optimizer = RemoteOptimizer(client)
        optimizer.pull(named)  # paired by name; train from the server's weights
        losses: list[float] = []

        def report(version: int, loss: float, accuracy: float) -> None:
            losses.append(loss)
            if len(losses) % args.log_every == 0:
                recent = float(np.mean(losses[-args.log_every :]))
                print(f"{worker_id}: step {len(losses)} version {version} batch loss "
                      f"{recent:.4f} accuracy {accuracy:.1%}", flush=True)  # fmt: skip

        for _ in range(args.steps):
            _step_with_retry(client, optimizer, params, data, args, report)
        version, loss, accuracy = _evaluate(client, x, labels)
    print(f"{worker_id}: done after {args.steps} steps at version {version}: full-data loss "
          f"{loss:.4f}, accuracy {accuracy:.1%}", flush=True)  # fmt: skip


def worker_main(argv: Sequence[str] | None = None) -> int:
    """Run one demo worker against ``--address``; exit status 0 after ``--steps`` steps,
    1 when the server refuses or cannot be reached, 2 for bad flags or credential files."""
    args = build_worker_parser().parse_args(argv)
    if (
        args.workers < 1
        or not 0 <= args.rank < args.workers
        or args.steps < 0
        or args.log_every < 1
        or args.wait_for_model_s < 0
        or args.timeout_s <= 0
    ):
        print("paramserve worker: need --workers >= 1, 0 <= --rank < --workers, --steps >= 0, "
              "--log-every >= 1, --wait-for-model-s >= 0, --timeout-s > 0",
              file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(level=logging.WARNING)
    try:
        security = client_security(args)
    except SecurityConfigError as exc:
        print(f"paramserve worker: {exc}", file=sys.stderr)
        return 2
    try:
        _train_worker(args, security)
    except _WorkerStop as exc:
        print(f"paramserve worker: {exc}", file=sys.stderr)
        return 1
    except ParamServeError as exc:
        # The SDK's errors carry the gRPC code and the server's message: no traceback.
        print(f"paramserve worker: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an unreadable TLS file
        print(f"paramserve worker: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
