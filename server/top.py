"""``paramserve top ADDRESS...``: a live terminal view of one job across its servers.

Every ``--interval`` seconds each address is asked for its status (``GetStatus``; its
snapshots and, once per model, ``Describe``), all in parallel, and one frame is drawn with
rich: a row per server (version, versions, rounds and pushes per second, bytes in and out
per second, partial and aborted rounds, last snapshot's age) and a row per worker (its
pushes, last push, lag in versions, duplicates). Rates are differences between the last two
answers of a server. A server that does not answer shows why in its row.

The command line imports this module for its flags (:func:`add_top_parser`); rich and the
SDK are imported only when ``top`` runs, so the other commands stay light. ``--once`` samples
twice, ``--interval`` apart (so the rates are filled in), prints one frame (200 columns wide
off a terminal) and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paramserve.client import Client, ModelDescription, ServerStatus

MISSING_RICH = (
    "paramserve top needs the rich package: pip install 'paramserve[top]' (or pip install rich)"
)
NO_VALUE = "-"
ONCE_WIDTH = 200  # columns of a --once frame written to a pipe or file


@dataclass(frozen=True)
class Sample:
    """One server's answers at one moment: ``at`` is monotonic, ``now`` the wall clock."""

    address: str
    at: float
    now: datetime
    status: ServerStatus | None = None
    error: str | None = None  # "unreachable: ..." or "refused: ..." when status failed
    model: ModelDescription | None = None
    # The newest snapshot's creation time; None with none (or see ``snapshots_note``).
    last_snapshot: datetime | None = None
    snapshots_note: str = ""  # why there is no snapshot age: "off", "admin only", an error


@dataclass(frozen=True)
class Rates:
    """Per-second rates of one server between two samples; None where unknown."""

    versions: float | None = None
    rounds: float | None = None
    pushes: float | None = None
    received: float | None = None
    sent: float | None = None
    worker_pushes: dict[str, float] | None = None


class Poller:
    """Samples every address in parallel through one ``Client`` each."""

    def __init__(self, addresses: Sequence[str], *, timeout_s: float, **security: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from paramserve.client import Client

        self.clients: list[Client] = [
            Client(a, timeout_s=timeout_s, wait_for_ready=False, retry_max_attempts=1, **security)
            for a in addresses
        ]
        self._models: dict[str, ModelDescription] = {}
        self._pool = ThreadPoolExecutor(max(1, len(addresses)), thread_name_prefix="top")

    def poll(self) -> list[Sample]:
        """One sample per address, in the order given."""
        return list(self._pool.map(self._sample, self.clients))

    def close(self) -> None:
        """Close the clients (cancelling calls in flight) and stop the threads."""
        for client in self.clients:
            client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _sample(self, client: Client) -> Sample:
        from paramserve.client import (
            DeadlineExceededError,
            FailedPreconditionError,
            ParamServeError,
            PermissionDeniedError,
            UnauthenticatedError,
            UnavailableError,
        )

        at, now = time.monotonic(), datetime.now(timezone.utc)
        try:
            status = client.status()
        except ParamServeError as exc:
            self._models.pop(client.address, None)
            what = (
                "unreachable"
                if isinstance(exc, UnavailableError | DeadlineExceededError)
                else "refused"
            )
            return Sample(client.address, at, now, error=f"{what}: {_one_line(exc)}")
        model = self._model(client, status)
        last_snapshot, note = None, ""
        try:
            snapshots = client.list_snapshots()
        except FailedPreconditionError:
            note = "off"
        except (PermissionDeniedError, UnauthenticatedError):
            note = "admin only"
        except ParamServeError as exc:
            note = _one_line(exc)
        else:
            if snapshots:
                last_snapshot = _parse_time(snapshots[-1].created_at)
        return Sample(
            client.address,
            at,
            now,
            status=status,
            model=model,
            last_snapshot=last_snapshot,
            snapshots_note=note,
        )

    def _model(self, client: Client, status: ServerStatus) -> ModelDescription | None:
        """The model's description, asked for once per model (again after a version drop)."""
        from paramserve.client import ParamServeError

        known = self._models.get(client.address)
        if not status.has_model:
            self._models.pop(client.address, None)
            return None
        if known is None or status.version < known.version:
            with contextlib.suppress(ParamServeError):
                known = self._models[client.address] = client.describe()
        return known


def rates(before: Sample | None, after: Sample) -> Rates:
    """What changed per second from ``before`` to ``after`` (same server)."""
    if before is None or before.status is None or after.status is None:
        return Rates()
    seconds = after.at - before.at
    if seconds <= 0:
        return Rates()
    old, new = before.status, after.status

    def per_s(a: float, b: float) -> float | None:
        return (b - a) / seconds if b >= a else None  # a counter went back: restart, restore

    old_pushes = {w.worker_id: w.pushes for w in old.workers}
    worker_pushes = {
        w.worker_id: rate
        for w in new.workers
        if w.worker_id in old_pushes
        and (rate := per_s(old_pushes[w.worker_id], w.pushes)) is not None
    }
    return Rates(
        versions=per_s(old.version, new.version),
        rounds=per_s(
            old.rounds_completed + old.rounds_aborted, new.rounds_completed + new.rounds_aborted
        ),
        pushes=per_s(sum(old_pushes.values()), sum(w.pushes for w in new.workers)),
        received=per_s(old.received_bytes, new.received_bytes),
        sent=per_s(old.sent_bytes, new.sent_bytes),
        worker_pushes=worker_pushes,
    )


def render(previous: Sequence[Sample | None], current: Sequence[Sample], interval: float) -> Any:
    """One frame: a title, the servers' table and the workers' table (rich renderables)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = max((s.now for s in current), default=datetime.now(timezone.utc))
    reached = [s for s in current if s.status is not None]
    title = Text.assemble(
        ("paramserve top", "bold"),
        f"  {len(reached)}/{len(current)} servers up",
        f"  {now:%Y-%m-%d %H:%M:%S} UTC  every {interval:g} s  (q or Ctrl-C quits)",
    )
    servers = Table(title="servers", title_justify="left", expand=False)
    for name, justify in (
        ("server", "left"),
        ("state", "left"),
        ("mode", "left"),
        ("model", "left"),
        ("version", "right"),
        ("versions/s", "right"),
        ("rounds/s", "right"),
        ("partial", "right"),
        ("aborted", "right"),
        ("pending", "right"),
        ("pushes/s", "right"),
        ("in/s", "right"),
        ("out/s", "right"),
        ("last snapshot", "right"),
    ):
        servers.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    workers = Table(title="workers", title_justify="left", expand=False)
    for name, justify in (
        ("server", "left"),
        ("worker", "left"),
        ("pushes", "right"),
        ("pushes/s", "right"),
        ("last push", "right"),
        ("lag", "right"),
        ("duplicates", "right"),
        ("in round", "left"),
    ):
        workers.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    totals: list[Rates] = []
    for before, sample in zip(previous, current, strict=True):
        rate = rates(before, sample)
        totals.append(rate)
        status = sample.status
        if status is None:
            servers.add_row(
                sample.address,
                Text(sample.error or "", style="bold red"),
                *([NO_VALUE] * 12),
            )
            continue
        state = (
            Text("serving", style="green") if status.serving else Text("draining", style="yellow")
        )
        if not status.has_model:
            state = Text("no model", style="yellow")
        servers.add_row(
            sample.address
            + (f" ({status.shard_index}/{status.shards})" if status.shards > 1 else ""),
            state,
            _mode(status),
            _model_text(sample.model),
            str(status.version),
            _number(rate.versions),
            _number(rate.rounds),
            _count(status.rounds_partial, "yellow"),
            _count(status.rounds_aborted, "red"),
            str(status.pending_pushes),
            _number(rate.pushes),
            _bytes(rate.received),
            _bytes(rate.sent),
            _snapshot_age(sample),
        )
        for w in status.workers:
            pushed = w.pushes > 0
            lag = status.version - w.last_base_version if pushed else None
            workers.add_row(
                sample.address,
                w.worker_id,
                str(w.pushes),
                _number((rate.worker_pushes or {}).get(w.worker_id)),
                _ago(w.seconds_since_seen),
                NO_VALUE if lag is None else str(lag),
                _count(w.duplicates, "yellow"),
                "waiting" if w.pending else "",
            )
    if len(reached) > 1:  # the job: all its servers together
        servers.add_section()
        servers.add_row(
            "all",
            f"{len(reached)} up",
            "",
            "",
            "",
            "",
            _number(_total(r.rounds for r in totals)),
            str(sum(s.status.rounds_partial for s in reached if s.status)),
            str(sum(s.status.rounds_aborted for s in reached if s.status)),
            str(sum(s.status.pending_pushes for s in reached if s.status)),
            _number(_total(r.pushes for r in totals)),
            _bytes(_total(r.received for r in totals)),
            _bytes(_total(r.sent for r in totals)),
            "",
        )
    if not workers.row_count:
        workers.add_row(NO_VALUE, "no worker has pushed yet", *([""] * 6))
    return Group(title, servers, workers)


def _total(values: Iterator[float | None]) -> float | None:
    """The sum of the known values; None when none is known."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _parse_time(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=timezone.utc)


def _mode(status: ServerStatus) -> str:
    aggregation = status.aggregation
    mode = getattr(aggregation, "mode", "") or NO_VALUE
    replicas = getattr(aggregation, "replicas", 0)
    return f"{mode} x{replicas}" if mode == "sync" and replicas else mode


def _model_text(model: ModelDescription | None) -> str:
    if model is None:
        return NO_VALUE
    params = 0
    for spec in model.variables:
        size = 1
        for dim in spec.shape:
            size *= dim
        params += size
    return f"{model.model_name} ({_si(params)} params)"


def _number(value: float | None) -> str:
    if value is None:
        return NO_VALUE
    return f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def _count(value: int, style: str) -> Any:
    from rich.text import Text

    return Text(str(value), style=style if value else "")


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return NO_VALUE
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def _ago(seconds: float) -> str:
    return NO_VALUE if seconds < 0 else f"{_duration(seconds)} ago"


def _snapshot_age(sample: Sample) -> str:
    if sample.snapshots_note:
        return sample.snapshots_note
    if sample.last_snapshot is None:
        return "none"
    return f"{_duration(max(0.0, (sample.now - sample.last_snapshot).total_seconds()))} ago"


@contextlib.contextmanager
def _keys(stop: threading.Event | None = None) -> Iterator[Any]:
    """``wait(seconds)``: sleeps, and returns True early when ``q`` is typed (a terminal) or
    ``stop`` is set."""
    stop = stop if stop is not None else threading.Event()
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    saved = None
    if fd is not None:
        try:
            import termios
            import tty

            saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        except (ImportError, OSError):
            fd = None

    def wait(seconds: float) -> bool:
        if fd is None:
            return stop.wait(seconds)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not stop.is_set():
            readable, _, _ = select.select([fd], [], [], min(left, 0.2))
            if readable:
                typed = os.read(fd, 64)
                if not typed or b"q" in typed.lower():
                    return True
        return stop.is_set()

    try:
        yield wait
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def add_top_parser(sub: argparse._SubParsersAction, help_text: str) -> argparse.ArgumentParser:
    """The ``top`` subcommand's flags: addresses, ``--interval``, ``--once``, TLS and token."""
    from paramserve.wire import DEFAULT_ADDRESS

    from .client_flags import add_tls_token_flags

    p = sub.add_parser("top", help=help_text, description=help_text + ".")
    p.add_argument(
        "addresses",
        nargs="*",
        metavar="ADDRESS",
        help="host:port of each of the job's servers "
        f"(default: $PARAMSERVE_ADDRESS or {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--interval",
        type=_positive_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default: 1)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="sample twice, --interval apart, print one frame and exit",
    )
    p.add_argument(
        "--timeout-s",
        type=_positive_seconds,
        default=5.0,
        help="deadline of each call to a server (default: 5)",
    )
    add_tls_token_flags(p, token_role="a worker's or an admin's")
    p.epilog = (
        "Keys: q quits (so does Ctrl-C). Snapshot ages need an admin's token; with a "
        "worker's the column says 'admin only'."
    )
    return p


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def run_top(args: argparse.Namespace) -> int:
    """Run ``paramserve top`` from its parsed flags; returns the exit status."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print(MISSING_RICH, file=sys.stderr)
        return 1
    from paramserve.wire import DEFAULT_ADDRESS

    from .client_flags import client_security

    addresses = args.addresses or [os.environ.get("PARAMSERVE_ADDRESS", DEFAULT_ADDRESS)]
    security = client_security(args)
    poller = Poller(addresses, timeout_s=args.timeout_s, **security)
    interval = args.interval
    try:
        if args.once:
            first = poller.poll()
            time.sleep(interval)
            # Off a terminal (a pipe, a file) rich would fold the tables into 80 columns.
            width = None if sys.stdout.isatty() else ONCE_WIDTH
            Console(width=width).print(render(first, poller.poll(), interval))
            return 0
        previous: list[Sample | None] = [None] * len(addresses)
        # Ctrl-C (or SIGTERM) only sets a flag the loop reads: a KeyboardInterrupt raised
        # inside a gRPC call can be swallowed there, and the view would then never end.
        stop = threading.Event()
        handled = (signal.SIGINT, signal.SIGTERM)
        saved = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in handled}
        try:
            with Live(console=Console(), auto_refresh=False) as live, _keys(stop) as wait:
                while not stop.is_set():
                    current = poller.poll()
                    live.update(render(previous, current, interval), refresh=True)
                    previous = list(current)
                    if wait(interval):
                        break
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        return 0
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how one leaves a live view
    finally:
        poller.close()
