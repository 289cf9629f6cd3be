"""A minimal hand-written TCP parameter server: the yardstick that bench/step.py compares with.

What a competent engineer writes in an afternoon, with no framework: one flat float32 buffer
of weights and Adam's two slots, length-prefixed frames over one TCP connection, the gradient
received with ``recv_into`` straight into a preallocated buffer, the same fused numba Adam
as paramserve (``paramserve.optim_core.fused.adam``, with Keras's bias correction computed
exactly as ``optim_core.adam`` does, so the weights match bit for bit), and the weights sent
back with ``sendall`` of a memoryview (no copies in Python).

Three step variants:

* serial (``OP_STEP``): receive the whole gradient, apply, send the weights;
* pipelined (``OP_STEP_PIPELINED``): apply each ``chunk_bytes`` piece as soon as it has
  arrived, while the kernel's socket buffer takes in the next one (Adam is elementwise, so
  this is exact), then send the weights;
* streamed (``OP_STEP_STREAM``, the yardstick): the reply header goes out first, then for
  each ``chunk_bytes`` piece the server receives the gradient piece, applies Adam to it and
  at once sends that piece of the new weights back, while the worker sends the rest of the
  gradient from a second thread and receives the weights into its array as they come. Both
  directions of the connection are busy at once; nothing is copied in Python (memoryview
  slices of the arrays, ``recv_into``, ``sendmsg`` of header and payload together);
  TCP_NODELAY is on, and the socket buffers are the faster of a fixed SO_SNDBUF/SO_RCVBUF
  and the kernel's autotuning as measured (see ``SOCK_BUF_BYTES``).
  A step that fits one piece is a plain request and reply, one ``sendmsg`` each way, with no
  thread hand-off.

Frames: a 16-byte header ``<IIQ`` (op, argument, payload bytes), then the payload. Every
request is answered with a frame carrying the same op. Ops: INIT (payload: initial weights;
resets the slots and the step count), STEP, STEP_PIPELINED, STEP_STREAM (payload: the
gradient; the argument: the piece size in bytes, 0 for the default; answer: the new weights,
the argument the step count), CLOSE.

Run as a script (``python bench/socket_baseline.py --port 0``): it loads the kernel, prints
``PORT <n>`` on stdout and serves connections one after another until stdin closes (so it
never outlives the benchmark that started it) or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable

import numpy as np

HEADER = struct.Struct("<IIQ")
OP_INIT = 1
OP_STEP = 2
OP_STEP_PIPELINED = 3
OP_CLOSE = 4
OP_STEP_STREAM = 5
CHUNK_BYTES = 4 << 20
# Piece size of the streamed step. Measured on the 2-core bench machine at 16M floats (median
# steps/s of 5 interleaved repeats): 256 KiB 24.8, 1 MiB 27.8, 4 MiB 28.6, serial 25.6.
STREAM_CHUNK_BYTES = 4 << 20
# SO_SNDBUF/SO_RCVBUF of the streamed variant's sockets; 0 leaves them to the kernel. Setting
# them turns Linux's buffer autotuning off and is capped at net.core.[rw]mem_max (4 MiB there,
# granted doubled), below autotuning's ceiling (tcp_rmem max, 32 MiB there): in the same A/B,
# 4 MiB buffers gave 26.3 steps/s against 28.6 with autotuning. So the yardstick takes the
# faster choice; ``--sock-buf`` (server) and ``sock_buf`` (client) set a size.
SOCK_BUF_BYTES = 0
# Below this, header and payload go out in one send (one segment with TCP_NODELAY).
_COALESCE_BYTES = 64 << 10

# Keras 3 Adam defaults, the same as paramserve's "adam".
LEARNING_RATE = 0.001
BETA_1 = 0.9
BETA_2 = 0.999
EPSILON = 1e-7


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (recv_into, no intermediate bytes objects)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k


def recv_header(sock: socket.socket) -> tuple[int, int, int]:
    buf = bytearray(HEADER.size)
    recv_exact(sock, memoryview(buf))
    return HEADER.unpack(buf)


def send_frame(sock: socket.socket, op: int, arg: int, payload: memoryview | None = None) -> None:
    """Header plus payload; small frames in a single send so they cost one segment."""
    n = 0 if payload is None else len(payload)
    header = HEADER.pack(op, arg, n)
    if payload is None or n == 0:
        sock.sendall(header)
    elif n <= _COALESCE_BYTES:
        sock.sendall(header + bytes(payload))
    else:
        sock.sendall(header)
        sock.sendall(payload)


def send_parts(sock: socket.socket, parts: list[memoryview | bytes]) -> None:
    """Send all ``parts`` with ``sendmsg`` (gather I/O: no joined copy), resuming on a
    partial send."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def tune_socket(sock: socket.socket, buf_bytes: int) -> None:
    """TCP_NODELAY, and SO_SNDBUF/SO_RCVBUF of ``buf_bytes`` (0: the kernel's autotuning)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buf_bytes > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf_bytes)


def _byte_view(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8)).cast("B")


class AdamState:
    """Weights, gradient buffer and Adam slots, flat float32, updated in place."""

    def __init__(self, weights: np.ndarray) -> None:
        self.w = np.array(weights, dtype=np.float32).reshape(-1)
        self.g = np.empty_like(self.w)
        self.m = np.zeros_like(self.w)
        self.v = np.zeros_like(self.w)
        self.iterations = 0

    def scalars(self) -> tuple[np.float32, np.float32, np.float32, np.float32]:
        """``alpha, 1-b1, 1-b2, eps`` for the next step, with optim_core.adam's exact ops."""
        dt = np.float32
        lr = dt(LEARNING_RATE)
        t = dt(self.iterations + 1)
        beta_1_power = np.power(dt(BETA_1), t)
        beta_2_power = np.power(dt(BETA_2), t)
        alpha = lr * np.sqrt(dt(1) - beta_2_power) / (dt(1) - beta_1_power)
        return alpha, dt(1 - BETA_1), dt(1 - BETA_2), dt(EPSILON)


def _serve_connection(conn: socket.socket, adam_fn: Callable[..., None]) -> None:
    state: AdamState | None = None
    while True:
        try:
            op, arg, n = recv_header(conn)
        except ConnectionError:
            return
        if op == OP_INIT:
            init = np.empty(n // 4, dtype=np.float32)
            recv_exact(conn, _byte_view(init))
            state = AdamState(init)
            send_frame(conn, OP_INIT, 0)
        elif op in (OP_STEP, OP_STEP_PIPELINED):
            if state is None or n != state.g.nbytes:
                raise ValueError(f"step of {n} bytes without a matching INIT")
            g_bytes = _byte_view(state.g)
            scalars = state.scalars()
            if op == OP_STEP:
                recv_exact(conn, g_bytes)
                adam_fn(state.w, state.g, state.m, state.v, *scalars)
            else:
                chunk = (arg or CHUNK_BYTES) // 4
                for a in range(0, state.w.size, chunk):
                    b = min(a + chunk, state.w.size)
                    recv_exact(conn, g_bytes[4 * a : 4 * b])
                    adam_fn(state.w[a:b], state.g[a:b], state.m[a:b], state.v[a:b], *scalars)
            state.iterations += 1
            send_frame(conn, op, state.iterations, _byte_view(state.w))
        elif op == OP_STEP_STREAM:
            if state is None or n != state.g.nbytes:
                raise ValueError(f"step of {n} bytes without a matching INIT")
            _stream_step(conn, state, adam_fn, arg or STREAM_CHUNK_BYTES)
        elif op == OP_CLOSE:
            send_frame(conn, OP_CLOSE, 0)
            return
        else:
            raise ValueError(f"unknown op {op}")


def _stream_step(
    conn: socket.socket, state: AdamState, adam_fn: Callable[..., None], chunk_bytes: int
) -> None:
    """Receive, apply and send back piece by piece; the header leaves with the first piece."""
    g_bytes, w_bytes = _byte_view(state.g), _byte_view(state.w)
    scalars = state.scalars()
    state.iterations += 1
    header: bytes = HEADER.pack(OP_STEP_STREAM, state.iterations, state.w.nbytes)
    chunk = max(chunk_bytes // 4, 1)
    for a in range(0, state.w.size, chunk):
        b = min(a + chunk, state.w.size)
        recv_exact(conn, g_bytes[4 * a : 4 * b])
        adam_fn(state.w[a:b], state.g[a:b], state.m[a:b], state.v[a:b], *scalars)
        send_parts(conn, [header, w_bytes[4 * a : 4 * b]])
        header = b""


def serve(host: str, port: int, sock_buf: int = 0) -> None:
    """Print ``PORT <n>`` once ready, then serve one connection at a time forever.

    ``sock_buf`` > 0 sets SO_SNDBUF/SO_RCVBUF of every connection (set on the listener, so
    accepted sockets start with it and the TCP window is scaled for it)."""
    from paramserve.optim_core import fused

    if not fused.available():
        raise SystemExit("numba kernels unavailable: the baseline needs fused.adam")
    one = np.zeros(8, dtype=np.float32)
    fused.adam(one, one.copy(), one.copy(), one.copy(), 0.1, 0.1, 0.1, 1e-7)  # load/compile now
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune_socket(listener, sock_buf)
        listener.bind((host, port))
        listener.listen()
        print(f"PORT {listener.getsockname()[1]}", flush=True)
        while True:
            conn, _ = listener.accept()
            with conn:
                tune_socket(conn, sock_buf)
                _serve_connection(conn, fused.adam)


class BaselineClient:
    """The worker side: one connection; ``step`` pushes a gradient and receives the weights.

    ``sock_buf`` > 0 sets SO_SNDBUF/SO_RCVBUF before connecting (0: the kernel's autotuning).
    """

    def __init__(
        self, address: tuple[str, int], *, timeout_s: float = 60.0, sock_buf: int = 0
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tune_socket(self.sock, sock_buf)
            self.sock.settimeout(timeout_s)
            self.sock.connect(address)
        except BaseException:
            self.sock.close()
            raise
        self._sender: _Sender | None = None

    def init(self, weights: np.ndarray, *, prefix: bytes = b"") -> None:
        """Send the initial weights (after ``prefix`` bytes, announced in the argument)."""
        flat = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
        payload = memoryview(prefix + _byte_view(flat).tobytes()) if prefix else _byte_view(flat)
        send_frame(self.sock, OP_INIT, len(prefix), payload)
        self._expect(OP_INIT, 0)

    def step(
        self, grad: np.ndarray, out: np.ndarray, *, pipelined: bool = False, chunk_bytes: int = 0
    ) -> int:
        """Push ``grad`` (flat float32), write the new weights into ``out``; returns the step."""
        op = OP_STEP_PIPELINED if pipelined else OP_STEP
        send_frame(self.sock, op, chunk_bytes, _byte_view(grad))
        return self._expect(op, out.nbytes, out)

    def step_stream(
        self, grad: np.ndarray, out: np.ndarray, *, chunk_bytes: int = STREAM_CHUNK_BYTES
    ) -> int:
        """The streamed step: the gradient goes out from a second thread while this one
        receives the new weights into ``out``; one request and reply when it fits a piece."""
        g = _byte_view(grad)
        header = HEADER.pack(OP_STEP_STREAM, chunk_bytes, len(g))
        if len(g) <= chunk_bytes:
            send_parts(self.sock, [header, g])
            return self._expect(OP_STEP_STREAM, out.nbytes, out)
        if self._sender is None:
            self._sender = _Sender(self.sock)
        self._sender.submit([header, g])
        try:
            step = self._expect(OP_STEP_STREAM, out.nbytes, out)
        finally:
            self._sender.wait()
        return step

    def _expect(self, op: int, n: int, out: np.ndarray | None = None) -> int:
        got_op, arg, got_n = recv_header(self.sock)
        if got_op != op or got_n != n:
            raise ConnectionError(f"unexpected reply op={got_op} bytes={got_n}")
        if out is not None and n:
            recv_exact(self.sock, _byte_view(out))
        return arg

    def close(self) -> None:
        if self._sender is not None:
            self._sender.stop()
        with contextlib.suppress(OSError):
            send_frame(self.sock, OP_CLOSE, 0)
            self._expect(OP_CLOSE, 0)
        self.sock.close()


class _Sender:
    """A long-lived thread that sends what it is given, so a step costs no thread start."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.jobs: queue.SimpleQueue[list[memoryview | bytes] | None] = queue.SimpleQueue()
        self.done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="baseline-sender", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (parts := self.jobs.get()) is not None:
            try:
                send_parts(self.sock, parts)
            except BaseException as exc:  # handed to the stepping thread
                self.done.put(exc)
            else:
                self.done.put(None)

    def submit(self, parts: list[memoryview | bytes]) -> None:
        self.jobs.put(parts)

    def wait(self) -> None:
        """Block until the last submitted send is done; re-raise its error."""
        error = self.done.get()
        if error is not None:
            raise error

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(5)


def _exit_when_stdin_closes() -> None:
    """The parent holds our stdin; EOF means it is gone, so we go too."""
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.buffer.read(1 << 16):
            pass
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--sock-buf",
        type=int,
        default=0,
        help="SO_SNDBUF/SO_RCVBUF in bytes of each connection (0: kernel autotuning)",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    serve(args.host, args.port, args.sock_buf)


if __name__ == "__main__":
    main()
