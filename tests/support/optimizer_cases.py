"""The conformance case table: every optimizer x its own options, x every base option.

A case is ``(class_name, config, harness)``. ``config`` holds constructor arguments with
schedules and inner optimizers written as ``("ClassName", {...})`` so the same case can be
built both in real Keras and here. ``harness`` controls the gradient stream:
``none_steps`` (first variable gets a None gradient), ``nonfinite_steps`` (an inf is
injected) and ``sparse`` (the first 2-D variable's gradient is sent as rows).
"""

from __future__ import annotations

from typing import Any

from paramserve import optim_core

EXP_DECAY = (
    "ExponentialDecay",
    {"initial_learning_rate": 0.01, "decay_steps": 5, "decay_rate": 0.8},
)
COSINE_WARMUP = (
    "CosineDecay",
    {"initial_learning_rate": 0.001, "decay_steps": 30, "warmup_target": 0.01, "warmup_steps": 10},
)

# Optimizer-specific options, each run with default base options.
OWN_OPTIONS: dict[str, list[dict[str, Any]]] = {
    "SGD": [
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"learning_rate": 0.1, "momentum": 0.5},
    ],
    "Adam": [{"amsgrad": True}, {"beta_1": 0.5, "beta_2": 0.9, "epsilon": 1e-3}],
    "AdamW": [{"weight_decay": 0.1}, {"amsgrad": True, "weight_decay": 0.02}],
    "RMSprop": [
        {"momentum": 0.9},
        {"centered": True},
        {"momentum": 0.5, "centered": True, "rho": 0.8, "epsilon": 1e-4},
    ],
    "Adadelta": [{"rho": 0.9, "epsilon": 1e-6}, {"learning_rate": 1.0}],
    "Adagrad": [{"initial_accumulator_value": 0.5, "epsilon": 1e-5}, {"learning_rate": 0.1}],
    "Adamax": [{"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4}],
    "Nadam": [{"beta_1": 0.8, "beta_2": 0.99}, {"epsilon": 1e-3, "learning_rate": 0.01}],
    "Ftrl": [
        {"l1_regularization_strength": 0.01, "l2_regularization_strength": 0.02},
        {"l2_shrinkage_regularization_strength": 0.05, "beta": 0.1, "learning_rate_power": -0.7},
        {"initial_accumulator_value": 0.5, "learning_rate_power": 0.0, "learning_rate": 0.05},
    ],
    "Lion": [{"beta_1": 0.95, "beta_2": 0.98}, {"beta_1": 1.0}],
    "Lamb": [{"beta_1": 0.8, "epsilon": 1e-5}, {"learning_rate": 0.01}],
    "Adafactor": [
        {"clip_threshold": 0.5, "beta_2_decay": -0.5},
        {"relative_step": False, "learning_rate": 1.0},
        {"epsilon_2": 1e-2, "epsilon_1": 1e-20},
    ],
    "Muon": [
        {"nesterov": False},
        {"exclude_layers": ["wide"]},
        {"rms_rate": None},
        {"adam_lr_ratio": 0.5, "momentum": 0.9, "ns_steps": 3},
        {"exclude_embeddings": False, "learning_rate": 0.01},
        {"weight_decay": None, "adam_weight_decay": 0.1},
    ],
    "ScheduleFreeAdamW": [{"warmup_steps": 5}, {"weight_decay": 0.01}, {"beta_1": 0.8}],
    "LossScaleOptimizer": [
        {"inner_optimizer": ("SGD", {"momentum": 0.9})},
        {"inner_optimizer": ("Adam", {}), "initial_scale": 4.0, "dynamic_growth_steps": 3},
        {"inner_optimizer": ("RMSprop", {"gradient_accumulation_steps": 2})},
    ],
}

# Base options shared by every optimizer, each run with default optimizer options.
BASE_OPTIONS: list[dict[str, Any]] = [
    {},
    {"weight_decay": 0.05},
    {"clipnorm": 0.5},
    {"clipvalue": 0.3},
    {"global_clipnorm": 0.7},
    {"use_ema": True, "ema_momentum": 0.9},
    {"use_ema": True, "ema_overwrite_frequency": 4},
    {"loss_scale_factor": 64.0},
    {"gradient_accumulation_steps": 3},
    {
        "gradient_accumulation_steps": 2,
        "use_ema": True,
        "ema_overwrite_frequency": 2,
        "clipnorm": 1.0,
        "weight_decay": 0.01,
    },
    {"learning_rate": EXP_DECAY},
    {"learning_rate": COSINE_WARMUP, "gradient_accumulation_steps": 2},
]

# The harness variations, each run with default options.
HARNESS_OPTIONS: list[dict[str, Any]] = [
    {"none_steps": [0, 3, 4, 10]},
    {"sparse": True},
]

# LossScaleOptimizer forbids base options on itself; they go on its inner optimizer.
LSO_DEFAULT_INNER = ("Adam", {})


def _id(class_name: str, config: dict[str, Any], harness: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, tuple):
            return v[0]
        return str(v).replace(" ", "")

    parts = [f"{k}={fmt(v)}" for k, v in {**config, **harness}.items()]
    return f"{class_name}[{','.join(parts) or 'default'}]"


def all_cases() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """Every (id, class_name, config, harness) the conformance suite runs."""
    out = []
    for cls, own in OWN_OPTIONS.items():
        for cfg in own:
            out.append((cls, dict(cfg), {}))
        for base in BASE_OPTIONS:
            if cls == "LossScaleOptimizer":
                if not base:
                    out.append((cls, {"inner_optimizer": LSO_DEFAULT_INNER}, {}))
                else:
                    out.append((cls, {"inner_optimizer": ("Adam", dict(base))}, {}))
            else:
                out.append((cls, dict(base), {}))
        for harness in HARNESS_OPTIONS:
            cfg = {"inner_optimizer": LSO_DEFAULT_INNER} if cls == "LossScaleOptimizer" else {}
            out.append((cls, cfg, dict(harness)))
        if cls == "LossScaleOptimizer":
            out.append(
                (cls, {"inner_optimizer": LSO_DEFAULT_INNER}, {"nonfinite_steps": [2, 3, 9]})
            )
            out.append(
                (
                    cls,
                    {"inner_optimizer": ("SGD", {}), "dynamic_growth_steps": 2},
                    {"nonfinite_steps": [5]},
                )
            )
    return [(_id(c, cfg, h), c, cfg, h) for c, cfg, h in out]


CLASS_NAMES = list(OWN_OPTIONS)


def build_keras_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its schedules and inner optimizers built in real Keras."""
    import keras

    out = {}
    for k, v in config.items():
        if isinstance(v, tuple) and k == "learning_rate":
            out[k] = getattr(keras.optimizers.schedules, v[0])(**v[1])
        elif isinstance(v, tuple) and k == "inner_optimizer":
            out[k] = getattr(keras.optimizers, v[0])(**build_keras_config(v[1]))
        else:
            out[k] = v
    return out


def build_our_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its schedules and inner optimizers built in optim_core."""
    out = {}
    for k, v in config.items():
        if isinstance(v, tuple) and k == "learning_rate":
            out[k] = getattr(optim_core.schedules, v[0])(**v[1])
        elif isinstance(v, tuple) and k == "inner_optimizer":
            out[k] = getattr(optim_core, v[0])(**build_our_config(v[1]))
        else:
            out[k] = v
    return out
