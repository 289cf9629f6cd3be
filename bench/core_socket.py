"""paramserve's own server core behind the hand-written socket transport: a what-if for step.py.

The real ``ModelStore`` + ``Aggregator`` (async, Adam from optim_core, non-finite check, store
lock, consistent host copy on read) driven over bench/socket_baseline.py's framing instead of
gRPC: the gradient of all variables is received with ``recv_into`` into one preallocated
buffer, pushed through ``Aggregator.push`` as per-variable views, and the weights from
``ModelStore.read`` go back with ``sendall`` of memoryviews. The gap between this and the
plain socket server is what paramserve's core costs; the gap between paramserve and this is
what the gRPC transport costs. It answers "would a raw data plane meet the targets?".

Frames (``socket_baseline.HEADER``): INIT carries a JSON spec ``[[name, shape], ...]`` (its
byte length in the header's argument) followed by the initial values of all variables,
concatenated in spec order; STEP carries the concatenated gradient and is answered with the
concatenated weights (the header's argument is the new version); CLOSE ends the connection.

Run as a script (``python bench/core_socket.py --port 0``): prints ``PORT <n>``, serves one
connection at a time until stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from socket_baseline import (
    _COALESCE_BYTES,
    HEADER,
    OP_CLOSE,
    OP_INIT,
    OP_STEP,
    _exit_when_stdin_closes,
    recv_exact,
    recv_header,
    send_frame,
)

WORKER_ID = "bench-core-socket"


def _serve_connection(conn: socket.socket) -> None:
    from paramserve.server.aggregator import AggregationConfig, Aggregator
    from paramserve.server.store import ModelStore

    store: ModelStore | None = None
    aggregator: Aggregator | None = None
    grad_buffer = np.empty(0, dtype=np.uint8)
    grads: dict[str, np.ndarray] = {}
    sequence = 0
    while True:
        try:
            op, arg, n = recv_header(conn)
        except ConnectionError:
            return
        if op == OP_INIT:
            payload = np.empty(n, dtype=np.uint8)
            recv_exact(conn, memoryview(payload))
            spec = json.loads(payload[:arg].tobytes())
            values = payload[arg:].view(np.float32)
            variables, offset = {}, 0
            for name, shape in spec:
                size = int(np.prod(shape))
                variables[name] = values[offset : offset + size].reshape(shape).copy()
                offset += size
            store = ModelStore(device="cpu")
            store.create_model("bench", "adam", variables)
            aggregator = Aggregator(store, AggregationConfig(mode="async", replicas=1))
            grad_buffer = np.empty(4 * offset, dtype=np.uint8)
            flat = grad_buffer.view(np.float32)
            grads, offset = {}, 0
            for name, shape in spec:
                size = int(np.prod(shape))
                grads[name] = flat[offset : offset + size].reshape(shape)
                offset += size
            send_frame(conn, OP_INIT, 0)
        elif op == OP_STEP:
            if store is None or aggregator is None or n != grad_buffer.nbytes:
                raise ValueError(f"step of {n} bytes without a matching INIT")
            recv_exact(conn, memoryview(grad_buffer))
            sequence += 1
            aggregator.push(WORKER_ID, sequence, store.version, grads)
            version, weights = store.read()
            views = [
                memoryview(np.ascontiguousarray(w).reshape(-1).view(np.uint8))
                for w in weights.values()
            ]
            header = HEADER.pack(OP_STEP, version, sum(len(v) for v in views))
            if sum(len(v) for v in views) <= _COALESCE_BYTES:
                conn.sendall(b"".join([header, *views]))  # one segment for small models
            else:
                conn.sendall(header)
                for view in views:  # each variable's bytes as they are: no concatenation
                    conn.sendall(view)
        elif op == OP_CLOSE:
            send_frame(conn, OP_CLOSE, 0)
            return
        else:
            raise ValueError(f"unknown op {op}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()

    from paramserve.optim_core import fused

    fused.available()  # load the kernels before we say we are ready
    with socket.create_server((args.host, args.port)) as listener:
        print(f"PORT {listener.getsockname()[1]}", flush=True)
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _serve_connection(conn)


if __name__ == "__main__":
    main()
