"""Generated snapshot ids (path traversal, empty, huge) and damaged snapshot uploads."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from . import oracle, oracle_admin, strategies
from .live import TIMEOUT_S, State
from .runner import fuzz, run_case, sender

pytestmark = pytest.mark.slow


@fuzz(max_examples=80)
@given(
    snapshot_id=strategies.snapshot_ids,
    method=st.sampled_from(["RestoreSnapshot", "DownloadSnapshot"]),
    policy=st.sampled_from(["reject", "reject", "skip"]),
)
def test_snapshot_ids(servers, snapshot_id, method, policy):
    """Only ids of the documented form name a file; none of them reaches outside the folder."""
    server = servers[policy]
    request_cls = (
        pb.RestoreSnapshotRequest if method == "RestoreSnapshot" else pb.DownloadSnapshotRequest
    )

    def prepare(state: State):
        request = request_cls(id=snapshot_id)
        verdict = oracle_admin.snapshot_id_verdict(
            snapshot_id, enabled=server.checkpoint_dir is not None, existing=state.snapshots
        )
        call = getattr(server.stub, method)
        return sender(call, request, timeout=TIMEOUT_S), oracle.sized(request, verdict)

    run_case(server, "snapshot_id", prepare)


def upload_messages(case: strategies.UploadCase, reference: bytes) -> list:
    data = reference
    if case.content == "truncated":
        data = reference[: case.cut % len(reference)]
    elif case.content == "garbage":
        data = bytes((i * 131 + case.cut) % 256 for i in range(case.cut % 3000))
    elif case.content == "flipped":
        # One byte of the tensor data (after the 8-byte length and the JSON header) changed.
        start = 8 + int.from_bytes(reference[:8], "little")
        pos = start + case.cut % (len(reference) - start)
        data = reference[:pos] + bytes([reference[pos] ^ 0x5A]) + reference[pos + 1 :]
    size = max(0, len(data) + case.size_delta)
    chunks = [
        pb.FileChunk(offset=o, data=data[o : o + case.chunk_bytes])
        for o in range(0, len(data), case.chunk_bytes)
    ]
    if chunks:
        chunks[0].total_size = len(data)
        k = case.cut % len(chunks)
        if case.chunk_mutation == "offset":
            chunks[k].offset += 1 + case.cut % 7
        elif case.chunk_mutation == "drop":
            del chunks[k]
        elif case.chunk_mutation == "repeat":
            chunks.insert(k, pb.FileChunk(offset=chunks[k].offset, data=chunks[k].data))
        elif case.chunk_mutation == "extra":
            chunks.append(pb.FileChunk(offset=len(data), data=b"\0"))
    if case.chunk_mutation == "oversized":
        chunks.append(pb.FileChunk(offset=len(data), data=b"\0" * strategies.OVERSIZED))
    header = pb.UploadSnapshotRequest(
        header=pb.UploadSnapshotHeader(size_bytes=size, restore=case.restore)
    )
    items = [pb.UploadSnapshotRequest(chunk=c) for c in chunks]
    end = pb.UploadSnapshotRequest(end=tpb.StreamEnd())
    if case.plan == "no header":
        return [*items, end]
    if case.plan == "second header":
        return [header, *items[:1], header, *items[1:], end]
    if case.plan == "empty":
        return [header, pb.UploadSnapshotRequest(), *items, end]
    if case.plan == "no end":
        return [header, *items]
    if case.plan == "early end":
        return [header, *items[:1], end, *items[1:]]
    return [header, *items, end]


@fuzz(max_examples=50)
@given(case=strategies.upload_cases(), policy=st.sampled_from(["reject"] * 4 + ["skip"]))
def test_snapshot_uploads(servers, case, policy):
    """Truncated, garbage or corrupted files and broken chunk streams are refused untouched."""
    server = servers[policy]
    messages = upload_messages(case, servers.snapshot_bytes)

    def prepare(state: State):
        verdict = oracle_admin.upload_verdict(
            messages,
            enabled=server.checkpoint_dir is not None,
            valid_files={servers.snapshot_bytes: servers.snapshot_state},
        )
        return sender(server.stub.UploadSnapshot, iter(messages), timeout=TIMEOUT_S), verdict

    run_case(server, "snapshot_upload", prepare)
