"""The SDK reads a pull reply's header from its bytes, parsing only what changed.

A worker pulls the same tensors every step, so a reply's serialized header starts with the
same bytes each time (its tensors) and only its version (and a stripe's range) differ.
``ReplyLayouts.read`` keeps those bytes per header list and parses the rest alone; these
tests hold it to what parsing the whole header gives.
"""

from __future__ import annotations

import numpy as np
import pytest

from paramserve import wire
from paramserve.client.errors import DataLossError
from paramserve.client.streams import RawHeader, ReplyLayouts, receive_stripes, receive_tensors
from paramserve.v1 import tensor_pb2 as tpb


def _values(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"v{i:03d}": rng.standard_normal(i % 7 + 1).astype(np.float32) for i in range(n)}


def _tensors_part(values: dict[str, np.ndarray]) -> bytes:
    headers = [wire.header_for(n, v) for n, v in values.items()]
    return tpb.TensorStreamHeader(tensors=headers).SerializeToString()


def _reply(values: dict[str, np.ndarray], version: int) -> list:
    """A merged reply as the daemon sends it, decoded as the SDK's deserializer does."""
    from paramserve.client.streams import decode_stream_item

    body = wire.stream_header_body(_tensors_part(values), version)
    items = list(wire.merged_stream_items(body, list(values.values()), chunk_bytes=64))
    return [decode_stream_item(item) for item in items]


def test_a_header_list_seen_before_is_parsed_from_its_version_on() -> None:
    values = _values()
    layouts = ReplyLayouts()
    part = _tensors_part(values)
    first_plan, first = layouts.read(RawHeader(wire.stream_header_body(part, 7)))
    assert first.version == 7 and len(first.tensors) == len(values)  # parsed whole
    for version in (8, 0, 2**40):
        plan, header = layouts.read(RawHeader(wire.stream_header_body(part, version)))
        assert plan is first_plan
        assert header.version == version
        assert not header.tensors  # only the bytes after the tensors were parsed
    # A stripe's range after the version is read too.
    raw = wire.stream_header_body(part, 9) + wire.length_delimited(
        3, tpb.PayloadRange(start=4, end=12).SerializeToString()
    )
    plan, header = layouts.read(RawHeader(raw))
    assert plan is first_plan and header.version == 9
    assert (header.stripe.start, header.stripe.end) == (4, 12)


def test_more_tensors_after_a_known_prefix_are_not_taken_for_it() -> None:
    """Protobuf concatenates repeated fields: a header that starts with a known list and
    goes on with more tensors is another list, parsed whole."""
    values = _values()
    layouts = ReplyLayouts()
    part = _tensors_part(values)
    known, _ = layouts.read(RawHeader(wire.stream_header_body(part, 1)))
    extra = {"extra": np.zeros(3, np.float32)}
    raw = part + _tensors_part(extra) + wire.stream_header_body(b"", 2)
    plan, header = layouts.read(RawHeader(raw))
    assert plan is not known
    assert plan.layout.names == [*values, "extra"]
    assert header.version == 2


def test_replies_read_through_the_kept_bytes_match_the_values() -> None:
    values = _values()
    layouts = ReplyLayouts()
    out = {n: np.empty_like(v) for n, v in values.items()}
    for version in (3, 4, 5):
        got = receive_tensors(_reply(values, version), layouts=layouts, out=out)
        assert got.version == version
        for n, v in values.items():
            np.testing.assert_array_equal(got[n], v)
            assert got[n] is out[n]


def test_a_header_that_does_not_parse_is_a_data_loss() -> None:
    values = _values(4)
    items = _reply(values, 3)
    items[0][0] = RawHeader(b"\x0a\xff\xff")  # a tensor field longer than the bytes
    with pytest.raises(DataLossError, match="does not parse"):
        receive_tensors(items)
    with pytest.raises(DataLossError, match="does not parse"):
        receive_stripes([items, _reply(values, 3)])
