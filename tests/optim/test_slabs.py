"""Flat slabs: a whole slab updated in one call equals the per-variable update, bit for bit.

Every element-wise optimizer is run twice on the same start: once on variables packed into
slabs and applied with one flat gradient per slab, once on plain variables applied one by
one. Weights, every optimizer variable and the state dicts must be identical (NaN patterns
included). Optimizers with per-tensor statistics (Lamb, Muon, Adafactor) and per-tensor
clipping never update a slab whole, and give the per-variable results too.
"""

from __future__ import annotations

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.optim_core import IndexedSlices, Slab, Variable, pack

SHAPES = {"a/kernel": (3, 4), "a/bias": (4,), "b/kernel": (4, 2), "b/scale": (), "c": (5,)}


def _arrays(dtype: str = "float32", seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


def _grads(step: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    return {n: (rng.standard_normal(a.shape) * 0.5).astype(a.dtype) for n, a in arrays.items()}


def _flat(slab: Slab, grads: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(grads[v.path]).reshape(-1) for v in slab.variables])


CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("rmsprop", {}),
    ("rmsprop", {"momentum": 0.5, "centered": True}),
    ("adam", {}),
    ("adam", {"amsgrad": True, "clipvalue": 0.3}),
    ("adam", {"use_ema": True, "ema_overwrite_frequency": 2}),
    ("adam", {"gradient_accumulation_steps": 2}),
    ("adam", {"loss_scale_factor": 4.0, "weight_decay": 0.1}),
    ("adamw", {}),
    ("adadelta", {}),
    ("adagrad", {}),
    ("adamax", {}),
    ("nadam", {}),
    ("lion", {}),
]


def _make(name: str, options: dict, *, slabs: bool) -> optim_core.Optimizer:
    config = {"learning_rate": 0.01, **options}
    opt = optim_core.get({"class_name": name, "config": config})
    opt.use_slabs = slabs
    return opt


def _run(
    name: str,
    options: dict,
    *,
    packed: bool,
    dtype: str | dict[str, str] = "float32",
    steps: int = 4,
    exclude: list[str] | None = None,
    sparse: bool = False,
    fused: bool = True,
) -> tuple[optim_core.Optimizer, dict[str, np.ndarray]]:
    dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(SHAPES, dtype)
    arrays = {n: a.astype(dtypes[n]) for n, a in _arrays().items()}
    opt = _make(name, options, slabs=packed)
    opt.use_fused_kernels = fused
    if exclude:
        opt.exclude_from_weight_decay(var_names=exclude)
    if packed:
        variables, slabs = pack(list(arrays.items()))
    else:
        variables = [Variable(a.copy(), path=n) for n, a in arrays.items()]
        slabs = []
    opt.build(variables)
    if packed:
        assert len(opt._slabs) == (len(slabs) if opt._slab_rule() else 0)
    for step in range(steps):
        grads = _grads(step, arrays)
        grads = {n: g.astype(dtypes[n]) for n, g in grads.items()}
        sparse_grad = None
        if sparse:  # rows 0 and 2 (twice) of a/kernel as row gradients
            rows = np.array([2, 0, 2])
            values = grads["a/kernel"][[0, 1, 2]]
            sparse_grad = IndexedSlices(rows, values)
            dense = np.zeros_like(grads["a/kernel"])
            np.add.at(dense, rows, values)
            grads["a/kernel"] = dense
        if not packed:
            given = [grads[v.path] for v in variables]
            if sparse_grad is not None:
                given[list(SHAPES).index("a/kernel")] = sparse_grad
            opt.apply(given, variables)
            continue
        in_slabs = {v.path for s in slabs for v in s.variables}
        rest = [v for v in variables if v.path not in in_slabs]
        opt.apply([_flat(s, grads) for s in slabs] + [grads[v.path] for v in rest], [*slabs, *rest])
    return opt, {v.path: np.array(v.value) for v in variables}


def _assert_same(a: tuple, b: tuple) -> None:
    (opt_a, weights_a), (opt_b, weights_b) = a, b
    assert list(weights_a) == list(weights_b)
    for n in weights_a:
        np.testing.assert_array_equal(weights_a[n], weights_b[n], strict=True, err_msg=n)
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    assert list(state_a) == list(state_b)
    for k in state_a:
        np.testing.assert_array_equal(state_a[k], state_b[k], strict=True, err_msg=k)
    assert opt_a.iterations == opt_b.iterations


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_slab_apply_equals_per_variable_apply(name, options, fused):
    packed = _run(name, options, packed=True, fused=fused)
    assert packed[0]._slabs, "an element-wise optimizer updates the slab whole"
    _assert_same(packed, _run(name, options, packed=False, fused=fused))


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
def test_float64_and_mixed_dtypes(name):
    for dtype in (
        "float64",
        {
            "a/kernel": "float64",
            "a/bias": "float32",
            "b/kernel": "float64",
            "b/scale": "float32",
            "c": "float16",
        },
    ):
        _assert_same(
            _run(name, {"momentum": 0.9} if name == "sgd" else {}, packed=True, dtype=dtype),
            _run(name, {"momentum": 0.9} if name == "sgd" else {}, packed=False, dtype=dtype),
        )


def test_weight_decay_with_some_variables_excluded():
    options = {"weight_decay": 0.05}
    for exclude in (["bias"], ["bias", "kernel", "scale", "c"]):
        packed = _run("adamw", options, packed=True, exclude=exclude)
        _assert_same(packed, _run("adamw", options, packed=False, exclude=exclude))


def test_sparse_rows_densified_into_the_flat_gradient():
    _assert_same(
        _run("adam", {}, packed=True, sparse=True), _run("adam", {}, packed=False, sparse=True)
    )


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("lamb", {}),
        ("adafactor", {}),
        ("muon", {}),
        ("adam", {"clipnorm": 0.5}),
        ("sgd", {"global_clipnorm": 0.5, "momentum": 0.9}),
        ("ftrl", {}),
        ("schedulefreeadamw", {}),
    ],
)
def test_per_tensor_statistics_stay_per_variable(name, options):
    packed = _run(name, options, packed=True)
    assert not packed[0]._slabs  # each variable on its own: norms, factors per tensor
    _assert_same(packed, _run(name, options, packed=False))


def test_slab_variables_are_views_and_state_round_trips():
    arrays = _arrays()
    variables, (slab,) = pack(list(arrays.items()))
    for v in variables:
        assert np.shares_memory(v.value, slab.buffer)
        np.testing.assert_array_equal(v.value, arrays[v.path])
    opt = _make("adam", {}, slabs=True)
    opt.build(variables)
    grads = _grads(0, arrays)
    opt.apply([_flat(slab, grads)], [slab])
    state = opt.state_dict()
    # Loading the state back writes through the slot views into the slot slabs.
    other_vars, (other_slab,) = pack(list(arrays.items()))
    other = _make("adam", {}, slabs=True)
    other.build(other_vars)
    other.load_state_dict(state)
    for v, w in zip(variables, other_vars, strict=True):
        w.assign(v.value)
    opt.apply([_flat(slab, _grads(1, arrays))], [slab])
    other.apply([_flat(other_slab, _grads(1, arrays))], [other_slab])
    for v, w in zip(variables, other_vars, strict=True):
        np.testing.assert_array_equal(v.value, w.value, strict=True)


def test_a_slab_without_its_optimizer_support_is_applied_variable_by_variable():
    arrays = _arrays()
    variables, (slab,) = pack(list(arrays.items()))
    opt = _make("lamb", {}, slabs=True)
    opt.build(variables)
    plain = [Variable(a.copy(), path=n) for n, a in arrays.items()]
    ref = _make("lamb", {}, slabs=False)
    ref.build(plain)
    grads = _grads(0, arrays)
    opt.apply([_flat(slab, grads)], [slab])
    ref.apply([grads[v.path] for v in plain], plain)
    for v, w in zip(variables, plain, strict=True):
        np.testing.assert_array_equal(v.value, w.value, strict=True)
    with pytest.raises(ValueError, match="must be flat"):
        opt.apply([np.zeros(3, np.float32)], [slab])


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("name", "options"),
    [("adam", {"weight_decay": 0.01, "use_ema": True}), ("sgd", {"momentum": 0.9}), ("lamb", {})],
)
def test_gpu_slab_apply_equals_per_variable_apply(name, options):
    """On CuPy a slab is one kernel launch per operation instead of one per variable, with
    the same per-element operations: the same bits as variable by variable."""
    if not optim_core.gpu_available():
        pytest.skip("no usable GPU (CuPy) on this machine")
    cupy = optim_core.array_module("gpu")
    arrays = _arrays()
    results = []
    for packed in (True, False):
        opt = _make(name, options, slabs=packed)
        if packed:
            variables, slabs = pack(list(arrays.items()), device="gpu")
        else:
            variables = [Variable(a.copy(), path=n, device="gpu") for n, a in arrays.items()]
            slabs = []
        opt.build(variables)
        for step in range(3):
            grads = {n: cupy.asarray(g) for n, g in _grads(step, arrays).items()}
            if packed:
                flat = cupy.concatenate([grads[v.path].reshape(-1) for v in slabs[0].variables])
                opt.apply([flat], slabs)
            else:
                opt.apply([grads[v.path] for v in variables], variables)
        results.append((opt, {v.path: cupy.asnumpy(v.value) for v in variables}))
    _assert_same(*results)


def test_host_state_starts_on_a_cache_line():
    """Slabs, lone variables and every slot start at a multiple of 64 bytes (the fused
    kernels' vector loads never straddle two cache lines); values are as given."""
    arrays = _arrays("float64")
    arrays["lone"] = np.arange(7, dtype=np.float32)
    variables, slabs = pack(list(arrays.items()))
    optimizer = optim_core.get("adam")
    optimizer.build(variables)
    for variable in variables:
        np.testing.assert_array_equal(variable.value, arrays[variable.path])
    buffers = [s.buffer for s in slabs] + [v.value for v in variables if v.slab is None]
    # Slots: the lone variable's, and the first of each slot slab (the others are views of
    # it at their variables' offsets).
    first = next(iter(arrays)).replace("/", "_")
    buffers += [
        v.value
        for v in optimizer.variables
        if v.path.split("/", 1)[1].startswith(("lone_", f"{first}_"))
    ]
    assert len(buffers) == 6
    assert all(b.ctypes.data % 64 == 0 for b in buffers)
