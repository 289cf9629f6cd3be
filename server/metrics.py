"""Prometheus metrics of one daemon, on its own CollectorRegistry (several servers per process).

Counters: RPCs by method and status code, pushes and pulls by outcome, payload bytes in and
out, dedupe hits, sync rounds by outcome, snapshots by trigger and outcome. Histograms:
optimizer apply latency, time a push waits for its round, push staleness, snapshot duration.
Gauges: model version, last snapshot size, whether the server is serving.

:class:`ServerMetrics` is the core's metric hooks (:class:`~.hooks.CoreMetrics`: applies,
rounds, pushes, versions, snapshots) and what the gRPC layer counts (calls by status code,
payload bytes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

# From 100 µs to ~2 min: apply on a tiny model up to a slow sync round.
_LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The metric families of one server; call the ``record_*``/``observe_*`` helpers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpcs = Counter(
            "paramserve_rpcs",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "paramserve_rpc_seconds",
            "Time the server spent on a call, from the handler's start to its reply (a "
            "stream's last message), by method: a shard slower than the others shows here",
            ["method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.pushes = Counter(
            "paramserve_pushes",
            "Pushes by outcome: applied, skipped (non-finite, policy skip), duplicate, "
            "or the lower-case status code of the error",
            ["outcome"],
            registry=r,
        )
        self.pulls = Counter(
            "paramserve_pulls",
            "Pulls by outcome: ok or the lower-case status code",
            ["outcome"],
            registry=r,
        )
        self.bytes_received = Counter(
            "paramserve_received_bytes",
            "Tensor and file payload bytes received",
            ["method"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "paramserve_sent_bytes", "Tensor and file payload bytes sent", ["method"], registry=r
        )
        self.dedupe_hits = Counter(
            "paramserve_dedupe_hits",
            "Pushes acknowledged as duplicates of an already applied (worker_id, sequence)",
            registry=r,
        )
        self.apply_seconds = Histogram(
            "paramserve_apply_seconds",
            "Time of one optimizer apply on the store",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.round_wait_seconds = Histogram(
            "paramserve_round_wait_seconds",
            "Time a push spends in the aggregator (sync: waiting for its round to close)",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.staleness = Histogram(
            "paramserve_push_staleness",
            "Model version at arrival minus the push's base_version",
            buckets=_STALENESS_BUCKETS,
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "paramserve_snapshot_seconds",
            "Time to take and write one snapshot",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.snapshots = Counter(
            "paramserve_snapshots",
            "Snapshots taken, by trigger (rpc, periodic, exit) and outcome",
            ["trigger", "outcome"],
            registry=r,
        )
        self.snapshot_size_bytes = Gauge(
            "paramserve_snapshot_size_bytes", "Size of the last snapshot written", registry=r
        )
        self.model_version = Gauge(
            "paramserve_model_version", "Current model version (optimizer iterations)", registry=r
        )
        self.rounds = Counter(
            "paramserve_rounds",
            "Synchronous rounds by outcome: full (all replicas), partial (closed at the "
            "deadline with fewer), aborted (deadline under the abort policy, restore, shutdown)",
            ["outcome"],
            registry=r,
        )
        self.serving = Gauge(
            "paramserve_serving", "1 while the server accepts pushes, 0 once it drains", registry=r
        )
        self._http_server = None
        self._http_thread: threading.Thread | None = None
        # Labelled children by label values: ``labels()`` takes a lock and builds a key on
        # every call, which counts on a small model's every step.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, family: Any, *values: str) -> Any:
        """``family.labels(*values)``, looked up once per family and label values."""
        key = (id(family), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*values)
        return child

    # -- recording helpers -------------------------------------------------------------------

    def record_rpc(
        self,
        method: str,
        code: str,
        *,
        counts_as: str | None = None,
        seconds: float | None = None,
    ) -> None:
        """Count one finished RPC by method and status code name, and observe its handling
        time ``seconds`` when given (calls refused before a handler ran have none).

        ``counts_as="pull"`` also counts it as a pull of that outcome (``ok`` or the code),
        ``counts_as="push"`` a failed one as a push of that outcome (a push that succeeded
        is counted by :meth:`record_push`, by what became of it).
        """
        self._child(self.rpcs, method, code).inc()
        if seconds is not None:
            self._child(self.rpc_seconds, method).observe(seconds)
        if counts_as == "pull":
            self._child(self.pulls, "ok" if code == "OK" else code.lower()).inc()
        elif counts_as == "push" and code != "OK":
            self._child(self.pushes, code.lower()).inc()

    def payload_bytes(self) -> tuple[int, int]:
        """Payload bytes received and sent so far, all methods together."""
        return _counter_total(self.bytes_received), _counter_total(self.bytes_sent)

    # -- the core's hooks (CoreMetrics) ------------------------------------------------------

    def observe_apply(self, seconds: float) -> None:
        """One optimizer apply on the store took ``seconds``."""
        self.apply_seconds.observe(seconds)

    def observe_staleness(self, versions: int) -> None:
        """A push arrived ``versions`` behind the model."""
        self.staleness.observe(versions)

    def observe_round_wait(self, seconds: float) -> None:
        """A push spent ``seconds`` in the aggregator."""
        self.round_wait_seconds.observe(seconds)

    def set_model_version(self, version: int) -> None:
        """The model is now at ``version``."""
        self.model_version.set(version)

    def set_snapshot_size(self, size_bytes: int) -> None:
        """The last snapshot written takes ``size_bytes``."""
        self.snapshot_size_bytes.set(size_bytes)

    def record_push(self, *, duplicate: bool, applied: bool, version: int) -> None:
        """Count a successful push by outcome."""
        if duplicate:
            self._child(self.pushes, "duplicate").inc()
            self.dedupe_hits.inc()
        elif applied:
            self._child(self.pushes, "applied").inc()
        else:
            self._child(self.pushes, "skipped").inc()
        self.model_version.set(version)

    def record_round(self, outcome: str) -> None:
        """Count one synchronous round that ended: full, partial or aborted."""
        self.rounds.labels(outcome=outcome).inc()

    @contextmanager
    def time_snapshot(self, trigger: str) -> Iterator[None]:
        """Time a snapshot and count it by trigger and outcome."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.snapshots.labels(trigger=trigger, outcome="error").inc()
            raise
        self.snapshot_seconds.observe(time.perf_counter() - start)
        self.snapshots.labels(trigger=trigger, outcome="ok").inc()

    # -- HTTP endpoint -----------------------------------------------------------------------

    def serve_http(self, *, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the bound port."""
        self._http_server, self._http_thread = start_http_server(
            port, addr=host, registry=self.registry
        )
        bound = int(self._http_server.server_port)
        logger.info("metrics at http://%s:%d/metrics", host, bound)
        return bound

    def stop_http(self) -> None:
        """Stop serving ``/metrics`` (if it was)."""
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)


def _counter_total(counter: Counter) -> int:
    """The sum of a counter family's ``_total`` samples over all its label values."""
    return int(
        sum(
            sample.value
            for family in counter.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )
    )
