"""Learning-rate schedules with Keras 3 semantics, evaluated in float32 at the raw step."""

from __future__ import annotations

from typing import Any

import numpy as np

SCHEDULES_MODULE = "keras.optimizers.schedules"


class LearningRateSchedule:
    """Base class: a pure function of the raw optimizer step returning a float32 value."""

    def __call__(self, step: int) -> np.float32:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step)")

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearningRateSchedule:
        return cls(**config)


_SCHEDULES: dict[str, type[LearningRateSchedule]] = {}


def serialize(schedule: LearningRateSchedule) -> dict[str, Any]:
    """The Keras serialization dict of a schedule (``module``, ``class_name``, ``config``)."""
    return {
        "module": SCHEDULES_MODULE,
        "class_name": type(schedule).__name__,
        "config": schedule.get_config(),
        "registered_name": None,
    }


def deserialize(config: dict[str, Any]) -> LearningRateSchedule:
    """Rebuild a schedule from :func:`serialize` output or a Keras-exported dict."""
    name = config.get("class_name")
    cls = _SCHEDULES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"Unknown learning rate schedule {name!r}. Known schedules: {sorted(_SCHEDULES)}"
        )
    return cls.from_config(dict(config.get("config", {})))
