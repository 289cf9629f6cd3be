"""Opt-in compression on the wire: float32 tensors travelling as bfloat16 or float16.

Both sides share the rules: only float32 variables are compressed (other dtypes travel as
they are); a gradient or a weight is rounded to nearest even into the wire dtype and
upcast exactly back to float32 on arrival. The request says which wire dtype it opts in to
(``PushHeader.wire_dtype``, ``PullRequest.wire_dtype``), so a tensor of another dtype than
its variable's without that opt-in is still refused as a dtype mismatch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from paramserve.v1 import tensor_pb2 as tpb

from .tensors import SparseRows, TensorValue, dtype_from_proto

# The wire dtypes a request may opt in to, by name (as Client(wire_dtype=...) takes them).
WIRE_DTYPES: dict[str, int] = {"bfloat16": tpb.BFLOAT16, "float16": tpb.FLOAT16}
# The only variable dtype that is compressed.
COMPRESSIBLE = np.dtype("float32")
# Largest finite float16.
FLOAT16_MAX = float(np.finfo(np.float16).max)


def wire_dtype_code(name: str | None) -> int:
    """The proto enum for a wire dtype name (None: ``DTYPE_UNSPECIFIED``, exact float32)."""
    if name is None:
        return tpb.DTYPE_UNSPECIFIED
    if name not in WIRE_DTYPES:
        raise ValueError(
            f"wire_dtype must be one of {sorted(WIRE_DTYPES)} or None (float32, exact). "
            f"Received: {name!r}"
        )
    return WIRE_DTYPES[name]


def wire_dtype_of(code: int) -> np.dtype | None:
    """The NumPy wire dtype a request opted in to (None for ``DTYPE_UNSPECIFIED``);
    ValueError for a code that is not FLOAT16 or BFLOAT16."""
    if code == tpb.DTYPE_UNSPECIFIED:
        return None
    if code not in WIRE_DTYPES.values():
        raise ValueError(
            f"wire_dtype {code} is not supported; expected DTYPE_UNSPECIFIED (0), "
            f"FLOAT16 ({tpb.FLOAT16}) or BFLOAT16 ({tpb.BFLOAT16})"
        )
    return dtype_from_proto(code)


def cast_tensor(value: Any, dtype: np.dtype) -> TensorValue:
    """``value`` (dense, or the values of sparse rows) as ``dtype``, a copy: rounded to
    nearest even when narrowing (float32 to the wire dtype), exact when widening back."""
    if isinstance(value, SparseRows):
        return SparseRows(value.indices, value.values.astype(dtype))
    return np.asarray(value).astype(dtype)
