"""tests/deploy/k8s_schema.py refuses what the API server refuses: its passes mean something."""

from __future__ import annotations

import copy

import pytest

from tests.deploy.k8s_schema import schema_errors

CONTAINER = {"name": "paramserve", "image": "paramserve:latest"}
STATEFUL_SET = {
    "apiVersion": "apps/v1",
    "kind": "StatefulSet",
    "metadata": {"name": "ps", "labels": {"app": "ps"}},
    "spec": {
        "serviceName": "ps",
        "replicas": 3,
        "selector": {"matchLabels": {"app": "ps"}},
        "template": {
            "metadata": {"labels": {"app": "ps"}},
            "spec": {
                "containers": [
                    {
                        **CONTAINER,
                        "ports": [{"name": "grpc", "containerPort": 50051}],
                        "readinessProbe": {"grpc": {"port": 50051}, "periodSeconds": 5},
                        "resources": {"limits": {"memory": "4Gi"}},
                    }
                ]
            },
        },
    },
}


def _broken(edit) -> dict:
    obj = copy.deepcopy(STATEFUL_SET)
    edit(obj)
    return obj


def _container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def test_a_valid_stateful_set_passes():
    assert schema_errors(STATEFUL_SET) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda o: _container(o).update(readinesProbe=_container(o).pop("readinessProbe")),
            "containers[0].readinesProbe: unknown field (not in V1Container)",
            id="misspelt-field",
        ),
        pytest.param(
            lambda o: o["spec"]["template"]["spec"].update(terminationGracePeriod=90),
            "spec.template.spec.terminationGracePeriod: unknown field (not in V1PodSpec)",
            id="unknown-pod-field",
        ),
        pytest.param(
            lambda o: o.update(status={"replicas": 3, "readyReplica": 3}),
            "StatefulSet.status.readyReplica: unknown field",
            id="unknown-field-deep",
        ),
        pytest.param(
            lambda o: o["spec"].update(replicas="3"),
            "StatefulSet.spec.replicas: expected an integer, got str '3'",
            id="string-for-integer",
        ),
        pytest.param(
            lambda o: _container(o)["ports"][0].update(containerPort=True),
            "ports[0].containerPort: expected an integer, got bool True",
            id="boolean-for-integer",
        ),
        pytest.param(
            lambda o: _container(o).update(args="--config x"),
            "containers[0].args: expected a list, got str",
            id="string-for-list",
        ),
        pytest.param(
            lambda o: _container(o)["resources"]["limits"].update(memory=["4Gi"]),
            "resources.limits.memory: expected a string, got list",
            id="list-for-quantity",
        ),
        pytest.param(
            lambda o: _container(o)["readinessProbe"].update(grpc="50051"),
            "readinessProbe.grpc: expected an object (V1GRPCAction), got str",
            id="string-for-object",
        ),
        pytest.param(
            lambda o: _container(o).pop("name"),
            "containers[0].name: required field missing",
            id="container-without-name",
        ),
        pytest.param(
            lambda o: _container(o)["readinessProbe"]["grpc"].pop("port"),
            "readinessProbe.grpc.port: required field missing",
            id="grpc-probe-without-port",
        ),
        pytest.param(
            lambda o: o["spec"].pop("selector"),
            "StatefulSet.spec.selector: required field missing",
            id="stateful-set-without-selector",
        ),
        pytest.param(
            lambda o: o.update(apiVersion="v1"),
            "apiVersion/kind ('v1', 'StatefulSet') is none of",
            id="wrong-api-version",
        ),
    ],
)
def test_a_broken_stateful_set_is_refused_with_the_path(edit, expected):
    errors = schema_errors(_broken(edit))
    assert any(expected in error for error in errors), errors


def test_every_error_is_reported_not_just_the_first():
    def edit(obj):
        _container(obj).pop("name")
        obj["spec"]["replicas"] = "3"
        obj["spec"]["template"]["spec"]["hostNetwork"] = "yes"

    assert len(schema_errors(_broken(edit))) == 3


def test_int_or_string_fields_take_either_and_nothing_else():
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "ps"},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "ps"}}},
    }
    assert schema_errors(pdb) == []
    pdb["spec"]["maxUnavailable"] = "25%"
    assert schema_errors(pdb) == []
    pdb["spec"]["maxUnavailable"] = True
    assert schema_errors(pdb) == [
        "PodDisruptionBudget.spec.maxUnavailable: expected an integer or a string, got bool True"
    ]


def test_secret_data_must_be_base64_and_string_data_text():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}
    assert schema_errors({**secret, "data": {"k": "aGVsbG8="}, "stringData": {"t": "x"}}) == []
    assert schema_errors({**secret, "data": {"k": "not base64!"}}) == [
        "Secret.data.k: not valid base64: 'not base64!'"
    ]
    assert schema_errors({**secret, "stringData": {"t": 5}}) == [
        "Secret.stringData.t: expected a string, got int 5"
    ]


def test_a_document_that_is_not_an_object_is_refused():
    assert schema_errors(["a", "list"]) == ["<document>: expected an object, got list"]
