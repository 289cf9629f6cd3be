"""A lossy TCP proxy for tests: forwards client <-> server and cuts connections on purpose.

Every accepted connection gets a :class:`CutPlan` drawn from ``random.Random(f"{seed}:{n}")``
(``n`` counts connections from 0), so the same seed cuts the same connections at the same
places. A cut closes both sides of the connection at once, with a TCP reset or a FIN.

Where a plan cuts, in either direction (``up``: client -> server, requests being uploaded;
``down``: server -> client, replies):

- ``stream_cuts`` (:class:`StreamCuts`, the default plan): each HTTP/2 stream, i.e. each
  call's request or reply, is a victim with some probability and is cut after a seeded
  number of its message bytes, log-uniform, so small messages (a 64 KiB push, a 13-byte
  acknowledgement) are cut about as often as large ones;
- ``up_at`` / ``down_at``: after that many message bytes of the connection in that direction.

Positions count HTTP/2 DATA payload bytes (gRPC messages), not raw bytes: control frames
(window updates, pings, settings) come and go with timing, message bytes do not. So with one
caller making its calls one after another, a seed gives the same cuts in every run, each of
them inside a message: mid-upload or mid-reply. ``raw=True`` makes ``up_at`` / ``down_at``
count every byte instead (a cut anywhere: frame headers, trailers, the preface; also for
TLS, which this proxy cannot parse).

What the peer sees: with ``reset=False`` (FIN) it receives exactly the bytes up to the cut,
then end of stream; with ``reset=True`` the kernel discards what it had not sent yet, so it
receives at most those bytes, then a connection reset.

A single thread forwards everything (non-blocking sockets and a selector), so a cut never
races a send on another thread.
"""

from __future__ import annotations

import contextlib
import math
import random
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA_FRAME = 0x0
_RST_STREAM_FRAME = 0x3
_FRAME_HEADER_BYTES = 9
_READ_BYTES = 256 << 10
# Stop reading from one side while this much is waiting to be written to the other.
_HIGH_WATER_BYTES = 1 << 20


@dataclass(frozen=True)
class StreamCuts:
    """Per-stream cuts: the ``index``-th stream of a direction (in the order its first
    message bytes pass) is cut with probability ``up_probability`` / ``down_probability``,
    after a number of its DATA bytes drawn log-uniformly from [0, ``up_max`` / ``down_max``).
    A stream that ends before that many bytes passes uncut."""

    key: str
    up_probability: float = 0.25
    down_probability: float = 0.4
    up_max: int = 8 << 20
    down_max: int = 128 << 10

    def offset(self, direction: str, index: int) -> int | None:
        """Where stream ``index`` of ``direction`` is cut (None: not at all)."""
        rng = random.Random(f"{self.key}:{direction}:{index}")
        up = direction == "up"
        if rng.random() >= (self.up_probability if up else self.down_probability):
            return None
        top = self.up_max if up else self.down_max
        return int(math.exp(rng.uniform(0.0, math.log(top)))) - 1


@dataclass(frozen=True)
class CutPlan:
    """Where one connection is cut (see the module docstring); the first cut reached wins."""

    up_at: int | None = None
    down_at: int | None = None
    stream_cuts: StreamCuts | None = None
    reset: bool = True
    raw: bool = False
    # An HTTP/2 error code: on an upload cut, first send the client a RST_STREAM frame with
    # it for the stream being cut (as a middlebox resetting one stream would), then cut.
    rst_stream: int | None = None


@dataclass(frozen=True)
class Cut:
    """A cut that happened: connection number, direction, position in the connection's
    message bytes (raw bytes for a raw plan), the HTTP/2 stream cut and how many of its
    message bytes had passed, and whether it was a reset."""

    connection: int
    direction: str
    position: int
    stream_id: int
    stream_offset: int
    reset: bool


def random_plan(
    rng: random.Random, *, reset_fraction: float = 0.5, **stream_cuts: float
) -> CutPlan:
    """The default plan: :class:`StreamCuts` (``stream_cuts`` overrides its defaults), a TCP
    reset with probability ``reset_fraction``, a FIN otherwise."""
    cuts = StreamCuts(key=f"{rng.getrandbits(64):016x}", **stream_cuts)  # type: ignore[arg-type]
    return CutPlan(stream_cuts=cuts, reset=rng.random() < reset_fraction)


class FrameCounter:
    """Follows one direction of an HTTP/2 connection: all bytes, DATA payload bytes, and the
    DATA bytes of each stream, and finds where a plan cuts it."""

    def __init__(
        self, *, preface: bool, stream_offset: Callable[[int], int | None] | None = None
    ) -> None:
        self._skip = len(PREFACE) if preface else 0
        self._header = bytearray()
        self._remaining = 0  # payload bytes left in the current frame
        self._in_payload = False
        self._frame_type = -1
        self._stream_offset = stream_offset
        self._streams: dict[int, list[int | None]] = {}  # stream -> [bytes, cut offset]
        self.stream_id = 0
        self.raw_bytes = 0
        self.data_bytes = 0
        self.cut_stream_offset = 0

    @property
    def at_boundary(self) -> bool:
        """True between frames (a frame may be inserted here)."""
        return not self._skip and not self._in_payload and not self._header

    def feed(self, chunk: bytes, *, limit: int | None, raw: bool) -> int | None:
        """Account for ``chunk``. If a cut falls within it (the count, raw or DATA bytes,
        would pass ``limit``, or a stream reaches its cut offset), stop there and return the
        index in ``chunk`` to cut at."""
        if limit is not None and raw:
            if self.raw_bytes + len(chunk) > limit:
                cut = max(0, limit - self.raw_bytes)
                stop = self._walk(chunk[:cut], None)
                return cut if stop is None else stop
            return self._walk(chunk, None)
        return self._walk(chunk, limit)

    def _walk(self, chunk: bytes, limit: int | None) -> int | None:
        i, n = 0, len(chunk)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
            elif not self._in_payload:
                k = min(_FRAME_HEADER_BYTES - len(self._header), n - i)
                self._header += chunk[i : i + k]
                if len(self._header) == _FRAME_HEADER_BYTES:
                    length = int.from_bytes(self._header[:3], "big")
                    self._frame_type = self._header[3]
                    self.stream_id = int.from_bytes(self._header[5:9], "big") & 0x7FFFFFFF
                    self._header.clear()
                    self._remaining = length
                    self._in_payload = length > 0
            else:
                k = min(self._remaining, n - i)
                if self._frame_type == _DATA_FRAME:
                    stop = self._data(k, limit)
                    if stop is not None:
                        self.raw_bytes += i + stop
                        return i + stop
                self._remaining -= k
                self._in_payload = self._remaining > 0
            i += k
        self.raw_bytes += n
        return None

    def _data(self, k: int, limit: int | None) -> int | None:
        """Account for ``k`` DATA bytes of the current stream; the cut within them, if any."""
        entry = self._streams.get(self.stream_id)
        if entry is None:
            index = len(self._streams)
            offset = self._stream_offset(index) if self._stream_offset is not None else None
            entry = self._streams[self.stream_id] = [0, offset]
        passed, offset = entry
        assert passed is not None
        stops = [] if limit is None else [limit - self.data_bytes]
        if offset is not None:
            stops.append(offset - passed)
        stop = min(stops, default=None)
        if stop is not None and stop < k:  # at least one byte of this frame is withheld
            self.data_bytes += stop
            self.cut_stream_offset = passed + stop
            return stop
        self.data_bytes += k
        entry[0] = passed + k
        return None


@dataclass(eq=False)
class _Connection:
    number: int
    client: socket.socket
    server: socket.socket
    plan: CutPlan
    to_client: bytearray = field(default_factory=bytearray)
    to_server: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def __post_init__(self) -> None:
        cuts = self.plan.stream_cuts
        self.up = FrameCounter(
            preface=True, stream_offset=None if cuts is None else lambda i: cuts.offset("up", i)
        )
        self.down = FrameCounter(
            preface=False,
            stream_offset=None if cuts is None else lambda i: cuts.offset("down", i),
        )


class LossyProxy:
    """``LossyProxy(("127.0.0.1", port), seed=1)``: listens on ``proxy.address``.

    ``plan`` draws each connection's :class:`CutPlan` from its own seeded Random (default:
    :func:`random_plan`). ``cuts`` lists what was cut,
    ``connections`` counts accepted connections. Use as a context manager, or ``close()``.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        seed: int,
        plan: Callable[[random.Random], CutPlan] = random_plan,
    ) -> None:
        self.upstream = upstream
        self.seed = seed
        self._plan = plan
        self.cuts: list[Cut] = []
        self.connections = 0
        self.upstream_failures = 0
        self._live: dict[int, _Connection] = {}
        self._selector = selectors.DefaultSelector()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="lossy-proxy", daemon=True)
        self._thread.start()

    def plan_for(self, number: int) -> CutPlan:
        """The plan of connection ``number`` (the same for the same seed, every time)."""
        return self._plan(random.Random(f"{self.seed}:{number}"))

    def close(self) -> None:
        if not self._running:
            return
        self._running = False
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(10)
        for conn in list(self._live.values()):
            self._close_conn(conn, reset=False)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def __enter__(self) -> LossyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the forwarding loop (one thread) --------------------------------------------------
    def _loop(self) -> None:
        while self._running:
            for key, events in self._selector.select(timeout=0.5):
                if key.data is None:
                    self._accept()
                elif key.data == "wake":  # close() wants the loop to look at _running
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                else:
                    conn, side = key.data
                    if conn.closed:
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._flush(conn, side)
                    if events & selectors.EVENT_READ and not conn.closed:
                        self._read(conn, side)
                    if not conn.closed:
                        self._update(conn)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        number = self.connections
        self.connections += 1
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self.upstream_failures += 1
            _abort(client)
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(number, client, server, self.plan_for(number))
        self._live[number] = conn
        self._selector.register(client, selectors.EVENT_READ, (conn, "client"))
        self._selector.register(server, selectors.EVENT_READ, (conn, "server"))

    def _read(self, conn: _Connection, side: str) -> None:
        source = conn.client if side == "client" else conn.server
        try:
            chunk = source.recv(_READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the peer closed: pass on what is pending, then close both
            self._close_conn(conn, reset=False)
            return
        if side == "client":
            counter, limit, out, direction = conn.up, conn.plan.up_at, conn.to_server, "up"
        else:
            counter, limit, out, direction = conn.down, conn.plan.down_at, conn.to_client, "down"
        cut_at = counter.feed(chunk, limit=limit, raw=conn.plan.raw)
        if cut_at is None:
            out += chunk
            self._flush(conn, "server" if side == "client" else "client")
            return
        out += chunk[:cut_at]
        position = counter.raw_bytes if conn.plan.raw else counter.data_bytes
        if direction == "up" and conn.plan.rst_stream is not None and conn.down.at_boundary:
            frame = struct.pack(">I", 4)[1:] + bytes([_RST_STREAM_FRAME, 0])  # length 4
            frame += struct.pack(">II", counter.stream_id, conn.plan.rst_stream)
            conn.to_client += frame
            self._flush(conn, "client")
        self._cut(
            conn,
            direction,
            position,
            reset=conn.plan.reset,
            stream=counter.stream_id,
            stream_offset=counter.cut_stream_offset,
        )

    def _flush(self, conn: _Connection, side: str) -> None:
        sock, pending = (
            (conn.client, conn.to_client) if side == "client" else (conn.server, conn.to_server)
        )
        while pending:
            try:
                sent = sock.send(pending)
            except BlockingIOError:
                return
            except OSError:
                self._close_conn(conn, reset=True)
                return
            del pending[:sent]

    def _update(self, conn: _Connection) -> None:
        for side, sock, out_to_me, out_to_other in (
            ("client", conn.client, conn.to_client, conn.to_server),
            ("server", conn.server, conn.to_server, conn.to_client),
        ):
            events = 0
            if len(out_to_other) < _HIGH_WATER_BYTES:
                events |= selectors.EVENT_READ
            if out_to_me:
                events |= selectors.EVENT_WRITE
            key = self._selector.get_key(sock)
            if events == 0:
                events = selectors.EVENT_WRITE if out_to_me else selectors.EVENT_READ
            if key.events != events:
                self._selector.modify(sock, events, (conn, side))

    def _cut(
        self,
        conn: _Connection,
        direction: str,
        position: int,
        *,
        reset: bool,
        stream: int = 0,
        stream_offset: int = 0,
    ) -> None:
        self.cuts.append(Cut(conn.number, direction, position, stream, stream_offset, reset))
        self._close_conn(conn, reset=reset)

    def _close_conn(self, conn: _Connection, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._live.pop(conn.number, None)
        for sock, pending in ((conn.client, conn.to_client), (conn.server, conn.to_server)):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            if reset:
                _abort(sock)
                continue
            # FIN: deliver exactly what came before the cut (bounded wait), then close.
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)
                sock.sendall(pending)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): unsent bytes are dropped, the peer gets RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
