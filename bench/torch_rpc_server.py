"""The PyTorch RPC parameter-server pattern, for bench/step.py: a server process holding weights.

What a PyTorch user writes instead of paramserve (the pattern of the PyTorch "parameter
server with RPC" tutorial, CPU only): two processes joined by ``torch.distributed.rpc``
(world size 2, TensorPipe backend with its default transports and channels, rendezvous on
``MASTER_ADDR``/``MASTER_PORT`` over loopback); this one, rank 0 named ``ps``, holds the
weights as one flat float32 tensor, and the worker (rank 1, in the benchmark's process) calls
``rpc_sync("ps", push, (grad,))`` then ``rpc_sync("ps", pull)``. The update is paramserve's
fused numba Adam (``paramserve.optim_core.fused.adam``, with the bias correction of
bench/socket_baseline.py's ``AdamState``) on numpy views of the tensors, not ``torch.optim.Adam``:
Keras's Adam (epsilon outside the bias correction) and torch's differ in rounding, and the
benchmark checks every system's weights bit for bit against optim_core's Adam, so all
systems do the same arithmetic and differ only in how the bytes travel.

``init``/``push``/``pull`` run here when the worker calls them: RPC names a function by its
module, so they are resolved as ``torch_rpc_server.<name>`` (this directory is on the path of
both processes) and keep their state in this module's globals.

Run as a script (``python bench/torch_rpc_server.py --port 0``): picks a free port when given
0, prints ``PORT <n>`` (the rendezvous port for the worker's ``MASTER_PORT``), joins the RPC
group (which waits for the worker) and serves until the worker shuts RPC down, stdin closes
or SIGTERM. ``init_rpc`` works once per process, so one server serves every size of a run
(``init`` resets the state).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from socket_baseline import AdamState, _exit_when_stdin_closes

SERVER_NAME = "ps"
WORKER_NAME = "worker"
RPC_TIMEOUT_S = 120.0
_state: dict[str, AdamState] = {}


def init(weights: torch.Tensor) -> None:
    """Take new initial weights (any shape, flattened); reset Adam's slots and step count."""
    _state["adam"] = AdamState(weights.detach().reshape(-1).numpy())


def push(grad: torch.Tensor) -> None:
    """Apply one Adam step with ``grad`` (flat float32) in place."""
    from paramserve.optim_core import fused

    state = _state["adam"]
    fused.adam(state.w, grad.numpy(), state.m, state.v, *state.scalars())
    state.iterations += 1


def pull() -> torch.Tensor:
    """The current weights: a tensor sharing the server's buffer (TensorPipe sends it)."""
    return torch.from_numpy(_state["adam"].w)


def server_pid() -> int:
    """This process's id, for the benchmark's CPU accounting."""
    return os.getpid()


def rpc_options(tcp_only: bool = False) -> torch.distributed.rpc.TensorPipeRpcBackendOptions:
    """The backend options both ranks use: TensorPipe's defaults (on one host it may move
    tensors through shared memory or cross-memory attach), or with ``tcp_only`` its TCP
    transport (``uv``) and plain channel (``basic``) alone, as between two hosts; a generous
    timeout either way."""
    from torch.distributed import rpc

    if tcp_only:
        return rpc.TensorPipeRpcBackendOptions(
            rpc_timeout=RPC_TIMEOUT_S, _transports=["uv"], _channels=["basic"]
        )
    return rpc.TensorPipeRpcBackendOptions(rpc_timeout=RPC_TIMEOUT_S)


def free_port(host: str) -> int:
    """A port nobody listens on now (the rendezvous store binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="rendezvous port (0: a free one)")
    parser.add_argument("--tcp-only", action="store_true", help="TensorPipe over TCP alone")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()

    from torch.distributed import rpc

    from paramserve.optim_core import fused

    if not fused.available():
        raise SystemExit("numba kernels unavailable: the server needs fused.adam")
    one = np.zeros(8, dtype=np.float32)
    fused.adam(one, one.copy(), one.copy(), one.copy(), 0.1, 0.1, 0.1, 1e-7)  # load now
    torch.set_num_threads(1)
    port = args.port or free_port(args.host)
    os.environ["MASTER_ADDR"] = args.host
    os.environ["MASTER_PORT"] = str(port)
    print(f"PORT {port}", flush=True)
    rpc.init_rpc(SERVER_NAME, rank=0, world_size=2, rpc_backend_options=rpc_options(args.tcp_only))
    with contextlib.suppress(Exception):
        rpc.shutdown()  # waits until the worker shuts down too
    os._exit(0)


if __name__ == "__main__":
    main()
