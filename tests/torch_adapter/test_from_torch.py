"""from_torch: torch optimizers' settings as the nearest Keras config, and what differs.

Each translation is run against torch's own optimizer on the same float64 gradients: where
the rules agree the trajectories match to 1e-7 (Keras keeps the learning rate as float32);
where only epsilon's placement differs (gradients of order 1 make it negligible) to 1e-6.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from paramserve import optim_core  # noqa: E402
from paramserve.client.torch import TorchTranslation, from_torch  # noqa: E402

STEPS = 6
# Where the rules agree: the only difference left is the learning rate, which Keras keeps
# as float32 (0.1 is 0.10000000149...), a relative 1.5e-8 per step.
EXACT = 1e-7


def _gradients() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.standard_normal(5) for _ in range(STEPS)]


def _torch_trajectory(cls: Any, kwargs: dict[str, Any]) -> np.ndarray:
    param = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
    opt = cls([param], **kwargs)
    for grad in _gradients():
        param.grad = torch.from_numpy(grad.copy())
        opt.step()
    return param.detach().numpy()


def _keras_trajectory(translation: TorchTranslation) -> np.ndarray:
    variable = optim_core.Variable(np.linspace(-1, 1, 5), path="w")
    opt = optim_core.deserialize(translation.config())
    for grad in _gradients():
        opt.apply([grad.copy()], [variable])
    return variable.value


def _translate(cls: Any, kwargs: dict[str, Any]) -> TorchTranslation:
    param = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    return from_torch(cls([param], **kwargs))


CASES = [
    # (torch class, settings, Keras class, expected Keras config entries, rtol, notes)
    (torch.optim.SGD, {"lr": 0.1}, "SGD", {"momentum": 0.0, "nesterov": False}, EXACT, []),
    (
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9},
        "SGD",
        {"momentum": 0.9},
        EXACT,
        ["momentum buffer holds steps with the learning rate"],
    ),
    (
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
        "SGD",
        {"nesterov": True},
        EXACT,
        [],
    ),
    (
        torch.optim.SGD,
        {"lr": 0.1, "weight_decay": 0.01},
        "SGD",
        {"weight_decay": 0.01},
        EXACT,
        ["same step as Keras's decoupled decay"],
    ),
    (
        torch.optim.Adam,
        {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-8},
        "Adam",
        {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-8, "amsgrad": False},
        1e-6,
        ["sqrt(v / (1 - beta_2^t))", "10x torch's at step 1"],
    ),
    (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}, "Adam", {"amsgrad": True}, 1e-6, []),
    (
        torch.optim.AdamW,
        {"lr": 0.01, "weight_decay": 0.1},
        "AdamW",
        {"weight_decay": 0.1},
        1e-6,
        ["epsilon"],
    ),
    (
        torch.optim.Adam,
        {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "AdamW",
        {"weight_decay": 0.1},
        1e-6,
        [],
    ),
    (
        torch.optim.NAdam,
        {"lr": 0.01, "betas": (0.9, 0.99), "momentum_decay": 1.0},
        "Nadam",
        {"beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-8},
        EXACT,
        [],
    ),
    (
        torch.optim.RMSprop,
        {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "centered": True},
        "RMSprop",
        {"rho": 0.9, "momentum": 0.5, "centered": True, "epsilon": 1e-16},
        1e-6,
        ["eps**2", "momentum buffer holds steps"],
    ),
    (
        torch.optim.Adagrad,
        {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.2},
        "Adagrad",
        {"initial_accumulator_value": 0.2, "epsilon": 1e-20},
        1e-6,
        ["InverseTimeDecay", "eps**2"],
    ),
    (
        torch.optim.Adamax,
        {"lr": 0.01, "betas": (0.9, 0.99)},
        "Adamax",
        {"beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-8},
        1e-6,
        ["inside the running maximum"],
    ),
    (torch.optim.Adadelta, {"lr": 1.0, "rho": 0.8}, "Adadelta", {"rho": 0.8}, EXACT, []),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "keras", "entries", "rtol", "notes"),
    CASES,
    ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)],
)
def test_translation_follows_torchs_trajectory(cls, kwargs, keras, entries, rtol, notes) -> None:
    translation = _translate(cls, kwargs)
    config = translation.config()
    assert config["class_name"] == keras
    for key, value in entries.items():
        assert config["config"][key] == pytest.approx(value, rel=1e-12), key
    text = "\n".join(translation.differences)
    for note in notes:
        assert note in text
    assert str(translation).startswith(f"torch.optim.{cls.__name__} -> {keras}")
    np.testing.assert_allclose(
        _keras_trajectory(translation), _torch_trajectory(cls, kwargs), rtol=rtol, atol=1e-7
    )


def test_adams_l2_weight_decay_maps_to_decoupled_and_says_so() -> None:
    translation = _translate(torch.optim.Adam, {"weight_decay": 0.01})
    assert translation.config()["class_name"] == "Adam"
    assert translation.config()["config"]["weight_decay"] == 0.01
    assert any("L2 term" in d and "decoupled" in d for d in translation.differences)


def test_nadams_momentum_schedule_is_stated() -> None:
    """torch's default momentum_decay=0.004 keeps mu near beta_1/2 for thousands of steps;
    Keras's Nadam fixes 0.96^t (torch's momentum_decay=1): translated, and said."""
    translation = _translate(torch.optim.NAdam, {"lr": 0.01})
    assert translation.config()["class_name"] == "Nadam"
    assert any("momentum_decay=0.004" in d for d in translation.differences)
    assert not _translate(torch.optim.NAdam, {"momentum_decay": 1.0}).differences


def test_weight_decay_groups_keep_the_one_nonzero_value() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [a]}, {"params": [b], "weight_decay": 0.0}]
    translation = from_torch(torch.optim.AdamW(groups, weight_decay=0.05))
    assert translation.config()["config"]["weight_decay"] == 0.05
    assert any("weight-decay exclusions" in d for d in translation.differences)


class _MyAdam(torch.optim.Adam):
    pass


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
        (lambda p: torch.optim.Adam(p, maximize=True), "maximize"),
        (lambda p: torch.optim.Adam(p, differentiable=True), "differentiable"),
        (lambda p: torch.optim.RAdam(p), "cannot translate"),
        (lambda p: torch.optim.LBFGS(p), "cannot translate"),
        (lambda p: _MyAdam(p), "cannot translate"),
        (
            lambda p: torch.optim.Adam([{"params": p[:1], "betas": (0.5, 0.9)}, {"params": p[1:]}]),
            "different values of 'betas'",
        ),
        (
            lambda p: torch.optim.Adam([{"params": p[:1], "lr": 0.1}, {"params": p[1:]}]),
            "different learning rates",
        ),
        (
            lambda p: torch.optim.AdamW(
                [{"params": p[:1], "weight_decay": 0.1}, {"params": p[1:], "weight_decay": 0.2}]
            ),
            "one weight decay",
        ),
    ],
)
def test_what_keras_cannot_express_is_refused(make, message) -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=message):
        from_torch(make(params))


def test_from_torch_takes_an_optimizer_instance() -> None:
    with pytest.raises(TypeError, match="optimizer instance"):
        from_torch(torch.optim.Adam)  # type: ignore[arg-type]
