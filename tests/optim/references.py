"""Keras's results for every conformance case, recorded once and stored in the repo.

Every run of real Keras the conformance suite compares with (``jobs()``) is recorded by
``python -m tests.optim.record_references`` with the pinned Keras into ``keras_references.npz``
beside this file: per case, the variables after the first and the last step, every optimizer
variable (name, dtype, shape, values) and ``iterations``, exactly as Keras returned them. A
case is stored under a hash of its exact inputs (optimizer, config, shapes, dtype, initial
values and gradient stream), so a changed case is never compared with an old recording: the
suite runs it in live Keras instead, and ``test_references.py`` fails until it is recorded
again. The same test checks the Keras pin and the recording code, and runs a subset of the
cases in live Keras on every run to prove the stored results are Keras's.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from tests.support.optimizer_cases import CLASS_NAMES, all_cases

from . import harness
from .harness import MIXED_SHAPES, SINGLE_SHAPES, RunResult, make_stream

# The Keras the references come from; pyproject's test extra pins the same version.
KERAS_VERSION = "3.15.1"
PATH = Path(__file__).with_name("keras_references.npz")
RECORDER = Path(__file__).with_name("record_references.py")

CASES = all_cases()
_CASE_INDEX = {cid: (cls, cfg, h) for cid, cls, cfg, h in CASES}
OTHER_DTYPES = ("float64", "float16", np.dtype(ml_dtypes.bfloat16).name)


@dataclass(frozen=True)
class Job:
    """One Keras run: a case (an option-matrix id, or a class name run with defaults) on a
    model (``"mixed"`` or one of SINGLE_SHAPES) in a dtype."""

    case_id: str
    shapes_key: str
    dtype: str

    def lookup(self) -> tuple[str, dict, dict, dict]:
        """``(class_name, config, harness options, shapes)``."""
        if self.case_id in _CASE_INDEX:
            cls, cfg, h = _CASE_INDEX[self.case_id]
        else:
            cls, cfg, h = self.case_id, {}, {}
            if cls == "LossScaleOptimizer":
                cfg = {"inner_optimizer": ("Adam", {})}
        if self.shapes_key == "mixed":
            shapes = MIXED_SHAPES
        else:
            shapes = {"x": SINGLE_SHAPES[self.shapes_key]}
        return cls, cfg, h, shapes

    def inputs(self) -> tuple[str, dict, dict[str, np.ndarray], list[list[Any]]]:
        """``(class_name, config, initial values, gradient stream)``."""
        cls, cfg, h, shapes = self.lookup()
        init, stream = make_stream(shapes, h, self.dtype)
        return cls, cfg, init, stream


def jobs() -> list[Job]:
    """Every Keras run of test_conformance.py, in its order (option matrix, shapes, dtypes)."""
    out = [Job(case_id, "mixed", "float32") for case_id, *_ in CASES]
    out += [Job(cls, shape, "float32") for cls in CLASS_NAMES for shape in SINGLE_SHAPES]
    out += [Job(cls, "mixed", dtype) for cls in CLASS_NAMES for dtype in OTHER_DTYPES]
    return out


def input_key(class_name: str, config: dict, init: dict, stream: list[list[Any]]) -> str:
    """A hash of everything a Keras run depends on besides Keras itself."""
    digest = hashlib.sha256(repr((class_name, config)).encode())

    def add(array: np.ndarray) -> None:
        digest.update(f"{array.dtype.name}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())

    for name, value in init.items():
        digest.update(name.encode())
        add(value)
    for grads in stream:
        for g in grads:
            if g is None:
                digest.update(b"None")
            elif isinstance(g, tuple):
                digest.update(b"rows")
                add(g[1])
                add(g[2])
            else:
                add(g)
    return digest.hexdigest()[:24]


def recording_fingerprint() -> str:
    """A hash of the code that records (the script, and how the harness drives Keras) and of
    the Keras version: the stored results are current only while this is unchanged."""
    digest = hashlib.sha256(KERAS_VERSION.encode())
    digest.update(RECORDER.read_bytes())
    for fn in (harness.run_keras, harness._to_grad_for_keras, harness.dense_rows):
        digest.update(inspect.getsource(fn).encode())
    return digest.hexdigest()[:24]


# -- storage -----------------------------------------------------------------------------------
# One compressed .npz: the values of each dtype concatenated into one array (bfloat16 as its
# uint16 bits), and a JSON index giving, per case, where each of its arrays lies.


def save(results: dict[str, RunResult], path: Path = PATH) -> None:
    chunks: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}

    def put(value: np.ndarray) -> list[Any]:
        dtype = value.dtype.name
        bits = value.view(np.uint16) if dtype == "bfloat16" else value
        offset = sizes.get(dtype, 0)
        chunks.setdefault(dtype, []).append(bits.ravel())
        sizes[dtype] = offset + value.size
        return [dtype, list(value.shape), offset]

    index = {}
    for key, result in results.items():
        index[key] = {
            "iterations": result.iterations,
            "first_step": {p: put(v) for p, v in result.first_step.items()},
            "variables": {p: put(v) for p, v in result.variables.items()},
            "slots": [[name, *put(v)] for name, v in result.opt_variables],
        }
    meta = {
        "keras": KERAS_VERSION,
        "fingerprint": recording_fingerprint(),
        "cases": index,
    }
    data = {f"values_{d}": np.concatenate(c) for d, c in chunks.items()}
    data["index"] = np.frombuffer(json.dumps(meta, separators=(",", ":")).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **data)
    path.write_bytes(buffer.getvalue())


@dataclass(frozen=True)
class Stored:
    """The stored recording: its Keras version, fingerprint and results by input key."""

    keras: str
    fingerprint: str
    index: dict[str, Any]
    values: dict[str, np.ndarray]

    def get(self, key: str) -> RunResult | None:
        entry = self.index.get(key)
        if entry is None:
            return None

        def take(dtype: str, shape: list[int], offset: int) -> np.ndarray:
            size = int(np.prod(shape, dtype=np.int64))
            flat = self.values[dtype][offset : offset + size]
            if dtype == "bfloat16":
                flat = flat.view(ml_dtypes.bfloat16)
            return flat.reshape(shape).copy()

        return RunResult(
            variables={p: take(*where) for p, where in entry["variables"].items()},
            opt_variables=[(name, take(*where)) for name, *where in entry["slots"]],
            iterations=entry["iterations"],
            first_step={p: take(*where) for p, where in entry["first_step"].items()},
        )


@functools.cache
def stored(path: Path = PATH) -> Stored:
    """The stored recording (empty if there is none)."""
    if not path.exists():
        return Stored(keras="", fingerprint="", index={}, values={})
    with np.load(path) as data:
        meta = json.loads(data["index"].tobytes())
        values = {k.removeprefix("values_"): data[k] for k in data.files if k != "index"}
    return Stored(meta["keras"], meta["fingerprint"], meta["cases"], values)


def keras_result(job: Job) -> tuple[RunResult, tuple[dict, list]]:
    """Keras's result for ``job`` (stored, or run in live Keras when the stored recording
    lacks these exact inputs) and the job's inputs."""
    class_name, config, init, stream = job.inputs()
    result = stored().get(input_key(class_name, config, init, stream))
    if result is None:
        result = harness.run_keras(class_name, config, init, stream)
    return result, (init, stream)
