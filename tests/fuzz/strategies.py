"""Hypothesis strategies for whole requests of every family, malformed in many ways.

Tensor streams come from :mod:`.streams`; everything else (pulls, hyperparameters, snapshot
ids and uploads, push identities) is generated here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from . import spec
from .streams import (
    OVERSIZED,
    StreamPlan,
    assemble,
    chance,
    gradients,
    initial_values,
    names,
    optimizer_state,
    tensor_stream,
)

# -- requests ------------------------------------------------------------------------------


@dataclass
class PushCase:
    headers: list[tpb.TensorHeader]
    chunks: list[tpb.TensorChunk]
    plan: StreamPlan
    worker_id: str
    sequence: str  # "fresh", "zero", "repeat" or "max": resolved against the live state
    mutations: int

    def messages(self, sequence: int) -> list[pb.PushRequest]:
        header = pb.PushHeader(worker_id=self.worker_id, sequence=sequence, tensors=self.headers)
        return assemble(pb.PushRequest, header, self.chunks, self.plan)


@st.composite
def push_cases(draw, *, nonfinite: float = 0.15, max_mutations: int = 3) -> PushCase:
    body = gradients(nonfinite=nonfinite)
    headers, chunks, plan, mutations = draw(tensor_stream(body, max_mutations=max_mutations))
    worker_id = draw(st.sampled_from(["fuzz"] * 8 + ["", "other", "max"]))
    sequence = "fresh"
    if worker_id == "max":
        worker_id, sequence = "rnd-" + draw(st.text(max_size=8)), "max"
    elif chance(draw, 0.1):
        sequence = draw(st.sampled_from(["zero", "repeat"]))
    return PushCase(headers, chunks, plan, worker_id, sequence, mutations)


OPTIMIZER_JSONS = [
    spec.OPTIMIZER_JSON,
    spec.OPTIMIZER_JSON,
    "",
    "sgd",
    "adam",
    "nosuch",
    '"sgd"',
    "{not json",
    "[1, 2]",
    "3",
    "null",
    "NaN",
    '{"class_name": "NoSuch", "config": {}}',
    '{"class_name": "SGD", "config": {"no_such_option": 1}}',
    '{"class_name": "SGD", "config": {"learning_rate": "fast"}}',
    '{"class_name": "SGD", "config": {"learning_rate": 0.5, "momentum": 0.8}}',
    "[" * 5000,
    '{"a": ' * 3000 + "1" + "}" * 3000,
]


@st.composite
def create_cases(draw) -> list[pb.CreateModelRequest]:
    body = st.composite(lambda d: initial_values(d))()
    headers, chunks, plan, _ = draw(tensor_stream(body))
    name = draw(st.one_of(st.just(spec.MODEL_NAME), st.just(spec.MODEL_NAME), names))
    header = pb.CreateModelHeader(
        model_name=name, optimizer_json=draw(st.sampled_from(OPTIMIZER_JSONS)), variables=headers
    )
    return assemble(pb.CreateModelRequest, header, chunks, plan)


@st.composite
def set_state_cases(draw) -> list[tpb.TensorStreamItem]:
    headers, chunks, plan, _ = draw(tensor_stream(optimizer_state(), max_mutations=2))
    header = tpb.TensorStreamHeader(tensors=headers, version=draw(st.integers(-5, 5)))
    return assemble(tpb.TensorStreamItem, header, chunks, plan)


rows = st.lists(st.one_of(st.integers(-2, 8), st.sampled_from([2**62, -(2**63)])), max_size=4)


@st.composite
def pull_requests(draw) -> tuple[pb.PullRequest, str]:
    """A PullRequest and how its min_version relates to the live version."""
    selections = draw(
        st.lists(st.builds(lambda n, r: pb.RowSelection(name=n, rows=r), names, rows), max_size=3)
    )
    request = pb.PullRequest(
        names=draw(st.lists(names, max_size=4)),
        rows=selections,
        scope=draw(st.sampled_from([0, 0, 0, 1, 1, 2, -1])),
        worker_id=draw(st.text(max_size=8)),
    )
    wait = draw(st.sampled_from(["none"] * 6 + ["negative", "current", "future"]))
    return request, wait


HYPERPARAMETER_KEYS = ["learning_rate"] * 4 + ["momentum"] * 3 + ["ema_momentum"] * 2
hyper_values = st.one_of(
    st.sampled_from([0.0, 1.0, 1.5, -0.5, 1e-300, 1e300, 3.5e38, np.nan, np.inf, -np.inf]),
    st.floats(-2, 2),
)


@st.composite
def hyperparameters(draw) -> dict[str, float]:
    """0-3 known hyperparameters with odd values, and sometimes one unknown name."""
    values = draw(st.dictionaries(st.sampled_from(HYPERPARAMETER_KEYS), hyper_values, max_size=3))
    if draw(st.sampled_from([False, False, True])):
        bad = st.one_of(
            st.sampled_from(["", "nope", "beta_1", "lr", "Learning_Rate"]), st.text(max_size=6)
        )
        values[draw(bad)] = draw(hyper_values)
    return values


snapshot_ids = st.one_of(
    st.sampled_from(
        [
            "",
            "../../etc/passwd",
            "/etc/passwd",
            "snap-000000000001-20260101T000000000000Z/../../../etc/passwd",
            "snap-000000000001-20260101T000000000000Z\x00",
            "..",
            ".",
            "snap-*",
            "snap-000000000001-20260101T000000000000Z.safetensors",
        ]
    ),
    st.text(max_size=40),
    st.builds(
        lambda v, t: f"snap-{v:012d}-{t}Z",
        st.integers(0, 10**13),
        st.from_regex(r"\A[0-9]{8}T[0-9]{12}\Z"),
    ),
    st.integers(2000, 3000).map(lambda n: "s" * n),
    st.just("s" * OVERSIZED),
)


@dataclass
class UploadCase:
    content: str  # "valid", "truncated", "garbage", "flipped"
    cut: int
    size_delta: int
    chunk_bytes: int
    restore: bool
    chunk_mutation: str  # "none", "offset", "drop", "repeat", "extra", "oversized"
    plan: str  # "ok", "no header", "second header", "empty", "no end", "early end"


@st.composite
def upload_cases(draw) -> UploadCase:
    return UploadCase(
        content=draw(st.sampled_from(["valid", "valid", "truncated", "garbage", "flipped"])),
        cut=draw(st.integers(0, 10**6)),
        size_delta=draw(st.sampled_from([0] * 6 + [-1, 1, 10**7])),
        chunk_bytes=draw(st.sampled_from([1 << 14, 1000, 333])),
        restore=draw(st.booleans()),
        chunk_mutation=draw(
            st.sampled_from(["none"] * 6 + ["offset", "drop", "repeat", "extra", "oversized"])
        ),
        plan=draw(
            st.sampled_from(
                ["ok"] * 6 + ["no header", "second header", "empty", "no end", "early end"]
            )
        ),
    )
