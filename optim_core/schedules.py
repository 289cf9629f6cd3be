"""Learning-rate schedules with Keras 3 semantics, evaluated in float32 at the raw step.

Each schedule reproduces the value Keras 3.15.1 computes on its numpy backend, bit for
bit: the arithmetic runs on 0-d NumPy values in the dtype Keras would pick (float32 for a
Python float ``initial_learning_rate``), with the same operation order and the same
roundings (Python-float hyper-parameters are rounded to float32 where Keras rounds them,
``math.pi`` is rounded to the compute dtype, and so on).

To get the dtypes right in corner cases too (an integer or float16 learning rate), the
arithmetic goes through a few private helpers that follow the dtype rules of Keras's
numpy-backend ops (``_kr_*``), while the places where Keras uses Python operators on
NumPy values use NumPy's own operators (NEP 50 promotion). Keras's ``floatx`` is assumed
to be its default, ``"float32"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SCHEDULES_MODULE = "keras.optimizers.schedules"

_FLOATX = np.dtype(np.float32)
# Keras (outside TensorFlow) narrows 64-bit results to their 32-bit counterparts.
_NARROW = {"int64": "int32", "uint64": "uint32", "float64": "float32"}


# --- Keras numpy-backend dtype semantics ------------------------------------------------------
def _kind(x: Any) -> Any:
    """What Keras feeds to its type promotion for ``x``: the dtype, else the Python type."""
    return getattr(x, "dtype", type(x))


def _is_float_dtype(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt.name == "bfloat16"


def _result_type(*kinds: Any) -> np.dtype:
    """Keras's promotion result for the kinds schedules meet (floatx = float32).

    Python ``int``/``float`` are weak types: they adopt the other operand's dtype, a weak
    float turns integers into floatx, and two different float dtypes meet at float32
    (float16 with bfloat16) or the wider one. 64-bit results are narrowed to 32 bits.
    """
    weak = {k for k in kinds if k is int or k is float}
    strong = [np.dtype(k) for k in kinds if k is not int and k is not float]
    floats = {dt for dt in strong if _is_float_dtype(dt)}
    if floats:
        if len(floats) == 1:
            out = next(iter(floats))
        elif all(dt.itemsize == 2 for dt in floats):
            out = _FLOATX
        else:
            out = max(floats, key=lambda dt: dt.itemsize)
    elif float in weak:
        out = _FLOATX
    elif any(dt.kind in "iu" for dt in strong):
        out = np.result_type(*strong)
    elif strong:  # only booleans, possibly with a weak int
        out = np.dtype(np.int32) if int in weak else np.dtype(np.bool_)
    else:
        out = np.dtype(np.int32)
    return np.dtype(_NARROW.get(out.name, out))


def _kr_tensor(x: Any, dtype: Any = None) -> np.ndarray:
    """Keras ``convert_to_tensor``/``cast``: a 0-d array, in Keras's default dtype if none."""
    dtype = _result_type(_kind(x)) if dtype is None else np.dtype(dtype)
    if dtype.name == "bfloat16" and not isinstance(x, (np.generic, np.ndarray)):
        return np.asarray(x).astype(dtype)
    return np.array(x, dtype=dtype)


def _kr_binary(
    ufunc: Callable[..., Any], x1: Any, x2: Any, *, floating: bool = False
) -> np.generic:
    """A Keras two-operand op: promote both to one dtype (a float one if ``floating``)."""
    if not isinstance(x1, (int, float)):
        x1 = _kr_tensor(x1)
    if not isinstance(x2, (int, float)):
        x2 = _kr_tensor(x2)
    kinds = [_kind(x1), _kind(x2)] + ([float] if floating else [])
    dtype = _result_type(*kinds)
    return ufunc(_kr_tensor(x1, dtype), _kr_tensor(x2, dtype))


def _kr_unary_float(ufunc: Callable[..., Any], x: Any) -> np.generic:
    """A Keras one-operand float op (floor, ceil, cos, log): ints become a float dtype."""
    x = _kr_tensor(x)
    dtype = _FLOATX if x.dtype == np.int64 else _result_type(x.dtype, float)
    return ufunc(x.astype(dtype))


def _kr_add(x1: Any, x2: Any) -> np.generic:
    return _kr_binary(np.add, x1, x2)


def _kr_subtract(x1: Any, x2: Any) -> np.generic:
    return _kr_binary(np.subtract, x1, x2)


def _kr_multiply(x1: Any, x2: Any) -> np.generic:
    return _kr_binary(np.multiply, x1, x2)


def _kr_divide(x1: Any, x2: Any) -> np.generic:
    return _kr_binary(np.divide, x1, x2, floating=True)


def _kr_power(x1: Any, x2: Any) -> np.generic:
    return _kr_binary(np.power, x1, x2)


def _kr_minimum(x1: Any, x2: Any) -> np.generic:
    return _kr_binary(np.minimum, x1, x2)


def _kr_where(condition: Any, x1: Any, x2: Any) -> np.generic:
    return _kr_binary(lambda a, b: np.where(condition, a, b), x1, x2)


def _kr_floor(x: Any) -> np.generic:
    return _kr_unary_float(np.floor, x)


def _kr_ceil(x: Any) -> np.generic:
    return _kr_unary_float(np.ceil, x)


def _kr_cos(x: Any) -> np.generic:
    return _kr_unary_float(np.cos, x)


def _kr_log(x: Any) -> np.generic:
    return _kr_unary_float(np.log, x)


def _scalar(x: Any) -> Any:
    """A NumPy scalar of the result (Keras sometimes returns a 0-d array instead)."""
    return np.asarray(x)[()]


def _check_positive(arg_name: str, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"Argument `{arg_name}` must be > 0. Received: {arg_name}={value}")


# --- schedules ------------------------------------------------------------------------------
class LearningRateSchedule:
    """Base class: a pure function of the raw optimizer step returning a float32 value."""

    def __call__(self, step: int) -> np.float32:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step)")

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearningRateSchedule:
        return cls(**config)


class _TimeDecay(LearningRateSchedule):
    """Shared by the two schedules of ``(initial_learning_rate, decay_steps, decay_rate)``."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        decay_rate: float,
        staircase: bool = False,
        name: str | None = None,
    ) -> None:
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.decay_rate = decay_rate
        self.staircase = staircase
        self.name = type(self).__name__ if name is None else name
        _check_positive("decay_steps", decay_steps)

    def _operands(self, step: int) -> tuple[Any, Any, Any, Any]:
        """``(lr0, dtype, decay_rate, step / decay_steps)`` in Keras's dtypes, floored if
        ``staircase``."""
        lr0 = _kr_tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        decay_steps = _kr_tensor(self.decay_steps, dtype)
        decay_rate = _kr_tensor(self.decay_rate, dtype)
        ratio = _kr_tensor(step, dtype) / decay_steps
        if self.staircase:
            ratio = _kr_floor(ratio)
        return lr0, dtype, decay_rate, ratio

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class ExponentialDecay(_TimeDecay):
    """``lr0 * decay_rate ** (step / decay_steps)``; the exponent is floored if ``staircase``."""

    def __call__(self, step: int) -> np.float32:
        lr0, _, decay_rate, exponent = self._operands(step)
        return _scalar(_kr_multiply(lr0, _kr_power(decay_rate, exponent)))


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[i]`` on the i-th interval of ``boundaries``, each interval closed above."""

    def __init__(
        self,
        boundaries: Sequence[float],
        values: Sequence[float],
        name: str = "PiecewiseConstant",
    ) -> None:
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "The length of boundaries should be 1 less than the length of values. "
                f"Received: boundaries={boundaries} of length {len(boundaries)}, "
                f"and values={values} of length {len(values)}."
            )
        self.boundaries = boundaries
        self.values = values
        self.name = name

    def __call__(self, step: int) -> np.float32:
        step_t = _kr_tensor(step)
        # Boundaries take the step's (integer) dtype: a fractional boundary is truncated.
        bounds = []
        for b in self.boundaries:
            b_t = _kr_tensor(b)
            bounds.append(b_t if b_t.dtype == step_t.dtype else _kr_tensor(b_t, step_t.dtype))
        vals = [_kr_tensor(v) for v in self.values]
        out_dtype = vals[0].dtype
        # Keras adds one indicator-weighted term per interval (first, last, then the
        # middle ones in order); all terms are added, so an inf value poisons the sum.
        total = np.array(0, dtype=out_dtype)
        total += _kr_tensor(step_t <= bounds[0], out_dtype) * vals[0]
        total += _kr_tensor(step_t > bounds[-1], out_dtype) * vals[-1]
        for low, high, value in zip(bounds[:-1], bounds[1:], vals[1:-1], strict=True):
            total += _kr_tensor((step_t > low) & (step_t <= high), out_dtype) * value
        return _scalar(total)

    def get_config(self) -> dict[str, Any]:
        return {"boundaries": self.boundaries, "values": self.values, "name": self.name}


class PolynomialDecay(LearningRateSchedule):
    """``(lr0 - end) * (1 - s / D) ** power + end`` with ``s`` capped at ``D`` or cycled."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        end_learning_rate: float = 0.0001,
        power: float = 1.0,
        cycle: bool = False,
        name: str = "PolynomialDecay",
    ) -> None:
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.end_learning_rate = end_learning_rate
        self.power = power
        self.cycle = cycle
        self.name = name
        _check_positive("decay_steps", decay_steps)

    def __call__(self, step: int) -> np.float32:
        lr0 = _kr_tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        end_lr = _kr_tensor(self.end_learning_rate, dtype)
        power = _kr_tensor(self.power, dtype)
        s = _kr_tensor(step, dtype)
        horizon = _kr_tensor(self.decay_steps, dtype)
        if self.cycle:
            # The first multiple of decay_steps at or above the step (1 at step 0).
            periods = _kr_where(np.equal(s, 0), 1.0, _kr_ceil(s / self.decay_steps))
            horizon = _kr_multiply(horizon, periods)
        else:
            s = _kr_minimum(s, horizon)
        fraction = _kr_divide(s, horizon)
        return _scalar(_kr_add(_kr_multiply(lr0 - end_lr, _kr_power(1 - fraction, power)), end_lr))

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
            "cycle": self.cycle,
            "name": self.name,
        }


class InverseTimeDecay(_TimeDecay):
    """``lr0 / (1 + decay_rate * step / decay_steps)``; the ratio is floored if ``staircase``."""

    def __call__(self, step: int) -> np.float32:
        lr0, dtype, decay_rate, ratio = self._operands(step)
        one = _kr_tensor(_kr_tensor(1), dtype)
        return _scalar(_kr_divide(lr0, _kr_add(one, _kr_multiply(decay_rate, ratio))))


class CosineDecay(LearningRateSchedule):
    """Optional linear warmup to ``warmup_target``, then a half-cosine down to ``alpha`` * peak."""

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        alpha: float = 0.0,
        name: str = "CosineDecay",
        warmup_target: float | None = None,
        warmup_steps: int = 0,
    ) -> None:
        self.initial_learning_rate = initial_learning_rate
        self.decay_steps = decay_steps
        self.alpha = alpha
        self.name = name
        self.warmup_steps = warmup_steps
        self.warmup_target = warmup_target
        _check_positive("decay_steps", decay_steps)

    def _decayed(self, s: Any, horizon: Any, peak: Any, dtype: np.dtype) -> Any:
        fraction = _kr_divide(s, horizon)
        pi = _kr_tensor(math.pi, dtype)
        cosine = 0.5 * (1.0 + _kr_cos(_kr_multiply(pi, fraction)))
        # ``1 - alpha`` is formed on the raw (Python) alpha, then meets the array.
        return _kr_multiply(peak, (1 - self.alpha) * cosine + self.alpha)

    def __call__(self, step: int) -> np.float32:
        lr0 = _kr_tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        horizon = _kr_tensor(self.decay_steps, dtype)
        s = _kr_tensor(step, dtype)
        if self.warmup_target is None:
            return _scalar(self._decayed(_kr_minimum(s, horizon), horizon, lr0, dtype))
        target = _kr_tensor(self.warmup_target, dtype)
        warmup = _kr_tensor(self.warmup_steps, dtype)
        s = _kr_minimum(s, horizon + warmup)
        if s < warmup:
            return _scalar((target - lr0) * (s / warmup) + lr0)
        return _scalar(self._decayed(s - warmup, horizon, target, dtype))

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "alpha": self.alpha,
            "name": self.name,
            "warmup_target": self.warmup_target,
            "warmup_steps": self.warmup_steps,
        }


class CosineDecayRestarts(LearningRateSchedule):
    """SGDR: cosine periods growing by ``t_mul``, cosine part scaled by ``m_mul`` per restart."""

    def __init__(
        self,
        initial_learning_rate: float,
        first_decay_steps: int,
        t_mul: float = 2.0,
        m_mul: float = 1.0,
        alpha: float = 0.0,
        name: str = "SGDRDecay",
    ) -> None:
        self.initial_learning_rate = initial_learning_rate
        self.first_decay_steps = first_decay_steps
        self.t_mul = t_mul
        self.m_mul = m_mul
        self.alpha = alpha
        self.name = name
        _check_positive("first_decay_steps", first_decay_steps)

    def __call__(self, step: int) -> np.float32:
        lr0 = _kr_tensor(self.initial_learning_rate)
        dtype = lr0.dtype
        first_steps = _kr_tensor(self.first_decay_steps, dtype)
        alpha = _kr_tensor(self.alpha, dtype)
        t_mul = _kr_tensor(self.t_mul, dtype)
        m_mul = _kr_tensor(self.m_mul, dtype)
        fraction = _kr_tensor(step, dtype) / first_steps
        if np.equal(t_mul, 1.0):
            restart = _kr_floor(fraction)
            fraction = fraction - restart
        else:
            # Periods are D, D*t, D*t^2, ...: invert the geometric sum to find the period.
            log_arg = _kr_tensor(1.0 - fraction * (1.0 - t_mul), dtype)
            restart = _kr_floor(_kr_log(log_arg) / _kr_log(t_mul))
            elapsed = _kr_divide(1.0 - _kr_power(t_mul, restart), 1.0 - t_mul)
            fraction = _kr_divide(_kr_subtract(fraction, elapsed), _kr_power(t_mul, restart))
        pi = _kr_tensor(math.pi, dtype)
        cosine = 0.5 * _kr_power(m_mul, restart) * (1.0 + _kr_cos(_kr_multiply(pi, fraction)))
        decayed = _kr_add(_kr_multiply(1 - alpha, cosine), alpha)
        return _scalar(_kr_multiply(lr0, decayed))

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "first_decay_steps": self.first_decay_steps,
            "t_mul": self.t_mul,
            "m_mul": self.m_mul,
            "alpha": self.alpha,
            "name": self.name,
        }


_SCHEDULES: dict[str, type[LearningRateSchedule]] = {
    cls.__name__: cls
    for cls in (
        ExponentialDecay,
        PiecewiseConstantDecay,
        PolynomialDecay,
        InverseTimeDecay,
        CosineDecay,
        CosineDecayRestarts,
    )
}


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
