"""Optimizer.state_owners(): the model variable each optimizer slot belongs to (None for the
state of the whole step), for every builtin optimizer and the options that add slots."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from paramserve import optim_core
from paramserve.optim_core import Optimizer, Variable
from paramserve.optim_core.loss_scale_optimizer import INNER_PREFIX

# 2-D, 1-D and 3-D variables, an embedding (Muon keeps it on its AdamW path), paths with "/".
SHAPES = {
    "embedding": (10, 4),
    "dense/kernel": (4, 3),
    "dense/bias": (3,),
    "conv/kernel": (2, 3, 5),
}

CASES: list[tuple[str, Any]] = [
    ("SGD", lambda: optim_core.SGD(0.1)),
    ("SGD-momentum", lambda: optim_core.SGD(0.1, momentum=0.9)),
    ("RMSprop-centered", lambda: optim_core.RMSprop(momentum=0.5, centered=True)),
    ("Adam", lambda: optim_core.Adam()),
    ("Adam-amsgrad", lambda: optim_core.Adam(amsgrad=True)),
    ("AdamW", lambda: optim_core.AdamW(weight_decay=0.1)),
    ("Adadelta", lambda: optim_core.Adadelta()),
    ("Adagrad", lambda: optim_core.Adagrad(initial_accumulator_value=0.3)),
    ("Adamax", lambda: optim_core.Adamax()),
    ("Nadam", lambda: optim_core.Nadam()),
    ("Ftrl", lambda: optim_core.Ftrl()),
    ("Lion", lambda: optim_core.Lion()),
    ("Lamb", lambda: optim_core.Lamb()),
    ("Adafactor", lambda: optim_core.Adafactor()),
    ("Muon", lambda: optim_core.Muon()),
    ("ScheduleFreeAdamW", lambda: optim_core.ScheduleFreeAdamW()),
    ("Adam-ema-accumulate", lambda: optim_core.Adam(use_ema=True, gradient_accumulation_steps=2)),
    ("LossScaleOptimizer", lambda: optim_core.LossScaleOptimizer(optim_core.Nadam())),
    (
        "LossScaleOptimizer-ema",
        lambda: optim_core.LossScaleOptimizer(optim_core.SGD(0.1, momentum=0.5, use_ema=True)),
    ),
    ("Adam-schedule", lambda: optim_core.Adam(optim_core.schedules.ExponentialDecay(0.1, 5, 0.9))),
]
# The step-wide state each optimizer keeps, besides the iteration count and learning rate.
STEP_WIDE = {"Nadam": {"variable"}, "LossScaleOptimizer": {"step_counter", "dynamic_scale"}}


def _built(make: Any) -> Optimizer:
    optimizer = make()
    rng = np.random.default_rng(0)
    optimizer.build(
        [Variable(rng.standard_normal(s).astype(np.float32), path=n) for n, s in SHAPES.items()]
    )
    return optimizer


def test_every_builtin_optimizer_is_covered() -> None:
    covered = {name.split("-")[0] for name, _ in CASES}
    assert covered == {cls.__name__ for cls in optim_core.BUILTIN_OPTIMIZERS}


@pytest.mark.parametrize("name, make", CASES, ids=[n for n, _ in CASES])
def test_owners_partition_the_state_keys(name: str, make: Any) -> None:
    optimizer = _built(make)
    owners = optimizer.state_owners()
    state = optimizer.state_dict()
    # Every key of the state, in its order, exactly once.
    assert list(owners) == list(state)
    slots = dict(zip(state, optimizer.variables, strict=True))
    kind = name.split("-")[0]
    lso = isinstance(optimizer, optim_core.LossScaleOptimizer)
    rows_separable = (optimizer.inner_optimizer if lso else optimizer).rows_separable
    # A learning rate schedule is config, not state.
    step_wide = {"iteration"} if "schedule" in name else {"iteration", "learning_rate"}
    expected = step_wide | STEP_WIDE.get(kind, set())
    if lso:
        inner = step_wide | STEP_WIDE.get(type(optimizer.inner_optimizer).__name__, set())
        expected |= {INNER_PREFIX + k for k in inner}
    assert {k for k, owner in owners.items() if owner is None} == expected
    for key, owner in owners.items():
        if owner is None:
            assert state[key].shape == (), key  # step-wide state is scalars
            continue
        assert owner in SHAPES, (key, owner)
        # Keras names a slot after its variable's path: the owner is that variable.
        bare = key.removeprefix(INNER_PREFIX) if lso else key
        assert bare.startswith(owner.replace("/", "_") + "_"), (key, owner)
        if rows_separable:
            # A rule that may split a variable by rows keeps slots of the variable's shape,
            # so each shard's piece of a slot is the same rows as its piece of the variable.
            assert slots[key].shape == SHAPES[owner], key
            assert state[key].shape[0] == SHAPES[owner][0], key
    # Every variable owns the same number of slots (one of each kind), except where a rule
    # keeps some variables on another path (Muon's AdamW velocity).
    counts = {n: sum(o == n for o in owners.values()) for n in SHAPES}
    if kind != "Muon":
        assert len(set(counts.values())) == 1, counts


def test_specific_owners() -> None:
    owners = _built(lambda: optim_core.Adafactor()).state_owners()
    assert owners["dense_kernel_r"] == owners["dense_kernel_c"] == "dense/kernel"
    assert owners["dense_bias_r"] == "dense/bias"  # a placeholder, still the variable's
    assert owners["conv_kernel_velocity"] == "conv/kernel"
    muon = _built(lambda: optim_core.Muon()).state_owners()
    assert muon["embedding_velocity"] == "embedding"
    assert "dense_kernel_velocity" not in muon  # the Muon path keeps no velocity
    ema = _built(lambda: optim_core.SGD(use_ema=True, gradient_accumulation_steps=3))
    assert ema.state_owners() == {
        "iteration": None,
        "learning_rate": None,
        **{f"{n.replace('/', '_')}_average": n for n in SHAPES},
        **{f"{n.replace('/', '_')}_gradient_accumulator": n for n in SHAPES},
    }


def test_unbuilt_optimizer_has_only_step_wide_state() -> None:
    assert optim_core.Adam().state_owners() == {"iteration": None, "learning_rate": None}


def test_custom_optimizer_names_owners_with_add_variable() -> None:
    class Custom(Optimizer):
        rows_separable = True

        def build(self, variables: Any) -> None:
            if self.built:
                return
            super().build(variables)
            self.slots = [
                self.add_variable(v.shape, name=f"{v.name}_s", owner=v)
                for v in self._trainable_variables
            ]
            self.total = self.add_variable((), name="total")
            self.by_path = self.add_variable((2,), name="x", owner="b")

        def update_step(self, gradient: Any, variable: Variable, learning_rate: Any) -> None:
            raise NotImplementedError

    optimizer = Custom(0.1)
    optimizer.build([Variable(np.zeros(3, np.float32), path="a"), Variable(np.zeros(2), path="b")])
    assert optimizer.state_owners() == {
        "iteration": None,
        "learning_rate": None,
        "a_s": "a",
        "b_s": "b",
        "total": None,
        "x": "b",
    }


@pytest.mark.parametrize("name, make", CASES, ids=[n for n, _ in CASES])
def test_owners_with_slabs_are_those_without(name: str, make: Any) -> None:
    # Variables packed into a slab (as the server keeps them): the slots of an optimizer
    # updating the slab whole are views of slot slabs, still each owned by its variable,
    # and the slot slabs themselves are no state of their own.
    rng = np.random.default_rng(0)
    arrays = [(n, rng.standard_normal(s).astype(np.float32)) for n, s in SHAPES.items()]
    variables, slabs = optim_core.pack(arrays)
    assert slabs
    packed = make()
    packed.build(variables)
    plain = _built(make)
    assert packed.state_owners() == plain.state_owners()
    assert list(packed.state_dict()) == list(plain.state_dict())
    assert len(packed.variables) == len(plain.variables)
    inner = packed.inner_optimizer if isinstance(packed, optim_core.LossScaleOptimizer) else packed
    if inner._slabs:  # the slot slabs are never listed
        buffers = {id(stand_in.value) for _, stand_in in inner._slabs.values()}
        assert not buffers & {id(v.value) for v in packed.variables}
        assert not any("slab" in k for k in packed.state_dict())
