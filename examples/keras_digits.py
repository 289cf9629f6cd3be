"""Data-parallel Keras training against a paramserve daemon: a digits classifier.

    python examples/keras_digits.py                     # 3 workers, 15 epochs, jax
    python examples/keras_digits.py --workers 2 --epochs 3 --plot /tmp/digits.png

The script starts a daemon in sync mode (one optimizer step per round; each round averages
the gradients of all workers), then N worker processes. Each worker is plain Keras code in
which only the optimizer line names the server:

    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=RemoteOptimizer(address, keras.optimizers.Adam(1e-2)),
                  metrics=["accuracy"])
    model.fit(x_shard, y_shard, epochs=..., batch_size=32)

Whichever worker connects first creates the server's model from its Keras model's weights;
every worker then takes the server's weights before its first step, so the replicas start
(and stay) identical. The data is scikit-learn's bundled digits set (8x8 images, no
download), split into a held-out test set and one shard per worker. The script prints each
worker's progress, the final accuracy of the server's weights on the test set, and writes a
PNG of loss and accuracy per worker against the server's model version (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

HIDDEN_UNITS = 64
DEFAULT_BACKEND = os.environ.get("KERAS_BACKEND", "jax")


def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1]: (x_train, y_train, x_test, y_test), a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def shard(x: np.ndarray, y: np.ndarray, rank: int, workers: int, batch_size: int) -> Any:
    """Worker ``rank``'s shard: every ``workers``-th example, cut to the same whole number of
    batches on every worker (sync rounds need the same number of steps from each)."""
    per_worker = (len(x) // workers) // batch_size * batch_size
    return x[rank::workers][:per_worker], y[rank::workers][:per_worker]


def make_model() -> Any:
    """The classifier; the same layer names on every worker, so the variables' paths (the
    server's variable names) match."""
    import keras

    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(HIDDEN_UNITS, activation="relu", name="hidden"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="digits",
    )


# --- a worker --------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    """One data-parallel worker: plain Keras, with a RemoteOptimizer."""
    import keras

    from paramserve.client.keras import RemoteOptimizer

    x_train, y_train, x_test, y_test = load_data()
    x, y = shard(x_train, y_train, args.rank, args.workers, args.batch_size)

    # Any initial weights would do (the server's replace them before the first step); the
    # same seed everywhere makes a run repeatable whichever worker creates the model.
    keras.utils.set_random_seed(args.seed)
    model = make_model()
    model.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=RemoteOptimizer(
            args.address,
            keras.optimizers.Adam(args.learning_rate),
            worker_id=f"worker-{args.rank}",
        ),
        metrics=["accuracy"],
    )
    progress = progress_callback(args.rank, args.epochs)
    keras.utils.set_random_seed(args.seed + 1 + args.rank)  # each worker's own shuffling
    model.fit(
        x,
        y,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_data=(x_test, y_test) if args.rank == 0 else None,
        callbacks=[progress],
        verbose=0,
    )
    Path(args.history).write_text(json.dumps(progress.history))


def progress_callback(rank: int, epochs: int) -> Any:
    """A Keras callback that prints each epoch and keeps (version, loss, accuracy) per epoch."""
    import keras

    class Progress(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.history: list[dict[str, float]] = []

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            # iterations mirrors the server's model version (one per sync round).
            version = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            entry = {"epoch": epoch + 1, "version": version}
            entry.update({k: float(v) for k, v in (logs or {}).items()})
            self.history.append(entry)
            line = (
                f"[worker {rank}] epoch {epoch + 1:>2}/{epochs}  version {version:>4}  "
                f"loss {entry['loss']:.4f}  accuracy {entry['accuracy']:.4f}"
            )
            if "val_accuracy" in entry:
                line += f"  test accuracy {entry['val_accuracy']:.4f}"
            print(line, flush=True)

    return Progress()


# --- the main process ------------------------------------------------------------------------
def start_daemon(workers: int) -> tuple[subprocess.Popen, str]:
    """`paramserve serve` on a free loopback port: sync rounds of ``workers``, mean."""
    command = [
        sys.executable, "-m", "paramserve.server", "serve", "--port", "0",
        "--mode", "sync", "--replicas", str(workers), "--reduction", "mean",
        "--log-format", "json",
    ]  # fmt: skip
    daemon = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert daemon.stderr is not None
    address = ""
    for line in daemon.stderr:  # JSON log lines; the daemon exits (ending this) if it fails
        try:
            message = json.loads(line).get("message", "")
        except ValueError:
            continue
        match = re.search(r"listening on (\S+)", message)
        if match:
            address = match.group(1)
            break
    if not address:
        daemon.kill()
        raise SystemExit("the daemon did not start")
    # Keep draining its log so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in daemon.stderr], daemon=True).start()
    return daemon, address


def evaluate(address: str, x_test: np.ndarray, y_test: np.ndarray) -> tuple[int, float]:
    """The server's weights (named by Keras path) in a fresh model; its test accuracy."""
    from paramserve.client import Client

    model = make_model()
    with Client(address) as client:
        weights = client.pull()
    for variable in model.trainable_variables:
        variable.assign(weights[variable.path])
    logits = model.predict(x_test, verbose=0)
    return weights.version, float(np.mean(np.argmax(logits, axis=1) == y_test))


def plot(histories: list[list[dict[str, float]]], accuracy: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for rank, history in enumerate(histories):
        versions = [e["version"] for e in history]
        loss_axis.plot(versions, [e["loss"] for e in history], marker=".", label=f"worker {rank}")
        accuracy_axis.plot(
            versions, [e["accuracy"] for e in history], marker=".", label=f"worker {rank}"
        )
    held_out = [(e["version"], e["val_accuracy"]) for e in histories[0] if "val_accuracy" in e]
    if held_out:
        accuracy_axis.plot(*zip(*held_out, strict=True), "k--", label="test set")
    loss_axis.set(xlabel="server model version", ylabel="training loss (epoch mean)")
    accuracy_axis.set(xlabel="server model version", ylabel="accuracy (epoch mean)")
    accuracy_axis.set_title(f"final test accuracy {accuracy:.3f}", fontsize=10)
    loss_axis.set_title(f"{len(histories)} workers, sync rounds (mean)", fontsize=10)
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def run_main(args: argparse.Namespace) -> int:
    os.environ["KERAS_BACKEND"] = args.backend
    daemon, address = start_daemon(args.workers)
    accuracy = 0.0
    print(f"daemon on {address}: sync rounds of {args.workers} workers, gradients averaged")
    procs: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            histories = [Path(tmp) / f"worker-{rank}.json" for rank in range(args.workers)]
            for rank in range(args.workers):
                command = [
                    sys.executable, __file__, "--worker", str(rank), "--address", address,
                    "--workers", str(args.workers), "--epochs", str(args.epochs),
                    "--batch-size", str(args.batch_size),
                    "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
                    "--history", str(histories[rank]),
                ]  # fmt: skip
                procs.append(subprocess.Popen(command, env=dict(os.environ)))
            for proc in procs:
                if proc.wait(timeout=args.timeout_s) != 0:
                    print(f"a worker failed (exit {proc.returncode})", file=sys.stderr)
                    return 1
            _, _, x_test, y_test = load_data()
            version, accuracy = evaluate(address, x_test, y_test)
            print(f"final: server version {version}, test accuracy {accuracy:.4f} "
                  f"on {len(y_test)} held-out images")  # fmt: skip
            if args.plot:
                loaded = [json.loads(p.read_text()) for p in histories]
                plot(loaded, accuracy, Path(args.plot))
                print(f"plot written to {args.plot}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        daemon.terminate()
        daemon.wait(timeout=30)
    if accuracy < args.min_accuracy:
        print(
            f"accuracy {accuracy:.4f} is below --min-accuracy {args.min_accuracy}", file=sys.stderr
        )
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, choices=range(1, 9), metavar="N")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backend", default=DEFAULT_BACKEND, choices=["jax", "torch", "tensorflow"]
    )
    parser.add_argument("--plot", default="keras_digits.png", help="PNG path ('' for none)")
    parser.add_argument("--min-accuracy", type=float, default=0.0, help="exit 1 below this")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    # Set by the main process for its workers.
    parser.add_argument("--worker", dest="rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--history", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.rank is not None:
        run_worker(arguments)
    else:
        sys.exit(run_main(arguments))
