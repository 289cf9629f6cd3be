"""Worker bodies run in other processes.

Scripts for the fault tests, run as ``python -m tests.support.workers NAME JSON``
(:meth:`tests.support.processes.Processes.worker`): each appends one JSON line per event
(pull, ack, retry, stale, pause) to its own file, flushed at once, so the record survives a
SIGKILL of the worker. Functions for the end-to-end tests' process pool (``sync_worker``,
``async_worker``, ``stale_worker``). The gradients come from :mod:`tests.support.models`, so a
test can recompute every push and replay it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from paramserve.client import (
    AbortedError,
    Client,
    DeadlineExceededError,
    FailedPreconditionError,
    UnavailableError,
)
from tests.support.models import embedding
from tests.support.models.dense import gradients

CALL_TIMEOUT_S = 10.0
GO_TIMEOUT_S = 300.0  # load_pusher: a client waits this long for the start signal (a hang guard)


class EventLog:
    """Append-only JSON lines, flushed per line (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields}) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def sync_trainer(
    address: str,
    worker_id: str,
    events: str,
    until_version: int,
    *,
    step_sleep_s: float = 0.0,
    pause_file: str | None = None,
    pause_at_versions: list[int] | None = None,
    stop_file: str | None = None,
    max_runtime_s: float = 120.0,
    call_timeout_s: float = CALL_TIMEOUT_S,
) -> None:
    """Pull, push gradients of the pulled weights, until the model reaches ``until_version``.

    A stale push (FAILED_PRECONDITION: the server moved on, was restored or restarted)
    re-pulls and pushes anew with the next sequence; an aborted, unavailable or timed-out
    push is resent with the same sequence. With ``pause_file`` present, the worker stops
    itself (SIGSTOP) once, right after a pull: its next push is then stale. With
    ``pause_at_versions``, it stops itself right after the first pull of each of these
    versions (or a later one), in order, until the test sends SIGCONT.
    """
    log = EventLog(events)
    give_up_at = time.monotonic() + max_runtime_s
    with Client(address, worker_id=worker_id, timeout_s=call_timeout_s) as client:
        worker = client.status().worker(worker_id)
        sequence = worker.last_sequence if worker is not None else 0
        log("start", sequence=sequence)
        paused = False
        while time.monotonic() < give_up_at:
            if stop_file is not None and os.path.exists(stop_file):
                break
            started = time.monotonic()
            try:
                weights = client.pull()
            except (UnavailableError, DeadlineExceededError) as exc:  # a server restarting
                log("retry", code=type(exc).__name__, seconds=time.monotonic() - started)
                continue
            log("pull", version=weights.version, seconds=time.monotonic() - started)
            if weights.version >= until_version:
                break
            if pause_at_versions and weights.version >= pause_at_versions[0]:
                pause_at_versions = pause_at_versions[1:]
                log("paused", version=weights.version)
                os.kill(os.getpid(), signal.SIGSTOP)
                log("continued", version=weights.version)
            if pause_file is not None and not paused and os.path.exists(pause_file):
                paused = True
                log("paused", version=weights.version)
                os.kill(os.getpid(), signal.SIGSTOP)
                log("continued", version=weights.version)
            sequence += 1
            grads = gradients(worker_id, sequence, weights)
            while time.monotonic() < give_up_at:
                started = time.monotonic()
                try:
                    result = client.push(grads, base_version=weights.version, sequence=sequence)
                except FailedPreconditionError as exc:
                    log("stale", sequence=sequence, base=weights.version, message=str(exc))
                    break
                except (AbortedError, UnavailableError, DeadlineExceededError) as exc:
                    code = exc.code.name if exc.code is not None else type(exc).__name__
                    log("retry", sequence=sequence, code=code, seconds=time.monotonic() - started)
                    if stop_file is not None and os.path.exists(stop_file):
                        break  # abort policy: the others may have left, the round cannot fill
                    continue
                log(
                    "ack",
                    sequence=sequence,
                    base=weights.version,
                    version=result.version,
                    duplicate=result.duplicate,
                    contributors=result.contributors,
                    seconds=time.monotonic() - started,
                )
                break
            time.sleep(step_sleep_s)
    log("done")
    log.close()


def _push_for(
    address: str,
    worker_id: str,
    events: str,
    go_file: str,
    pushes: int,
    resend_every: int,
) -> None:
    """Push sequences 1..``pushes``; every ``resend_every``-th is sent twice (a lost reply).

    The schedule is fixed, so the number of resends is known in advance whatever the speed of
    the machine. The pushes start once ``go_file`` exists (after every client said "ready").
    """
    log = EventLog(events)
    with Client(address, worker_id=worker_id, timeout_s=CALL_TIMEOUT_S) as client:
        client.status()  # connected
        log("ready", worker_id=worker_id)
        give_up_at = time.monotonic() + GO_TIMEOUT_S
        while not os.path.exists(go_file):
            if time.monotonic() > give_up_at:
                raise TimeoutError(f"{go_file} never appeared")
            time.sleep(0.005)
        for sequence in range(1, pushes + 1):
            grads = gradients(worker_id, sequence)
            # A simulated lost reply: the push is sent again with the same sequence.
            sends = 2 if sequence % resend_every == 0 else 1
            lost = 0
            while sends > 0:
                try:
                    result = client.push(grads, sequence=sequence)
                except (DeadlineExceededError, UnavailableError) as exc:
                    # A reply really lost: resend (it may have been applied meanwhile).
                    lost += 1
                    log("lost", worker_id=worker_id, sequence=sequence, error=type(exc).__name__)
                    if lost > 3:
                        raise
                    continue
                sends -= 1
                log(
                    "ack",
                    worker_id=worker_id,
                    sequence=sequence,
                    duplicate=result.duplicate,
                    version=result.version,
                )
    log("done", worker_id=worker_id, pushes=pushes)
    log.close()


def load_pusher(
    address: str,
    worker_ids: list[str],
    events_dir: str,
    go_file: str,
    pushes: int,
    resend_every: int,
) -> None:
    """One thread (and Client) per worker id, each pushing ``pushes`` times as fast as the
    server takes them (see :func:`_push_for`)."""
    errors: list[BaseException] = []

    def run(worker_id: str) -> None:
        try:
            path = os.path.join(events_dir, f"{worker_id}.jsonl")
            _push_for(address, worker_id, path, go_file, pushes, resend_every)
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=run, args=(w,)) for w in worker_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# -- the end-to-end tests' process pool --------------------------------------------------
POOL_TIMEOUT_S = 30.0


def sync_worker(
    address: str, worker_id: str, first_step: int, steps: int, sparse: bool = True
) -> dict[str, np.ndarray]:
    """Pull version ``step``, push its gradients, for each step; returns the final weights."""
    with Client(address, worker_id=worker_id, timeout_s=POOL_TIMEOUT_S) as client:
        for step in range(first_step, first_step + steps):
            weights = client.pull(min_version=step)
            assert weights.version == step, (weights.version, step)
            result = client.push(embedding.known_gradients(worker_id, step, weights, sparse=sparse))
            assert result.version == step + 1 and not result.duplicate, result
        return dict(client.pull(min_version=first_step + steps))


def async_worker(address: str, worker_id: str, pushes: int) -> list[tuple[int, int]]:
    """Push gradients that ignore the weights; returns ``(version after, step)`` per push."""
    zeros = {n: np.zeros(s, np.float32) for n, s in embedding.SHAPES.items()}
    out = []
    with Client(address, worker_id=worker_id, timeout_s=POOL_TIMEOUT_S) as client:
        for step in range(pushes):
            result = client.push(embedding.known_gradients(worker_id, step, zeros, sparse=False))
            assert not result.duplicate
            out.append((result.version, step))
    return out


def stale_worker(address: str, worker_id: str, pushes: int) -> list[float]:
    """Push as fast as allowed; returns the time each push returned."""
    zeros = {n: np.zeros(s, np.float32) for n, s in embedding.SHAPES.items()}
    done = []
    with Client(address, worker_id=worker_id, timeout_s=POOL_TIMEOUT_S) as client:
        for step in range(pushes):
            client.push(embedding.known_gradients(worker_id, step, zeros, sparse=False))
            done.append(time.monotonic())
    return done


def sharded_stopper(
    addresses: list[str], worker_id: str, events: str, stage: str, seed: int, prepare_on: int
) -> None:
    """A worker of a sharded sync job that stops midway through a push and waits there
    (to be killed): after preparing it on the first ``prepare_on`` shards only (stage
    "prepared"), or while its commit waits for the round (stage "committed")."""
    from tests.support.shards import shard_gradients

    log = EventLog(events)
    client = Client(addresses, worker_id=worker_id, timeout_s=CALL_TIMEOUT_S)
    client.pull()
    parts = client._split(shard_gradients(seed))
    sequence = client._next_sequence(None)
    base = client.base_version
    shards = client.shards[:prepare_on] if stage == "prepared" else client.shards
    for index, shard in enumerate(shards):
        shard._push_grads(parts[index], base, sequence, None, None, prepare=True)
    log("prepared", shards=len(shards), sequence=sequence)
    if stage == "committed":
        log("committing")
        client.shards[0]._commit_round(sequence, base, skipped=False, timeout_s=GO_TIMEOUT_S)
        log("committed")  # not reached in the tests: the worker is killed before the round ends
    time.sleep(GO_TIMEOUT_S)


if __name__ == "__main__":
    name, arguments = sys.argv[1], json.loads(sys.argv[2])
    {"sync_trainer": sync_trainer, "load_pusher": load_pusher, "sharded_stopper": sharded_stopper}[
        name
    ](**arguments)
