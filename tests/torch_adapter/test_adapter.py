"""paramserve.client.torch.RemoteOptimizer against real servers, checked against optim_core.

Each test trains a tiny module for a few steps; the reference is optim_core (the server's
own maths) replaying the very gradients the module pushed, so results must be bit-equal.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from paramserve import optim_core  # noqa: E402
from paramserve.client import (  # noqa: E402
    AlreadyExistsError,
    NotFoundError,
    PermissionDeniedError,
)
from paramserve.client.torch import RemoteOptimizer, from_torch  # noqa: E402


def _module(seed: int = 0, dtype: Any = None) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("hidden", nn.Linear(4, 3))
    model.add_module("act", nn.Tanh())
    model.add_module("head", nn.Linear(3, 2))
    return model.to(dtype) if dtype is not None else model


def _data(dtype: Any = torch.float32) -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(16, 4, generator=generator).to(dtype)
    y = torch.randint(0, 2, (16,), generator=generator)
    return x, y


def _host(tensor: Any) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: _host(p) for name, p in model.named_parameters()}


def _train(
    opt: Any, model: nn.Module, steps: int, *, drop: dict[int, str] | None = None, hook: Any = None
) -> list[dict[str, np.ndarray | None]]:
    """``steps`` steps on fixed data; returns the gradients pushed (None: dropped)."""
    x, y = _data(next(model.parameters()).dtype)
    pushed = []
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        if drop and step in drop:
            dict(model.named_parameters())[drop[step]].grad = None
        pushed.append(
            {n: None if p.grad is None else _host(p.grad) for n, p in model.named_parameters()}
        )
        opt.step()
        if hook is not None:
            hook(step)
    return pushed


def _replay(
    optimizer: optim_core.Optimizer,
    initial: dict[str, np.ndarray],
    pushed: list[dict[str, np.ndarray | None]],
    *,
    learning_rates: list[float] | None = None,
) -> tuple[dict[str, np.ndarray], optim_core.Optimizer]:
    variables = [optim_core.Variable(v.copy(), path=n) for n, v in initial.items()]
    for i, grads in enumerate(pushed):
        if learning_rates is not None:
            optimizer.learning_rate = learning_rates[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras's warning for None gradients
            optimizer.apply([grads[v.path] for v in variables], variables)
    return {v.path: v.value for v in variables}, optimizer


def _assert_equal_weights(model: nn.Module, expected: dict[str, np.ndarray]) -> None:
    for name, value in _weights(model).items():
        assert value.dtype == expected[name].dtype, name
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def _assert_equal_state(client: Any, optimizer: optim_core.Optimizer) -> None:
    served = client.optimizer_state()
    local = optimizer.state_dict()
    assert list(served) == list(local)
    for name, value in local.items():
        np.testing.assert_array_equal(served[name], value, err_msg=name)


# --- training equals an optim_core replay -------------------------------------------------
@pytest.mark.parametrize("step_max_bytes", [None, 0], ids=["step-call", "push-pull-in-place"])
def test_training_equals_optim_core_replay(start_server, connect, step_max_bytes) -> None:
    """AdamW through from_torch, biases in a weight_decay=0 group (an exclusion), one step
    with a parameter whose grad is None: bit-equal to optim_core on the same gradients."""
    server = start_server()
    model = _module()
    decay = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
    initial = {n: _host(p) for n, p in decay + no_decay}  # the server's order: group order
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    translation = from_torch(torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1))
    options = {} if step_max_bytes is None else {"step_max_bytes": step_max_bytes}
    opt = RemoteOptimizer(groups, connect(server), optimizer=translation, **options)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["weight_decay"] == 0.1
    views = {n: p.detach().numpy() for n, p in model.named_parameters()}
    versions = {n: p._version for n, p in model.named_parameters()}

    pushed = _train(opt, model, 4, drop={2: "head.bias"})

    assert opt.version == 4 == connect(server).status().version
    reference = optim_core.deserialize(translation.config())
    reference.exclude_from_weight_decay(var_paths=["hidden.bias", "head.bias"])
    expected, reference = _replay(reference, initial, pushed)
    _assert_equal_weights(model, expected)
    _assert_equal_state(opt.client, reference)
    config = opt.client.describe().optimizer
    assert config["class_name"] == "AdamW"
    assert config["exclude_from_weight_decay"]["var_paths"] == ["head.bias", "hidden.bias"]
    for name, p in model.named_parameters():
        # The same memory throughout (written in place), and autograd saw the writes.
        assert np.shares_memory(views[name], p.detach().numpy())
        assert p._version > versions[name]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_equal_optim_core_replay(start_server, connect, dtype) -> None:
    server = start_server()
    model = _module(dtype=dtype)
    initial = _weights(model)
    opt = RemoteOptimizer(
        model.named_parameters(),
        connect(server),
        optimizer=optim_core.SGD(learning_rate=0.1, momentum=0.9),
        step_max_bytes=0,
    )
    pushed = _train(opt, model, 3)
    assert all(p.dtype == dtype for p in model.parameters())
    expected, reference = _replay(optim_core.SGD(learning_rate=0.1, momentum=0.9), initial, pushed)
    _assert_equal_weights(model, expected)
    _assert_equal_state(opt.client, reference)


def test_non_contiguous_parameters_are_written_with_copy(start_server, connect) -> None:
    """A parameter whose memory cannot receive the pull directly (non-contiguous here; any
    CUDA parameter) takes the new weights through copy_, with the same result."""
    server = start_server()
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3).t())  # a (3, 4) view of (4, 3) memory
    assert not weight.is_contiguous()
    initial = {"weight": _host(weight)}
    opt = RemoteOptimizer([("weight", weight)], connect(server), optimizer="adam",
                          step_max_bytes=0)  # fmt: skip
    x = torch.randn(5, 4)
    pushed = []
    for _ in range(2):
        opt.zero_grad()
        (x @ weight.t()).square().sum().backward()
        pushed.append({"weight": _host(weight.grad)})
        opt.step()
    assert not weight.is_contiguous()
    expected, _ = _replay(optim_core.Adam(), initial, pushed)
    np.testing.assert_array_equal(_host(weight), expected["weight"])


def test_sparse_embedding_gradients_travel_as_rows(start_server, connect) -> None:
    server = start_server()
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 3, sparse=True)
    initial = _weights(embedding)
    opt = RemoteOptimizer(embedding.named_parameters(), connect(server), optimizer="sgd")
    rows = torch.tensor([1, 4, 4, 7])
    opt.zero_grad()
    embedding(rows).pow(2).sum().backward()
    assert embedding.weight.grad.is_sparse
    grad = embedding.weight.grad.coalesce()
    sparse = optim_core.IndexedSlices(grad.indices()[0].numpy(), grad.values().numpy())
    opt.step()
    expected, _ = _replay(optim_core.SGD(), initial, [{"weight": sparse}])
    _assert_equal_weights(embedding, expected)


# --- zero_grad, step(closure), param_groups and lr_scheduler ------------------------------
def test_step_closure_and_zero_grad(start_server, connect) -> None:
    server = start_server()
    model = _module()
    x, y = _data()
    opt = RemoteOptimizer(model.named_parameters(), connect(server), optimizer="sgd")

    def closure() -> Any:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.version == 1
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.warns(UserWarning, match="found no gradients"):
        assert opt.step() is None
    assert opt.client.status().version == 1  # nothing pushed


def test_steplr_changes_the_servers_learning_rate(start_server, connect) -> None:
    server = start_server()
    model = _module()
    initial = _weights(model)
    opt = RemoteOptimizer(
        model.named_parameters(),
        connect(server),
        optimizer=from_torch(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)),
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    served: list[float] = []
    used: list[float] = []

    def after_step(step: int) -> None:
        used.append(opt.param_groups[0]["lr"])
        served.append(opt.client.describe().hyperparameters["learning_rate"])
        scheduler.step()

    pushed = _train(opt, model, 5, hook=after_step)
    assert used == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005])
    assert served == [float(np.float32(lr)) for lr in used]
    expected, _ = _replay(
        optim_core.SGD(learning_rate=0.5, momentum=0.9), initial, pushed, learning_rates=used
    )
    _assert_equal_weights(model, expected)


def test_groups_that_cannot_be_expressed_are_refused(start_server, connect) -> None:
    server = start_server()
    client = connect(server)
    model = _module()
    named = dict(model.named_parameters())
    weights = [(n, p) for n, p in named.items() if n.endswith("weight")]
    biases = [(n, p) for n, p in named.items() if n.endswith("bias")]
    cases = [
        ([{"params": weights, "lr": 0.1}, {"params": biases, "lr": 0.01}], "one learning rate"),
        (
            [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.2}],
            "one weight decay",
        ),
        ([{"params": weights, "momentum": 0.9}, {"params": biases}], r"\['momentum'\]"),
    ]
    for groups, message in cases:
        with pytest.raises(ValueError, match=message):
            RemoteOptimizer(groups, client, optimizer="adam")
    assert not client.status().has_model  # refused before anything reached the server


def test_a_scheduler_giving_groups_different_lrs_is_refused_before_the_push(
    start_server, connect
) -> None:
    server = start_server()
    model = _module()
    named = dict(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named.items() if n.startswith("hidden")]},
        {"params": [(n, p) for n, p in named.items() if n.startswith("head")]},
    ]
    opt = RemoteOptimizer(groups, connect(server), optimizer="sgd")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 1.0, lambda e: 0.5**e])
    _train(opt, model, 1)
    scheduler.step()
    with pytest.raises(ValueError, match="one learning rate"):
        _train(opt, model, 1)
    assert opt.client.status().version == 1


def test_gradients_from_a_version_the_server_lost_are_dropped(start_server, connect) -> None:
    """After a restore to an older snapshot, the worker's next gradients (from a version the
    server no longer has) are dropped with a warning and the module takes the server's
    weights; the step after that trains normally."""
    server = start_server()
    admin = connect(server)
    model = _module()
    opt = RemoteOptimizer(model.named_parameters(), connect(server), optimizer="adam")
    _train(opt, model, 2)
    snapshot = admin.snapshot()
    restored = {k: v.copy() for k, v in admin.pull().items()}
    _train(opt, model, 2)
    admin.restore(snapshot)
    with pytest.warns(UserWarning, match="from version 4.*dropped.*now hold version 2"):
        _train(opt, model, 1)
    assert opt.version == 2
    _assert_equal_weights(model, restored)
    _train(opt, model, 1)
    assert opt.version == 3


# --- state_dict ------------------------------------------------------------------------------
def test_state_dict_round_trips(start_server, connect) -> None:
    """Save after 3 steps (through torch.save/torch.load(weights_only=True)), train 2 more;
    a fresh server given the saved module and optimizer state trains the same 2 steps to the
    same bits, and loading on the first server turns its state and version back."""
    first = start_server()
    model = _module()
    opt = RemoteOptimizer(model.named_parameters(), connect(first), optimizer="adam")
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    _train(opt, model, 3, hook=lambda step: scheduler.step())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    saved_state = {k: v.copy() for k, v in opt.client.optimizer_state().items()}
    _train(opt, model, 2)
    finished = _weights(model)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = _module(seed=1)
    resumed.load_state_dict(checkpoint["model"])
    second = start_server()
    opt2 = RemoteOptimizer(resumed.named_parameters(), connect(second), optimizer="adam")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the weights agree: no warning
        opt2.load_state_dict(checkpoint["opt"])
    assert opt2.version == 3 == opt2.client.status().version
    assert opt2.param_groups[0]["lr"] == 0.001 * 0.5**3
    assert opt2.param_groups[0]["initial_lr"] == 0.001
    # The groups' lr (the scheduler's, not yet sent when saved) is the server's now.
    assert opt2.client.describe().hyperparameters["learning_rate"] == np.float32(0.001 * 0.5**3)
    saved_state["learning_rate"] = np.float32(0.001 * 0.5**3)
    for name, value in opt2.client.optimizer_state().items():
        np.testing.assert_array_equal(value, saved_state[name], err_msg=name)
    _train(opt2, resumed, 2)
    _assert_equal_weights(resumed, finished)

    # Back on the first server, whose weights moved on to version 5: the module takes the
    # checkpoint's weights, but the server keeps its own, and says so.
    model.load_state_dict(checkpoint["model"])
    with pytest.warns(UserWarning, match="differ from the server's weights"):
        opt.load_state_dict(checkpoint["opt"])
    assert opt.client.status().version == 3
    for name, value in opt.client.optimizer_state().items():
        np.testing.assert_array_equal(value, saved_state[name], err_msg=name)


def test_a_torch_optimizers_state_dict_is_refused(start_server, connect) -> None:
    server = start_server()
    model = _module()
    opt = RemoteOptimizer(model.named_parameters(), connect(server), optimizer="adam")
    _train(opt, model, 1)
    local = torch.optim.Adam(model.parameters())
    _train(local, model, 1)
    with pytest.raises(ValueError, match="not written by paramserve"):
        opt.load_state_dict(local.state_dict())
    assert opt.client.status().version == 1


# --- creation, joining, bad input ---------------------------------------------------------
def test_a_second_worker_takes_the_servers_weights(start_server, connect) -> None:
    server = start_server()
    first, second = _module(seed=0), _module(seed=1)
    RemoteOptimizer(first.named_parameters(), connect(server), optimizer="adam")
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(_weights(first).values(), _weights(second).values(), strict=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the idempotent create's "other weights" is expected
        opt = RemoteOptimizer(second.named_parameters(), connect(server), optimizer="adam")
    _assert_equal_weights(second, _weights(first))
    assert opt.client.describe().version == 0

    with pytest.raises(AlreadyExistsError, match="another definition"):
        RemoteOptimizer(_module().named_parameters(), connect(server), optimizer="sgd")


def test_worker_tokens_join_an_existing_model_and_cannot_create(start_server, connect) -> None:
    server = start_server(admin_tokens=("admin-secret",), worker_tokens=("worker-secret",))
    with pytest.raises(PermissionDeniedError, match="admin token first"):
        RemoteOptimizer(
            _module().named_parameters(), connect(server, token="worker-secret"), optimizer="adam"
        )
    creator = _module(seed=0)
    RemoteOptimizer(creator.named_parameters(), connect(server, token="admin-secret"))
    worker = _module(seed=1)
    opt = RemoteOptimizer(
        worker.named_parameters(), connect(server, token="worker-secret"), optimizer="adam"
    )
    _assert_equal_weights(worker, _weights(creator))
    _train(opt, worker, 1)
    assert opt.version == 1


def test_a_worker_training_part_of_the_model_adds_a_group_later(start_server, connect) -> None:
    """The model is created whole; a worker joins with optimizer=None for the head only
    (fine-tuning), then adds the hidden layer with add_param_group: both take the server's
    weights, the hidden layer's weight decay exclusion is checked, and both train."""
    server = start_server()
    creator = _module(seed=0)
    weights = [(n, p) for n, p in creator.named_parameters() if n.endswith("weight")]
    biases = [(n, p) for n, p in creator.named_parameters() if n.endswith("bias")]
    RemoteOptimizer(
        [{"params": weights}, {"params": biases, "weight_decay": 0.0}],
        connect(server),
        optimizer=optim_core.AdamW(learning_rate=0.01, weight_decay=0.1),
    )
    model = _module(seed=1)
    named = dict(model.named_parameters())
    head = [(n, p) for n, p in named.items() if n.startswith("head")]
    hidden = [(n, p) for n, p in named.items() if n.startswith("hidden")]
    opt = RemoteOptimizer(head, connect(server), optimizer=None)
    assert opt.param_groups[0]["lr"] == 0.01
    for name, _ in hidden:
        named[name].requires_grad_(False)
    _train(opt, model, 1)
    assert opt.version == 1
    with pytest.raises(ValueError, match=r"decays \['hidden.bias'\]"):
        opt.add_param_group({"params": hidden, "weight_decay": 0.1})
    for name, _ in hidden:
        named[name].requires_grad_(True)
    opt.add_param_group({"params": hidden[:1]})  # takes the server's decay: 0.1
    opt.add_param_group({"params": hidden[1:], "weight_decay": 0.0})
    # The head group shows the server's decay, though its bias is excluded on the server.
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    served = connect(server).pull()
    _assert_equal_weights(model, dict(served))
    _train(opt, model, 1)
    assert opt.version == 2
    _assert_equal_weights(model, dict(connect(server).pull()))


def test_create_false_needs_an_existing_model(start_server, connect) -> None:
    server = start_server()
    with pytest.raises(NotFoundError, match="create=False"):
        RemoteOptimizer(_module().named_parameters(), connect(server), create=False)


class _Other(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.decoder = nn.Linear(3, 2)


def _refused_before_anything_changes(server: Any, connect: Any, params: Any, error: Any,
                                     match: str, **options: Any) -> None:  # fmt: skip
    client = connect(server)
    before = client.pull()
    with pytest.raises(error, match=match):
        RemoteOptimizer(params, client, optimizer="adam", **options)
    after = client.pull()
    assert after.version == before.version
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def test_bad_input_is_refused_before_anything_is_pushed(start_server, connect) -> None:
    server = start_server()
    model = _module()
    RemoteOptimizer(model.named_parameters(), connect(server), optimizer="adam")

    other = _Other()
    _refused_before_anything_changes(
        server, connect, other.named_parameters(), ValueError, "encoder.weight.*not variables"
    )
    bigger = _module()
    bigger.add_module("extra", nn.Linear(2, 2))
    _refused_before_anything_changes(
        server, connect, bigger.named_parameters(), ValueError, r"\['extra.weight', 'extra.bias'\]"
    )
    _refused_before_anything_changes(
        server, connect, _module(dtype=torch.float64).named_parameters(), TypeError,
        "hidden.weight.*torch.float64.*server's variable is float32",
    )  # fmt: skip
    counts = [("count", nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False))]
    _refused_before_anything_changes(server, connect, counts, TypeError, r"torch\.int64")
    _refused_before_anything_changes(
        server, connect, list(model.parameters()), TypeError, "named_parameters"
    )

    # A dtype changed after construction is caught at step(), before the push.
    opt = RemoteOptimizer(model.named_parameters(), connect(server), optimizer="adam")
    model.double()
    with pytest.raises(TypeError, match=r"torch\.float64"):
        _train(opt, model, 1)
    assert opt.client.status().version == 0
    # A group added later must name variables of the server's model.
    with pytest.raises(ValueError, match="not variables"):
        opt.add_param_group({"params": [("unknown", nn.Parameter(torch.zeros(1)))]})
    assert len(opt.param_groups) == 1
