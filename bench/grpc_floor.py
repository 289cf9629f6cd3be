"""The gRPC floor for one training step: raw-bytes Push + Pull with the fused Adam, no protobuf.

A reference point for bench/step.py, not a product: what gRPC Python itself costs for the
same two calls paramserve makes per step (a client-streaming Push of the gradient, a
server-streaming Pull of the weights) when nothing else is in the way. Methods are generic
handlers with no (de)serializers, so every message is raw bytes: the client sends
``chunk_bytes`` slices of the gradient, the server copies each into a preallocated buffer and
applies ``paramserve.optim_core.fused.adam`` to that slice as it arrives (Adam is elementwise,
so this is exact and overlaps the apply with the transfer), then Pull streams the weights back
in ``chunk_bytes`` slices. The gap between this and the hand-written socket server is gRPC's;
the gap between paramserve and this is paramserve's own (codec, servicer, store, client).

Run as a script (``python bench/grpc_floor.py --port 0``): prints ``PORT <n>``, serves until
stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
from grpc.experimental import ChannelOptions

SERVICE = "paramserve.bench.RawStep"
CHUNK_BYTES = 4 << 20
MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class RawStepServicer:
    """Flat float32 weights and Adam slots; one worker at a time (the benchmark's).

    ``apply_whole``: Adam runs once over the whole gradient after its last chunk arrived, as
    a server must that validates a push whole before changing anything (paramserve does),
    instead of on each chunk as it arrives (``grpc-raw-whole`` in bench/step.py: how much of
    grpc-raw's lead is that overlap)."""

    def __init__(self, *, chunk_bytes: int = CHUNK_BYTES, apply_whole: bool = False) -> None:
        from socket_baseline import AdamState  # same state and bias correction

        self._state_type = AdamState
        self.state: AdamState | None = None
        self.chunk_bytes = chunk_bytes
        self.apply_whole = apply_whole
        self.lock = threading.Lock()

    def init(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        weights = np.frombuffer(b"".join(requests), dtype=np.float32)
        with self.lock:
            self.state = self._state_type(weights)
        return b""

    def push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        from paramserve.optim_core import fused

        with self.lock:
            st = self.state
            if st is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Init first")
            g_bytes = memoryview(st.g.view(np.uint8))
            scalars = st.scalars()
            offset = 0
            for message in requests:
                end = offset + len(message)
                if end > len(g_bytes) or offset % 4 or end % 4:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad chunk")
                g_bytes[offset:end] = message
                if not self.apply_whole:
                    a, b = offset // 4, end // 4
                    fused.adam(st.w[a:b], st.g[a:b], st.m[a:b], st.v[a:b], *scalars)
                offset = end
            if offset != len(g_bytes):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "short gradient")
            if self.apply_whole:
                fused.adam(st.w, st.g, st.m, st.v, *scalars)
            st.iterations += 1
        return b""

    def pull(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self.lock:
            if self.state is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Init first")
            w_bytes = memoryview(self.state.w.view(np.uint8))
            pieces = [
                bytes(w_bytes[a : a + self.chunk_bytes])
                for a in range(0, len(w_bytes), self.chunk_bytes)
            ]
        yield from pieces

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Init": grpc.stream_unary_rpc_method_handler(self.init),
                "Push": grpc.stream_unary_rpc_method_handler(self.push),
                "Pull": grpc.unary_stream_rpc_method_handler(self.pull),
            },
        )


class GrpcRawClient:
    """The worker side: ``step`` = Push(gradient chunks) then Pull(weights) into ``out``."""

    def __init__(self, port: int, *, chunk_bytes: int = CHUNK_BYTES, timeout_s: float = 60.0):
        # Pulls read on the calling thread, as paramserve's SDK reads them (no channel spin
        # thread started per call).
        options = [*GRPC_OPTIONS, (ChannelOptions.SingleThreadedUnaryStream, 1)]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self._init = self.channel.stream_unary(f"/{SERVICE}/Init")
        self._push = self.channel.stream_unary(f"/{SERVICE}/Push")
        self._pull = self.channel.unary_stream(f"/{SERVICE}/Pull")

    def _chunks(self, array: np.ndarray) -> Iterator[bytes]:
        view = memoryview(array.reshape(-1).view(np.uint8))
        for a in range(0, len(view), self.chunk_bytes):
            yield bytes(view[a : a + self.chunk_bytes])  # gRPC Python sends bytes only

    def init(self, weights: np.ndarray) -> None:
        self._init(self._chunks(np.ascontiguousarray(weights, np.float32)), timeout=self.timeout_s)

    def step(self, grad: np.ndarray, out: np.ndarray) -> None:
        self._push(self._chunks(grad), timeout=self.timeout_s)
        out_bytes = memoryview(out.reshape(-1).view(np.uint8))
        offset = 0
        for message in self._pull(b"", timeout=self.timeout_s):
            out_bytes[offset : offset + len(message)] = message
            offset += len(message)
        if offset != len(out_bytes):
            raise ConnectionError(f"pulled {offset} of {len(out_bytes)} bytes")

    def close(self) -> None:
        self.channel.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES)
    parser.add_argument(
        "--apply",
        choices=("chunks", "whole"),
        default="chunks",
        help="Adam on each chunk as it arrives (default), or once after the whole gradient",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    from paramserve.optim_core import fused

    if not fused.available():
        raise SystemExit("numba kernels unavailable: the floor needs fused.adam")
    servicer = RawStepServicer(chunk_bytes=args.chunk_bytes, apply_whole=args.apply == "whole")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((servicer.handler(),))
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.buffer.read(1 << 16):
                pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(f"PORT {port}", flush=True)
    stop.wait()
    server.stop(0)


if __name__ == "__main__":
    main()
