"""The service both sides speak: its full name, where a client finds it, JSON values.

``SERVICE_NAME`` routes calls (``/paramserve.v1.ParameterServer/<method>``), names the
service to health checks and reflection, and tells the auth interceptor which calls are
ours. ``DEFAULT_HOST`` and ``DEFAULT_PORT`` are where a daemon listens unless told
otherwise, and ``DEFAULT_ADDRESS`` where the SDK and the admin commands look for it.
Optimizer configs travel as JSON text; :func:`json_default` writes the NumPy scalars a
config may hold as plain numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from paramserve.v1 import parameter_server_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"{DEFAULT_HOST}:{DEFAULT_PORT}"


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default``: NumPy scalars as Python numbers; TypeError otherwise."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
