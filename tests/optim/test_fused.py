"""Fused numba kernels match the NumPy update rules bit for bit, and fuse only when they may."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.optim_core import fused

needs_numba = pytest.mark.skipif(not fused.available(), reason="numba kernels unavailable")

STEPS = 25
DTYPES = ["float32", "float64"]
SHAPES = {
    "1": (1,),
    "7": (7,),
    "1000": (1000,),
    "100003": (100_003,),
    "scalar": (),
    "2d": (40, 25),
    "3d": (3, 4, 5),
}
KERNELS = ("adam", "sgd", "sgd_momentum")


@contextlib.contextmanager
def count_fused_calls() -> Iterator[dict[str, int]]:
    """Wrap the public kernels of ``fused`` (as the optimizers call them) to count calls."""
    counts = dict.fromkeys(KERNELS, 0)
    originals = {name: getattr(fused, name) for name in KERNELS}

    def wrap(name: str) -> Any:
        def counted(*args: Any, **kwargs: Any) -> None:
            counts[name] += 1
            originals[name](*args, **kwargs)

        return counted

    for name in KERNELS:
        setattr(fused, name, wrap(name))
    try:
        yield counts
    finally:
        for name, func in originals.items():
            setattr(fused, name, func)


def make_problem(
    shapes: list[tuple[int, ...]], dtype: str, steps: int = STEPS, seed: int = 0
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Initial values and a gradient stream, with some exact zeros and large values mixed in."""
    rng = np.random.default_rng(seed)
    init = [np.asarray(rng.standard_normal(s) * 0.5, dtype=dtype) for s in shapes]
    stream = []
    for step in range(steps):
        grads = []
        for s in shapes:
            g = np.asarray(rng.standard_normal(s), dtype=dtype)
            flat = g.reshape(-1)
            flat[step % 3 :: 5] = 0
            flat[step % 7 :: 11] *= 1e3
            grads.append(g)
        stream.append(grads)
    return init, stream


def run(
    cls: str,
    config: dict[str, Any],
    init: list[np.ndarray],
    stream: list[list[np.ndarray]],
    use_fused: bool,
    make_variable: Any = None,
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Apply the stream; return the caller's arrays, every optimizer variable, kernel calls."""
    variables = [make_variable(v) if make_variable else v.copy() for v in init]
    opt = getattr(optim_core, cls)(**config)
    opt.use_fused_kernels = use_fused
    with count_fused_calls() as counts:
        for grads in stream:
            opt.apply(grads, variables)
    return variables, [v.numpy() for v in opt.variables], dict(counts)


def assert_bit_equal(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Same dtype, shape and bits (so -0.0 vs 0.0 counts as a difference)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.dtype.kind == "f":
        uint = np.dtype(f"u{a.dtype.itemsize}")
        a, b = a.view(uint), b.view(uint)
    assert np.array_equal(a, b), what


def check_same(cls: str, config: dict[str, Any], init: Any, stream: Any, **kw: Any) -> dict:
    """Run fused and unfused; assert bit-identical variables and slots; return fused calls."""
    v_on, s_on, calls_on = run(cls, config, init, stream, True, **kw)
    v_off, s_off, calls_off = run(cls, config, init, stream, False, **kw)
    assert sum(calls_off.values()) == 0
    assert len(s_on) == len(s_off)
    for i, (a, b) in enumerate(zip(v_on, v_off, strict=True)):
        assert_bit_equal(np.asarray(a), np.asarray(b), f"variable {i}")
    for i, (a, b) in enumerate(zip(s_on, s_off, strict=True)):
        assert_bit_equal(a, b, f"optimizer variable {i}")
    return calls_on


# --- bit-exactness over shapes, sizes and dtypes --------------------------------------------
CORE = {
    "Adam": ("Adam", {}, "adam"),
    "Adam-amsgrad": ("Adam", {"amsgrad": True}, "adam"),
    "SGD-momentum": ("SGD", {"momentum": 0.9}, "sgd_momentum"),
    "SGD-nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}, "sgd_momentum"),
    "SGD-plain": ("SGD", {"learning_rate": 0.1}, "sgd"),
}


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CORE))
def test_bit_exact_shapes(case: str, shape: str, dtype: str) -> None:
    cls, config, kernel = CORE[case]
    init, stream = make_problem([SHAPES[shape]], dtype)
    calls = check_same(cls, config, init, stream)
    assert calls[kernel] == STEPS


# --- bit-exactness with base options that still end in the same update_step -------------------
def _exp_decay() -> Any:
    schedule = getattr(optim_core.schedules, "ExponentialDecay", None)
    if schedule is None:
        pytest.skip("schedules.ExponentialDecay is not implemented yet")
    return schedule(initial_learning_rate=0.01, decay_steps=5, decay_rate=0.8)


OPTIONS: dict[str, tuple[str, dict[str, Any], str]] = {
    "Adam-betas-eps": ("Adam", {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}, "adam"),
    "Adam-weight_decay": ("Adam", {"weight_decay": 0.05}, "adam"),
    "Adam-clipnorm": ("Adam", {"clipnorm": 0.5}, "adam"),
    "Adam-global_clipnorm": ("Adam", {"global_clipnorm": 0.7}, "adam"),
    "Adam-clipvalue": ("Adam", {"clipvalue": 0.3}, "adam"),
    "Adam-ema": (
        "Adam",
        {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 4},
        "adam",
    ),
    "Adam-accumulation": ("Adam", {"gradient_accumulation_steps": 3}, "adam"),
    "Adam-loss_scale": ("Adam", {"loss_scale_factor": 64.0}, "adam"),
    "Adam-callable_lr": ("Adam", {"learning_rate": lambda: 0.02}, "adam"),
    "Adam-schedule": ("Adam", {"learning_rate": "exp_decay"}, "adam"),
    "Adam-amsgrad-mixed": (
        "Adam",
        {"amsgrad": True, "weight_decay": 0.01, "clipnorm": 1.0, "gradient_accumulation_steps": 2},
        "adam",
    ),
    "AdamW": ("AdamW", {}, "adam"),
    "AdamW-amsgrad": ("AdamW", {"amsgrad": True, "weight_decay": 0.02}, "adam"),
    "SGD-momentum-options": (
        "SGD",
        {"momentum": 0.5, "learning_rate": 0.1, "weight_decay": 0.01, "clipnorm": 1.0},
        "sgd_momentum",
    ),
    "SGD-nesterov-ema-accumulation": (
        "SGD",
        {"momentum": 0.9, "nesterov": True, "use_ema": True, "gradient_accumulation_steps": 2},
        "sgd_momentum",
    ),
    "SGD-plain-clipvalue": ("SGD", {"clipvalue": 0.3}, "sgd"),
}
MODEL = [(7,), (40, 25), (100_003,), (), (1,)]


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_bit_exact_options(case: str, dtype: str) -> None:
    """Several variables in one optimizer, so global clipping and slot indexing are exercised."""
    cls, config, kernel = OPTIONS[case]
    config = dict(config)
    if config.get("learning_rate") == "exp_decay":
        config["learning_rate"] = _exp_decay()
    init, stream = make_problem(MODEL, dtype)
    calls = check_same(cls, config, init, stream)
    updates = STEPS // (config.get("gradient_accumulation_steps") or 1)
    # Clipping and loss scaling turn the 0-d gradient into a NumPy scalar, which falls back.
    assert calls[kernel] in ((len(MODEL) - 1) * updates, len(MODEL) * updates)


# --- fallbacks: what must not fuse still gives the NumPy rule's result -----------------------
@needs_numba
@pytest.mark.parametrize("layout", ["strided", "fortran"])
@pytest.mark.parametrize("case", ["Adam", "SGD-momentum", "SGD-plain"])
def test_non_contiguous_variable_falls_back(case: str, layout: str) -> None:
    cls, config, kernel = CORE[case]
    init, stream = make_problem([(30, 20)], "float32")
    outer: list[np.ndarray] = []

    def make_variable(v: np.ndarray) -> np.ndarray:
        if layout == "fortran":
            return np.asfortranarray(v)
        base = np.full((30, 40), 7.0, dtype=v.dtype)
        base[:, ::2] = v
        outer.append(base)
        return base[:, ::2]

    v_on, _, calls = run(cls, config, init, stream, True, make_variable)
    assert calls[kernel] == 0
    outer_on = outer.pop() if outer else None
    v_off, _, _ = run(cls, config, init, stream, False, make_variable)
    assert_bit_equal(v_on[0], v_off[0], "variable")
    if outer_on is not None:
        assert np.all(outer_on[:, 1::2] == 7.0)  # the other columns are untouched


@needs_numba
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy rule warns
def test_float16_and_mixed_dtypes_fall_back() -> None:
    init, stream = make_problem([(50,), (50,)], "float16")
    init[1] = init[1].astype("float32")
    stream = [[grads[0], grads[1].astype("float32")] for grads in stream]
    _, _, calls = run("Adam", {}, init, stream, True)
    assert calls["adam"] == STEPS  # the float32 variable fuses; float16 does not


@needs_numba
@pytest.mark.parametrize("case", ["Adam", "Adam-amsgrad", "SGD-nesterov", "SGD-plain"])
def test_read_only_gradient(case: str) -> None:
    """np.frombuffer gradients (read-only, as received off the wire) fuse without a copy."""
    cls, config, kernel = CORE[case]
    init, stream = make_problem([(64, 33)], "float32")
    wire = [[np.frombuffer(g.tobytes(), dtype=g.dtype).reshape(g.shape) for g in s] for s in stream]
    assert not wire[0][0].flags.writeable
    g0 = wire[0][0]
    assert fused.can_fuse(optim_core.SGD(), init[0].copy(), g0, init[0].copy())
    calls = check_same(cls, config, init, wire)
    assert calls[kernel] == STEPS
    assert np.array_equal(wire[0][0], stream[0][0])  # the gradient was not written to


@needs_numba
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the NumPy rule warns
@pytest.mark.parametrize("case", ["Adam", "Adam-amsgrad", "SGD-momentum", "SGD-nesterov"])
def test_non_finite_gradients_propagate_alike(case: str) -> None:
    cls, config, kernel = CORE[case]
    init, stream = make_problem([(40,)], "float32")
    stream[2][0][[0, 5]] = np.inf
    stream[3][0][[1, 5]] = -np.inf
    stream[4][0][[2, 9]] = np.nan
    results = [run(cls, config, init, stream, on) for on in (True, False)]
    (v_on, s_on, calls), (v_off, s_off, _) = results
    assert calls[kernel] == STEPS
    for a, b in zip(v_on + s_on, v_off + s_off, strict=True):
        assert np.array_equal(a, b, equal_nan=True)
    assert np.isnan(v_on[0]).any()


@needs_numba
def test_writes_land_in_memmap_variable(tmp_path: Any) -> None:
    init, stream = make_problem([(257,)], "float32")
    mm = np.memmap(tmp_path / "w.bin", dtype="float32", mode="w+", shape=(257,))
    mm[:] = init[0]
    v_on, _, calls = run("Adam", {}, init, stream, True, lambda v: mm)
    v_off, _, _ = run("Adam", {}, init, stream, False)
    assert calls["adam"] == STEPS
    assert v_on[0] is mm
    assert_bit_equal(np.asarray(mm), v_off[0], "memmap variable")


# --- kernels offered to base.py (decay, EMA): same bits as its NumPy expressions -----------
@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["1", "1000", "100003", "2d"])
def test_weight_decay_and_ema_kernels(shape: str, dtype: str) -> None:
    rng = np.random.default_rng(3)
    dt = np.dtype(dtype).type
    w = np.asarray(rng.standard_normal(SHAPES[shape]), dtype=dtype)
    avg = np.asarray(rng.standard_normal(SHAPES[shape]), dtype=dtype)
    wd, lr, mu = dt(0.05), dt(0.01), dt(0.99)
    expected_w = w - w * wd * lr  # base.py _apply_weight_decay
    expected_avg = mu * avg + (dt(1) - mu) * w  # base.py _update_moving_averages
    got_w = w.copy()
    fused.weight_decay(got_w, wd, lr)
    fused.ema(avg, w, mu, dt(1) - mu)
    assert_bit_equal(got_w, expected_w, "weight decay")
    assert_bit_equal(avg, expected_avg, "ema")


# --- several threads: bit-identical to one -----------------------------------------------
@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Three threads from 1 element up, in pieces of 1024 elements (so the test sizes run in
    several pieces, a ragged one last); yields the sizes of the pieces the kernels ran on."""
    pieces: list[int] = []
    kernels = fused._kernels()

    def counting(kernel: Any) -> Any:
        def run(*args: Any) -> None:
            pieces.append(args[0].shape[0])
            kernel(*args)

        return run

    counted = SimpleNamespace(**{n: counting(k) for n, k in vars(kernels).items()})
    monkeypatch.setattr(fused, "_MIN_PIECE", 256)
    monkeypatch.setattr(fused, "_kernels", lambda: counted)
    fused.set_threads(3, min_elements=1)
    try:
        yield pieces
    finally:
        fused.set_threads(1)


PARALLEL_SHAPES = [(1,), (511,), (1024,), (3001,), (20_011,), (37, 1001)]


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", [*CORE, "Adam-ema", "AdamW-amsgrad", "SGD-nesterov-ema-accumulation"]
)
def test_several_threads_are_bit_identical(case: str, dtype: str, threads: list[int]) -> None:
    """Every fused optimizer, on odd sizes, equals the NumPy rule (which equals the one-thread
    kernels, above) while its kernels run in pieces on three threads."""
    cls, config, _ = {**CORE, **OPTIONS}[case]
    init, stream = make_problem(PARALLEL_SHAPES, dtype, steps=6)
    check_same(cls, config, init, stream)
    assert 1024 in threads and 20_011 not in threads, "the large variables ran whole"


@needs_numba
def test_weight_decay_and_ema_on_several_threads(threads: list[int]) -> None:
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal(10_007).astype(np.float32)
    avg0 = rng.standard_normal(10_007).astype(np.float32)
    dt = np.float32
    wd, lr, mu = dt(0.05), dt(0.01), dt(0.99)
    w, avg = w0.copy(), avg0.copy()
    fused.weight_decay(w, wd, lr)
    fused.ema(avg, w0, mu, dt(1) - mu)
    assert_bit_equal(w, w0 - w0 * wd * lr, "weight decay")
    assert_bit_equal(avg, mu * avg0 + (dt(1) - mu) * w0, "ema")
    assert sorted(set(threads)) == [791, 1024]  # 10,007 = 9 x 1024 + 791


@needs_numba
def test_pool_threads_take_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first piece waits until another thread has run one: the call completes only if
    a pool thread takes pieces while the calling thread is busy."""
    ran_elsewhere = threading.Event()
    caller = threading.get_ident()
    sgd = fused._kernels().sgd

    def kernel(w: np.ndarray, g: np.ndarray, lr: Any) -> None:
        if threading.get_ident() == caller:
            assert ran_elsewhere.wait(timeout=60), "no pool thread took a piece"
        else:
            ran_elsewhere.set()
        sgd(w, g, lr)

    monkeypatch.setattr(fused, "_MIN_PIECE", 256)
    monkeypatch.setattr(fused, "_kernels", lambda: SimpleNamespace(sgd=kernel))
    fused.set_threads(2, min_elements=1)
    try:
        w, g = np.ones(4096, np.float32), np.full(4096, 2.0, np.float32)
        fused.sgd(w, g, 0.5)
    finally:
        fused.set_threads(1)
    assert (w == 0).all()


def test_set_threads_checks_its_arguments() -> None:
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads must be an integer"):
            fused.set_threads(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_elements"):
        fused.set_threads(2, min_elements=0)
    assert fused.threads() == (1, fused.DEFAULT_MIN_ELEMENTS)
    assert optim_core.kernel_threads() == fused.threads()


# --- can_fuse itself ------------------------------------------------------------------------
class _Opt:
    use_fused_kernels = True


def _arrays(n: int = 10, dtype: str = "float32") -> list[np.ndarray]:
    return [np.ones(n, dtype=dtype) for _ in range(4)]


@needs_numba
def test_can_fuse_accepts() -> None:
    assert fused.can_fuse(_Opt(), *_arrays())
    assert fused.can_fuse(_Opt(), *_arrays(dtype="float64"))
    assert fused.can_fuse(_Opt(), *(np.ones((3, 4), "float32") for _ in range(4)))
    assert fused.can_fuse(_Opt(), np.ones((), "float32"), np.ones((), "float32"))
    w, g, m, v = _arrays()
    g.flags.writeable = False
    assert fused.can_fuse(_Opt(), w, g, m, v)  # only the gradient may be read-only


def test_can_fuse_refuses() -> None:
    off = _Opt()
    off.use_fused_kernels = False
    assert not fused.can_fuse(off, *_arrays())
    assert not fused.can_fuse(_Opt())
    assert not fused.can_fuse(_Opt(), *_arrays(0))
    assert not fused.can_fuse(_Opt(), *_arrays(dtype="float16"))
    assert not fused.can_fuse(_Opt(), *_arrays(dtype=">f4"))
    w, g, m, v = _arrays()
    assert not fused.can_fuse(_Opt(), w, g.astype("float64"), m, v)
    assert not fused.can_fuse(_Opt(), w, g[:5], m, v)
    assert not fused.can_fuse(_Opt(), w, g.reshape(2, 5), m, v)
    assert not fused.can_fuse(_Opt(), w, np.ones(20, "float32")[::2], m, v)
    assert not fused.can_fuse(_Opt(), w, list(g), m, v)
    unaligned = np.frombuffer(b"\0" * 44, dtype="float32", count=10, offset=2)
    assert not fused.can_fuse(_Opt(), w, unaligned, m, v)
    m.flags.writeable = False
    assert not fused.can_fuse(_Opt(), w, g, m, v)
    m.flags.writeable = True
    w.flags.writeable = False
    assert not fused.can_fuse(_Opt(), w, g, m, v)


def test_can_fuse_refuses_cupy_like_arrays() -> None:
    """Arrays of other libraries (CuPy) are refused without importing them."""
    cupy_like = type("ndarray", (), {"__module__": "cupy._core.core", "dtype": np.float32})
    had_cupy = "cupy" in sys.modules
    assert not fused.can_fuse(_Opt(), cupy_like(), *_arrays()[1:])
    assert not fused.can_fuse(_Opt(), *_arrays()[:3], cupy_like())
    assert ("cupy" in sys.modules) == had_cupy


# --- lazy import and graceful absence of numba ----------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_numba_is_not_imported_with_the_package() -> None:
    code = (
        "import sys\n"
        "from paramserve import optim_core\n"
        "import numpy as np\n"
        "w = np.ones(3, np.float16)\n"
        "optim_core.Adam().apply([np.ones(3, np.float16)], [w])\n"
        "assert 'numba' not in sys.modules, 'numba imported eagerly'\n"
        "w = np.ones(3, np.float32)\n"
        "optim_core.Adam().apply([np.ones(3, np.float32)], [w])\n"
        "assert 'numba' in sys.modules, 'the first float32 step should load the kernels'\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr


def test_missing_numba_falls_back_to_numpy() -> None:
    code = (
        "import sys\n"
        "sys.modules['numba'] = None  # any import of numba now raises ImportError\n"
        "import numpy as np\n"
        "from paramserve import optim_core\n"
        "from paramserve.optim_core import fused\n"
        "w = np.ones(5, np.float32)\n"
        "opt = optim_core.Adam()\n"
        "opt.apply([np.full(5, 0.5, np.float32)], [w])\n"
        "assert not fused.available()\n"
        "assert not fused.can_fuse(opt, w, w, w, w)\n"
        "assert np.all(w < 1)\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr


@needs_numba
def test_no_writable_cache_still_fuses() -> None:
    """When numba cannot cache on disk, the kernels compile in memory instead."""
    code = (
        "import numba\n"
        "real = numba.njit\n"
        "def njit(*args, cache=False, **kwargs):\n"
        "    if cache:\n"
        "        raise RuntimeError('cannot cache function: no locator available')\n"
        "    return real(*args, **kwargs)\n"
        "numba.njit = njit\n"
        "from paramserve.optim_core import fused\n"
        "assert fused.available()\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr


@needs_numba
def test_benchmark_script_runs() -> None:
    """bench/optimizer_apply.py stays runnable, and its Adam rows take the fused path."""
    script = Path(__file__).resolve().parents[2] / "bench" / "optimizer_apply.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--sizes", "4K", "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)["rows"]}
    assert rows["Adam fused"]["path"] == "fused"
    assert rows["Adam numpy"]["path"] == "numpy"
    assert rows["SGD momentum fused"]["path"] == "fused"
    assert all(r["elems_per_s"] > 0 for r in rows.values() if r["elems_per_s"] is not None)
