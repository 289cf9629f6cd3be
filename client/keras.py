"""Keras 3 adapter: a ``keras.optimizers.Optimizer`` whose updates run on a paramserve daemon.

Plain Keras code trains against a daemon by changing the optimizer line only::

    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=keras.optimizers.Adam(1e-3))                      # local
    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=RemoteOptimizer("ps:50051", keras.optimizers.Adam(1e-3)))  # remote
    model.fit(x, y, epochs=3)

How it works, per backend:

- ``build(model.trainable_variables)`` (which ``fit``, ``evaluate`` and the first
  ``apply_gradients`` call) connects: the first worker creates the server's model from the
  Keras model's current weights and the optimizer's settings (creation is idempotent), and
  every worker then writes the server's weights into its model, so all replicas start from
  the same weights. Variables are paired with the server's by ``Variable.path``, which is the
  server's variable name; shape, dtype and trainability are checked first.
- ``apply`` / ``apply_gradients`` (torch, tensorflow, and custom loops in eager mode) push the
  gradients (host NumPy, cast to the variable's dtype as Keras casts), receive the new weights
  and assign them to the Keras variables.
- ``stateless_apply`` (JAX's ``fit``, jitted or not) does the same through
  ``jax.experimental.io_callback`` (ordered), so it runs inside a traced ``train_step``; the
  new weights come back as the step's outputs.
- ``iterations`` mirrors the server's model version; ``learning_rate`` is a Keras variable
  (callbacks such as ``LearningRateScheduler`` and ``ReduceLROnPlateau`` set it) whose
  changes reach the server before the next step is applied; ``get_config()`` returns the
  server's optimizer config; ``scale_loss`` multiplies by the server's current loss scale
  (``loss_scale_factor``, or a ``LossScaleOptimizer``'s dynamic scale), and the server
  unscales, once.
- ``model.save()`` stores no address, token or client: the optimizer's state lives on the
  server (snapshot it there).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

try:
    import keras
    from keras import ops
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "paramserve.client.keras needs Keras 3: pip install 'paramserve[keras]'"
    ) from exc

from paramserve import optim_core

from .client import Client, check_sendable
from .errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from .remote import STEP_MAX_BYTES
from .remote import RemoteOptimizer as _ArrayRemoteOptimizer

if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    raise ImportError(f"paramserve.client.keras needs Keras 3; found Keras {keras.__version__}")

__all__ = ["RemoteOptimizer", "keras_optimizer_config"]

# optim_core's prefix of a LossScaleOptimizer's inner state in optimizer_state() names.
_INNER_PREFIX = "inner_optimizer/"
# Where optim_core's serialization dict carries weight-decay exclusions (see its README).
_EXCLUSIONS_KEY = "exclude_from_weight_decay"


# --- optimizer settings -> the config the server rebuilds ------------------------------------
@dataclasses.dataclass(frozen=True)
class _Exclusions:
    """Weight-decay exclusions of one Keras optimizer (Keras leaves them out of its config):
    the ``_var_key`` of each excluded variable, and the compiled ``var_names`` pattern."""

    keys: frozenset[int]
    pattern: str | None


def _keras_exclusions(optimizer: Any) -> list[_Exclusions]:
    """Exclusions of a Keras optimizer and, for a LossScaleOptimizer, of each inner one."""
    pattern = getattr(optimizer, "_exclude_from_weight_decay_pattern", None)
    levels = [
        _Exclusions(
            frozenset(getattr(optimizer, "_exclude_from_weight_decay", None) or ()),
            pattern.pattern if pattern is not None else None,
        )
    ]
    inner = getattr(optimizer, "inner_optimizer", None)
    if isinstance(inner, keras.optimizers.Optimizer):
        levels += _keras_exclusions(inner)
    return levels


def _with_exclusions(
    config: dict[str, Any], levels: Sequence[_Exclusions], paths_by_key: Mapping[int, str]
) -> dict[str, Any]:
    """``config`` with each level's exclusions added in optim_core's form
    (``exclude_from_weight_decay: {var_names, var_paths}``), variables named by path."""
    config = copy.deepcopy(config)
    node: dict[str, Any] | None = config
    for level in levels:
        if node is None:
            break
        paths = sorted(paths_by_key[k] for k in level.keys if k in paths_by_key)
        names = [level.pattern] if level.pattern else []
        if paths or names:
            node[_EXCLUSIONS_KEY] = {"var_names": names, "var_paths": paths}
        inner = (node.get("config") or {}).get("inner_optimizer")
        node = inner if isinstance(inner, dict) else None
    return config


def keras_optimizer_config(
    optimizer: Any, variables: Iterable[Any] | None = None
) -> dict[str, Any]:
    """The serialization dict the server rebuilds an optimizer from, with every setting.

    ``optimizer``: a Keras optimizer instance, its ``keras.optimizers.serialize`` dict, a
    name (``"adam"``) or an optim_core optimizer. Keras's own config leaves out the
    weight-decay exclusions; they are added under ``"exclude_from_weight_decay"``
    (``var_names`` patterns, and the ``path`` of each excluded variable found among
    ``variables``). Raises TypeError or ValueError when the server could not rebuild it.
    """
    levels: list[_Exclusions] = []
    if isinstance(optimizer, RemoteOptimizer):
        raise TypeError("A RemoteOptimizer cannot be the server's optimizer; pass the one it runs")
    if isinstance(optimizer, keras.optimizers.Optimizer):
        config = keras.optimizers.serialize(optimizer)
        levels = _keras_exclusions(optimizer)
    elif isinstance(optimizer, optim_core.Optimizer):
        config = optim_core.serialize(optimizer)
    elif isinstance(optimizer, str):
        config = optim_core.serialize(optim_core.get(optimizer))
    elif isinstance(optimizer, dict):
        config = copy.deepcopy(optimizer)
    else:
        raise TypeError(
            "optimizer must be a Keras optimizer, its serialized dict, a name or an optim_core "
            f"optimizer. Received: {optimizer!r}"
        )
    check_sendable(config, schedules="keras.optimizers.schedules")
    if levels:
        keys: dict[int, str] = {}
        if variables is not None:
            key = optimizer._var_key
            keys = {key(v): v.path for v in variables}
        config = _with_exclusions(config, levels, keys)
    try:
        optim_core.deserialize(json.loads(json.dumps(config, default=_json_default)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The server could not rebuild this optimizer: {exc}") from exc
    return config


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@dataclasses.dataclass(frozen=True)
class _ServerOptimizer:
    """What the Keras side mirrors of the server's optimizer, read from its config."""

    learning_rate: Any  # a float, or a schedule's serialization dict
    scaling: str  # "none", "static" (loss_scale_factor) or "dynamic" (LossScaleOptimizer)
    initial_scale: float
    ema_prefix: str | None  # optimizer_state() prefix of the EMA averages; None without EMA

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> _ServerOptimizer:
        options = config.get("config") or {}
        if config.get("class_name") == "LossScaleOptimizer":
            inner = cls.from_config(options["inner_optimizer"])
            return cls(
                inner.learning_rate,
                "dynamic",
                float(options.get("initial_scale", 2.0**15)),
                None if inner.ema_prefix is None else _INNER_PREFIX + inner.ema_prefix,
            )
        factor = options.get("loss_scale_factor")
        return cls(
            options.get("learning_rate", 0.001),
            "static" if factor is not None else "none",
            float(factor) if factor is not None else 1.0,
            "" if options.get("use_ema") else None,
        )


# --- the optimizer -------------------------------------------------------------------------
@dataclasses.dataclass
class _Link:
    """Connection state; kept off the Keras object's tracked attributes and out of saves."""

    client: Client
    owns_client: bool
    config: dict[str, Any] | None  # what to create the model with; None: the server's
    exclusions: list[_Exclusions]
    model_name: str
    step_max_bytes: int
    arrays: _ArrayRemoteOptimizer | None = None
    host: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    paths: list[str] = dataclasses.field(default_factory=list)
    server: _ServerOptimizer | None = None
    server_lr: float | None = None  # the float learning rate the server has
    seen_lr: float | None = None  # the learning rate last passed into a step
    lr_set_before_build: bool = False
    scale: float = 1.0  # the server's loss scale after the last step
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _f32(value: Any) -> float:
    return float(np.float32(np.asarray(value)))


def _dtype_name(dtype: Any) -> str:
    return keras.backend.standardize_dtype(dtype)


def _wait_for_steps() -> None:
    """Under JAX, wait until the steps already dispatched (io_callbacks) have run, so that
    what follows (a new learning rate, a read of the server's state) comes after them."""
    if keras.backend.backend() == "jax":
        import jax

        jax.effects_barrier()


def _in_tf_graph() -> bool:
    """True while TensorFlow traces a graph (``tf.function``), where values are symbolic."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return not tf.executing_eagerly()


def _in_xla_graph() -> bool:
    """True while TensorFlow traces a function for XLA (``jit_compile=True``)."""
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow without this helper
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


@keras.saving.register_keras_serializable(package="paramserve")
class RemoteOptimizer(keras.optimizers.Optimizer):
    """A Keras optimizer whose update runs on a paramserve daemon (see the module docstring).

    Args:
        target: the daemon's address (``"host:port"``; a :class:`~paramserve.client.Client`
            is made with ``worker_id`` and ``client_options``) or a ``Client``.
        optimizer: the server's optimizer, used when this worker creates the model: a Keras
            optimizer instance (every setting travels: exclusions from weight decay,
            schedules, EMA, clipping, gradient accumulation, loss scaling, a
            ``LossScaleOptimizer``), its serialized dict, a name, or an optim_core optimizer.
            None: the server's (the model it has, or its default optimizer when this worker
            creates the model).
        worker_id: this worker's id on the server (default: unique per process).
        model_name: the server model's name (creation is idempotent for one definition).
        step_max_bytes: below this size each way a step is one Step call (see
            :class:`paramserve.client.RemoteOptimizer`).
        name: the Keras optimizer's name.
        **client_options: passed to ``Client`` when ``target`` is an address (``token``,
            ``tls_ca``, ``timeout_s``, ...).
    """

    def __init__(
        self,
        target: str | Client,
        optimizer: Any = None,
        *,
        worker_id: str | None = None,
        model_name: str = "model",
        step_max_bytes: int = STEP_MAX_BYTES,
        name: str | None = None,
        **client_options: Any,
    ) -> None:
        config = keras_optimizer_config(optimizer) if optimizer is not None else None
        if isinstance(target, Client):
            if client_options:
                raise TypeError(
                    f"Client options {sorted(client_options)} apply only when target is an "
                    "address; this Client is already configured."
                )
            if worker_id is not None and worker_id != target.worker_id:
                raise ValueError(
                    f"worker_id={worker_id!r} differs from the Client's {target.worker_id!r}"
                )
            client, owns = target, False
        elif isinstance(target, str):
            client, owns = Client(target, worker_id=worker_id, **client_options), True
        else:
            raise TypeError(f"target must be an address or a Client. Received: {target!r}")
        if step_max_bytes < 0:
            raise ValueError(f"`step_max_bytes` must be >= 0. Received: {step_max_bytes}")
        server = _ServerOptimizer.from_config(config) if config is not None else None
        lr = server.learning_rate if server is not None else 0.001
        lr = keras.optimizers.schedules.deserialize(lr) if isinstance(lr, dict) else float(lr)
        super().__init__(learning_rate=lr, name=name)
        levels = (
            _keras_exclusions(optimizer)
            if isinstance(optimizer, keras.optimizers.Optimizer)
            else []
        )
        self._link = _Link(client, owns, config, levels, model_name, step_max_bytes)
        self._loss_scale = None
        if server is not None and server.scaling != "none":
            self._create_loss_scale(server.initial_scale)

    # --- the connection -------------------------------------------------------------------
    @property
    def client(self) -> Client:
        """The SDK client this optimizer talks to the server with."""
        return self._link.client

    def close(self) -> None:
        """Close the client if this optimizer opened it (``target`` was an address)."""
        _wait_for_steps()
        if self._link.owns_client:
            self._link.client.close()

    def __repr__(self) -> str:
        client = self._link.client
        return f"<RemoteOptimizer {client.address} worker_id={client.worker_id!r}>"

    # --- variables and building -----------------------------------------------------------
    def _create_loss_scale(self, value: float) -> None:
        with keras.name_scope(self.name, caller=self):
            self._loss_scale = self.add_variable(
                (),
                initializer=keras.initializers.Constant(value),
                dtype="float32",
                name="loss_scale",
            )

    def _check_model_variables(self, variables: Sequence[Any]) -> None:
        """TypeError/ValueError unless each is a trainable float keras.Variable, paths unique."""
        seen: dict[str, int] = {}
        for i, v in enumerate(variables):
            if not isinstance(v, keras.Variable):
                raise TypeError(
                    "RemoteOptimizer updates keras.Variables, paired with the server's variables "
                    f"by their path. Variable #{i} is a {type(v).__name__}."
                )
            if not v.trainable:
                raise ValueError(
                    f"Variable {v.path!r} is not trainable: RemoteOptimizer only updates "
                    "trainable variables (pass model.trainable_variables)."
                )
            if not keras.backend.is_float_dtype(v.dtype):
                raise ValueError(
                    f"Variable {v.path!r} has dtype {_dtype_name(v.dtype)}; the server trains "
                    "floating-point variables only."
                )
            if v.path in seen:
                raise ValueError(
                    f"Variables #{seen[v.path]} and #{i} share the path {v.path!r}; the server "
                    "names variables by path, so paths must be unique (name your layers)."
                )
            seen[v.path] = i

    def build(self, variables: Sequence[Any]) -> None:
        """Connect: create the server's model from these variables' current values (if this
        worker is first) or join it, check every variable against the server's (path, shape,
        dtype), then write the server's weights into them. Nothing is pushed."""
        if self.built:
            return
        variables = list(variables)
        self._check_model_variables(variables)
        with keras.name_scope(self.name, caller=self):
            self._connect(variables)
            super().build(variables)

    def _connect(self, variables: list[Any]) -> None:
        link = self._link
        values = {v.path: np.array(ops.convert_to_numpy(v.value)) for v in variables}
        config = None
        if link.config is not None:
            paths_by_key = {self._var_key(v): v.path for v in variables}
            config = _with_exclusions(link.config, link.exclusions, paths_by_key)
        description = self._create_or_join(variables, values, config)
        arrays = _ArrayRemoteOptimizer(link.client, step_max_bytes=link.step_max_bytes)
        host = {v.path: np.empty_like(values[v.path]) for v in variables}
        arrays.build(host)
        version = arrays.pull()
        link.arrays, link.host, link.paths = arrays, host, [v.path for v in variables]
        for v in variables:
            v.assign(host[v.path].copy())
        self._iterations.assign(version)
        self._adopt(description.optimizer, description.hyperparameters)

    def _create_or_join(
        self, variables: list[Any], values: dict[str, np.ndarray], config: dict[str, Any] | None
    ) -> Any:
        """Join the server's model, or create it if this worker is first; returns the server's
        description, against which every variable has been checked."""
        client = self._link.client
        try:
            description = client.describe()
        except NotFoundError:
            description = None
        if description is not None:
            self._check_against(variables, description)
            if config is None:
                return description
            if set(values) != set(description.variable_names):
                # Fewer trainable variables than the server has (frozen layers): no CreateModel.
                self._warn_if_other_optimizer(config, description.optimizer)
                return description
        try:
            # Creates the model, or confirms that this is its definition (idempotent).
            self._create(values, config)
        except AlreadyExistsError as exc:
            raise ValueError(
                f"The server at {client.address} already has a model that differs from this "
                f"Keras model or optimizer: {exc.message}. Use the same model and optimizer on "
                "every worker, or delete the server's model first."
            ) from exc
        except PermissionDeniedError:
            # A worker token may not create models: the model must exist already.
            try:
                description = client.describe()
            except NotFoundError as exc:
                raise NotFoundError(
                    f"The server at {client.address} has no model yet, and this worker's token "
                    "may not create one (CreateModel is admin-only). Create the model first "
                    "with an admin token (for example, run one worker with "
                    "PARAMSERVE_TOKEN=<admin token>), then start the workers.",
                    code=exc.code,
                    reason=exc.reason,
                ) from exc
            self._check_against(variables, description)
            self._warn_if_other_optimizer(config, description.optimizer)
            return description
        description = client.describe()
        self._check_against(variables, description)
        return description

    def _create(self, values: dict[str, np.ndarray], config: dict[str, Any] | None) -> None:
        link = self._link
        with warnings.catch_warnings():
            # Joining a model that exists with other weights is expected: they are pulled.
            warnings.filterwarnings("ignore", "The model .* already exists", UserWarning)
            link.client.create_model(values, optimizer=config, name=link.model_name)

    @staticmethod
    def _warn_if_other_optimizer(config: dict[str, Any] | None, server: dict[str, Any]) -> None:
        if config is None:
            return

        def normal(c: dict[str, Any]) -> str:
            options = optim_core.serialize(optim_core.deserialize(c))
            return json.dumps(options, sort_keys=True, default=_json_default)

        if normal(config) != normal(server):
            warnings.warn(
                "The server's optimizer differs from the one given to RemoteOptimizer, and this "
                "worker joins the existing model without creating it; the server's is used: "
                f"{server.get('class_name')} {server.get('config')}",
                stacklevel=5,
            )

    def _check_against(self, variables: list[Any], description: Any) -> None:
        """ValueError unless each variable's path, shape and dtype match a server variable."""
        for v in variables:
            spec = description.spec(v.path)
            if spec is None:
                raise ValueError(
                    f"The server's model has no variable {v.path!r}. Its variables are named by "
                    f"their Keras paths: {description.variable_names}. Is this the model the "
                    "server holds (the same layers and layer names)?"
                )
            shape, dtype = tuple(v.shape), _dtype_name(v.dtype)
            if shape != spec.shape or dtype != spec.dtype:
                raise ValueError(
                    f"Variable {v.path!r} is {dtype} {list(shape)} here, but {spec.dtype} "
                    f"{list(spec.shape)} on the server."
                )

    def _adopt(self, config: dict[str, Any], hyperparameters: Mapping[str, float]) -> None:
        """Mirror the server optimizer's learning rate, loss scale and EMA on this side."""
        link = self._link
        server = _ServerOptimizer.from_config(config)
        link.server = server
        if isinstance(server.learning_rate, dict):
            schedule = keras.optimizers.schedules.deserialize(server.learning_rate)
            keras.optimizers.Optimizer.learning_rate.fset(self, schedule)
            link.server_lr = link.seen_lr = None
        else:
            if not isinstance(self._learning_rate, keras.Variable):
                self._track_float_learning_rate()
            if link.lr_set_before_build:
                self._set_server_learning_rate(
                    _f32(ops.convert_to_numpy(self._learning_rate.value))
                )
            else:
                self._learning_rate.assign(hyperparameters["learning_rate"])
                link.server_lr = _f32(hyperparameters["learning_rate"])
            link.seen_lr = link.server_lr
        if server.scaling == "dynamic":
            link.scale = self._read_dynamic_scale()
        else:
            link.scale = server.initial_scale
        if server.scaling != "none" or self._loss_scale is not None:
            if self._loss_scale is None:
                self._create_loss_scale(link.scale)
            self._loss_scale.assign(link.scale)

    def _track_float_learning_rate(self) -> None:
        variable = keras.Variable(
            0.0, name="learning_rate", dtype=keras.backend.floatx(), trainable=False
        )
        self._track_variable(variable)
        self._learning_rate = variable

    def _read_dynamic_scale(self) -> float:
        return float(self._link.client.optimizer_state()["dynamic_scale"])

    # --- learning rate and iterations -----------------------------------------------------
    @property
    def iterations(self) -> Any:
        """The server's model version (its optimizer's step count), as a Keras variable."""
        return self._iterations

    @property
    def learning_rate(self) -> Any:
        """The learning rate: a Keras variable (set it, or let a callback set it: the server
        gets the new value before the next step), or a schedule's value at ``iterations``."""
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        if isinstance(value, keras.optimizers.schedules.LearningRateSchedule) or callable(value):
            raise TypeError(
                "RemoteOptimizer's learning rate is set to numbers only: the server's "
                "optimizer is created with its schedule and cannot take a new one live."
            )
        if not isinstance(self._learning_rate, keras.Variable):
            raise TypeError(
                "This optimizer's learning rate follows a schedule (on the server too), so it "
                "cannot be set to a number."
            )
        self._learning_rate.assign(value)
        if self.built:
            _wait_for_steps()
            self._set_server_learning_rate(_f32(value))
        else:
            self._link.lr_set_before_build = True

    def _set_server_learning_rate(self, value: float) -> None:
        link = self._link
        try:
            link.client.set_hyperparameters(learning_rate=value)
        except PermissionDeniedError as exc:
            raise PermissionDeniedError(
                f"Cannot change the server's learning rate to {value}: this worker's token may "
                "not call SetHyperparameters (admin-only). Change it with an admin token, or "
                "run learning-rate callbacks on a worker that has one.",
                code=exc.code,
                reason=exc.reason,
            ) from exc
        link.server_lr = value

    def _sync_learning_rate(self, value: Any) -> None:
        """Send a learning rate that changed in the variable (not through the setter)."""
        link = self._link
        if value is None or link.server_lr is None:
            return
        value = _f32(value)
        if value != link.seen_lr:
            link.seen_lr = value
            if value != link.server_lr:
                self._set_server_learning_rate(value)

    def _lr_value(self) -> float | None:
        if isinstance(self._learning_rate, keras.Variable):
            return _f32(ops.convert_to_numpy(self._learning_rate.value))
        return None

    # --- loss scaling ---------------------------------------------------------------------
    def scale_loss(self, loss: Any) -> Any:
        """``loss`` times the server's current loss scale (its ``loss_scale_factor``, or a
        LossScaleOptimizer's dynamic scale); the server divides the gradients by it."""
        if self._loss_scale is None:
            return loss
        return ops.multiply(loss, self._loss_scale)

    # --- applying gradients ---------------------------------------------------------------
    def _check_known(self, variables: Sequence[Any]) -> None:
        unknown = [
            getattr(v, "path", repr(v))
            for v in variables
            if self._var_key(v) not in self._trainable_variables_indices
        ]
        if unknown:
            raise ValueError(
                f"Variables {unknown} are not the ones this RemoteOptimizer was built with "
                f"({self._link.paths}); variables of another model? Use one RemoteOptimizer "
                "per model."
            )

    def _host_gradient(self, grad: Any, variable: Any) -> Any:
        """A gradient as the server takes it: host NumPy in the variable's dtype (Keras casts),
        or sparse rows ``(indices, values)``; ValueError for a wrong shape."""
        if grad is None:
            return None
        dtype = np.dtype(_dtype_name(variable.dtype))
        if hasattr(grad, "indices") and hasattr(grad, "values") and hasattr(grad, "dense_shape"):
            indices = np.asarray(ops.convert_to_numpy(grad.indices)).astype(np.int64)
            rows = np.asarray(ops.convert_to_numpy(grad.values)).astype(dtype, copy=False)
            return indices, rows
        value = np.asarray(ops.convert_to_numpy(grad))
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"The gradient for {variable.path!r} has shape {list(value.shape)}; the "
                f"variable's is {list(variable.shape)}."
            )
        return value.astype(dtype, copy=False)

    def _host_step(self, paths: list[str], grads: list[Any], lr: float | None) -> int:
        """Push ``grads`` for ``paths``, write the new weights into the host copies; returns
        the version. One step at a time."""
        link = self._link
        assert link.arrays is not None
        with link.lock:
            self._sync_learning_rate(lr)
            try:
                version = link.arrays.apply(grads, [link.host[p] for p in paths])
            except InvalidArgumentError as exc:
                if (
                    exc.reason == "NONFINITE_GRADIENT"
                    and link.server is not None
                    and (link.server.scaling == "dynamic")
                ):
                    raise InvalidArgumentError(
                        f"{exc.message}. A LossScaleOptimizer must see non-finite gradients to "
                        "lower its scale: start the daemon with --nonfinite allow.",
                        code=exc.code,
                        reason=exc.reason,
                        metadata=exc.metadata,
                    ) from exc
                raise
            if link.server is not None and link.server.scaling == "dynamic":
                link.scale = self._read_dynamic_scale()
            return version

    def apply(self, grads: Sequence[Any], trainable_variables: Iterable[Any] | None = None) -> None:
        """Push ``grads``; assign the server's new weights to ``trainable_variables``.

        Everything is checked before the push: that the variables are the ones this optimizer
        was built with (keras.Variables, trainable, paired with the server's by path, with
        its shapes and dtypes) and each gradient's shape. ``None`` gradients are skipped.
        """
        if keras.backend.backend() == "torch":
            import torch

            # Under torch.compile (fit(jit_compile=True)) the push must not be traced.
            torch.compiler.disable(self._apply)(grads, trainable_variables)
        else:
            self._apply(grads, trainable_variables)

    def _apply(self, grads: Sequence[Any], trainable_variables: Iterable[Any] | None) -> None:
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built on a list of variables. Call `optimizer.build(trainable_variables)` "
                    "first."
                )
            variables = list(self._trainable_variables)
        else:
            variables = list(trainable_variables)
            self._check_model_variables(variables)
            if not self.built:
                self._build_in_apply(variables)
            self._check_known(variables)
        if len(grads) != len(variables):
            raise ValueError(
                f"Got {len(grads)} gradients for {len(variables)} variables; they must be "
                "paired one to one."
            )
        if _in_tf_graph():
            self._apply_in_graph(grads, variables)
            return
        host = [self._host_gradient(g, v) for g, v in zip(grads, variables, strict=True)]
        paths = [v.path for v in variables]
        version = self._host_step(paths, host, self._lr_value())
        for v, path in zip(variables, paths, strict=True):
            v.assign(self._link.host[path].copy())
        self._iterations.assign(version)
        if self._loss_scale is not None:
            self._loss_scale.assign(self._link.scale)

    def _build_in_apply(self, variables: list[Any]) -> None:
        """Build on the first apply; warn if the server's weights are not the ones this
        step's gradients were computed from."""
        if _in_tf_graph():
            import tensorflow as tf

            # TensorFlow's fit builds the optimizer while tracing its train step: connect
            # eagerly now. The weights pulled are in place before the traced step first runs.
            with tf.init_scope():
                self.build(variables)
            return
        before = [np.array(ops.convert_to_numpy(v.value)) for v in variables]
        self.build(variables)
        after = [np.asarray(ops.convert_to_numpy(v.value)) for v in variables]
        if not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)):
            warnings.warn(
                "RemoteOptimizer connected in its first apply(): the server's weights differ "
                "from this model's, so this step's gradients were computed from the model's own "
                "weights. Call optimizer.build(model.trainable_variables) before computing the "
                "first gradients.",
                stacklevel=3,
            )

    def _apply_in_graph(self, grads: list[Any], variables: list[Any]) -> None:
        """TensorFlow graph mode (``tf.function``): the step runs as a ``tf.numpy_function``."""
        import tensorflow as tf

        if _in_xla_graph():
            raise ValueError(
                "RemoteOptimizer's step is a call to the server, which XLA cannot compile: on "
                "the TensorFlow backend, compile the model with jit_compile=False (the default "
                "on CPU; Keras turns XLA on by default on GPU)."
            )

        present = [i for i, g in enumerate(grads) if g is not None]
        inputs = [tf.convert_to_tensor(grads[i]) for i in present]
        lr = self._learning_rate if isinstance(self._learning_rate, keras.Variable) else None
        if lr is not None:
            inputs.append(tf.convert_to_tensor(lr.value))
        paths = [v.path for v in variables]

        def step(*args: np.ndarray) -> list[np.ndarray]:
            host: list[Any] = [None] * len(variables)
            for k, i in enumerate(present):
                host[i] = self._host_gradient(args[k], variables[i])
            version = self._host_step(paths, host, args[-1] if lr is not None else None)
            out = [self._link.host[p].copy() for p in paths]
            return [*out, np.asarray(version, np.int64), np.asarray(self._link.scale, np.float32)]

        dtypes = [v.value.dtype for v in variables] + [tf.int64, tf.float32]
        outputs = tf.numpy_function(step, inputs, dtypes, stateful=True)
        for v, new in zip(variables, outputs, strict=False):
            v.assign(tf.ensure_shape(new, v.shape))
        version = tf.ensure_shape(outputs[len(variables)], ())
        self._iterations.assign(tf.cast(version, self._iterations.dtype))
        if self._loss_scale is not None:
            self._loss_scale.assign(tf.ensure_shape(outputs[len(variables) + 1], ()))

    def stateless_apply(
        self, optimizer_variables: Sequence[Any], grads: Sequence[Any], trainable_variables: Any
    ) -> tuple[list[Any], list[Any]]:
        """Keras's functional step (JAX ``fit``): the push runs in an ordered
        ``io_callback``, so it also works inside ``jax.jit``; returns the server's new
        weights and this optimizer's variables (iterations, learning rate, loss scale)."""
        self._check_super_called()
        if not self.built:
            raise ValueError(
                "To call `stateless_apply`, RemoteOptimizer must be built (connected). "
                "You can build it via `optimizer.build(trainable_variables)`."
            )
        # A wrapper may pass the variables themselves (Keras's LossScaleOptimizer, which
        # compile() adds under a mixed_float16 policy, does): use their current values.
        optimizer_variables = [
            v.value if isinstance(v, keras.Variable) else v for v in optimizer_variables
        ]
        if len(optimizer_variables) != len(self.variables):
            raise ValueError(
                "Argument `optimizer_variables` must be a list of tensors corresponding 1:1 to "
                f"RemoteOptimizer().variables ({len(self.variables)}); received "
                f"{len(optimizer_variables)}."
            )
        variables = list(self._trainable_variables)
        if len(grads) != len(variables) or len(trainable_variables) != len(variables):
            raise ValueError(
                f"Expected {len(variables)} gradients and trainable variables (the variables "
                f"this optimizer was built with); received {len(grads)} and "
                f"{len(trainable_variables)}."
            )
        for g, v in zip(grads, variables, strict=True):
            if g is not None and tuple(g.shape) != tuple(v.shape):
                raise ValueError(
                    f"The gradient for {v.path!r} has shape {list(g.shape)}; the variable's is "
                    f"{list(v.shape)}."
                )
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            raise ValueError("No gradients provided for any variable.")
        index = {id(v): i for i, v in enumerate(self.variables)}
        has_lr = isinstance(self._learning_rate, keras.Variable)
        args = [grads[i] for i in present]
        if has_lr:
            args.append(optimizer_variables[index[id(self._learning_rate)]])
        iteration_dtype = np.dtype(_dtype_name(self._iterations.dtype))
        host_step = functools.partial(self._stateless_host_step, present, has_lr, iteration_dtype)
        if keras.backend.backend() == "jax":
            import jax
            from jax.experimental import io_callback

            shapes = [jax.ShapeDtypeStruct(tuple(v.shape), _dtype_name(v.dtype)) for v in variables]
            shapes += [
                jax.ShapeDtypeStruct((), iteration_dtype),
                jax.ShapeDtypeStruct((), np.float32),
            ]
            outputs = io_callback(host_step, shapes, *args, ordered=True)
        else:
            outputs = host_step(*[ops.convert_to_numpy(a) for a in args])
        n = len(variables)
        new_optimizer_variables = list(optimizer_variables)
        new_optimizer_variables[index[id(self._iterations)]] = outputs[n]
        if self._loss_scale is not None:
            new_optimizer_variables[index[id(self._loss_scale)]] = outputs[n + 1]
        return list(outputs[:n]), new_optimizer_variables

    def _stateless_host_step(
        self, present: list[int], has_lr: bool, iteration_dtype: np.dtype, *args: Any
    ) -> list[np.ndarray]:
        variables = self._trainable_variables
        host: list[Any] = [None] * len(variables)
        for k, i in enumerate(present):
            host[i] = self._host_gradient(args[k], variables[i])
        lr = args[len(present)] if has_lr else None
        paths = self._link.paths
        version = self._host_step(paths, host, lr)
        out = [self._link.host[p].copy() for p in paths]
        return [
            *out,
            np.asarray(version, iteration_dtype),
            np.asarray(self._link.scale, np.float32),
        ]

    # --- after training -------------------------------------------------------------------
    def pull(self, variables: Iterable[Any] | None = None) -> int:
        """Write the server's current weights into the variables (all it was built with by
        default); returns their version. E.g. after a restore on the server, or to train on
        after ``fit`` left EMA averages in the model."""
        if not self.built:
            raise ValueError("Build the optimizer first: optimizer.build(trainable_variables)")
        variables = list(self._trainable_variables if variables is None else variables)
        self._check_known(variables)
        _wait_for_steps()
        link = self._link
        with link.lock:
            version = link.arrays.pull([link.host[v.path] for v in variables])
            for v in variables:
                v.assign(link.host[v.path].copy())
        self._iterations.assign(version)
        return version

    def finalize_variable_values(self, var_list: Sequence[Any]) -> None:
        """With EMA on the server, set the model's variables to the server's moving averages
        (the server's weights stay as they are), as Keras does at the end of ``fit``."""
        link = self._link
        if not self.built or link.server is None or link.server.ema_prefix is None:
            return
        _wait_for_steps()
        state = link.client.optimizer_state()
        for v in var_list:
            key = f"{link.server.ema_prefix}{v.path.replace('/', '_')}_average"
            if key in state:
                v.assign(state[key])

    # --- config and saving ----------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The server's optimizer config (Keras ``get_config()`` form; before the model exists,
        the config this optimizer would create it with). No address, token or client."""
        link = self._link
        _wait_for_steps()
        try:
            server = link.client.describe().optimizer
        except NotFoundError:
            server = link.config
        return dict((server or {}).get("config") or {"name": self.name})

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> RemoteOptimizer:
        """Not supported: a saved model holds no connection to restore one from."""
        raise ValueError(
            "A RemoteOptimizer cannot be restored from a saved model: model.save() stores no "
            "server address, token or client. Load the model with "
            "keras.models.load_model(path, compile=False) and compile it with a new "
            "RemoteOptimizer(address) (the optimizer's state lives on the server)."
        )

    def load_own_variables(self, store: Any) -> None:
        """Skipped: iterations and the learning rate are the server's (restore a server
        snapshot to go back in time)."""
        warnings.warn(
            "RemoteOptimizer does not load saved optimizer variables: the optimizer's state "
            "lives on the server.",
            stacklevel=2,
        )
