"""The systems bench/step.py compares: model sizes, server subprocesses, and one worker each.

Each system is a server script in this directory started in its own process (it prints
``PORT <n>`` when ready and exits when its stdin closes, so it never outlives the benchmark)
plus a :class:`Runner` in the benchmark's process whose ``step()`` is one whole training step:
push the gradient, the server applies Adam, pull the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from socket_baseline import BaselineClient  # noqa: E402

SYSTEMS = (
    "paramserve",
    "paramserve-push-pull",
    "grpc-raw",
    "core-socket",
    "socket",
    "socket-pipelined",
)
SERVER_SCRIPTS = {
    "paramserve": "paramserve_server.py",
    "paramserve-push-pull": "paramserve_server.py",
    "grpc-raw": "grpc_floor.py",
    "core-socket": "core_socket.py",
    "socket": "socket_baseline.py",
    "socket-pipelined": "socket_baseline.py",
}
SMALL_MODEL = {
    "dense/kernel": (64, 128),
    "dense/bias": (128,),
    "out/kernel": (128, 10),
    "out/bias": (10,),
}
START_TIMEOUT_S = 90.0  # first start may compile the numba kernels
# glibc allocator settings of paramserve.wire.tune_malloc, as environment variables
# for server processes (--malloc tuned gives them to every server, so all compare alike).
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "MALLOC_ARENA_MAX": "1",
}


def server_args(system: str) -> tuple[str, ...]:
    """Command-line arguments of a system's server script."""
    if system == "grpc-raw":  # the same chunk size as paramserve, so the floor compares alike
        from paramserve.wire import CHUNK_BYTES

        return ("--chunk-bytes", str(CHUNK_BYTES))
    return ()


# --- model definitions ------------------------------------------------------------------
@dataclass
class Model:
    """Variables (name -> shape) of one benchmark size, with fixed initial values and grads."""

    label: str
    shapes: dict[str, tuple[int, ...]]
    init: dict[str, np.ndarray] = field(default_factory=dict)
    grads: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def elements(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes.values())

    @property
    def nbytes(self) -> int:
        return 4 * self.elements

    def materialize(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        for name, shape in self.shapes.items():
            self.init[name] = rng.standard_normal(shape, dtype=np.float32)
            self.grads[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)

    def flat(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(arrays[n]).reshape(-1) for n in self.shapes])


def parse_size(text: str) -> Model:
    """``16M`` / ``1M`` / ``10K`` / ``4096`` (one variable) or ``small`` (an MLP)."""
    t = text.strip()
    if t.lower() == "small":
        return Model("small", dict(SMALL_MODEL))
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:].upper(), 1)
    n = int(t[:-1] if mult != 1 else t) * mult
    if n <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return Model(t.upper() if mult != 1 else t, {"w": (n,)})


def reference_weights(model: Model, steps: int) -> np.ndarray:
    """Flat weights after ``steps`` local optim_core Adam steps with the model's gradient."""
    from paramserve import optim_core

    variables = [optim_core.Variable(model.init[n].copy(), path=n) for n in model.shapes]
    opt = optim_core.get("adam")
    opt.build(variables)
    grads = [model.grads[n] for n in model.shapes]
    for _ in range(steps):
        opt.apply(grads, variables)
    return np.concatenate([v.value.reshape(-1) for v in variables])


# --- server subprocesses ------------------------------------------------------------------
class ServerProcess:
    """A server script in a subprocess that prints ``PORT <n>``; stopped on close()."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.name = script
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / script), "--port", "0", *args],
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        try:
            self.port = self._read_port()
        except BaseException:
            self.close()
            raise

    def _read_port(self) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"{self.name}: no PORT line in {START_TIMEOUT_S:.0f} s")
                chunk = os.read(self.proc.stdout.fileno(), 256)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited early:\n{self.stderr_tail()}")
                line += chunk
        words = line.decode().split()
        if len(words) != 2 or words[0] != "PORT":
            raise RuntimeError(f"{self.name}: unexpected first line {line!r}")
        return int(words[1])

    def stderr_tail(self, n_bytes: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n_bytes:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin:
                self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


# --- the systems under test ------------------------------------------------------------------
class Runner:
    """One system's worker: ``step()`` is one whole training step; ``weights()`` the last pull."""

    name: str

    def step(self) -> None:
        raise NotImplementedError

    def weights(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SocketRunner(Runner):
    def __init__(self, port: int, model: Model, *, pipelined: bool, core: bool = False) -> None:
        self.name = "core-socket" if core else "socket-pipelined" if pipelined else "socket"
        self.pipelined = pipelined
        self.client = BaselineClient(("127.0.0.1", port))
        # core-socket: the paramserve core needs the variables' names and shapes first.
        spec = json.dumps([[n, list(s)] for n, s in model.shapes.items()]).encode()
        self.client.init(model.flat(model.init), prefix=spec if core else b"")
        self.grad = model.flat(model.grads)
        self.out = np.empty_like(self.grad)

    def step(self) -> None:
        self.client.step(self.grad, self.out, pipelined=self.pipelined)

    def weights(self) -> np.ndarray:
        return self.out.copy()

    def close(self) -> None:
        self.client.close()


class GrpcRawRunner(Runner):
    name = "grpc-raw"

    def __init__(self, port: int, model: Model) -> None:
        from grpc_floor import GrpcRawClient

        from paramserve.wire import CHUNK_BYTES

        self.client = GrpcRawClient(port, chunk_bytes=CHUNK_BYTES)
        self.client.init(model.flat(model.init))
        self.grad = model.flat(model.grads)
        self.out = np.empty_like(self.grad)

    def step(self) -> None:
        self.client.step(self.grad, self.out)

    def weights(self) -> np.ndarray:
        return self.out.copy()

    def close(self) -> None:
        self.client.close()


class ParamserveRunner(Runner):
    """The SDK as a worker uses it: ``Client.step`` (one RPC) for a model that fits
    ``STEP_MAX_BYTES`` each way, as RemoteOptimizer does, else ``push`` then ``pull`` into
    the worker's arrays (``out=``, as RemoteOptimizer does, and as grpc-raw's worker does);
    ``push_pull`` forces the latter."""

    def __init__(self, port: int, model: Model, *, push_pull: bool = False) -> None:
        from paramserve.client import Client

        self.name = "paramserve-push-pull" if push_pull else "paramserve"
        self.model = model
        self.use_step = not push_pull and fits_one_step(model)
        self.client = Client(f"127.0.0.1:{port}", worker_id="bench-step", timeout_s=60.0)
        self.client.__enter__()
        self.client.create_model(dict(model.init), optimizer="adam")
        self.grads = dict(model.grads)
        self.out = {n: np.empty_like(v) for n, v in model.init.items()}
        self.pulled: dict[str, np.ndarray] = {}

    def step(self) -> None:
        if self.use_step:
            self.pulled = self.client.step(self.grads)
        else:
            self.client.push(self.grads)
            self.pulled = self.client.pull(out=self.out)

    def weights(self) -> np.ndarray:
        return self.model.flat(self.pulled)

    def close(self) -> None:
        self.client.__exit__(None, None, None)


def fits_one_step(model: Model) -> bool:
    """Whether the SDK's RemoteOptimizer would use one Step call for this model."""
    from paramserve.client.remote import STEP_MAX_BYTES

    return model.nbytes <= STEP_MAX_BYTES


def systems_for(model: Model, systems: list[str]) -> list[str]:
    """``systems`` less paramserve-push-pull where it is what paramserve does anyway."""
    if fits_one_step(model):
        return systems
    return [s for s in systems if not (s == "paramserve-push-pull" and "paramserve" in systems)]


def make_runner(system: str, port: int, model: Model) -> Runner:
    """The worker for ``system`` (one of SYSTEMS), connected and initialised."""
    if system in ("paramserve", "paramserve-push-pull"):
        return ParamserveRunner(port, model, push_pull=system == "paramserve-push-pull")
    if system == "grpc-raw":
        return GrpcRawRunner(port, model)
    return SocketRunner(
        port, model, pipelined=system == "socket-pipelined", core=system == "core-socket"
    )
