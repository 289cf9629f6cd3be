"""``from_torch``: a ``torch.optim`` optimizer's settings as the nearest Keras 3 optimizer.

The server applies Keras 3's update rules (:mod:`paramserve.optim_core`), not torch's. Most
torch optimizers have a Keras counterpart with the same maths up to where epsilon sits, how
momentum holds the learning rate, and how weight decay is applied; :func:`from_torch` maps
the settings and lists every such difference in plain words. What has no counterpart
(``maximize``, SGD's ``dampening``, optimizers Keras lacks) is refused with ValueError.

| torch.optim | Keras / optim_core | settings |
| --- | --- | --- |
| SGD | SGD | lr, momentum, nesterov, weight_decay (decoupled) |
| Adam | Adam | lr, betas, eps, amsgrad, weight_decay (decoupled) |
| Adam(decoupled_weight_decay=True), AdamW | AdamW | lr, betas, eps, amsgrad, weight_decay |
| NAdam | Nadam | lr, betas, eps, weight_decay (decoupled); Keras's momentum_decay is 1 |
| RMSprop | RMSprop | lr, alpha -> rho, eps -> epsilon = eps**2, momentum, centered |
| Adagrad | Adagrad | lr, lr_decay -> InverseTimeDecay, eps -> eps**2, initial_accumulator_value |
| Adamax | Adamax | lr, betas, eps |
| Adadelta | Adadelta | lr, rho, eps |
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from paramserve import optim_core
from paramserve.optim_core import schedules

# Settings of torch's optimizers that choose an implementation, not the maths.
_IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable")
# Keras 3's Nadam fixes its momentum schedule at mu_t = beta_1 * (1 - 0.5 * 0.96 ** t): torch's
# NAdam with momentum_decay=1 (torch's default is 0.004).
_KERAS_NADAM_MOMENTUM_DECAY = 1.0


@dataclass(frozen=True)
class TorchTranslation:
    """A torch optimizer translated to the nearest Keras 3 optimizer.

    ``optimizer`` is an optim_core optimizer (usable wherever one is: ``RemoteOptimizer``,
    ``Client.create_model``); ``differences`` says, one sentence each, where its update
    differs from torch's; ``source`` names the torch class.
    """

    source: str
    optimizer: optim_core.Optimizer
    differences: tuple[str, ...]

    def config(self) -> dict[str, Any]:
        """The Keras serialization dict of :attr:`optimizer` (what the server receives)."""
        return optim_core.serialize(self.optimizer)

    def __str__(self) -> str:
        head = f"{self.source} -> {type(self.optimizer).__name__}"
        if not self.differences:
            return f"{head}: the same update rule"
        return "\n".join([f"{head}; differences:", *(f"- {d}" for d in self.differences)])


def from_torch(optimizer: torch.optim.Optimizer) -> TorchTranslation:
    """Translate ``optimizer``'s settings (lr, betas, eps, weight_decay, momentum, ...) to
    the nearest Keras 3 configuration; see :class:`TorchTranslation`.

    Param groups must agree on every setting except ``weight_decay``, where one non-zero
    value and 0 may mix (pass the same groups to ``RemoteOptimizer``: the groups with 0
    become weight-decay exclusions). ValueError for what Keras cannot express.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "from_torch() takes a torch.optim optimizer instance, e.g. "
            f"from_torch(torch.optim.Adam(model.parameters(), lr=1e-3)). Received: {optimizer!r}"
        )
    cls = type(optimizer)
    source = f"torch.optim.{cls.__name__}"
    translate = _TRANSLATIONS.get(cls.__name__)
    if translate is None or getattr(torch.optim, cls.__name__, None) is not cls:
        raise ValueError(
            f"from_torch() cannot translate {cls.__module__}.{cls.__qualname__}: it maps "
            f"torch.optim's {', '.join(sorted(_TRANSLATIONS))}. Pick the Keras optimizer "
            "yourself (a name, a Keras config dict or a paramserve.optim_core optimizer)."
        )
    settings = _settings(optimizer, source)
    differences: list[str] = []
    if settings.get("maximize"):
        raise ValueError(f"{source}(maximize=True) has no Keras counterpart: negate the loss")
    if settings.get("differentiable"):
        raise ValueError(
            f"{source}(differentiable=True) cannot be translated: the update runs on the "
            "server, outside autograd"
        )
    chosen = [k for k in _IMPLEMENTATION_OPTIONS if settings.get(k)]
    if chosen:
        differences.append(
            f"{', '.join(chosen)}: torch implementation choices with no effect here (the "
            "server computes the update)"
        )
    if settings.get("_mixed_weight_decay"):
        differences.append(
            "param groups with weight_decay=0 are not decayed: pass the same groups to "
            "RemoteOptimizer, which turns them into weight-decay exclusions"
        )
    class_name, config = translate(settings, source, differences)
    instance = optim_core.deserialize({"class_name": class_name, "config": config})
    return TorchTranslation(source, instance, tuple(differences))


def _number(value: Any) -> Any:
    """Tensors (torch allows a Tensor lr or betas) as Python floats; tuples element-wise."""
    if isinstance(value, torch.Tensor):
        return float(value)
    if isinstance(value, tuple):
        return tuple(_number(v) for v in value)
    return value


def _settings(optimizer: torch.optim.Optimizer, source: str) -> dict[str, Any]:
    """The optimizer's settings, the same in every param group (weight_decay aside)."""
    out: dict[str, Any] = {}
    groups = optimizer.param_groups
    for key, default in optimizer.defaults.items():
        values = [_number(g.get(key, default)) for g in groups]
        if key == "weight_decay":
            nonzero = sorted({float(v) for v in values if v})
            if len(nonzero) > 1:
                raise ValueError(
                    f"{source}'s param groups use weight decays {nonzero}: the server has one "
                    "weight decay per model (each variable is decayed with it or excluded). "
                    "Use one value and 0."
                )
            out[key] = nonzero[0] if nonzero else 0.0
            out["_mixed_weight_decay"] = bool(nonzero) and len(set(values)) > 1
            continue
        if any(v != values[0] for v in values):
            what = "learning rates" if key == "lr" else f"values of {key!r}"
            raise ValueError(
                f"{source}'s param groups have different {what} ({values}): the server's "
                "optimizer has one setting for the whole model"
            )
        out[key] = values[0]
    return out


def _weight_decay(
    settings: dict[str, Any], source: str, differences: list[str], *, decoupled: bool
) -> float | None:
    """Keras's ``weight_decay`` (decoupled: ``p -= lr * wd * p`` before the update)."""
    wd = float(settings.get("weight_decay") or 0.0)
    if wd == 0:
        return None
    if not decoupled:
        momentum = settings.get("momentum", 0)
        same = source == "torch.optim.SGD" and not momentum
        differences.append(
            f"weight_decay={wd:g}: torch adds an L2 term wd * p to the gradient"
            + (
                ", which plain SGD turns into the same step as Keras's decoupled decay "
                "(p -= lr * wd * p), up to rounding"
                if same
                else " (it then passes through the optimizer's moments); Keras decays the "
                "weights directly (decoupled, as AdamW: p -= lr * wd * p). Same value kept, "
                "different regularization strength"
            )
        )
    return wd


def _epsilon_adam(settings: dict[str, Any], differences: list[str]) -> float:
    beta_2 = float(settings["betas"][1])
    eps = float(settings["eps"])
    # Keras's effective epsilon is eps / sqrt(1 - beta_2^t): within 1% of torch's after t1.
    t1 = math.ceil(math.log(1 - 1 / 1.01**2) / math.log(beta_2)) if 0 < beta_2 < 1 else 1
    differences.append(
        f"epsilon={eps:g}: torch adds it to sqrt(v / (1 - beta_2^t)) (bias-corrected); Keras "
        "adds it to sqrt(v) and corrects the step size instead, so its epsilon is in effect "
        f"eps / sqrt(1 - beta_2^t): {1 / math.sqrt(1 - beta_2):.3g}x torch's at step 1, "
        f"within 1% of it from step {t1}"
    )
    return eps


def _betas(settings: dict[str, Any]) -> dict[str, float]:
    beta_1, beta_2 = settings["betas"]
    return {"beta_1": float(beta_1), "beta_2": float(beta_2)}


def _momentum_note(name: str, differences: list[str]) -> None:
    differences.append(
        f"{name}: Keras's momentum buffer holds steps with the learning rate applied (SGD: "
        "m = momentum * m - lr * g); torch's holds them without and multiplies by the current "
        "lr. The same while lr is constant; after an lr change (a scheduler), Keras's past "
        "momentum keeps the old rate"
    )


def _sgd(s: dict[str, Any], source: str, differences: list[str]) -> tuple[str, dict[str, Any]]:
    if s.get("dampening"):
        raise ValueError(
            f"{source}(dampening={s['dampening']}) has no Keras counterpart (Keras's SGD has "
            "no dampening)"
        )
    momentum = float(s.get("momentum") or 0.0)
    if momentum:
        _momentum_note(f"momentum={momentum:g}", differences)
    config = {
        "learning_rate": float(s["lr"]),
        "momentum": momentum,
        "nesterov": bool(s.get("nesterov")),
        "weight_decay": _weight_decay(s, source, differences, decoupled=False),
    }
    return "SGD", config


def _adam(s: dict[str, Any], source: str, differences: list[str]) -> tuple[str, dict[str, Any]]:
    decoupled = bool(s.get("decoupled_weight_decay")) or source == "torch.optim.AdamW"
    wd = _weight_decay(s, source, differences, decoupled=decoupled)
    config = {
        "learning_rate": float(s["lr"]),
        **_betas(s),
        "epsilon": _epsilon_adam(s, differences),
        "amsgrad": bool(s.get("amsgrad")),
        "weight_decay": wd,
    }
    return ("AdamW" if decoupled and wd is not None else "Adam"), config


def _nadam(s: dict[str, Any], source: str, differences: list[str]) -> tuple[str, dict[str, Any]]:
    decay = float(s.get("momentum_decay", 0.004))
    if decay != _KERAS_NADAM_MOMENTUM_DECAY:
        beta_1 = float(s["betas"][0])

        def mu(t: int) -> float:
            return beta_1 * (1 - 0.5 * 0.96 ** (t * decay))

        differences.append(
            f"momentum_decay={decay:g}: torch's momentum schedule is mu_t = beta_1 * (1 - 0.5 "
            f"* 0.96^(t * {decay:g})); Keras's Nadam fixes it at 0.96^t (momentum_decay=1): "
            f"its mu_t rises from {beta_1 * 0.52:.3g} to {beta_1 * (1 - 0.5 * 0.96**100):.3g} "
            f"by step 100, torch's is {mu(100):.3g} there and {mu(1000):.3g} at step 1,000. "
            "With momentum_decay=1 the rules agree"
        )
    wd = _weight_decay(s, source, differences, decoupled=bool(s.get("decoupled_weight_decay")))
    config = {
        "learning_rate": float(s["lr"]),
        **_betas(s),
        "epsilon": float(s["eps"]),
        "weight_decay": wd,
    }
    return "Nadam", config


def _squared_epsilon(eps: float, where: str, differences: list[str]) -> float:
    differences.append(
        f"eps={eps:g}: torch adds it outside the square root ({where}); Keras inside "
        f"(sqrt(. + epsilon)), so epsilon = eps**2 = {eps * eps:g}, equal where the "
        "accumulator is 0 or large, up to 2x apart near eps**2 (for float16 parameters, "
        "choose a larger eps: its square may round to 0)"
    )
    return eps * eps


def _rmsprop(s: dict[str, Any], source: str, differences: list[str]) -> tuple[str, dict[str, Any]]:
    momentum = float(s.get("momentum") or 0.0)
    if momentum:
        _momentum_note(f"momentum={momentum:g}", differences)
    config = {
        "learning_rate": float(s["lr"]),
        "rho": float(s["alpha"]),
        "momentum": momentum,
        "epsilon": _squared_epsilon(float(s["eps"]), "sqrt(v) + eps", differences),
        "centered": bool(s.get("centered")),
        "weight_decay": _weight_decay(s, source, differences, decoupled=False),
    }
    return "RMSprop", config


def _adagrad(s: dict[str, Any], source: str, differences: list[str]) -> tuple[str, dict[str, Any]]:
    lr: Any = float(s["lr"])
    lr_decay = float(s.get("lr_decay") or 0.0)
    if lr_decay:
        differences.append(
            f"lr_decay={lr_decay:g} becomes the schedule InverseTimeDecay(lr, decay_steps=1, "
            "decay_rate=lr_decay), the same lr / (1 + (t - 1) * lr_decay); the server's "
            "learning rate is then a schedule, which a torch lr_scheduler cannot change"
        )
        lr = schedules.InverseTimeDecay(lr, decay_steps=1, decay_rate=lr_decay)
    config = {
        "learning_rate": lr,
        "initial_accumulator_value": float(s.get("initial_accumulator_value") or 0.0),
        "epsilon": _squared_epsilon(float(s["eps"]), "sqrt(sum) + eps", differences),
        "weight_decay": _weight_decay(s, source, differences, decoupled=False),
    }
    return "Adagrad", config


def _adamax(s: dict[str, Any], source: str, differences: list[str]) -> tuple[str, dict[str, Any]]:
    eps = float(s["eps"])
    differences.append(
        f"eps={eps:g}: torch adds it to |g| inside the running maximum "
        "(u = max(beta_2 * u, |g| + eps)); Keras adds it to the maximum (u + eps)"
    )
    config = {
        "learning_rate": float(s["lr"]),
        **_betas(s),
        "epsilon": eps,
        "weight_decay": _weight_decay(s, source, differences, decoupled=False),
    }
    return "Adamax", config


def _adadelta(s: dict[str, Any], source: str, differences: list[str]) -> tuple[str, dict[str, Any]]:
    config = {
        "learning_rate": float(s["lr"]),
        "rho": float(s["rho"]),
        "epsilon": float(s["eps"]),
        "weight_decay": _weight_decay(s, source, differences, decoupled=False),
    }
    return "Adadelta", config


_Translate = Callable[[dict[str, Any], str, list[str]], tuple[str, dict[str, Any]]]
_TRANSLATIONS: dict[str, _Translate] = {
    "SGD": _sgd,
    "Adam": _adam,
    "AdamW": _adam,
    "NAdam": _nadam,
    "RMSprop": _rmsprop,
    "Adagrad": _adagrad,
    "Adamax": _adamax,
    "Adadelta": _adadelta,
}
