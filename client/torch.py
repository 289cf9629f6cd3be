"""PyTorch adapter: a ``torch.optim.Optimizer`` whose update runs on a paramserve server.

A PyTorch training loop changes one line::

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)                    # local
    opt = RemoteOptimizer(model.named_parameters(), "127.0.0.1:50051",     # remote
                          optimizer=from_torch(torch.optim.Adam(model.parameters(), lr=1e-3)))

    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()                      # pushes the grads, writes the new weights in place

Parameters are paired with the server's variables by their ``named_parameters()`` names.
The first worker to arrive creates the server's model from its current weights (creation
is idempotent; a worker whose token may not create needs the model to exist), and every
worker takes the server's weights into its parameters when the optimizer is constructed,
before its first step. The update rule is Keras 3's (see :mod:`paramserve.optim_core`),
not torch's: :func:`from_torch` maps a torch optimizer's settings to the nearest Keras
configuration and lists what differs.

Data handling: gradients of CPU parameters are pushed straight from their memory (a NumPy
view, no copy; bfloat16 through an int16 view). New weights are received straight into the
memory of contiguous CPU parameters (``Client.pull(out=...)``), except for models small
enough for one Step round trip (``step_max_bytes``, 1 MiB), whose reply is copied in with
``copy_``; CUDA parameters go through a host copy and ``copy_``. float32, float64, float16
and bfloat16 parameters are supported; sparse gradients (``nn.Embedding(sparse=True)``)
travel as rows.

Learning rate: the server has one. ``param_groups`` carry it as ``lr`` (all groups alike),
so ``torch.optim.lr_scheduler`` works: a changed lr is sent (``SetHyperparameters``, an
admin call when the server has tokens) before the next step's gradients.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

try:
    import torch
    from torch.autograd.graph import increment_version
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "paramserve.client.torch needs PyTorch: pip install 'paramserve[torch]' (torch==2.13.0)"
    ) from exc

from paramserve import optim_core
from paramserve.wire import SparseRows

from .client import Client
from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
)
from .remote import STEP_MAX_BYTES
from .results import ModelDescription, TensorSpec
from .torch_translate import TorchTranslation, from_torch

__all__ = ["STEP_MAX_BYTES", "RemoteOptimizer", "TorchTranslation", "from_torch"]

logger = logging.getLogger("paramserve.client")

# torch dtypes the server can hold, and their NumPy dtypes.
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}
# Keys a param group given to RemoteOptimizer may set; the server has one optimizer config,
# so torch's per-group options (momentum, betas, eps, ...) cannot be honoured.
_GROUP_KEYS = frozenset({"params", "lr", "weight_decay"})
# Key of this optimizer's entry in state_dict()["state"].
STATE_KEY = "paramserve"
_STATE_FORMAT = 1
# create_model warns when the model existed with other weights; the adapter pulls them.
_VALUES_WARNING = r"The model .* already exists on .* with other weights"

ParamsT = Iterable[tuple[str, torch.Tensor]] | Iterable[dict[str, Any]] | Mapping[str, torch.Tensor]
OptimizerSpec = (
    str | dict[str, Any] | optim_core.Optimizer | TorchTranslation | torch.optim.Optimizer | None
)


# --- tensors and arrays ------------------------------------------------------------------
def _host_view(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy array sharing a CPU tensor's memory (bfloat16 as ml_dtypes.bfloat16)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor in host memory: a view of a CPU tensor, a copy of any other."""
    if tensor.device.type != "cpu":
        tensor = tensor.detach().to("cpu")
    return _host_view(tensor)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing ``array``'s memory (bfloat16 through int16)."""
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _receives_in_place(param: torch.Tensor) -> bool:
    """Whether new weights can be received straight into the parameter's memory."""
    return param.device.type == "cpu" and param.is_contiguous()


def _write(param: torch.Tensor, value: np.ndarray) -> None:
    """Overwrite ``param`` with ``value`` in place (a parameter requiring grad included)."""
    with torch.no_grad():
        param.copy_(_as_tensor(np.ascontiguousarray(value)).reshape(param.shape))


def _writable(array: np.ndarray) -> np.ndarray:
    """``array``, or a copy when it is read-only (torch.from_numpy wants writable memory)."""
    return array if array.flags.writeable else array.copy()


def _nbytes(value: np.ndarray | SparseRows) -> int:
    if isinstance(value, SparseRows):
        return int(value.indices.nbytes + value.values.nbytes)
    return int(value.nbytes)


def _numpy_dtype(name: str, param: torch.Tensor) -> np.dtype:
    dtype = _NUMPY_DTYPES.get(param.dtype)
    if dtype is None:
        raise TypeError(
            f"Parameter {name!r} is {param.dtype}; the server holds float32, float64, float16 "
            "and bfloat16 variables. Convert the module (e.g. model.float()) first."
        )
    return dtype


# --- optimizer configs -------------------------------------------------------------------
def _target(config: dict[str, Any]) -> dict[str, Any]:
    """The serialization dict that holds the learning rate (a wrapper's inner optimizer)."""
    inner = (config.get("config") or {}).get("inner_optimizer")
    return _target(inner) if isinstance(inner, dict) else config


def _is_schedule(learning_rate: Any) -> bool:
    return isinstance(learning_rate, dict)


def _server_weight_decay(config: dict[str, Any], name: str) -> float:
    """The weight decay the server's optimizer applies to variable ``name`` (0: none)."""
    target = _target(config)
    wd = (target.get("config") or {}).get("weight_decay")
    if not wd:
        return 0.0
    exclusions = target.get(optim_core.registry.EXCLUSIONS_KEY) or {}
    if name in exclusions.get("var_paths", ()):
        return 0.0
    patterns = exclusions.get("var_names") or []
    # The server's variables are named by their path's last "/" component, as in Keras.
    if patterns and re.search("|".join(patterns), name.rsplit("/", 1)[-1]):
        return 0.0
    return float(wd)


def _is_pair(item: Any) -> bool:
    """Whether ``item`` is a ``(name, parameter)`` pair, as ``named_parameters()`` yields."""
    return (
        isinstance(item, tuple)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], torch.Tensor)
    )


def _as_written(value: float) -> float:
    """The shortest decimal float that rounds to the same float32 as ``value``: the server
    keeps a learning rate as float32 (0.009999999776482582), a user writes 0.01."""
    return float(str(np.float32(value)))


def _same_float32(a: float, b: float) -> bool:
    return bool(np.float32(a) == np.float32(b))


class RemoteOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose slots, step counter and update live on a server.

    ``params``: ``model.named_parameters()``, a ``{name: parameter}`` mapping, or param
    groups whose ``"params"`` are ``(name, parameter)`` pairs; the names are the server's
    variable names. A group may set ``lr`` (all groups must agree: the server has one
    learning rate) and ``weight_decay`` (0 or one common value: groups with 0 become
    weight-decay exclusions); other per-group options are refused.

    ``target``: a :class:`~paramserve.client.Client`, or an address (``host:port``) for
    which this optimizer opens (and :meth:`close` closes) its own client, with
    ``worker_id``.

    ``optimizer``: a name (``"adam"``), a Keras or optim_core serialization dict, an
    optim_core optimizer, a :func:`from_torch` translation or a torch optimizer (translated
    by :func:`from_torch`; its differences are logged at INFO). It defines the model when
    this worker creates it; None joins an existing model as it is.

    ``create``: False never creates the model (it must exist). ``step_max_bytes``: as in
    :class:`paramserve.client.RemoteOptimizer`, the size up to which a step is one Step call
    (one round trip) instead of a streamed push and pull.

    Everything that can be checked is checked before anything reaches the server: names,
    shapes and dtypes against the server's variables, dtypes torch may hold but the server
    cannot, groups that cannot be expressed.
    """

    def __init__(
        self,
        params: ParamsT,
        target: Client | str,
        *,
        optimizer: OptimizerSpec = "adam",
        model_name: str = "model",
        create: bool = True,
        worker_id: str | None = None,
        step_max_bytes: int = STEP_MAX_BYTES,
    ) -> None:
        if step_max_bytes < 0:
            raise ValueError(f"`step_max_bytes` must be >= 0. Received: {step_max_bytes}")
        if isinstance(target, Client):
            if worker_id is not None:
                raise ValueError("worker_id is set on the Client; pass it there")
            self.client, self._owns_client = target, False
        elif isinstance(target, str):
            self.client, self._owns_client = Client(target, worker_id=worker_id), True
        else:
            raise TypeError(f"target must be a Client or an address string. Received: {target!r}")
        self.model_name = model_name
        self.step_max_bytes = step_max_bytes
        self.translation: TorchTranslation | None = None
        self._ready = False
        self._explicit_weight_decay: list[bool] = []
        self._group_weight_decay: list[float] = []
        try:
            self._setup(params, optimizer, create=create)
        except BaseException:
            self.close()
            raise
        self._ready = True

    # --- construction ---------------------------------------------------------------------
    def _setup(self, params: ParamsT, optimizer: OptimizerSpec, *, create: bool) -> None:
        requested = self._requested_config(optimizer)
        description = self._describe_or_none()
        if description is None and requested is None:
            raise NotFoundError(
                "optimizer=None joins an existing model, but the server has none: pass "
                "optimizer=... (a name, a config dict, an optimizer) to create it",
                reason="NO_MODEL",
            )
        source = requested if requested is not None else description.optimizer  # type: ignore[union-attr]
        base = _target(source)
        lr = base.get("config", {}).get("learning_rate")
        if _is_schedule(lr) or lr is None:
            lr = float(optim_core.deserialize(base).learning_rate)
        defaults = {
            "lr": _as_written(lr),
            "weight_decay": float(base["config"].get("weight_decay") or 0),
        }
        if isinstance(params, Mapping):
            params = list(params.items())
        super().__init__(params, defaults)  # calls add_param_group for each group
        names = self._names()
        for name, param in self._entries():
            _numpy_dtype(name, param)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Parameter names must be unique; repeated: {duplicates}")
        lr, wd, excluded = self._group_settings()

        if description is None:
            if not create:
                raise NotFoundError(
                    "The server has no model and create=False: create it first (an admin "
                    "client's create_model, or a worker with create=True)",
                    reason="NO_MODEL",
                )
            config = self._creation_config(requested, lr, wd, excluded)  # type: ignore[arg-type]
            self._create(config, creating=True)
            description = self.client.describe()
            self._check_variables(description)
        else:
            self._check_variables(description)
            identical = description.variable_names == names
            if create and identical and requested is not None:
                config = self._creation_config(requested, lr, wd, excluded)
                if not self._create(config, creating=False):
                    self._check_joined(requested, description)
            else:
                self._check_joined(requested, description)
        self._adopt(description)
        self._version = 0
        self.pull()

    def _requested_config(self, optimizer: OptimizerSpec) -> dict[str, Any] | None:
        """The serialization dict of the optimizer asked for (validated here), or None."""
        if optimizer is None:
            return None
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer = from_torch(optimizer)
            logger.info("RemoteOptimizer: %s", optimizer)
        if isinstance(optimizer, TorchTranslation):
            self.translation = optimizer
            optimizer = optimizer.optimizer
        if isinstance(optimizer, str | dict):
            optimizer = optim_core.get(optimizer)
        if not isinstance(optimizer, optim_core.Optimizer):
            raise TypeError(
                "optimizer must be a name, a Keras config dict, an optim_core optimizer, a "
                f"from_torch() translation or a torch optimizer. Received: {optimizer!r}"
            )
        return optim_core.serialize(optimizer)

    def _describe_or_none(self) -> ModelDescription | None:
        try:
            return self.client.describe()
        except NotFoundError as exc:
            if exc.reason not in (None, "NO_MODEL"):
                raise
            return None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, with parameters as ``(name, parameter)`` pairs.

        After construction, the new parameters must be variables of the server's model (not
        yet in this optimizer); their weights are then taken from the server.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        unknown = sorted(set(param_group) - _GROUP_KEYS)
        if unknown:
            raise ValueError(
                f"Param group options {unknown} cannot be expressed: the server has one "
                "optimizer config for the whole model, so a group may set only 'lr' (the same "
                "in every group) and 'weight_decay' (0 to exclude its parameters from decay). "
                "Put other settings in optimizer=..."
            )
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(
                "Parameters must come in an ordered collection (a set's order changes between "
                "runs): pass a list of (name, parameter) pairs"
            )
        params = [params] if _is_pair(params) or isinstance(params, torch.Tensor) else list(params)
        for item in params:
            if not _is_pair(item):
                raise TypeError(
                    "RemoteOptimizer pairs parameters with the server's variables by name: "
                    "pass model.named_parameters() (or groups of (name, parameter) pairs), "
                    f"not bare tensors. Received: {type(item).__name__}"
                )
        explicit = "weight_decay" in param_group
        group = {**param_group, "params": params}
        if not self._ready:
            super().add_param_group(group)
            self._explicit_weight_decay.append(explicit)
            self._group_weight_decay.append(float(self.param_groups[-1]["weight_decay"]))
            return
        self._add_group_later(group, explicit)

    def _add_group_later(self, group: dict[str, Any], explicit: bool) -> None:
        """add_param_group after construction: only variables the server already has."""
        known = set(self._names())
        for name, _ in group["params"]:
            if name in known:
                raise ValueError(f"Parameter {name!r} is already in this optimizer")
        current = self.param_groups[0]["lr"]
        if "lr" in group and float(group["lr"]) != float(current):
            raise ValueError(
                f"The new group's lr {group['lr']} differs from the other groups' {current}: "
                "the server has one learning rate"
            )
        description = self.client.describe()
        count = len(self.param_groups)
        super().add_param_group(group)
        try:
            self._explicit_weight_decay.append(explicit)
            self._group_weight_decay.append(float(self.param_groups[-1]["weight_decay"]))
            self.param_groups[-1]["lr"] = current
            self._check_variables(description, groups=[count])
            self._check_weight_decay(description, groups=[count])
            self._specs = {s.name: s for s in description.variables}
            self._pull_into(self._entries(groups=[count]), min_version=0)
        except BaseException:
            del self.param_groups[count:]
            del self._explicit_weight_decay[count:]
            del self._group_weight_decay[count:]
            raise

    def _entries(self, groups: Iterable[int] | None = None) -> list[tuple[str, torch.Tensor]]:
        """``(server name, parameter)`` of every parameter, in group order."""
        chosen = range(len(self.param_groups)) if groups is None else groups
        out = []
        for i in chosen:
            group = self.param_groups[i]
            out.extend(zip(group["param_names"], group["params"], strict=True))
        return out

    def _names(self) -> list[str]:
        return [name for name, _ in self._entries()]

    def _group_settings(self) -> tuple[float, float | None, list[str]]:
        """The one learning rate, the one non-zero weight decay (None: none) and the
        parameters of weight_decay=0 groups; ValueError when the groups cannot be expressed."""
        lrs = sorted({float(g["lr"]) for g in self.param_groups})
        if len(lrs) > 1:
            raise ValueError(
                f"Param groups have learning rates {lrs}: the server's optimizer has one "
                "learning rate for the whole model. Use one lr (scale gradients instead)."
            )
        decays = sorted({float(g["weight_decay"]) for g in self.param_groups} - {0.0})
        if len(decays) > 1:
            raise ValueError(
                f"Param groups have weight decays {decays}: the server has one weight decay "
                "for the model (each variable is decayed with it, or excluded). Use one value "
                "and 0."
            )
        excluded = [
            name
            for i, group in enumerate(self.param_groups)
            if float(group["weight_decay"]) == 0
            for name in self.param_groups[i]["param_names"]
        ]
        return lrs[0], (decays[0] if decays else None), excluded

    def _creation_config(
        self, requested: dict[str, Any], lr: float, wd: float | None, excluded: list[str]
    ) -> dict[str, Any]:
        """``requested`` with the groups' learning rate, weight decay and exclusions."""
        config = optim_core.serialize(optim_core.deserialize(requested))  # a fresh copy
        target = _target(config)
        options = target["config"]
        if not _is_schedule(options.get("learning_rate")) and not _same_float32(
            lr, options["learning_rate"]
        ):
            options["learning_rate"] = lr
        elif _is_schedule(options.get("learning_rate")):
            start = float(optim_core.deserialize(target).learning_rate)
            if not _same_float32(lr, start):
                raise ValueError(
                    "The optimizer's learning rate is a schedule; param groups cannot set "
                    f"another lr ({lr})"
                )
        current = options.get("weight_decay")
        if wd is not None and (current is None or not _same_float32(wd, current)):
            options["weight_decay"] = wd
        if options.get("weight_decay") and excluded:
            key = optim_core.registry.EXCLUSIONS_KEY
            exclusions = dict(target.get(key) or {"var_names": [], "var_paths": []})
            exclusions["var_paths"] = sorted({*exclusions.get("var_paths", []), *excluded})
            exclusions.setdefault("var_names", [])
            target[key] = exclusions
        return optim_core.serialize(optim_core.deserialize(config))  # validated

    def _create(self, config: dict[str, Any], *, creating: bool) -> bool:
        """CreateModel (idempotent) from the parameters' current weights; False when this
        client's token may not create (the model exists: fine; it does not: raised)."""
        values = {name: _host_array(p) for name, p in self._entries()}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_VALUES_WARNING)
                self.client.create_model(values, config, name=self.model_name)
        except PermissionDeniedError as exc:
            if not creating:
                return False
            raise PermissionDeniedError(
                "The server has no model yet, and this client's token may not create one "
                "(CreateModel is an admin call): create the model with an admin token first. "
                f"Server: {exc.message}",
                reason=exc.reason,
                domain=exc.domain,
                metadata=exc.metadata,
            ) from exc
        except AlreadyExistsError as exc:
            raise AlreadyExistsError(
                "The server already holds a model with another definition than this module "
                f"and optimizer: {exc.message}. Use the same optimizer settings as the worker "
                "that created it, optimizer=None to join it as it is, or delete it first.",
                reason=exc.reason,
                domain=exc.domain,
                metadata=exc.metadata,
            ) from exc
        return True

    def _check_variables(
        self, description: ModelDescription, groups: Iterable[int] | None = None
    ) -> None:
        """Names, dtypes and shapes against the server's variables (ValueError/TypeError)."""
        if groups is None and description.model_name != self.model_name:
            raise ValueError(
                f"The server serves model {description.model_name!r}, not {self.model_name!r} "
                "(pass model_name=...)"
            )
        entries = self._entries(groups)
        unknown = [name for name, _ in entries if description.spec(name) is None]
        if unknown:
            raise ValueError(
                f"Parameters {unknown} are not variables of the server's model "
                f"{description.model_name!r} (a parameter of another model, or a layer the "
                f"model was created without); its variables are {description.variable_names}"
            )
        for name, param in entries:
            spec = description.spec(name)
            assert spec is not None
            self._check_param(name, param, spec)

    @staticmethod
    def _check_param(name: str, param: torch.Tensor, spec: TensorSpec) -> None:
        dtype = _numpy_dtype(name, param)
        if dtype != spec.numpy_dtype:
            raise TypeError(
                f"Parameter {name!r} is {param.dtype}, but the server's variable is "
                f"{spec.dtype}: convert the module (e.g. model.to(torch.{spec.dtype}))"
            )
        if tuple(param.shape) != spec.shape:
            raise ValueError(
                f"Parameter {name!r} has shape {list(param.shape)}, but the server's variable "
                f"has {list(spec.shape)}"
            )

    def _check_joined(
        self, requested: dict[str, Any] | None, description: ModelDescription
    ) -> None:
        """Joining a model this worker could not check with CreateModel: the optimizer class
        and the groups' weight decay must agree with the server's."""
        if requested is not None:
            asked = _target(requested)["class_name"]
            served = _target(description.optimizer).get("class_name")
            if asked != served:
                raise ValueError(
                    f"optimizer={asked!r} was asked for, but the server's model trains with "
                    f"{served!r}; pass optimizer=None to join the model as it is"
                )
        self._check_weight_decay(description)

    def _check_weight_decay(
        self, description: ModelDescription, groups: Iterable[int] | None = None
    ) -> None:
        """Groups that set weight_decay must agree with the server's decay of their
        parameters; the others take the server's value."""
        chosen = range(len(self.param_groups)) if groups is None else groups
        for i in chosen:
            group = self.param_groups[i]
            server = {
                n: _server_weight_decay(description.optimizer, n) for n in group["param_names"]
            }
            if self._explicit_weight_decay[i]:
                wd = float(group["weight_decay"])
                wrong = [
                    n
                    for n, v in server.items()
                    if (v == 0) != (wd == 0) or (wd and not _same_float32(v, wd))
                ]
                if wrong:
                    raise ValueError(
                        f"Param group {i} sets weight_decay={wd:g}, but the server's model "
                        f"decays {wrong} with {[server[n] for n in wrong]} (0: excluded); a "
                        "model's weight decay is fixed when it is created"
                    )
            elif len(set(server.values())) == 1:
                group["weight_decay"] = next(iter(server.values()))
                self._group_weight_decay[i] = float(group["weight_decay"])

    def _adopt(self, description: ModelDescription) -> None:
        """Specs, and the server's current learning rate into every group."""
        self._specs = {s.name: s for s in description.variables}
        self._lr_is_schedule = _is_schedule(
            _target(description.optimizer).get("config", {}).get("learning_rate")
        )
        server_lr = _as_written(description.hyperparameters["learning_rate"])
        for group in self.param_groups:
            if not _same_float32(float(group["lr"]), server_lr):
                group["lr"] = server_lr
        self._sent_lr = float(self.param_groups[0]["lr"])

    # --- training --------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The model version (the server's iteration count) of the parameters' weights."""
        return self._version

    def close(self) -> None:
        """Close the client if this optimizer opened it (given an address)."""
        if getattr(self, "_owns_client", False):
            self.client.close()

    def pull(self) -> int:
        """Write the server's current weights into the parameters (done at construction;
        again after a server restore or ``model.load_state_dict``); returns their version."""
        self._version = self._pull_into(self._entries(), min_version=0)
        return self._version

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Push the gradients, then write the new weights into the parameters in place.

        ``closure`` (re-evaluates the model and returns the loss) runs first, with grad
        enabled. Parameters whose ``grad`` is None are skipped for the update, as Keras
        skips None gradients, and still refreshed. The learning rate of the param groups
        (a ``torch.optim.lr_scheduler`` writes it) reaches the server first when it changed.
        In sync mode this blocks until the round closes. If the server no longer has the
        version the gradients were computed from (a restore, a round that closed without
        this worker), they are dropped with a warning and the parameters refreshed.
        Returns the closure's loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            entries = self._entries()
            payload = self._gradients(entries)
            if not payload:
                warnings.warn(
                    "RemoteOptimizer.step() found no gradients (every parameter's grad is "
                    "None); nothing was pushed",
                    stacklevel=2,
                )
                return loss
            self._sync_learning_rate()
            try:
                self._version = self._apply(payload, entries)
            except FailedPreconditionError as exc:
                if exc.reason != "STALE_BASE_VERSION":
                    raise
                base = self._version
                self.pull()
                warnings.warn(
                    f"The server no longer takes gradients computed from version {base} "
                    f"({exc.message}); this step's gradients were dropped and the parameters "
                    f"now hold version {self._version}",
                    stacklevel=2,
                )
        return loss

    def _gradients(self, entries: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Checked host gradients (views of CPU memory where possible); nothing is sent."""
        for i, group in enumerate(self.param_groups):
            if float(group["weight_decay"]) != self._group_weight_decay[i]:
                raise ValueError(
                    f"Param group {i}'s weight_decay changed to {group['weight_decay']}: a "
                    "model's weight decay per variable is fixed when it is created "
                    "(Client.set_hyperparameters(weight_decay=...) changes the common value)"
                )
        payload: dict[str, Any] = {}
        for name, param in entries:
            self._check_param(name, param, self._specs[name])
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                grad = grad.coalesce()
                if grad.sparse_dim() == 1:
                    values = grad.values().to(param.dtype)
                    indices = _host_array(grad.indices()[0]).astype(np.int64, copy=False)
                    payload[name] = SparseRows(indices, _host_array(values))
                    continue
                grad = grad.to_dense()
            elif grad.layout != torch.strided:
                grad = grad.to_dense()
            if grad.shape != param.shape:
                raise ValueError(
                    f"The gradient of {name!r} has shape {list(grad.shape)}, but the "
                    f"parameter has {list(param.shape)}"
                )
            payload[name] = _host_array(grad.to(param.dtype))
        return payload

    def _sync_learning_rate(self) -> None:
        """Send the param groups' lr to the server if it changed since the last send."""
        lrs = sorted({float(g["lr"]) for g in self.param_groups})
        if len(lrs) > 1:
            raise ValueError(
                f"Param groups have learning rates {lrs}: the server has one learning rate "
                "(a scheduler must give every group the same lr)"
            )
        lr = lrs[0]
        if lr == self._sent_lr:
            return
        if self._lr_is_schedule:
            raise ValueError(
                f"The param groups' lr changed to {lr}, but the server's learning rate follows "
                "a Keras schedule, which a number cannot replace: drop the torch lr_scheduler "
                "or create the model with a float learning rate"
            )
        if not math.isfinite(lr):
            raise ValueError(f"The param groups' lr must be finite. Received: {lr}")
        self.client.set_hyperparameters(learning_rate=lr)
        self._sent_lr = lr

    def _apply(self, payload: dict[str, Any], entries: list[tuple[str, torch.Tensor]]) -> int:
        """One update: a Step call when small, else push then pull; returns the version."""
        names = [name for name, _ in entries]
        sent = sum(_nbytes(v) for v in payload.values())
        returned = sum(
            math.prod(self._specs[n].shape) * self._specs[n].numpy_dtype.itemsize for n in names
        )
        if max(sent, returned) <= self.step_max_bytes:
            weights = self.client.step(payload, names=names, base_version=self._version)
            for name, param in entries:
                _write(param, weights[name])
            return weights.version
        result = self.client.push(payload, base_version=self._version)
        return self._pull_into(entries, min_version=result.version)

    def _pull_into(self, entries: list[tuple[str, torch.Tensor]], *, min_version: int) -> int:
        """Pull the weights of ``entries`` into the parameters: straight into the memory of
        contiguous CPU parameters, through ``copy_`` for the others."""
        direct = {name: _host_view(p) for name, p in entries if _receives_in_place(p)}
        weights = self.client.pull([n for n, _ in entries], min_version=min_version, out=direct)
        with torch.no_grad():
            for name, param in entries:
                if name in direct:
                    increment_version(param)  # autograd sees the in-place change
                else:
                    _write(param, weights[name])
        return weights.version

    # --- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict: ``param_groups`` (lr, weight_decay, a scheduler's
        ``initial_lr``, names) and, under ``state["paramserve"]``, the server's optimizer
        state (every slot and the iteration count, as CPU tensors) and model version. It
        holds no weights: those are the module's (``model.state_dict()``)."""
        out = super().state_dict()
        state = self.client.optimizer_state()
        description = self.client.describe()
        out["state"] = {
            **out["state"],
            STATE_KEY: {
                "format": _STATE_FORMAT,
                "version": int(state.version),
                "optimizer": description.optimizer,
                "variables": self._names(),
                "slots": {name: _as_tensor(_writable(a)) for name, a in state.items()},
            },
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the server's optimizer state and iteration count (so
        the model version), and the param groups (their lr reaches the server at once).

        Load the module's weights first and construct this optimizer after (it creates the
        model from them), or the server keeps its own weights: a warning names the
        parameters that differ from the server's.
        """
        entry = (state_dict.get("state") or {}).get(STATE_KEY)
        if not isinstance(entry, dict) or entry.get("format") != _STATE_FORMAT:
            raise ValueError(
                "This state dict was not written by paramserve.client.torch.RemoteOptimizer."
                "state_dict() (no 'paramserve' entry of format 1): a torch optimizer's state "
                "(exp_avg, momentum_buffer, ...) cannot be loaded into the server's Keras "
                "optimizer"
            )
        if list(entry.get("variables") or []) != self._names():
            raise ValueError(
                "The state dict is for parameters "
                f"{entry.get('variables')}, but this optimizer has {self._names()}"
            )
        saved_groups = state_dict.get("param_groups") or []
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"])
            for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            raise ValueError("The state dict's param groups do not match this optimizer's")
        for i, saved in enumerate(saved_groups):
            if float(saved.get("weight_decay", 0)) != self._group_weight_decay[i]:
                raise ValueError(
                    f"The state dict's param group {i} has weight_decay "
                    f"{saved.get('weight_decay')}, this optimizer {self._group_weight_decay[i]}"
                    ": a model's weight decay per variable is fixed when it is created"
                )
        lrs = sorted({float(g["lr"]) for g in saved_groups})
        if len(lrs) > 1:
            raise ValueError(f"The state dict's param groups have learning rates {lrs}")
        slots = {
            name: t if isinstance(t, np.ndarray) else _host_array(t)
            for name, t in entry["slots"].items()
        }
        version = self.client.set_optimizer_state(slots)
        rest = {
            **state_dict,
            "state": {k: v for k, v in state_dict["state"].items() if k != STATE_KEY},
        }
        super().load_state_dict(rest)
        self.state.clear()
        self._version = version
        if not self._lr_is_schedule:
            self.client.set_hyperparameters(learning_rate=lrs[0])
            self._sent_lr = lrs[0]
        self._warn_if_weights_differ()

    def _warn_if_weights_differ(self) -> None:
        entries = self._entries()
        weights = self.client.pull([n for n, _ in entries])
        differ = [
            name
            for name, p in entries
            if not np.array_equal(_host_array(p), weights[name], equal_nan=True)
        ]
        if differ:
            warnings.warn(
                f"Parameters {differ} differ from the server's weights: the optimizer state "
                f"and iteration count were restored (the model is at version {weights.version} "
                "now), but the server keeps the weights it holds and trains those. Restore "
                "them with a server snapshot (Client.restore), or call pull() to take them "
                "into the module.",
                stacklevel=2,
            )
