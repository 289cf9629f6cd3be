"""PyTorch workers train a digits classifier against a paramserve daemon, in sync mode.

    python examples/torch_digits.py --workers 3 --steps 150 --plot torch_digits.png

The script starts a daemon (``paramserve serve --mode sync --replicas N`` on a free
loopback port), then N worker processes. Each worker is an ordinary PyTorch loop over its
shard of scikit-learn's bundled 8x8 digits (``load_digits``, no download) whose optimizer
line was changed to :class:`paramserve.client.torch.RemoteOptimizer`; a
``torch.optim.lr_scheduler.StepLR`` halves the learning rate on the server as it would
locally. Every worker initialises its own weights; the first to arrive creates the model
and the others take its weights. Each round sums the workers' gradients into one Adam step.

It prints progress, the final accuracy on 360 held-out digits, and writes a PNG of loss and
accuracy per worker and model version (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TEST_SIZE = 360
REPORT_TIMEOUT_S = 120.0


# --- a worker: plain PyTorch, one line changed ---------------------------------------------
def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 in [0, 1], labels, and a fixed permutation (the first
    ``TEST_SIZE`` rows are the held-out test set)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    return (x / 16.0).astype(np.float32), y.astype(np.int64), order


def worker(rank: int, workers: int, data: tuple[np.ndarray, ...], options: dict[str, Any],
           addresses: Any, reports: Any) -> None:  # fmt: skip
    """One training process: imports, waits for the daemon's address, trains; reports
    ``("step", ...)`` after each step, then ``("done", ...)``."""
    try:
        import torch
        from torch import nn

        from paramserve.client.torch import RemoteOptimizer, from_torch

        torch.set_num_threads(1)
        x, y, order = data
        address = addresses.get(timeout=REPORT_TIMEOUT_S)
        test, train = order[:TEST_SIZE], order[TEST_SIZE:]
        shard = train[rank::workers]
        x_test, y_test = torch.from_numpy(x[test]), torch.from_numpy(y[test])

        torch.manual_seed(0)  # as any torch script; the first worker to arrive creates the model
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        # was: opt = torch.optim.Adam(model.parameters(), lr=options["lr"])
        opt = RemoteOptimizer(
            model.named_parameters(),
            address,
            optimizer=from_torch(torch.optim.Adam(model.parameters(), lr=options["lr"])),
            worker_id=f"digits-worker-{rank}",
        )
        scheduler = torch.optim.lr_scheduler.StepLR(
            opt, step_size=max(1, options["steps"] // 3), gamma=0.5
        )
        rng = np.random.default_rng(rank + 1)
        for _ in range(options["steps"]):
            rows = rng.choice(shard, options["batch_size"])
            inputs, labels = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
            version, lr = opt.version, opt.param_groups[0]["lr"]
            opt.zero_grad()
            logits = model(inputs)
            loss = nn.functional.cross_entropy(logits, labels)
            loss.backward()
            opt.step()
            scheduler.step()
            accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
            reports.put(("step", rank, version, loss.item(), accuracy, lr))
            if rank == 0 and version % options["eval_every"] == 0:
                reports.put(("test", rank, version, _accuracy(model, x_test, y_test)))
        opt.pull()  # the weights after the last round (the same for every worker)
        reports.put(("done", rank, opt.version, _accuracy(model, x_test, y_test)))
        opt.close()
    except BaseException as exc:
        reports.put(("failed", rank, f"{type(exc).__name__}: {exc}"))
        raise


def _accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


# --- the daemon ------------------------------------------------------------------------------
class Daemon:
    """``paramserve serve`` on a free loopback port, its log read on a thread."""

    def __init__(self, workers: int) -> None:
        command = [sys.executable, "-m", "paramserve.server", "serve", "--port", "0",
                   "--mode", "sync", "--replicas", str(workers), "--log-format", "json",
                   "--no-snapshot-on-exit"]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.log: list[str] = []
        self._address: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.address = self._address.get(timeout=60)
        except queue.Empty:
            self.address = ""
        if not self.address:
            self.stop()
            raise RuntimeError("the daemon did not start:\n" + "\n".join(self.log[-20:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                message = json.loads(line)["message"]
            except (ValueError, KeyError, TypeError):
                message = line.rstrip()
            self.log.append(message)
            found = re.search(r"listening on (\S+)", message)
            if found:
                self._address.put(found.group(1))
        self._address.put("")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=60)


# --- the plot ---------------------------------------------------------------------------------
def plot(history: dict[int, list[tuple[int, float, float]]], tests: list[tuple[int, float]],
         path: Path) -> None:  # fmt: skip
    """Loss and batch accuracy per worker against the model version, test accuracy too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rank in sorted(history):
        versions, losses, accuracies = zip(*history[rank], strict=True)
        loss_ax.plot(versions, losses, lw=1, label=f"worker {rank}")
        acc_ax.plot(versions, accuracies, lw=1, alpha=0.7, label=f"worker {rank} (batch)")
    if tests:
        versions, accuracies = zip(*tests, strict=True)
        acc_ax.plot(versions, accuracies, "k.-", lw=2, label="held-out test set")
    loss_ax.set(xlabel="model version", ylabel="cross-entropy loss", yscale="log",
                title="training loss per worker")  # fmt: skip
    acc_ax.set(xlabel="model version", ylabel="accuracy", ylim=(0, 1.02),
               title="accuracy per worker")  # fmt: skip
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"PyTorch on paramserve: digits, {len(history)} workers, sync mode")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the driver -------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Start the daemon and the workers, print progress and the final accuracy, plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=3, choices=[2, 3, 4])
    parser.add_argument("--steps", type=int, default=150, help="steps per worker")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=10, help="versions between tests")
    parser.add_argument("--log-every", type=int, default=25, help="versions between lines")
    parser.add_argument("--plot", type=Path, default=Path("torch_digits.png"),
                        help="where to write the plot (default: ./torch_digits.png)")  # fmt: skip
    args = parser.parse_args(argv)
    options = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
               "eval_every": args.eval_every}  # fmt: skip

    started = time.monotonic()
    data = load_data()
    context = mp.get_context("spawn")
    addresses, reports = context.Queue(), context.Queue()
    procs = [
        context.Process(target=worker, args=(r, args.workers, data, options, addresses, reports))
        for r in range(args.workers)
    ]
    for proc in procs:  # they import torch while the daemon starts
        proc.start()
    try:
        daemon = Daemon(args.workers)
    except BaseException:
        for proc in procs:
            proc.terminate()
        raise
    print(f"daemon on {daemon.address}: sync mode, {args.workers} replicas", flush=True)
    for _ in procs:
        addresses.put(daemon.address)
    history: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
    tests: list[tuple[int, float]] = []
    final: dict[int, tuple[int, float]] = {}
    try:
        while len(final) < args.workers:
            try:
                report = reports.get(timeout=REPORT_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(
                    f"no report from the workers in {REPORT_TIMEOUT_S:g} s"
                ) from None
            kind, rank = report[0], report[1]
            if kind == "failed":
                raise RuntimeError(f"worker {rank} failed: {report[2]}")
            if kind == "step":
                _, _, version, loss, accuracy, lr = report
                history[rank].append((version, loss, accuracy))
                if version % args.log_every == 0:
                    print(f"worker {rank} version {version:4d}: loss {loss:.4f}, batch accuracy "
                          f"{accuracy:.3f}, lr {lr:g}", flush=True)  # fmt: skip
            elif kind == "test":
                tests.append((report[2], report[3]))
            else:
                final[rank] = (report[2], report[3])
        for proc in procs:
            proc.join(timeout=60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        daemon.stop()
    for rank in sorted(final):
        version, accuracy = final[rank]
        print(f"worker {rank} finished at version {version}: test accuracy {accuracy:.4f}")
    version, accuracy = final[0]
    plot(history, [*tests, (version, accuracy)], args.plot)
    print(f"wrote {args.plot}")
    print(f"final test accuracy {accuracy:.4f} ({TEST_SIZE} held-out digits, version {version}, "
          f"{time.monotonic() - started:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
