"""The expected outcome of admin requests: CreateModel, SetOptimizerState,
SetHyperparameters, and snapshot ids and uploads (see :mod:`.oracle` for the rules)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from paramserve import optim_core
from paramserve.v1 import parameter_server_pb2 as pb
from paramserve.v1 import tensor_pb2 as tpb

from . import spec
from .live import State
from .oracle import (
    EXHAUSTED,
    EXISTS,
    INVALID,
    NOT_FOUND,
    PRECONDITION,
    Verdict,
    bad_name,
    fail,
    ok,
    tensor_stream,
)

SNAPSHOT_ID = re.compile(r"snap-(\d{12,})-(\d{8}T\d{12})Z")
OPTIMIZER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.>-]*$")
DEFAULT_OPTIMIZER = "adam"  # the server's --optimizer default, used for an empty optimizer_json


# -- model definition ----------------------------------------------------------------------


def optimizer_config(text: str) -> str | None:
    """The canonical config of an optimizer_json as the server reads it; None if invalid."""
    text = text.strip() or DEFAULT_OPTIMIZER
    if OPTIMIZER_NAME.match(text):
        identifier: Any = text
    else:
        try:
            identifier = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if not isinstance(identifier, dict | str):
            return None
    try:
        optimizer = optim_core.get(identifier)
    except Exception:
        return None
    return json.dumps(optim_core.serialize(optimizer), sort_keys=True, default=repr)


CREATED_CONFIG = optimizer_config(spec.OPTIMIZER_JSON)


def create_verdict(messages: Sequence[pb.CreateModelRequest], state: State) -> Verdict:
    """CreateModel while the fuzz model exists: a no-op, ALREADY_EXISTS, or an error."""
    config: list[str | None] = []

    def parse_optimizer(header: pb.CreateModelHeader) -> set[grpc.StatusCode]:
        config.append(optimizer_config(header.optimizer_json))
        return {INVALID} if config[0] is None else set()

    stream = tensor_stream(
        messages,
        lambda header: header.variables,
        known=None,
        unknown_code=NOT_FOUND,
        dense_only=True,
        header_codes=parse_optimizer,
    )
    if stream.codes:
        return fail(*stream.codes)
    assert stream.tensors is not None
    codes: set[grpc.StatusCode] = set()
    name = stream.header.model_name or "model"
    if bad_name(name):
        codes.add(INVALID)
    if not stream.tensors:
        codes.add(INVALID)
    prefixes: set[str] = set()
    total = 0
    for var_name, value in stream.tensors.items():
        prefix = var_name.replace("/", "_")
        if bad_name(var_name) or prefix in prefixes or value.dtype.name not in spec.FLOAT_NAMES:
            codes.add(INVALID)
        prefixes.add(prefix)
        total += value.nbytes
    if total > spec.MAX_STATE_BYTES:
        codes.add(EXHAUSTED)
    if codes:
        return fail(*codes)
    specs = [(n, v.dtype.name, v.shape) for n, v in stream.tensors.items()]
    wanted = [(n, dtype, shape) for n, (dtype, shape) in spec.VARIABLES.items()]
    current = optimizer_config(state.optimizer_json)
    if name == spec.MODEL_NAME and specs == wanted and config[0] in (CREATED_CONFIG, current):

        def not_created(reply: pb.CreateModelResponse) -> None:
            assert not reply.created and reply.version == state.version, reply

        return ok(check_reply=not_created)
    return fail(EXISTS)


# -- optimizer state and hyperparameters ---------------------------------------------------


def _with_learning_rate(state: State, lr: float) -> State:
    config = json.loads(state.optimizer_json)
    config["config"]["learning_rate"] = lr
    hyper = {**state.hyperparameters, "learning_rate": lr}
    return state.evolve(optimizer_json=json.dumps(config), hyperparameters=hyper)


def set_state_verdict(messages: Sequence[tpb.TensorStreamItem], state: State) -> Verdict:
    known = {k: (v.dtype.name, v.shape) for k, v in state.optimizer_state.items()}
    stream = tensor_stream(
        messages,
        lambda header: header.tensors,
        known=known,
        unknown_code=INVALID,
        dense_only=True,
    )
    if stream.codes:
        return fail(*stream.codes)
    assert stream.tensors is not None
    return _set_state(stream.tensors, known)


def _set_state(arrays: dict[str, Any], known: dict[str, Any]) -> Verdict:
    if arrays.keys() != known.keys():
        return fail(INVALID)  # every optimizer variable, no more, no less
    for key, value in arrays.items():
        # Step counters are >= 0 with room for one more step; the learning rate is finite.
        counter = value.dtype.kind in "iu"
        if counter and not (value.min() >= 0 and value.max() < np.iinfo(value.dtype).max):
            return fail(INVALID)
        if key.split("/")[-1] == "learning_rate" and not np.isfinite(value).all():
            return fail(INVALID)

    def expect(s: State) -> State:
        s = _with_learning_rate(s, float(arrays["learning_rate"]))
        return s.evolve(version=int(arrays["iteration"]), optimizer_state=dict(arrays))

    return ok(expect=expect)


def _state_keys(optimizer: optim_core.Optimizer) -> set[str]:
    variables = [optim_core.Variable(v, path=n) for n, v in spec.initial_variables().items()]
    optimizer.build(variables)
    return set(optimizer.state_dict())


def hyperparameters_verdict(values: dict[str, float], state: State) -> Verdict:
    codes: set[grpc.StatusCode] = set()
    for key, value in values.items():
        if key not in state.hyperparameters or not math.isfinite(value):
            codes.add(INVALID)
        elif key == "learning_rate" and abs(value) > float(np.finfo(np.float32).max):
            codes.add(INVALID)  # the learning rate lives in a float32 variable
    others = {k: v for k, v in values.items() if k != "learning_rate"}
    if not codes and others:
        config = json.loads(state.optimizer_json)
        config["config"].update(others)
        try:
            rebuilt = optim_core.get(config)  # the optimizer's own argument checks
        except Exception:
            codes.add(INVALID)
        else:
            if _state_keys(rebuilt) != set(state.optimizer_state):
                codes.add(PRECONDITION)  # e.g. SGD momentum to 0: its slots would go away
    if codes:
        return fail(*codes)

    def expect(s: State) -> State:
        config = json.loads(s.optimizer_json)
        config["config"].update(others)
        hyper = {**s.hyperparameters, **others}
        s = s.evolve(optimizer_json=json.dumps(config), hyperparameters=hyper)
        if "learning_rate" in values:
            lr = np.float32(values["learning_rate"])
            s = _with_learning_rate(s, float(lr))
            s = s.evolve(optimizer_state={**s.optimizer_state, "learning_rate": np.array(lr)})
        return s

    return ok(expect=expect)


# -- snapshots -----------------------------------------------------------------------------


def snapshot_id_verdict(snapshot_id: str, *, enabled: bool, existing: Sequence[str]) -> Verdict:
    """RestoreSnapshot and DownloadSnapshot of an id that is never an existing snapshot."""
    assert snapshot_id not in existing
    if not enabled:
        return fail(PRECONDITION)
    if not SNAPSHOT_ID.fullmatch(snapshot_id):
        return fail(INVALID)  # also every path: '/', '..', NUL and the like never match
    return fail(NOT_FOUND)


def upload_verdict(
    messages: Sequence[pb.UploadSnapshotRequest],
    *,
    enabled: bool,
    valid_files: dict[bytes, State],
) -> Verdict:
    """An upload is stored (and restored) only when it is byte for byte a valid snapshot."""
    sizes = [m.ByteSize() for m in messages]
    over = next((i for i, s in enumerate(sizes) if s > spec.MAX_MESSAGE_BYTES), None)
    if not enabled:
        return fail(PRECONDITION) if over is None else fail(PRECONDITION, EXHAUSTED)
    if over is None:
        return _upload(messages, valid_files, complete=True)
    if over == 0:
        return fail(EXHAUSTED)
    # Cut by the refused message, the stream never reaches its end item: nothing changes.
    return fail(EXHAUSTED, *_upload(messages[:over], valid_files, complete=False).codes)


def _upload(messages: Sequence[Any], valid_files: dict[bytes, State], *, complete: bool) -> Verdict:
    if not messages or messages[0].WhichOneof("item") != "header":
        return fail(INVALID)
    header = messages[0].header
    if header.size_bytes > spec.MAX_STATE_BYTES:
        return fail(EXHAUSTED)
    data = b""
    ended = False
    for m in messages[1:]:
        if ended:
            return fail(INVALID)  # nothing may follow the end item
        if m.WhichOneof("item") == "end":
            ended = True
            continue
        if m.WhichOneof("item") != "chunk" or m.chunk.offset != len(data):
            return fail(INVALID)
        data += m.chunk.data
        if len(data) > header.size_bytes:
            return fail(INVALID)
    if not complete:
        return Verdict()  # no defect before the cut
    if len(data) != header.size_bytes or not ended or data not in valid_files:
        return fail(INVALID)
    if not header.restore:
        return ok()  # the very same snapshot is already stored: nothing changes
    restored = valid_files[data]
    return ok(expect=lambda s: restored.evolve(snapshots=s.snapshots, files=s.files))
