"""One training job spread over several server processes (shards), behind Client's methods.

``Client(["ps-0:50051", "ps-1:50051", "ps-2:50051"])`` returns a :class:`ShardedClient`:
shard ``i`` is the daemon started with ``--shard-index i --shards 3``, and every call tells
it so (a daemon refuses a client that sees the job otherwise). Variables are placed by
:func:`paramserve.wire.partition.partition`: whole on one shard, or, when large and the
optimizer's rule is row-separable, split by rows across every shard. Every call talks to
the shards it needs concurrently, one thread per shard.

Synchronous jobs apply each round on every shard with the same workers' gradients, so that
a job of S shards computes what one server would, bit for bit. A push is therefore
1. *prepared* on every shard (each checks and holds its part, and answers at once),
2. *committed* to the coordinator, shard 0, whose round logic alone (``replicas``, the
   round deadline, ``partial`` or ``abort``) decides which workers are in the round; it
   applies its part and answers with the decision;
3. *applied* on every other shard by handing it that decision (every member does it; a
   shard applies a decision once).
A worker that dies before it commits is in no round on any shard; one that dies after is in
the round everywhere, since its gradients are on every shard already. Async and stale modes
are per shard: each shard applies each push when its part arrives.

Snapshots of the job are cuts: every shard's part at one version (see :meth:`snapshot`),
restored all together after each part was checked, and saved as a directory (each shard's
file and a manifest) that ``paramserve snapshot reshard`` re-places for another shard count.

Options that read every variable at once (``global_clipnorm``, the loss-scale wrapper) are
refused when the model is created; Lamb, Muon, Adafactor and ``clipnorm`` read whole
variables, so with them no variable is split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.wire import SparseRows
from paramserve.wire.partition import (
    DEFAULT_SPLIT_THRESHOLD_BYTES,
    PARTITIONER_VERSION,
    SHARD_METADATA_KEY,
    Layout,
    Placement,
    layout_from_shards,
    partition,
)

from .client import CLIENT_SETTING, Client, default_worker_id, optimizer_json
from .errors import FailedPreconditionError, NotFoundError
from .results import (
    CreateModelResult,
    ModelDescription,
    PushResult,
    ServerStatus,
    SnapshotInfo,
    Tensors,
    TensorSpec,
    WorkerStatus,
)
from .streams import as_host_array, named_values

R = TypeVar("R")

__all__ = ["ShardedClient"]


@dataclass(frozen=True)
class ShardTiming:
    """How long one shard took to answer this client's calls, as the client saw it (network
    included): a shard slower than the others holds up every push and pull of the job.

    ``calls``: calls timed; ``mean_ms``/``last_ms``/``max_ms``: their wall time;
    ``recent_ms``: an exponential average over about the last ten calls; ``slowest``: how
    many of the calls sent to every shard at once this shard answered last.
    """

    index: int
    address: str
    calls: int
    mean_ms: float
    recent_ms: float
    last_ms: float
    max_ms: float
    slowest: int


class _Timings:
    """Per-shard call times of one ShardedClient (thread-safe)."""

    DECAY = 0.2  # weight of the newest call in recent_ms

    def __init__(self, shards: int) -> None:
        self._lock = threading.Lock()
        self._calls = [0] * shards
        self._total = [0.0] * shards
        self._recent = [0.0] * shards
        self._last = [0.0] * shards
        self._max = [0.0] * shards
        self._slowest = [0] * shards

    def record(self, index: int, seconds: float) -> None:
        with self._lock:
            self._calls[index] += 1
            self._total[index] += seconds
            self._last[index] = seconds
            self._max[index] = max(self._max[index], seconds)
            recent = self._recent[index]
            self._recent[index] = (
                seconds if self._calls[index] == 1 else recent + self.DECAY * (seconds - recent)
            )

    def record_slowest(self, index: int) -> None:
        with self._lock:
            self._slowest[index] += 1

    def snapshot(self, addresses: Sequence[str]) -> list[ShardTiming]:
        with self._lock:
            return [
                ShardTiming(
                    index=i,
                    address=address,
                    calls=self._calls[i],
                    mean_ms=1e3 * self._total[i] / self._calls[i] if self._calls[i] else 0.0,
                    recent_ms=1e3 * self._recent[i],
                    last_ms=1e3 * self._last[i],
                    max_ms=1e3 * self._max[i],
                    slowest=self._slowest[i],
                )
                for i, address in enumerate(addresses)
            ]


def _first_error(futures: list[Any]) -> list[Any]:
    """The results of ``futures`` in order, once all finished; the first error raised."""
    errors = []
    results = []
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:
            errors.append(exc)
            results.append(None)
    if errors:
        raise errors[0]
    return results


class ShardedClient(Client):
    """A connection to every shard of one job; thread-safe, close it (or use ``with``)."""

    def __init__(
        self,
        address: Sequence[str],
        *,
        worker_id: str | None = None,
        split_threshold_bytes: int = DEFAULT_SPLIT_THRESHOLD_BYTES,
        metadata: Sequence[tuple[str, str]] = (),
        **options: Any,
    ) -> None:
        """Connect lazily to ``address``: every shard's ``host:port``, shard 0 first.

        ``split_threshold_bytes``: a variable at least this large is split by rows across
        every shard when the model is created (if its optimizer allows). The other options
        are :class:`Client`'s, used for every shard.
        """
        addresses = list(address)
        if not addresses or not all(isinstance(a, str) and a for a in addresses):
            raise ValueError(
                f"a sharded job needs each shard's address as a 'host:port' string, shard 0 "
                f"first. Received: {address!r}"
            )
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"a shard's address appears twice in {addresses}")
        if split_threshold_bytes < 1:
            raise ValueError(
                f"split_threshold_bytes must be >= 1. Received: {split_threshold_bytes}"
            )
        shards = len(addresses)
        self.worker_id = worker_id if worker_id is not None else default_worker_id()
        self.shards = [
            Client(
                a,
                worker_id=self.worker_id,
                metadata=(*metadata, (SHARD_METADATA_KEY, f"{i}/{shards}")),
                **options,
            )
            for i, a in enumerate(addresses)
        ]
        first = self.shards[0]
        self.addresses = tuple(addresses)
        self.address = ",".join(addresses)
        self.timeout_s = first.timeout_s
        self.strict_dtypes = first.strict_dtypes
        self.wire_dtype = first.wire_dtype
        self.pull_streams = first.pull_streams
        self.session = first.session
        self.split_threshold_bytes = split_threshold_bytes
        self._pool = ThreadPoolExecutor(max_workers=shards, thread_name_prefix="paramserve-shard")
        self._timings = _Timings(shards)
        self._lock = threading.Lock()
        self._closed = False
        self._sequence = 0
        self._sequence_synced = worker_id is None
        self._description: ModelDescription | None = None
        # Every shard's sub-client uses the job's session, so that all shards tell this
        # client's resends apart from another client's pushes the same way.
        for client in self.shards:
            client.session = self.session

    # --- lifecycle and plumbing ------------------------------------------------------------
    def close(self) -> None:
        """Close every shard's channel; calls in flight are cancelled."""
        self._closed = True
        for client in self.shards:
            client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"Client(address={list(self.addresses)!r}, worker_id={self.worker_id!r})"

    @property
    def wait_for_server_s(self) -> float:
        """How long a call waits for a shard this client has not reached yet (seconds)."""
        return self.shards[0].wait_for_server_s

    @property
    def resends(self) -> int:
        """Attempts made again after a call failed in transit, all shards together."""
        return sum(c.resends for c in self.shards)

    def _each(
        self, call: Callable[[int, Client], R], shards: Sequence[int] | None = None
    ) -> list[R]:
        """``call(index, client)`` on each of ``shards`` (default all) concurrently, in
        shard order; waits for all, then raises the first failure."""
        chosen = range(len(self.shards)) if shards is None else shards
        if len(chosen) == 1:
            index = chosen[0]
            return [self._timed(call, index)]
        ended: list[int] = []

        def timed(i: int) -> R:
            try:
                return self._timed(call, i)
            finally:
                ended.append(i)  # (list.append is atomic)

        results = _first_error([self._pool.submit(timed, i) for i in chosen])
        if ended:
            self._timings.record_slowest(ended[-1])
        return results

    def _timed(self, call: Callable[[int, Client], R], index: int) -> R:
        started = time.perf_counter()
        try:
            return call(index, self.shards[index])
        finally:
            self._timings.record(index, time.perf_counter() - started)

    def shard_timings(self) -> list[ShardTiming]:
        """How long each shard took to answer this client's calls so far (see
        :class:`ShardTiming`): the shard that holds up the job's steps stands out."""
        return self._timings.snapshot([c.address for c in self.shards])

    @property
    def layout(self) -> Layout:
        """Where each variable lives (described once, then cached)."""
        return self._described().layout  # type: ignore[return-value]

    def _described(self) -> ModelDescription:
        return self._description if self._description is not None else self.describe()

    def _placement(self, name: str) -> Placement | None:
        placement = self._described().layout.by_name().get(name)  # type: ignore[union-attr]
        if placement is None and self._description is not None:
            # The model may have changed since it was described.
            placement = self.describe().layout.by_name().get(name)  # type: ignore[union-attr]
        return placement

    @property
    def _coordinated(self) -> bool:
        """A sharded sync job: pushes are prepared, committed and applied (see above)."""
        return len(self.shards) > 1 and self._described().aggregation.mode == "sync"

    # --- model -------------------------------------------------------------------------------
    def create_model(
        self,
        variables: Mapping[str, Any] | Sequence[Any],
        optimizer: str | dict[str, Any] | Any = "adam",
        *,
        name: str = "model",
        timeout_s: float | None = None,
    ) -> CreateModelResult:
        """Place the variables (see :mod:`.partition`) and create each shard's part.

        ValueError, before anything is sent, for an optimizer option that reads every
        variable at once, or a model that cannot give every shard a variable.
        """
        from paramserve import optim_core

        if not isinstance(variables, Mapping):
            if not all(isinstance(v, optim_core.Variable) for v in variables):
                raise TypeError("variables must be a {name: array} dict or a list of Variables")
            variables = {v.path: v for v in variables}
        if optimizer is None:
            raise ValueError(
                "a sharded job needs the optimizer named in create_model (the shards' own "
                "default could differ from one another)"
            )
        config = json.loads(optimizer_json(optimizer, variables))
        instance = optim_core.deserialize(config)
        refused = instance.cross_variable_options()
        if len(self.shards) > 1 and refused:
            raise ValueError(
                f"{'; '.join(refused)}: this option reads every variable at once, which a job "
                f"of {len(self.shards)} shards cannot do shard by shard. Use a per-variable "
                "option (clipnorm instead of global_clipnorm) or a job of one server"
            )
        arrays = {n: as_host_array(v) for n, v in variables.items()}
        layout = partition(
            {n: (a.dtype.name, a.shape) for n, a in arrays.items()},
            len(self.shards),
            split_threshold_bytes=self.split_threshold_bytes,
            split_rows=instance.splits_rows(),
        )
        parts: list[dict[str, np.ndarray]] = [{} for _ in self.shards]
        for placement in layout.placements:
            array = arrays[placement.name]
            for piece in placement.pieces:
                parts[piece.shard][placement.name] = (
                    np.ascontiguousarray(array[piece.start : piece.stop])
                    if placement.split
                    else array
                )
        results = self._each(
            lambda i, c: c.create_model(parts[i], config, name=name, timeout_s=timeout_s)
        )
        self._description = None
        return CreateModelResult(
            created=all(r.created for r in results),
            version=results[0].version,
            values_match=all(r.values_match for r in results),
        )

    def delete_model(self, *, timeout_s: float | None = None) -> None:
        """Drop the model on every shard."""
        self._each(lambda i, c: c.delete_model(timeout_s=timeout_s))
        self._description = None

    def describe(self, *, timeout_s: float | None = None) -> ModelDescription:
        """The whole model (global shapes, model order), the layout, shard 0's version."""
        parts = self._each(lambda i, c: c.describe(timeout_s=timeout_s))
        try:
            layout = layout_from_shards(
                [{v.name: (v.dtype, v.shape) for v in d.variables} for d in parts]
            )
        except ValueError as exc:
            raise FailedPreconditionError(
                f"the shards at {list(self.addresses)} do not hold one job: {exc}"
            ) from None
        first = parts[0]
        for index, part in enumerate(parts[1:], start=1):
            if (part.model_name, part.optimizer) != (first.model_name, first.optimizer):
                raise FailedPreconditionError(
                    f"shard {index} ({self.addresses[index]}) holds model "
                    f"{part.model_name!r} with another optimizer config than shard 0: the "
                    "shards do not hold one job"
                )
        optimizer_variables: dict[str, TensorSpec] = {}
        for part in parts:
            for spec in part.optimizer_variables:
                held = optimizer_variables.get(spec.name)
                if held is not None and spec.shape:  # a slot of a variable split by rows
                    spec = TensorSpec(
                        spec.name, spec.dtype, (held.shape[0] + spec.shape[0], *spec.shape[1:])
                    )
                elif held is not None:
                    continue
                optimizer_variables[spec.name] = spec
        self._description = ModelDescription(
            model_name=first.model_name,
            variables=[TensorSpec(p.name, p.dtype, p.shape) for p in layout.placements],
            optimizer=first.optimizer,
            hyperparameters=first.hyperparameters,
            version=first.version,
            optimizer_variables=list(optimizer_variables.values()),
            aggregation=first.aggregation,
            layout=layout,
        )
        return self._description

    # --- training -----------------------------------------------------------------------------
    @property
    def base_version(self) -> int:
        """Version of the weights last pulled (the oldest over the shards)."""
        return min(c.base_version for c in self.shards)

    @property
    def last_sequence(self) -> int:
        """Sequence of the last push sent (the same on every shard)."""
        return self._sequence

    def _server_last_sequence(self) -> int:
        """The newest sequence any shard holds for this worker (the same on all, unless a
        push reached only some)."""
        statuses = self._each(lambda i, c: c.status())
        workers = [s.worker(self.worker_id) for s in statuses]
        return max((w.last_sequence for w in workers if w is not None), default=0)

    def _split(self, grads: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Each shard's part of ``grads``: whole tensors, row pieces, routed sparse rows."""
        names, values = named_values(grads)
        parts: list[dict[str, Any]] = [{} for _ in self.shards]
        for name, value in zip(names, values, strict=True):
            placement = self._placement(name)
            if placement is None:
                parts[0][name] = value  # shard 0 answers NOT_FOUND, naming it
            elif not placement.split:
                parts[placement.pieces[0].shard][name] = value
            elif isinstance(value, SparseRows):
                indices = np.asarray(value.indices)
                for piece in placement.pieces:
                    mask = (indices >= piece.start) & (indices < piece.stop)
                    if mask.any():
                        parts[piece.shard][name] = SparseRows(
                            indices=indices[mask] - piece.start, values=value.values[mask]
                        )
            else:
                if tuple(value.shape) != placement.shape:
                    raise ValueError(
                        f"the gradient of {name!r} has shape {list(value.shape)}, but the "
                        f"variable is {placement.dtype} {list(placement.shape)}"
                    )
                for piece in placement.pieces:
                    parts[piece.shard][name] = np.ascontiguousarray(value[piece.start : piece.stop])
        return parts

    def push(
        self,
        grads: Mapping[str, Any],
        *,
        base_version: int | None = None,
        sequence: int | None = None,
        timeout_s: float | None = None,
        wire_dtype: str | None = CLIENT_SETTING,
    ) -> PushResult:
        """Push to every shard (see the module docstring); returns once it took effect."""
        parts = self._split(grads)
        seq = self._next_sequence(sequence)
        if not self._coordinated:
            results = self._each(
                lambda i, c: c._push_grads(parts[i], base_version, seq, timeout_s, wire_dtype)
            )
            first = results[0]
            return PushResult(
                duplicate=all(r.duplicate for r in results),
                version=min(r.version for r in results),
                contributors=first.contributors,
                sequence=seq,
                applied=all(r.applied for r in results),
            )
        result, _ = self._round(parts, seq, base_version, timeout_s, wire_dtype)
        return result

    def _round(
        self,
        parts: list[dict[str, Any]],
        seq: int,
        base_version: int | None,
        timeout_s: float | None,
        wire_dtype: str | None,
        *,
        then: Callable[[int, Client], R] | None = None,
    ) -> tuple[PushResult, list[R] | None]:
        """Prepare on every shard, commit to shard 0, apply the decision on the others and
        run ``then`` on each shard (shard 0 at once, the others after the decision)."""
        base = self.base_version if base_version is None else base_version
        prepared = self._each(
            lambda i, c: c._push_grads(parts[i], base, seq, timeout_s, wire_dtype, prepare=True)
        )
        skipped = any(not r.applied and not r.duplicate for r in prepared)
        coordinator = self.shards[0]
        result, decision = coordinator._commit_round(
            seq, base, skipped=skipped, timeout_s=timeout_s
        )
        if decision is None:
            decision = self._last_decision()

        def finish(index: int, client: Client) -> R | None:
            if index and decision is not None:
                client._apply_round(decision, timeout_s=timeout_s)
            return then(index, client) if then is not None else None

        after = self._each(finish)
        return result, after if then is not None else None

    def _last_decision(self) -> pb.RoundDecision | None:
        """The coordinator's newest round decision (None before its first)."""
        response = self.shards[0]._call(
            "GetStatus", self.shards[0]._stub.GetStatus, pb.GetStatusRequest(), None
        )
        return response.last_round if response.HasField("last_round") else None

    def _not_one_cut(self, versions: list[int | None]) -> None:
        """FailedPreconditionError: the shards are more than one round apart."""
        cuts = self.list_snapshots()
        advice = (
            f"the newest cut every shard holds is {cuts[-1].id} (version {cuts[-1].version}): "
            f"restore it with `paramserve restore {cuts[-1].id} --address {self.address}` or "
            "client.restore(...)"
            if cuts
            else "no cut is held by every shard: restore each shard from snapshots of one "
            "version, or start the job again"
        )
        raise FailedPreconditionError(
            f"the shards of {list(self.addresses)} are at versions {versions}, more than one "
            f"round apart: a shard restarted from an older snapshot? The job must continue "
            f"from one cut; {advice}"
        )

    def catch_up(self, *, timeout_s: float | None = None) -> None:
        """Hand the coordinator's newest round decision to every other shard.

        Members of a round do this themselves; this is for a shard left one round behind
        because every member of the round stopped before telling it.
        """
        decision = self._last_decision()
        if decision is None or not self._coordinated:
            return
        self._each(
            lambda i, c: c._apply_round(decision, timeout_s=timeout_s),
            range(1, len(self.shards)),
        )

    def step(
        self,
        grads: Mapping[str, Any],
        *,
        names: Sequence[str] | None = None,
        rows: Mapping[str, Sequence[int] | np.ndarray] | None = None,
        base_version: int | None = None,
        sequence: int | None = None,
        timeout_s: float | None = None,
        wire_dtype: str | None = CLIENT_SETTING,
    ) -> Tensors:
        """:meth:`push` then :meth:`pull`, each shard's pull as soon as its part applied."""
        parts = self._split(grads)
        seq = self._next_sequence(sequence)
        plan = self._pull_plan(names, rows, None)

        def pull(index: int, client: Client) -> Tensors | None:
            return self._pull_shard(plan, index, client, None, timeout_s, wire_dtype)

        if self._coordinated:
            result, pulled = self._round(parts, seq, base_version, timeout_s, wire_dtype, then=pull)
        else:

            def push_pull(index: int, client: Client) -> tuple[PushResult, Tensors | None]:
                pushed = client._push_grads(parts[index], base_version, seq, timeout_s, wire_dtype)
                return pushed, pull(index, client)

            both = self._each(push_pull)
            results = [r for r, _ in both]
            pulled = [t for _, t in both]
            result = PushResult(
                duplicate=all(r.duplicate for r in results),
                version=min(r.version for r in results),
                contributors=results[0].contributors,
                sequence=seq,
                applied=all(r.applied for r in results),
            )
        weights = self._assemble(plan, pulled)  # type: ignore[arg-type]
        weights.push_result = PushResult(
            duplicate=result.duplicate,
            version=result.version,
            contributors=result.contributors,
            sequence=seq,
            applied=result.applied,
        )
        return weights

    # --- pulls ---------------------------------------------------------------------------------
    def _pull_plan(
        self,
        names: Sequence[str] | None,
        rows: Mapping[str, Sequence[int] | np.ndarray] | None,
        out: Mapping[str, np.ndarray] | None,
    ) -> dict[str, Any]:
        """What each shard is asked for, and how the answers fit together."""
        if isinstance(names, str):
            raise TypeError(
                f"names is a list of variable names; received the string {names!r} "
                f"(pass [{names!r}])"
            )
        description = self._described()
        rows = {n: np.asarray(r, dtype=np.int64).reshape(-1) for n, r in (rows or {}).items()}
        if out and rows and not set(out).isdisjoint(rows):
            raise ValueError("out= takes whole variables; it cannot receive selected rows")
        wanted = list(names) if names is not None else ([] if rows else None)
        if wanted is None:
            wanted = description.variable_names
        wanted = list(dict.fromkeys([*wanted, *rows]))
        shard_names: list[list[str]] = [[] for _ in self.shards]
        shard_rows: list[dict[str, np.ndarray]] = [{} for _ in self.shards]
        shard_out: list[dict[str, np.ndarray]] = [{} for _ in self.shards]
        whole: dict[str, np.ndarray] = {}
        selected: dict[str, list[tuple[int, np.ndarray]]] = {}
        for name in wanted:
            placement = self._placement(name)
            if placement is None:
                shard_names[0].append(name)  # shard 0 answers NOT_FOUND, naming it
                continue
            if name in rows:
                picks = rows[name]
                selected[name] = []
                for piece in placement.pieces:
                    if placement.split:
                        mask = (picks >= piece.start) & (picks < piece.stop)
                        if not mask.any():
                            continue
                        local = picks[mask] - piece.start
                    else:
                        mask, local = np.ones(picks.shape, dtype=bool), picks
                    shard_rows[piece.shard][name] = local
                    selected[name].append((piece.shard, mask))
                continue
            if not placement.split:
                shard = placement.pieces[0].shard
                shard_names[shard].append(name)
                if out and name in out:
                    shard_out[shard][name] = out[name]
                continue
            target = out[name] if out and name in out else None
            if target is None:
                target = np.empty(placement.shape, dtype=np.dtype(description.spec(name).dtype))
            elif tuple(target.shape) != placement.shape:
                raise ValueError(
                    f"out[{name!r}] has shape {list(target.shape)}, but the variable is "
                    f"{list(placement.shape)}"
                )
            whole[name] = target
            for piece in placement.pieces:
                shard_names[piece.shard].append(name)
                shard_out[piece.shard][name] = target[piece.start : piece.stop]
        return {
            "wanted": wanted,
            "names": shard_names,
            "rows": shard_rows,
            "out": shard_out,
            "whole": whole,
            "selected": selected,
            "rows_requested": rows,
        }

    @staticmethod
    def _pull_shard(
        plan: dict[str, Any],
        index: int,
        client: Client,
        min_version: int | None,
        timeout_s: float | None,
        wire_dtype: Any,
        streams: Any = CLIENT_SETTING,
    ) -> Tensors | None:
        names, rows = plan["names"][index], plan["rows"][index]
        if not names and not rows:
            return None
        return client.pull(
            [*names, *rows] if names else None,
            rows=rows or None,
            min_version=min_version,
            out=plan["out"][index] or None,
            timeout_s=timeout_s,
            wire_dtype=wire_dtype,
            streams=streams,
        )

    def _assemble(self, plan: dict[str, Any], pulled: list[Tensors | None]) -> Tensors:
        """The shards' answers as one result, in the order asked."""
        got = [t for t in pulled if t is not None]
        version = min((t.version for t in got), default=self.base_version)
        result = Tensors(version=version)
        for name in plan["wanted"]:
            if name in plan["whole"]:
                result[name] = plan["whole"][name]
            elif name in plan["selected"]:
                picks = plan["rows_requested"][name]
                values = None
                for shard, mask in plan["selected"][name]:
                    part = pulled[shard][name]  # type: ignore[index]
                    if values is None:
                        values = np.empty(
                            (len(picks), *part.values.shape[1:]), dtype=part.values.dtype
                        )
                    values[mask] = part.values
                if values is None:
                    raise ValueError(f"no rows selected of {name!r}")
                result[name] = SparseRows(indices=picks, values=values)
            else:
                for tensors in got:
                    if name in tensors:
                        result[name] = tensors[name]
                        break
        return result

    def pull(
        self,
        names: Sequence[str] | None = None,
        *,
        rows: Mapping[str, Sequence[int] | np.ndarray] | None = None,
        min_version: int | None = None,
        out: Mapping[str, np.ndarray] | None = None,
        timeout_s: float | None = None,
        wire_dtype: str | None = CLIENT_SETTING,
        streams: int | str = CLIENT_SETTING,
    ) -> Tensors:
        """Weights from every shard holding them, put together (see :meth:`Client.pull`;
        ``streams`` stripes each shard's part).

        In a sync job the shards' versions agree; one left a round behind (every member of
        the round stopped before telling it) is caught up first.
        """
        plan = self._pull_plan(names, rows, out)
        pulled = self._each(
            lambda i, c: self._pull_shard(plan, i, c, min_version, timeout_s, wire_dtype, streams)
        )
        versions = {t.version for t in pulled if t is not None}
        if len(versions) > 1 and self._coordinated and min_version is None:
            if max(versions) - min(versions) > 1:
                self._not_one_cut([t.version if t is not None else None for t in pulled])
            self.catch_up(timeout_s=timeout_s)
            behind = [
                i for i, t in enumerate(pulled) if t is not None and t.version < max(versions)
            ]
            again = self._each(
                lambda i, c: self._pull_shard(
                    plan, i, c, max(versions), timeout_s, wire_dtype, streams
                ),
                behind,
            )
            for index, tensors in zip(behind, again, strict=True):
                pulled[index] = tensors
        return self._assemble(plan, pulled)

    # --- optimizer -----------------------------------------------------------------------------
    def set_hyperparameters(self, **values: float) -> dict[str, float]:
        """Change numeric hyperparameters on every shard; returns shard 0's."""
        results = self._each(lambda i, c: c.set_hyperparameters(**values))
        self._description = None
        return results[0]

    def optimizer_state(self, *, timeout_s: float | None = None) -> Tensors:
        """The optimizer variables of the whole model: the slots of a variable split by
        rows put back together, the step counters (the same on every shard) once."""
        parts = self._each(lambda i, c: c.optimizer_state(timeout_s=timeout_s))
        held: dict[str, list[np.ndarray]] = {}
        for part in parts:
            for name, value in part.items():
                held.setdefault(name, []).append(value)
        state = Tensors(version=min(p.version for p in parts))
        for name, values in held.items():
            if len(values) > 1 and values[0].ndim:
                state[name] = np.concatenate(values, axis=0)
            else:
                state[name] = values[0]
        return state

    def set_optimizer_state(
        self, state: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> int:
        """Replace every optimizer variable on every shard (see :meth:`optimizer_state`)."""
        layout_shapes = [
            {s.name: s.shape for s in part.optimizer_variables}
            for part in self._each(lambda i, c: c.describe(timeout_s=timeout_s))
        ]
        parts: list[dict[str, np.ndarray]] = [{} for _ in self.shards]
        for name, value in state.items():
            array = as_host_array(value)
            holders = [i for i, shapes in enumerate(layout_shapes) if name in shapes]
            if len(holders) > 1 and array.ndim:
                start = 0
                for i in holders:
                    rows = layout_shapes[i][name][0]
                    parts[i][name] = np.ascontiguousarray(array[start : start + rows])
                    start += rows
            else:
                for i in holders or [0]:
                    parts[i][name] = array
        versions = self._each(lambda i, c: c.set_optimizer_state(parts[i], timeout_s=timeout_s))
        return versions[0]

    # --- status and snapshots -----------------------------------------------------------------
    def status(self, *, timeout_s: float | None = None) -> ServerStatus:
        """The job at one moment: shard 0's version and counters, every shard's workers
        merged (a worker's newest sequence and fewest pushes), each shard's own status in
        ``shard_statuses``."""
        parts = self._each(lambda i, c: c.status(timeout_s=timeout_s))
        first = parts[0]
        workers: dict[str, WorkerStatus] = {}
        for part in parts:
            for worker in part.workers:
                seen = workers.get(worker.worker_id)
                if seen is None or worker.last_sequence > seen.last_sequence:
                    workers[worker.worker_id] = worker
        return ServerStatus(
            server_version=first.server_version,
            has_model=all(p.has_model for p in parts),
            version=min(p.version for p in parts),
            rounds_completed=min(p.rounds_completed for p in parts),
            rounds_aborted=first.rounds_aborted,
            rounds_partial=first.rounds_partial,
            workers=[workers[w] for w in sorted(workers)],
            pending_pushes=max(p.pending_pushes for p in parts),
            aggregation=first.aggregation,
            device=first.device,
            uptime_s=min(p.uptime_s for p in parts),
            serving=all(p.serving for p in parts),
            received_bytes=sum(p.received_bytes for p in parts),
            sent_bytes=sum(p.sent_bytes for p in parts),
            shard_index=0,
            shards=len(self.shards),
            shard_statuses=parts,
        )

    def snapshot(self, *, timeout_s: float | None = None) -> SnapshotInfo:
        """A consistent snapshot of the whole job: every shard's part at one cut.

        Sync jobs: the coordinator holds its rounds, so every shard reaches, and stays at,
        its version while each writes its part. Async and stale jobs: every shard holds its
        pushes while it writes; a push already applied on some shards and not yet on others
        when the hold began shows as shards one version apart in the cut.
        """
        cut_id = f"cut-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(3)}"
        shards = len(self.shards)
        hold_s = float(self.timeout_s if timeout_s is None else timeout_s)
        coordinated = self._coordinated
        holders = [0] if coordinated else list(range(shards))
        if coordinated:
            self.catch_up(timeout_s=timeout_s)
        try:
            held = self._each(lambda i, c: c._hold_updates(hold_s, timeout_s=timeout_s), holders)
            versions = [held[0]] * shards if coordinated else held
            parts = self._each(
                lambda i, c: c._snapshot_part(
                    pb.SnapshotCut(cut_id=cut_id, shard_index=i, shards=shards),
                    versions[i],
                    timeout_s=timeout_s,
                )
            )
        finally:
            with contextlib.suppress(Exception):  # the hold is a lease: it ends by itself
                self._each(lambda i, c: c._hold_updates(0, timeout_s=timeout_s), holders)
        return self._cut_info(cut_id, parts)

    @staticmethod
    def _cut_info(cut_id: str, parts: Sequence[SnapshotInfo]) -> SnapshotInfo:
        return SnapshotInfo(
            id=cut_id,
            version=min(p.version for p in parts),
            size_bytes=sum(p.size_bytes for p in parts),
            created_at=parts[0].created_at,
            cut_id=cut_id,
            shard_snapshots=tuple(parts),
        )

    def list_snapshots(self, *, timeout_s: float | None = None) -> list[SnapshotInfo]:
        """The job's snapshots held by every shard, oldest first (a cut missing on any shard,
        e.g. one still being written, or lost with a shard's disk, is left out)."""
        listed = self._each(lambda i, c: c.list_snapshots(timeout_s=timeout_s))
        cuts: dict[str, list[SnapshotInfo | None]] = {}
        for index, infos in enumerate(listed):
            for info in infos:
                if info.cut_id:
                    cuts.setdefault(info.cut_id, [None] * len(self.shards))[index] = info
        complete = [
            self._cut_info(cut_id, parts)  # type: ignore[arg-type]
            for cut_id, parts in cuts.items()
            if all(p is not None for p in parts)
        ]
        return sorted(complete, key=lambda c: (c.created_at, c.id))

    def _cut(self, snapshot: str | SnapshotInfo, timeout_s: float | None) -> SnapshotInfo:
        cut_id = snapshot.id if isinstance(snapshot, SnapshotInfo) else snapshot
        for cut in self.list_snapshots(timeout_s=timeout_s):
            if cut.id == cut_id:
                return cut
        raise NotFoundError(
            f"no snapshot {cut_id!r} is held by every shard of {list(self.addresses)}: "
            "list_snapshots() (or `paramserve snapshots --address ...`) names the ones there are"
        )

    def restore(
        self, snapshot: str | SnapshotInfo, *, timeout_s: float | None = None
    ) -> SnapshotInfo:
        """Restore every shard to one cut: each shard's part is checked completely first,
        and none is restored unless all pass."""
        cut = self._cut(snapshot, timeout_s)
        parts = cut.shard_snapshots
        self._each(lambda i, c: c._validate_snapshot(parts[i].id, timeout_s=timeout_s))
        restored = self._each(lambda i, c: c.restore(parts[i].id, timeout_s=timeout_s))
        self._description = None
        return self._cut_info(cut.id, restored)

    def download_snapshot(
        self,
        snapshot: str | SnapshotInfo,
        path: str | os.PathLike[str],
        *,
        progress: bool | None = None,
        timeout_s: float | None = None,
    ) -> Path:
        """Save a cut to the directory ``path``: each shard's file and ``manifest.json``
        (the layout, and each file's size and sha256), the form ``paramserve snapshot
        reshard`` and :meth:`upload_snapshot` read."""
        cut = self._cut(snapshot, timeout_s)
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        names = [f"shard-{i}.safetensors" for i in range(len(self.shards))]
        self._each(
            lambda i, c: c.download_snapshot(
                cut.shard_snapshots[i].id,
                directory / names[i],
                progress=progress,
                timeout_s=timeout_s,
            )
        )
        layout = self.describe(timeout_s=timeout_s).layout
        manifest = {
            "format": SHARDED_FORMAT,
            "format_version": SHARDED_FORMAT_VERSION,
            "cut_id": cut.id,
            "version": cut.version,
            "shards": len(self.shards),
            "partitioner_version": PARTITIONER_VERSION,
            "split_threshold_bytes": self.split_threshold_bytes,
            "layout": layout.to_json() if layout is not None else None,
            "created_at": cut.created_at,
            "files": [
                {
                    "shard": i,
                    "file": names[i],
                    "snapshot_id": cut.shard_snapshots[i].id,
                    "sha256": _file_sha256(directory / names[i]),
                    "size_bytes": (directory / names[i]).stat().st_size,
                }
                for i in range(len(self.shards))
            ],
        }
        temp = directory / "manifest.json.tmp"
        temp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(temp, directory / "manifest.json")
        return directory

    def upload_snapshot(
        self,
        path: str | os.PathLike[str],
        *,
        restore: bool = False,
        progress: bool | None = None,
        timeout_s: float | None = None,
        split_threshold_bytes: int | None = None,
    ) -> SnapshotInfo:
        """Upload a sharded snapshot directory (see :meth:`download_snapshot`) to this job,
        checked against the manifest first; ``restore`` then restores it (all shards or none).

        A snapshot of as many shards as this job goes file by file, each to its shard. One of
        another number of shards is re-sharded over RPC: every shard receives the whole
        snapshot, checks it, and keeps its own part re-placed for this job (a new cut, the
        same version); the result equals ``paramserve snapshot reshard`` then an upload.
        ``split_threshold_bytes`` then picks the variables to split (default: the source
        job's threshold).
        """
        directory = Path(path)
        manifest = read_sharded_manifest(directory)
        files = sorted(manifest["files"], key=lambda f: f["shard"])
        if manifest["shards"] == len(self.shards) and split_threshold_bytes is None:
            uploaded = self._each(
                lambda i, c: c.upload_snapshot(
                    directory / files[i]["file"], progress=progress, timeout_s=timeout_s
                )
            )
            cut = self._cut_info(manifest["cut_id"], uploaded)
        else:
            cut_id = reshard_cut_id()
            uploaded = self._each(
                lambda i, c: c._upload_resharded(
                    directory,
                    manifest,
                    shards=len(self.shards),
                    shard_index=i,
                    cut_id=cut_id,
                    restore=False,
                    progress=progress,
                    timeout_s=timeout_s,
                    split_threshold_bytes=split_threshold_bytes,
                )
            )
            cut = self._cut_info(cut_id, uploaded)
        return self.restore(cut, timeout_s=timeout_s) if restore else cut


# The sharded snapshot directory: manifest.json beside one snapshot file per shard.
SHARDED_FORMAT = "paramserve.sharded_snapshot"
SHARDED_FORMAT_VERSION = 1


def reshard_cut_id() -> str:
    """A new cut id for a snapshot re-sharded on upload (time-ordered, unique)."""
    return f"reshard-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}Z-{secrets.token_hex(3)}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sharded_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a sharded snapshot directory, every file checked against it
    (present, its size and sha256); ValueError naming what is wrong."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory} has no manifest.json: not a sharded snapshot") from None
    except ValueError as exc:
        raise ValueError(f"{directory}/manifest.json is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT:
        raise ValueError(f"{directory}/manifest.json is not a {SHARDED_FORMAT} manifest")
    if manifest.get("format_version") != SHARDED_FORMAT_VERSION:
        raise ValueError(
            f"{directory}/manifest.json: format_version {manifest.get('format_version')!r} is "
            f"not supported (expected {SHARDED_FORMAT_VERSION})"
        )
    files = manifest.get("files")
    shards = manifest.get("shards")
    if (
        not isinstance(shards, int)
        or not isinstance(files, list)
        or sorted(f.get("shard") for f in files if isinstance(f, dict)) != list(range(shards))
        or not isinstance(manifest.get("cut_id"), str)
    ):
        raise ValueError(f"{directory}/manifest.json: malformed shards, files or cut_id")
    for entry in files:
        file = directory / str(entry.get("file"))
        if Path(str(entry.get("file"))).name != entry.get("file") or not file.is_file():
            raise ValueError(
                f"{directory}: shard {entry['shard']}'s file {entry.get('file')!r} is missing"
            )
        if file.stat().st_size != entry.get("size_bytes") or _file_sha256(file) != entry.get(
            "sha256"
        ):
            raise ValueError(
                f"{file}: its size or sha256 differs from the manifest's (damaged or replaced)"
            )
    return manifest
