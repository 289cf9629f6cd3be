"""The daemon's size limits: one request or the state over one is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .settings import check_min

# A message must hold a useful chunk plus its framing.
MIN_MESSAGE_BYTES = 64 << 10


@dataclass(frozen=True)
class Limits:
    """Size limits that keep one request from exhausting the server (all >= 1)."""

    # One gRPC message (a 2 MiB chunk plus headers fits easily).
    max_message_bytes: int = 64 << 20
    # One tensor's payload.
    max_tensor_bytes: int = 8 << 30
    # All tensor payloads of one request (CreateModel, Push, Step, SetOptimizerState).
    max_request_bytes: int = 16 << 30
    # Variables plus optimizer state held by the store; also bounds uploaded snapshots.
    max_state_bytes: int = 64 << 30
    # Variables of a model, and tensors in one request.
    max_variables: int = 10_000
    # Calls in flight on the whole server, each one HTTP/2 stream (queued calls count too);
    # a call past it is refused with RESOURCE_EXHAUSTED. Health checks count as well.
    max_concurrent_streams: int = 256

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_min(f.name, getattr(self, f.name), 1)
        check_min("max_message_bytes", self.max_message_bytes, MIN_MESSAGE_BYTES)
