"""A whole training step against S shards with W workers, beside the hand-written socket server.

Usage: python bench/shards.py [--sizes 16M,64M] [--shards 1,2,4] [--workers 1,4,8]
       [--modes sync[,async]] [--steps 8] [--repeats 1] [--json OUT]

A step is what one worker does per batch: push its gradient, the servers apply Adam, pull the
weights (``push`` then ``pull(out=...)``, as RemoteOptimizer does above 1 MiB; ``--call step``
uses ``Client.step`` instead). For each mode, worker count W and shard count S:

* S ``paramserve serve --shards S --shard-index I`` daemons (subprocesses, loopback ports,
  Adam, ``--reduction sum``). Sync mode needs ``--replicas W``, so a sync job's servers are
  started once per (S, W); async servers once per S, and the model is deleted and created
  again between runs on them;
* W worker processes (multiprocessing spawn), each with ``Client([addr0, addr1, ...])`` (a
  ShardedClient, also for S = 1), started once per (mode, W) and told each job's addresses;
* the model: one float32 variable of the given size split by rows into S equal pieces
  (``split_threshold_bytes=1``), or with ``--layout vars`` S equal variables, one per shard.

``socket-fast`` (bench/step.py's yardstick, bench/socket_baseline.py: one process, one worker,
fused numba Adam applied per 4 MiB piece as it arrives) runs at each size before and after
the sharded jobs, in the same run; its figure is the median of both.

Figures per (size, mode, S, W), timed steps only (warm-up excluded): ``wrk st/s`` is one
worker's steps/s (median over workers and repeats); ``agg st/s`` every worker's steps over
the wall time of the run (in sync mode a round is W steps); ``GB/s`` the gradient and weight
bytes of those steps over the wall time, and per shard; ``srv cpu`` all shard processes' CPU
(user + system, from /proc) per worker step, ``srv cores`` the mean CPU each shard process
used over the wall time (how near it comes to the cores it can use), ``wrk cpu`` one
worker process's CPU per step (getrusage, gRPC threads included). Ratios: ``vs fast`` is one
worker's steps/s over socket-fast's; ``scale`` is the aggregate steps/s over the one-shard
job's with the same mode and W, and ``eff`` that over S (1.0: linear).

Correctness, checked in every run: gradients are multiples of 2**-17 below 2**-7, so a round's
sum of up to 2**13 gradients is exact in float32 in any order and a local optim_core Adam
replay gives the servers' weights bit for bit. Sync jobs: every worker's weights pulled after
the warm-up equal the replay of the warm-up rounds (each worker pushes its own gradient; the
replay applies their sum); after the run, every shard is at the expected version and the
job's weights equal the replay of all rounds. Async jobs: every worker pushes the same
gradient, so the order of the pushes does not matter; after the run every shard has applied
W x (warm-up + timed) pushes and the weights equal that many replayed steps. The ``ok``
column is the verdict; the exit status is 1 when any check failed.

A SIGALRM limit (``--time-limit``) bounds the run; servers and workers are stopped on every
exit path.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from step import environment, process_cpu_s, timed_steps  # noqa: E402
from step_systems import (  # noqa: E402
    TUNED_MALLOC_ENV,
    YARDSTICK,
    Model,
    ServerProcess,
    SocketRunner,
    parse_size,
    reference_weights,
    server_args,
)

# The targets (on 16 cores): aggregate throughput from 1 to 4 shards with 8 workers
# at least 0.7 x linear; one worker at 16M with 4 shards at least socket-fast's steps/s.
TARGET_EFFICIENCY = 0.7
TARGET_VS_FAST = 1.0
TARGET_VS_FAST_ELEMENTS = 16 << 20
# Gradients: integers in [-GRID_RANGE, GRID_RANGE] times GRID_SCALE (exact sums, see above).
GRID_RANGE = 1 << 10
GRID_SCALE = 2.0**-17
INIT_SEED = 0
GRAD_SEED = 1000
START_TIMEOUT_S = 90.0
# A sync round waits for every worker; on a loaded machine a 64M round can take seconds.
ROUND_TIMEOUT_S = 600.0
CALL_TIMEOUT_S = 600.0


def grid_gradient(elements: int, seed: int) -> np.ndarray:
    """A float32 gradient of multiples of GRID_SCALE (sums of up to 2**13 are exact)."""
    rng = np.random.default_rng(seed)
    grad = rng.integers(-GRID_RANGE, GRID_RANGE + 1, size=elements, dtype=np.int16)
    out = grad.astype(np.float32)
    out *= np.float32(GRID_SCALE)
    return out


def initial_weights(elements: int) -> np.ndarray:
    rng = np.random.default_rng(INIT_SEED)
    return rng.standard_normal(elements, dtype=np.float32)


def variable_names(layout: str, shards: int) -> list[str]:
    return ["w"] if layout == "split" else [f"w{i}" for i in range(shards)]


def as_variables(flat: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Equal consecutive views of ``flat``, one per name."""
    size = len(flat) // len(names)
    return {n: flat[i * size : (i + 1) * size] for i, n in enumerate(names)}


def split_threshold(layout: str) -> int:
    # split: every variable is split by rows; vars: none is (each shard holds one whole).
    return 1 if layout == "split" else 1 << 62


def digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8))
    return h.hexdigest()


def cpu_self_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- workers --------------------------------------------------------------------------------
def worker_main(conn: Any, index: int, tune: bool) -> None:
    """One worker process: told a job (addresses, size, gradient seed) at a time, it runs
    warm-up and timed steps on command and reports times, CPU and what it pulled."""
    if tune:
        from paramserve.wire import tune_malloc

        tune_malloc()
    from paramserve.client import Client

    client: Any = None
    grads: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    names: list[str] = []
    call = "push-pull"
    pulled: Any = None

    def one_step() -> None:
        nonlocal pulled
        if call == "step":
            pulled = client.step(grads)
        else:
            client.push(grads)
            pulled = client.pull(out=out)

    try:
        conn.send(("up", os.getpid()))
        while True:
            message = conn.recv()
            op = message[0]
            if op == "job":
                job = message[1]
                names, call = job["names"], job["call"]
                flat = grid_gradient(job["elements"], job["seed"])
                grads = as_variables(flat, names)
                out = {n: np.empty_like(g) for n, g in grads.items()}
                client = Client(
                    job["addresses"],
                    worker_id=f"bench-w{index}",
                    timeout_s=CALL_TIMEOUT_S,
                    split_threshold_bytes=job["threshold"],
                )
                client.describe()
                conn.send(("ready",))
            elif op == "warmup":
                times = []
                for _ in range(message[1]):
                    t0 = time.perf_counter()
                    one_step()
                    times.append(time.perf_counter() - t0)
                conn.send(("warm", times, digest([pulled[n] for n in names]), pulled.version))
            elif op == "run":
                per_step = []
                cpu0 = cpu_self_s()
                start = time.monotonic()
                for _ in range(message[1]):
                    t0 = time.perf_counter()
                    one_step()
                    per_step.append(time.perf_counter() - t0)
                end = time.monotonic()
                conn.send(("done", start, end, cpu_self_s() - cpu0, per_step))
            elif op == "end":
                if client is not None:
                    client.close()
                client, grads, out, pulled = None, {}, {}, None
                conn.send(("ended",))
            elif op == "exit":
                return
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


class Workers:
    """W spawned worker processes, each behind a pipe (:meth:`wait_up` waits for them)."""

    def __init__(self, count: int, *, tune: bool) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.closed = False
        for index in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(child, index, tune), name=f"bench-w{index}", daemon=True
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def wait_up(self) -> None:
        self.gather("up", START_TIMEOUT_S)

    def send(self, message: tuple[Any, ...], which: int | None = None) -> None:
        for i, conn in enumerate(self.conns):
            if which is None or i == which:
                conn.send(message)

    def gather(self, expected: str, timeout_s: float) -> list[tuple[Any, ...]]:
        """Each worker's next reply, which must be ``expected``."""
        deadline = time.monotonic() + timeout_s
        replies = []
        for i, conn in enumerate(self.conns):
            while not conn.poll(0.2):
                if not self.procs[i].is_alive():
                    raise RuntimeError(f"worker {i} exited (code {self.procs[i].exitcode})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {i}: no {expected!r} in {timeout_s:.0f} s")
            reply = conn.recv()
            if reply[0] == "error":
                raise RuntimeError(f"worker {i} failed:\n{reply[1]}")
            if reply[0] != expected:
                raise RuntimeError(f"worker {i}: expected {expected!r}, got {reply[0]!r}")
            replies.append(reply)
        return replies

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("exit",))
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self.conns:
            conn.close()


# --- shard servers --------------------------------------------------------------------------
class ShardServer:
    """``paramserve serve`` in a subprocess on a loopback port (read from its JSON log)."""

    def __init__(
        self, index: int, shards: int, mode: str, replicas: int, device: str = "cpu"
    ) -> None:
        self.index = index
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMSERVE_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "paramserve.server",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-format",
                "json",
                "--mode",
                mode,
                "--replicas",
                str(replicas),
                "--reduction",
                "sum",
                "--round-timeout-s",
                str(ROUND_TIMEOUT_S),
                "--shards",
                str(shards),
                "--shard-index",
                str(index),
                "--device",
                device,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=env,
        )
        self.address = ""

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.log.seek(0)
            for line in self.log:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and entry.get("event") == "listening":
                        self.address = entry["address"]
                        return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"shard {self.index} did not start:\n{self.stderr_tail()}")

    def stderr_tail(self, n_bytes: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read()[-n_bytes:]

    def cpu_s(self) -> float:
        cpu = process_cpu_s(self.proc.pid)
        return 0.0 if cpu is None else cpu

    def close(self) -> None:
        if self.log.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class Job:
    """The S shard servers of one job, started (:meth:`wait_listening` waits for them)."""

    def __init__(self, shards: int, mode: str, replicas: int, device: str = "cpu") -> None:
        self.servers: list[ShardServer] = []
        self.addresses: list[str] = []
        try:
            for i in range(shards):
                self.servers.append(ShardServer(i, shards, mode, replicas, device))
        except BaseException:
            self.close()
            raise

    def wait_listening(self) -> None:
        for server in self.servers:
            server.wait_listening()
        self.addresses = [s.address for s in self.servers]

    def cpu_s(self) -> list[float]:
        return [s.cpu_s() for s in self.servers]

    def close(self) -> None:
        for server in self.servers:
            server.close()


# --- the replay that checks the servers -----------------------------------------------------
class Replay:
    """optim_core Adam on the flat model, advanced on demand: digests and weights at the step
    counts asked for (in increasing order)."""

    def __init__(self, init: np.ndarray, grad: np.ndarray) -> None:
        from paramserve import optim_core

        self.init = init
        self.variable = optim_core.Variable(init.copy(), path="w")
        self.optimizer = optim_core.get("adam")
        self.optimizer.build([self.variable])
        self.grad = grad
        self.steps = 0
        self.digests: dict[int, str] = {0: digest([init])}

    def advance(self, steps: int) -> np.ndarray:
        if steps < self.steps:
            raise ValueError("a replay only moves forward")
        while self.steps < steps:
            self.optimizer.apply([self.grad], [self.variable])
            self.steps += 1
        self.digests[steps] = digest([self.variable.value])
        return np.asarray(self.variable.value)

    def digest_at(self, steps: int) -> str:
        if steps not in self.digests:
            self.advance(steps)
        return self.digests[steps]


# --- measurement ----------------------------------------------------------------------------
@dataclass
class FastResult:
    size: str
    elements: int
    steps_per_s: float
    repeats: list[float]
    server_cpu_ms: float | None
    client_cpu_ms: float
    verified: bool


@dataclass
class Row:
    """One (size, mode, S, W) configuration."""

    size: str
    elements: int
    mode: str
    shards: int
    workers: int
    layout: str
    call: str
    steps: int  # timed steps per worker per repeat
    warmup: int
    repeats: list[dict[str, float]] = field(default_factory=list)
    worker_steps_per_s: float = 0.0
    agg_steps_per_s: float = 0.0
    ms_per_step: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    gbytes_per_s: float = 0.0
    gbytes_per_s_per_shard: float = 0.0
    server_cpu_ms_per_step: float = 0.0  # all shards together, per worker step
    server_cores: list[float] = field(default_factory=list)  # per shard: CPU s / wall s
    worker_cpu_ms_per_step: float = 0.0
    # CPU seconds per GB moved (gradient + weights): all shards together, one worker.
    server_cpu_s_per_gb: float = 0.0
    worker_cpu_s_per_gb: float = 0.0
    ratio_vs_fast: float | None = None
    scaling: float | None = None
    efficiency: float | None = None
    verified: bool = False
    checks: list[str] = field(default_factory=list)


def measure_fast(model: Model, args: argparse.Namespace) -> FastResult:
    """socket-fast at ``model``: warm-up, a bit-exact check, ``repeats`` timed runs."""
    model.materialize()
    env = TUNED_MALLOC_ENV if args.malloc == "tuned" else {}
    server = ServerProcess("socket_baseline.py", *server_args(YARDSTICK), env=env)
    try:
        runner = SocketRunner(server.port, model, mode="fast")
        try:
            for _ in range(args.warmup):
                runner.step()
            verified = bool(np.array_equal(runner.weights(), reference_weights(model, args.warmup)))
            reps = [
                timed_steps(runner, args.fast_steps or args.steps, server.proc.pid)
                for _ in range(args.repeats)
            ]
        finally:
            runner.close()
    finally:
        server.close()
    server_cpu = [r.server_cpu_s / r.n for r in reps if r.server_cpu_s is not None]
    return FastResult(
        size=model.label,
        elements=model.elements,
        steps_per_s=statistics.median(r.n / r.wall_s for r in reps),
        repeats=[round(r.n / r.wall_s, 3) for r in reps],
        server_cpu_ms=1e3 * statistics.median(server_cpu) if server_cpu else None,
        client_cpu_ms=1e3 * statistics.median(r.client_cpu_s / r.n for r in reps),
        verified=verified,
    )


def measure_job(
    job: Job,
    workers: Workers,
    model: Model,
    mode: str,
    shards: int,
    count: int,
    replay: Replay,
    args: argparse.Namespace,
) -> Row:
    from paramserve.client import Client

    n = model.elements
    names = variable_names(args.layout, shards)
    row = Row(
        size=model.label,
        elements=n,
        mode=mode,
        shards=shards,
        workers=count,
        layout=args.layout,
        call=args.call,
        steps=args.steps,
        warmup=args.warmup,
    )
    admin = Client(
        job.addresses,
        worker_id="bench-admin",
        timeout_s=CALL_TIMEOUT_S,
        split_threshold_bytes=split_threshold(args.layout),
    )
    try:
        created = admin.create_model(
            as_variables(replay.init, names), optimizer="adam", name="bench"
        )
        layout = admin.describe().layout
        held = layout.shard_bytes() if layout is not None else []
        if len(set(held)) > 1:
            row.checks.append(f"unequal shards: {held} bytes")
        for i in range(count):
            seed = GRAD_SEED + (i if mode == "sync" else 0)
            job_spec = {
                "addresses": job.addresses,
                "elements": n,
                "seed": seed,
                "names": names,
                "threshold": split_threshold(args.layout),
                "call": args.call,
            }
            workers.send(("job", job_spec), which=i)
        workers.gather("ready", CALL_TIMEOUT_S)

        workers.send(("warmup", args.warmup))
        warm = workers.gather("warm", CALL_TIMEOUT_S)
        if mode == "sync":
            want = replay.digest_at(args.warmup)
            bad = [i for i, w in enumerate(warm) if w[2] != want]
            if bad:
                row.checks.append(f"workers {bad}: weights after the warm-up differ from Adam")

        for _ in range(args.repeats):
            cpu0 = job.cpu_s()
            workers.send(("run", args.steps))
            done = workers.gather("done", CALL_TIMEOUT_S)
            cpu1 = job.cpu_s()
            wall = max(d[2] for d in done) - min(d[1] for d in done)
            row.repeats.append(
                {
                    "wall_s": wall,
                    "agg_steps_per_s": count * args.steps / wall,
                    "worker_steps_per_s": [args.steps / (d[2] - d[1]) for d in done],
                    "worker_cpu_s": [d[3] for d in done],
                    "server_cpu_s": [b - a for a, b in zip(cpu0, cpu1, strict=True)],
                    "per_step_s": [t for d in done for t in d[4]],
                }
            )

        # After the run: every shard at the expected version, the weights Adam's.
        rounds = args.warmup + args.repeats * args.steps
        applied = rounds if mode == "sync" else count * rounds
        status = admin.status()
        versions = [s.version - created.version for s in status.shard_statuses or [status]]
        if any(v != applied for v in versions):
            row.checks.append(f"shard versions {versions}, expected {applied}")
        weights = admin.pull()
        flat = np.concatenate([np.asarray(weights[n_]).reshape(-1) for n_ in names])
        if not np.isfinite(flat).all():
            row.checks.append("non-finite weights")
        if not np.array_equal(flat, replay.advance(applied)):
            row.checks.append(f"weights after {applied} updates differ from Adam")
        workers.send(("end",))
        workers.gather("ended", CALL_TIMEOUT_S)
        admin.delete_model()
    finally:
        admin.close()

    summarize(row, model)
    row.verified = not row.checks
    return row


def summarize(row: Row, model: Model) -> None:
    reps = row.repeats
    row.agg_steps_per_s = statistics.median(r["agg_steps_per_s"] for r in reps)
    row.worker_steps_per_s = statistics.median(x for r in reps for x in r["worker_steps_per_s"])
    row.ms_per_step = 1e3 / row.worker_steps_per_s
    q = np.quantile(np.array([t for r in reps for t in r["per_step_s"]]) * 1e3, [0.5, 0.9])
    row.p50_ms, row.p90_ms = float(q[0]), float(q[1])
    row.gbytes_per_s = 2 * model.nbytes * row.agg_steps_per_s / 1e9
    row.gbytes_per_s_per_shard = row.gbytes_per_s / row.shards
    steps = row.workers * row.steps
    row.server_cpu_ms_per_step = 1e3 * statistics.median(
        sum(r["server_cpu_s"]) / steps for r in reps
    )
    row.server_cores = [
        round(statistics.median(r["server_cpu_s"][i] / r["wall_s"] for r in reps), 3)
        for i in range(row.shards)
    ]
    row.worker_cpu_ms_per_step = 1e3 * statistics.median(
        x / row.steps for r in reps for x in r["worker_cpu_s"]
    )
    step_gb = 2 * model.nbytes / 1e9
    row.server_cpu_s_per_gb = row.server_cpu_ms_per_step / 1e3 / step_gb
    row.worker_cpu_s_per_gb = row.worker_cpu_ms_per_step / 1e3 / step_gb
    for r in reps:  # the JSON keeps per-repeat summaries, not every step
        r["worker_steps_per_s"] = [round(x, 3) for x in r["worker_steps_per_s"]]
        del r["per_step_s"]


def new_replay(model: Model, mode: str, workers: int) -> Replay:
    """The replay of a job of ``workers`` at ``model``'s size: sync rounds apply the sum of
    every worker's gradient; async pushes all carry one gradient."""
    n = model.elements
    if mode == "sync":
        grad = grid_gradient(n, GRAD_SEED)
        for i in range(1, workers):
            grad += grid_gradient(n, GRAD_SEED + i)
    else:
        grad = grid_gradient(n, GRAD_SEED)
    return Replay(initial_weights(n), grad)


@contextlib.contextmanager
def _closing(thing: Any) -> Iterator[Any]:
    try:
        yield thing
    finally:
        thing.close()


def run_all(
    args: argparse.Namespace,
    models: list[Model],
    log: Any,
    fast: list[FastResult],
    rows: list[Row],
) -> None:
    """Measure everything into ``fast`` and ``rows`` (what was measured stays there if the
    run stops early)."""
    started = time.monotonic()

    def note(msg: str) -> None:
        log(f"[{time.monotonic() - started:7.1f} s] {msg}")

    for model in models:
        note(f"{YARDSTICK} at {model.label}")
        fast.append(measure_fast(model, args))
    tune = args.malloc == "tuned"
    for mode in args.modes:
        with contextlib.ExitStack() as stack:
            # Every job a (mode, W) needs is started at once, beside the workers, and waited
            # for together (idle servers take no measurable CPU). Sync: one job per (S, W),
            # closed once measured; async: one job per S, for every W.
            device = args.device
            async_jobs = {s: stack.enter_context(_closing(Job(s, mode, 1, device))) for s in (
                args.shards if mode == "async" else []
            )}  # fmt: skip
            for count in args.workers:
                note(f"{mode}: starting {count} worker(s) and the servers")
                workers = stack.enter_context(_closing(Workers(count, tune=tune)))
                jobs = async_jobs or {
                    s: stack.enter_context(_closing(Job(s, mode, count, device)))
                    for s in args.shards
                }
                for job in jobs.values():
                    if not job.addresses:
                        job.wait_listening()
                workers.wait_up()
                replays: dict[str, Replay] = {}
                for shards, job in jobs.items():
                    for model in models:
                        if model.label not in replays:
                            replays[model.label] = new_replay(model, mode, count)
                        note(f"{mode} S={shards} W={count} {model.label}")
                        row = measure_job(
                            job, workers, model, mode, shards, count, replays[model.label], args
                        )
                        if not row.verified:
                            log(f"CHECK FAILED: {'; '.join(row.checks)}")
                        rows.append(row)
                    if mode == "sync":
                        job.close()
                workers.close()
    # socket-fast again at the end: the yardstick brackets the sharded runs.
    for i, model in enumerate(models):
        note(f"{YARDSTICK} at {model.label} (again)")
        again = measure_fast(model, args)
        fast[i].repeats += again.repeats
        fast[i].steps_per_s = statistics.median(fast[i].repeats)
        fast[i].verified = fast[i].verified and again.verified


def ratios(fast: list[FastResult], rows: list[Row]) -> None:
    by_fast = {f.size: f for f in fast}
    base = {(r.size, r.mode, r.workers): r for r in rows if r.shards == 1}
    for r in rows:
        yardstick = by_fast.get(r.size)
        if yardstick is not None:
            r.ratio_vs_fast = r.worker_steps_per_s / yardstick.steps_per_s
        one = base.get((r.size, r.mode, r.workers))
        if one is not None:
            r.scaling = r.agg_steps_per_s / one.agg_steps_per_s
            r.efficiency = r.scaling / r.shards


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    """The issue's targets, where the configurations they name were run."""
    out = []
    for r in rows:
        if r.shards == 4 and r.workers == 8 and r.efficiency is not None:
            out.append(
                {
                    "size": r.size,
                    "mode": r.mode,
                    "metric": "agg steps/s, 4 shards / 1 shard, 8 workers, over 4",
                    "value": round(r.efficiency, 3),
                    "target": f">= {TARGET_EFFICIENCY}",
                    "met": r.efficiency >= TARGET_EFFICIENCY,
                }
            )
        if (
            r.elements == TARGET_VS_FAST_ELEMENTS
            and r.shards == 4
            and r.workers == 1
            and r.ratio_vs_fast is not None
        ):
            out.append(
                {
                    "size": r.size,
                    "mode": r.mode,
                    "metric": f"1 worker, 4 shards: steps/s over {YARDSTICK}'s",
                    "value": round(r.ratio_vs_fast, 3),
                    "target": f">= {TARGET_VS_FAST}",
                    "met": r.ratio_vs_fast >= TARGET_VS_FAST,
                }
            )
    return out


# --- report ---------------------------------------------------------------------------------
def print_table(fast: list[FastResult], rows: list[Row], goals: list[dict[str, Any]]) -> None:
    def fmt(x: float | None, width: int, digits: int = 2) -> str:
        return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"

    head = (
        f"{'size':>5} {'mode':<5} {'S':>2} {'W':>2} {'wrk st/s':>9} {'agg st/s':>9} "
        f"{'ms/step':>8} {'p90 ms':>8} {'GB/s':>6} {'GB/s/S':>7} {'srv cpu':>8} "
        f"{'srv cores':>10} {'wrk cpu':>8} {'vs fast':>8} {'scale':>6} {'eff':>5}  ok"
    )
    print(head)
    print("-" * len(head))
    for f in fast:
        print(
            f"{f.size:>5} {YARDSTICK:<11} {1:>2} {f.steps_per_s:>9.2f} {f.steps_per_s:>9.2f} "
            f"{1e3 / f.steps_per_s:>8.1f} {'-':>8} {8 * f.elements * f.steps_per_s / 1e9:>6.2f} "
            f"{'-':>7} {fmt(f.server_cpu_ms, 8, 1)} {'-':>10} {f.client_cpu_ms:>8.1f} "
            f"{1:>8.2f} {'-':>6} {'-':>5}  {'yes' if f.verified else 'NO'}"
        )
    order = sorted(rows, key=lambda r: (r.elements, r.mode, r.workers, r.shards))
    for r in order:
        cores = "/".join(f"{c:.2f}" for c in r.server_cores)
        if len(cores) > 10:
            cores = f"{statistics.mean(r.server_cores):.2f} avg"
        print(
            f"{r.size:>5} {r.mode:<5} {r.shards:>2} {r.workers:>2} {r.worker_steps_per_s:>9.2f} "
            f"{r.agg_steps_per_s:>9.2f} {r.ms_per_step:>8.1f} {r.p90_ms:>8.1f} "
            f"{r.gbytes_per_s:>6.2f} {r.gbytes_per_s_per_shard:>7.2f} "
            f"{r.server_cpu_ms_per_step:>8.1f} {cores:>10} {r.worker_cpu_ms_per_step:>8.1f} "
            f"{fmt(r.ratio_vs_fast, 8)} {fmt(r.scaling, 6)} {fmt(r.efficiency, 5)}  "
            f"{'yes' if r.verified else 'NO'}"
        )
    print(
        "(wrk st/s: one worker's steps/s, median; agg st/s: all workers' steps over the wall "
        "time; ms/step, p90: one worker's step; GB/s: gradient + weight bytes over the wall "
        "time, and per shard; srv cpu: all shards' CPU ms per worker step; srv cores: CPU "
        "seconds per wall second of each shard process; wrk cpu: one worker's CPU ms per step; "
        f"vs fast: wrk st/s over {YARDSTICK}'s; scale: agg st/s over the 1-shard job's with "
        "the same mode and W; eff: scale / S; ok: weights and versions checked against a "
        "local Adam replay)"
    )
    if goals:
        print("\ntargets (the issue's, stated for 16 cores):")
        for g in goals:
            print(
                f"  {g['size']:>5} {g['mode']:<5} {g['metric']:<50} {g['value']:>7} "
                f"(target {g['target']}) {'MET' if g['met'] else 'MISSED'}"
            )


def _alarm(_signum: int, _frame: Any) -> None:
    raise TimeoutError("bench/shards.py ran past --time-limit; servers are being stopped")


def _int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"a comma list of positive integers: {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16M,64M", help="float32 elements, K/M suffixes")
    parser.add_argument("--shards", type=_int_list, default=[1, 2, 4], help="default 1,2,4")
    parser.add_argument("--workers", type=_int_list, default=[1, 4, 8], help="default 1,4,8")
    parser.add_argument(
        "--modes", default="sync", help="comma list of sync, async (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per worker per repeat")
    parser.add_argument("--fast-steps", type=int, default=0, help="socket-fast's (0: --steps)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--layout",
        choices=("split", "vars"),
        default="split",
        help="split: one variable split by rows into S pieces; vars: S equal variables",
    )
    parser.add_argument(
        "--call",
        choices=("push-pull", "step"),
        default="push-pull",
        help="push then pull(out=...) (RemoteOptimizer's way), or Client.step",
    )
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="where the shard servers keep the model (serve --device; bench/gpu_check.sh)",
    )
    parser.add_argument("--time-limit", type=int, default=3600, help="seconds for the run")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        models = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError as exc:
        parser.error(f"--sizes: {exc}")
    if any(m.label == "small" for m in models):
        parser.error("--sizes: one variable per size (K/M suffixes), not 'small'")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - {"sync", "async"}:
        parser.error("--modes: sync and/or async")
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats must be at least 1")
    if args.layout == "vars":
        for model in models:
            for s in args.shards:
                if model.elements % s:
                    parser.error(f"--layout vars: {model.label} does not split into {s} parts")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.malloc == "tuned":
        from paramserve.wire import tune_malloc

        tune_malloc()
    load_before = os.getloadavg()
    log(
        f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} on "
        f"{os.cpu_count()} CPUs before start"
    )
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.time_limit)
    started = time.monotonic()
    fast: list[FastResult] = []
    rows: list[Row] = []
    timed_out = False
    try:
        run_all(args, models, log, fast, rows)
    except TimeoutError as exc:  # servers and workers are already stopped
        log(f"{exc}; configurations not reached are left out")
        timed_out = True
    finally:
        signal.alarm(0)
    ratios(fast, rows)
    goals = targets(rows)
    load_after = os.getloadavg()
    print_table(fast, rows, goals)
    wall = time.monotonic() - started
    print(
        f"\n(wall {wall:.1f} s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} "
        f"after, {os.cpu_count()} CPUs; {args.steps} timed steps x {args.repeats} repeat(s) "
        f"per worker after {args.warmup} warm-up; layout {args.layout}; call {args.call})"
    )
    if args.json:
        payload = {
            "environment": environment(),
            "arguments": {k: v for k, v in vars(args).items() if k != "json"},
            "wall_s": round(wall, 1),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "socket_fast": [asdict(f) for f in fast],
            "results": [asdict(r) for r in rows],
            "targets": goals,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if timed_out:
        return 2
    ok = all(f.verified for f in fast) and all(r.verified for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
