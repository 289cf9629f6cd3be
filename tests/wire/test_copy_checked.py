"""The daemon's fused copy of received chunks: the bytes land as they are, and NaN and Inf
are counted on the way, from a source at any alignment."""

from __future__ import annotations

import numpy as np
import pytest

from paramserve import wire


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_copy_checked_copies_bits_and_tells_finiteness(dtype, shift):
    info = np.finfo(dtype)
    values = np.array(
        [0.0, -0.0, 1.5, -2.25, info.max, -info.max, info.tiny, info.smallest_subnormal],
        dtype,
    )
    values = np.tile(values, 37)
    for bad in (None, np.nan, np.inf, -np.inf):
        source = values.copy()
        if bad is not None:
            source[123] = bad
        raw = bytes(shift) + source.tobytes()  # the payload at an odd offset of the message
        dst = np.full_like(source, 7)
        finite = wire.copy_checked(memoryview(raw)[shift:], dst)
        assert finite is (bad is None)
        assert dst.tobytes() == source.tobytes()  # NaN bits included


def test_copy_checked_declines_what_it_cannot_take():
    assert wire.copy_checked(b"\0" * 8, np.zeros(2, np.int32)) is None  # not a float
    assert wire.copy_checked(b"\0" * 4, np.zeros(2, np.float16)) is None
    read_only = np.zeros(2, np.float32)
    read_only.flags.writeable = False
    assert wire.copy_checked(b"\0" * 8, read_only) is None
    with pytest.raises(ValueError):
        wire.copy_checked(b"\0" * 12, np.zeros(2, np.float32))


@pytest.mark.parametrize("nbytes", [1, 63, 64, 4 << 20])
def test_aligned_buffers_start_on_a_cache_line(nbytes):
    buffer = wire.aligned_buffer(nbytes)
    assert buffer.dtype == np.uint8 and buffer.shape == (nbytes,)
    assert buffer.ctypes.data % wire.tensors.BUFFER_ALIGNMENT == 0

