"""The systems bench/step.py compares: model sizes, server subprocesses, and one worker each.

Each system is a server script in this directory started in its own process (it prints
``PORT <n>`` when ready and exits when its stdin closes, so it never outlives the benchmark)
plus a :class:`Runner` in the benchmark's process whose ``step()`` is one whole training step:
push the gradient, the server applies Adam, pull the weights. The peers a user would pick
instead of paramserve cannot be restarted per size: ``torch-rpc`` (``init_rpc`` works once per
process) and ``ray`` (the local runtime takes seconds to start) live in :class:`Sessions`, one
per run, and are left out, with the reason printed, when their library is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from socket_baseline import SOCK_BUF_BYTES, BaselineClient  # noqa: E402

SYSTEMS = (
    "paramserve",
    "paramserve-pull",
    "paramserve-push-pull",
    "paramserve-bf16",
    "grpc-raw",
    "core-socket",
    "socket",
    "socket-pipelined",
    "socket-fast",
    "torch-rpc",
    "ray",
)
# Valid in --systems but not run by default: torch-rpc restricted to TensorPipe's TCP
# transport, and the Ray actor on a second local Ray node, so that its objects cross
# between two object stores over the network stack (one torch RPC group and one Ray runtime
# per process: a run takes torch-rpc or torch-rpc-tcp, ray or ray-2node).
# grpc-raw-whole: grpc-raw with Adam applied once after the whole gradient arrived, as a
# server that validates a push before applying it must (what the per-chunk overlap is worth).
EXTRA_SYSTEMS = ("torch-rpc-tcp", "ray-2node", "grpc-raw-whole")
# The yardstick of the targets: the streamed hand-written server.
YARDSTICK = "socket-fast"
SERVER_SCRIPTS = {
    "paramserve": "paramserve_server.py",
    "paramserve-pull": "paramserve_server.py",
    "paramserve-push-pull": "paramserve_server.py",
    "paramserve-bf16": "paramserve_server.py",
    "grpc-raw": "grpc_floor.py",
    "grpc-raw-whole": "grpc_floor.py",
    "core-socket": "core_socket.py",
    "socket": "socket_baseline.py",
    "socket-pipelined": "socket_baseline.py",
    "socket-fast": "socket_baseline.py",
}
# Peers whose library may be missing: system -> the module it needs.
OPTIONAL_LIBRARIES = {
    "torch-rpc": "torch",
    "torch-rpc-tcp": "torch",
    "ray": "ray",
    "ray-2node": "ray",
}
# Ray's object store for the run: room for a few 64 MiB gradients and weights in flight.
RAY_OBJECT_STORE_BYTES = 1 << 30
# ray-2node: the custom resource only the second node has, so the actor is placed there.
RAY_SERVER_RESOURCE = "paramserver"
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


def server_script(system: str) -> str | None:
    """The server script of ``system`` (None: a peer living in ``Sessions``)."""
    if stripe_system(system) is not None:
        return SERVER_SCRIPTS["paramserve"]
    return SERVER_SCRIPTS.get(system)


def server_args(system: str) -> tuple[str, ...]:
    """Command-line arguments of a system's server script."""
    if system in ("grpc-raw", "grpc-raw-whole"):  # paramserve's chunk size, to compare alike
        from paramserve.wire import CHUNK_BYTES

        whole = ("--apply", "whole") if system == "grpc-raw-whole" else ()
        return ("--chunk-bytes", str(CHUNK_BYTES), *whole)
    if system == "socket-fast":
        return ("--sock-buf", str(SOCK_BUF_BYTES))
    return ()


def missing_library(system: str) -> str | None:
    """Why ``system`` cannot run here (its library is not installed), or None."""
    module = OPTIONAL_LIBRARIES.get(system)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{system}: skipped, {module!r} is not installed (pip install -e '.[bench]')"
    return None


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


def _count(text: str, whole: str) -> int:
    """``16M`` / ``1K`` / ``300``: an element count (K/M/G in powers of two)."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        n = int(text[:-1] if mult != 1 else text) * mult
    except ValueError:
        raise ValueError(f"not a size: {whole!r}") from None
    if n <= 0:
        raise ValueError(f"size must be positive: {whole!r}")
    return n


def parse_size(text: str) -> Model:
    """``16M`` / ``1M`` / ``10K`` / ``4096`` (one variable), ``small`` (an MLP), or ``NxM``
    (``300x1K``: N variables of M floats each, named ``v000``, ``v001``, ...)."""
    t = text.strip()
    if t.lower() == "small":
        return Model("small", dict(SMALL_MODEL))
    if "x" in t.lower():
        count, _, each = t.lower().partition("x")
        n, m = _count(count, text), _count(each.upper(), text)
        width = len(str(n - 1))
        return Model(f"{n}x{each.upper()}", {f"v{i:0{width}d}": (m,) for i in range(n)})
    n = _count(t, text)
    return Model(t.upper() if t[-1:].isalpha() else t, {"w": (n,)})


def one_variable_twin(model: Model) -> Model | None:
    """For a many-variable size (``NxM``), the one-variable model of the same total floats
    (None for the other sizes): bench/step.py measures it in the same run for the
    "many-vars / one-var same bytes" ratio."""
    if len(model.shapes) < 2 or model.label == "small":
        return None
    n = model.elements
    label = f"{n >> 10}K" if n % (1 << 10) == 0 else str(n)
    return Model(label, {"w": (n,)})


def reference_weights(model: Model, steps: int, wire_dtype: str | None = None) -> np.ndarray:
    """Flat weights after ``steps`` local optim_core Adam steps with the model's gradient.

    ``wire_dtype``: each step applies what the SDK sends (the gradient plus its error-
    feedback residual, rounded to that dtype, widened), and the weights come back rounded.
    """
    from paramserve import optim_core
    from paramserve.client import ErrorFeedback
    from paramserve.wire import dtype_from_name

    variables = [optim_core.Variable(model.init[n].copy(), path=n) for n in model.shapes]
    opt = optim_core.get("adam")
    opt.build(variables)
    names = list(model.shapes)
    grads = [model.grads[n] for n in names]
    feedback = ErrorFeedback()
    for _ in range(steps):
        if wire_dtype is None:
            opt.apply(grads, variables)
            continue
        sent, made = feedback.compress(names, grads, wire_dtype)
        opt.apply([g.astype(np.float32) for g in sent], variables)
        feedback.finish(made, taken=True)
    flat = np.concatenate([v.value.reshape(-1) for v in variables])
    if wire_dtype is None:
        return flat
    return flat.astype(dtype_from_name(wire_dtype)).astype(np.float32)


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
    # The process that applies the updates, for the CPU column (None: the server script's).
    server_pid: int | None = None

    def step(self) -> None:
        raise NotImplementedError

    def weights(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SocketRunner(Runner):
    """The hand-written servers (``mode``: serial, pipelined or fast) and core-socket."""

    def __init__(self, port: int, model: Model, *, mode: str, core: bool = False) -> None:
        names = {"serial": "socket", "pipelined": "socket-pipelined", "fast": "socket-fast"}
        self.name = "core-socket" if core else names[mode]
        self.mode = mode
        sock_buf = SOCK_BUF_BYTES if mode == "fast" else 0
        self.client = BaselineClient(("127.0.0.1", port), sock_buf=sock_buf)
        # core-socket: the paramserve core needs the variables' names and shapes first.
        spec = json.dumps([[n, list(s)] for n, s in model.shapes.items()]).encode()
        self.client.init(model.flat(model.init), prefix=spec if core else b"")
        self.grad = model.flat(model.grads)
        self.out = np.empty_like(self.grad)

    def step(self) -> None:
        if self.mode == "fast":
            self.client.step_stream(self.grad, self.out)
        else:
            self.client.step(self.grad, self.out, pipelined=self.mode == "pipelined")

    def weights(self) -> np.ndarray:
        return self.out.copy()

    def close(self) -> None:
        self.client.close()


class GrpcRawRunner(Runner):
    name = "grpc-raw"

    def __init__(self, port: int, model: Model, *, whole: bool = False) -> None:
        from grpc_floor import GrpcRawClient

        self.name = "grpc-raw-whole" if whole else "grpc-raw"

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


def stripe_system(system: str) -> tuple[int, bool] | None:
    """``(K, own channels)`` of ``paramserve-kK`` (striped pulls over K streams of the
    client's channel) or ``paramserve-kKc`` (each stripe on a TCP connection of its own);
    None for any other system."""
    prefix = "paramserve-k"
    if not system.startswith(prefix):
        return None
    text = system[len(prefix) :]
    own = text.endswith("c")
    text = text[:-1] if own else text
    if not text.isdigit() or not 1 <= int(text) <= 64:
        return None
    return int(text), own


class ParamserveRunner(Runner):
    """The SDK as a worker uses it: ``Client.step`` (one RPC) for a model that fits
    ``STEP_MAX_BYTES`` each way, as RemoteOptimizer does, else ``push`` then ``pull`` into
    the worker's arrays (``out=``, as RemoteOptimizer does, and as grpc-raw's worker does);
    ``push_pull`` forces the latter; ``alloc`` is the plain call a user writes first,
    ``push`` then ``pull()`` into new arrays, at every size. ``wire_dtype``: the client's
    compression (``paramserve-bf16``: gradients and weights as bfloat16, error feedback)."""

    def __init__(
        self,
        port: int,
        model: Model,
        *,
        push_pull: bool = False,
        alloc: bool = False,
        wire_dtype: str | None = None,
        stripes: tuple[int, bool] | None = None,
    ) -> None:
        from paramserve.client import Client

        self.name = (
            "paramserve-pull" if alloc else "paramserve-push-pull" if push_pull else "paramserve"
        )
        if wire_dtype == "bfloat16":
            self.name = "paramserve-bf16"
        if stripes is not None:  # paramserve with pull_streams=K (see stripe_system)
            self.name = f"paramserve-k{stripes[0]}{'c' if stripes[1] else ''}"
        self.wire_dtype = wire_dtype
        self.model = model
        self.alloc = alloc
        self.use_step = not push_pull and not alloc and fits_one_step(model)
        self.client = Client(
            f"127.0.0.1:{port}",
            worker_id="bench-step",
            timeout_s=60.0,
            wire_dtype=wire_dtype,
            pull_streams=1 if stripes is None else stripes[0],
        )
        if stripes is not None:
            self.client._own_stripe_channels = stripes[1]
        self.client.__enter__()
        self.client.create_model(dict(model.init), optimizer="adam")
        self.grads = dict(model.grads)
        self.out = {n: np.empty_like(v) for n, v in model.init.items()}
        self.pulled: dict[str, np.ndarray] = {}

    def step(self) -> None:
        if self.use_step:
            self.pulled = self.client.step(self.grads)
        elif self.alloc:
            self.client.push(self.grads)
            self.pulled = self.client.pull()
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


def make_runner(system: str, port: int, model: Model, sessions: Sessions) -> Runner:
    """The worker for ``system`` (one of SYSTEMS), connected and initialised; ``port`` is
    its server script's (unused by the peers in ``sessions``)."""
    stripes = stripe_system(system)
    if stripes is not None:
        return ParamserveRunner(port, model, stripes=stripes)
    if system in ("paramserve", "paramserve-push-pull", "paramserve-pull", "paramserve-bf16"):
        return ParamserveRunner(
            port,
            model,
            push_pull=system == "paramserve-push-pull",
            alloc=system == "paramserve-pull",
            wire_dtype="bfloat16" if system == "paramserve-bf16" else None,
        )
    if system in ("grpc-raw", "grpc-raw-whole"):
        return GrpcRawRunner(port, model, whole=system == "grpc-raw-whole")
    if system in ("torch-rpc", "torch-rpc-tcp"):
        return TorchRpcRunner(sessions.torch_rpc(tcp_only=system == "torch-rpc-tcp"), model)
    if system in ("ray", "ray-2node"):
        return RayRunner(sessions, model, two_nodes=system == "ray-2node")
    modes = {"socket-pipelined": "pipelined", "socket-fast": "fast"}
    return SocketRunner(port, model, mode=modes.get(system, "serial"), core=system == "core-socket")


# --- the peers a user would pick instead -------------------------------------------------
class TorchRpcSession:
    """bench/torch_rpc_server.py in a subprocess and this process as RPC rank 1 (worker)."""

    def __init__(self, env: dict[str, str], *, tcp_only: bool = False) -> None:
        import torch_rpc_server as ps
        from torch.distributed import rpc

        self.tcp_only = tcp_only
        args = ("--tcp-only",) if tcp_only else ()
        self.server = ServerProcess("torch_rpc_server.py", *args, env=env)
        try:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(self.server.port)
            rpc.init_rpc(
                ps.WORKER_NAME, rank=1, world_size=2, rpc_backend_options=ps.rpc_options(tcp_only)
            )
        except BaseException:
            self.server.close()
            raise
        self.pid = rpc.rpc_sync(ps.SERVER_NAME, ps.server_pid)

    def close(self) -> None:
        from torch.distributed import rpc

        with contextlib.suppress(Exception):
            rpc.shutdown()
        self.server.close()


class TorchRpcRunner(Runner):
    """``rpc_sync`` push of the gradient tensor, then ``rpc_sync`` pull of the weights (a
    new tensor each step, as RPC returns it)."""

    def __init__(self, session: TorchRpcSession, model: Model) -> None:
        self.name = "torch-rpc-tcp" if session.tcp_only else "torch-rpc"
        import torch
        import torch_rpc_server as ps
        from torch.distributed import rpc

        self.rpc, self.ps = rpc, ps
        self.server_pid = session.pid
        rpc.rpc_sync(ps.SERVER_NAME, ps.init, args=(torch.from_numpy(model.flat(model.init)),))
        self.grad = torch.from_numpy(model.flat(model.grads))
        self.pulled = torch.from_numpy(model.flat(model.init))

    def step(self) -> None:
        self.rpc.rpc_sync(self.ps.SERVER_NAME, self.ps.push, args=(self.grad,))
        self.pulled = self.rpc.rpc_sync(self.ps.SERVER_NAME, self.ps.pull)

    def weights(self) -> np.ndarray:
        return self.pulled.numpy().copy()


class RayRunner(Runner):
    """A Ray actor holding the weights (bench/ray_actor.py): ``actor.push.remote(grad)``,
    then ``ray.get(actor.pull.remote())`` (a read-only array backed by Ray's object store)."""

    def __init__(self, sessions: Sessions, model: Model, *, two_nodes: bool = False) -> None:
        import ray_actor

        self.name = "ray-2node" if two_nodes else "ray"
        self.ray = ray = sessions.ray(two_nodes=two_nodes)
        resources = {RAY_SERVER_RESOURCE: 1.0} if two_nodes else None
        actor_class = ray_actor.remote_class(ray, sessions.env, resources)
        self.actor = actor_class.remote(model.flat(model.init))
        self.server_pid = ray.get(self.actor.pid.remote())
        self.grad = model.flat(model.grads)
        self.pulled = model.flat(model.init)

    def step(self) -> None:
        self.actor.push.remote(self.grad)
        self.pulled = self.ray.get(self.actor.pull.remote())

    def weights(self) -> np.ndarray:
        return np.array(self.pulled, copy=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(self.actor)


class Sessions:
    """The peers' long-lived parts, started on first use and closed once at the end."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {}
        self._torch: TorchRpcSession | None = None
        self._ray: Any = None
        self._ray_two_nodes = False
        self._ray_cluster: Any = None

    def torch_rpc(self, *, tcp_only: bool = False) -> TorchRpcSession:
        if self._torch is None:
            self._torch = TorchRpcSession(self.env, tcp_only=tcp_only)
        elif self._torch.tcp_only != tcp_only:
            raise RuntimeError("one torch RPC group per process: torch-rpc or torch-rpc-tcp")
        return self._torch

    def ray(self, *, two_nodes: bool = False) -> Any:
        """The ``ray`` module with a local runtime, no dashboard, 1 GiB object store per node:
        one node with 2 CPUs, or with ``two_nodes`` a head node (1 CPU, the driver) and a
        second node (1 CPU, ``RAY_SERVER_RESOURCE``) for the actor."""
        if self._ray is not None:
            if self._ray_two_nodes != two_nodes:
                raise RuntimeError("one Ray runtime per process: ray or ray-2node")
            return self._ray
        import ray

        # Ray's workers inherit this process's environment: bench/ on their path (for
        # ray_actor). The allocator settings go to the actor alone (ray_actor).
        path = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), path) if p)
        quiet = {"log_to_driver": False, "configure_logging": False}
        if two_nodes:
            from ray.cluster_utils import Cluster

            store = {"object_store_memory": RAY_OBJECT_STORE_BYTES}
            self._ray_cluster = Cluster(
                initialize_head=True,
                head_node_args={"num_cpus": 1, "include_dashboard": False, **store},
            )
            self._ray_cluster.add_node(num_cpus=1, resources={RAY_SERVER_RESOURCE: 1}, **store)
            ray.init(address=self._ray_cluster.address, **quiet)
        else:
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                object_store_memory=RAY_OBJECT_STORE_BYTES,
                **quiet,
            )
        self._ray, self._ray_two_nodes = ray, two_nodes
        return ray

    def close(self) -> None:
        if self._torch is not None:
            self._torch.close()
            self._torch = None
        if self._ray is not None:
            with contextlib.suppress(Exception):
                self._ray.shutdown()
            self._ray = None
        if self._ray_cluster is not None:
            with contextlib.suppress(Exception):
                self._ray_cluster.shutdown()
            self._ray_cluster = None
