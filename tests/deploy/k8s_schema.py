"""Strict checks of Kubernetes objects against the API schema, as the `kubernetes` client models it.

Each model class of the client carries its OpenAPI field types (``openapi_types``), their JSON
names (``attribute_map``) and which fields are required (its pydantic ``model_fields``).
:func:`schema_errors` walks an object against them and reports every unknown field, every
value of the wrong type and every missing required field, with its path: the client's own
deserializer would drop an unknown field without a word, and a misspelt ``readinessProbe`` is
exactly the mistake that must not pass. The schema is the one of the installed client (the
``test`` extra pins it, so CI checks against one Kubernetes release).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import typing
from typing import Any

from kubernetes.client import models

# The kinds deploy/ uses, each at the apiVersion that serves it; anything else is an error
# (so `apiVersion: v1` on a StatefulSet does not pass as the StatefulSet model).
KINDS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("batch/v1", "Job"): "V1Job",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
}

_LIST = re.compile(r"List\[(.+)\]")
_DICT = re.compile(r"Dict\[str, (.+)\]")


def schema_errors(obj: Any) -> list[str]:
    """Every schema violation in ``obj``, one ``path: what is wrong`` line each; [] if none."""
    if not isinstance(obj, dict):
        return [f"<document>: expected an object, got {type(obj).__name__}"]
    key = (obj.get("apiVersion"), obj.get("kind"))
    model = KINDS.get(key)  # type: ignore[arg-type]
    if model is None:
        known = sorted(f"{v} {k}" for v, k in KINDS)
        return [f"<document>: apiVersion/kind {key} is none of {known}"]
    errors: list[str] = []
    _check(obj, model, key[1], errors)
    return errors


def _check(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    if match := _LIST.fullmatch(type_name):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {_describe(value)}")
            return
        for i, item in enumerate(value):
            _check(item, match.group(1), f"{path}[{i}]", errors)
        return
    if match := _DICT.fullmatch(type_name):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {_describe(value)}")
            return
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append(f"{path}: key {key!r} is not a string")
            _check(item, match.group(1), f"{path}.{key}", errors)
        return
    if type_name in _PRIMITIVES:
        problem = _PRIMITIVES[type_name](value)
        if problem:
            errors.append(f"{path}: {problem}")
        return
    _check_model(value, getattr(models, type_name), path, errors)


def _check_model(value: Any, cls: type, path: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{path}: expected an object ({cls.__name__}), got {_describe(value)}")
        return
    attribute_of = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    for key, item in value.items():
        attr = attribute_of.get(key)
        where = f"{path}.{key}"
        if attr is None:
            errors.append(f"{where}: unknown field (not in {cls.__name__})")
            continue
        if item is None:  # `field: null` means unset to the API server
            continue
        type_name = cls.openapi_types[attr]
        if type_name == "object" and _is_int_or_string(cls, attr):
            if isinstance(item, bool) or not isinstance(item, int | str):
                errors.append(f"{where}: expected an integer or a string, got {_describe(item)}")
            continue
        _check(item, type_name, where, errors)
    for attr, field in cls.model_fields.items():
        if field.is_required() and value.get(cls.attribute_map[attr]) is None:
            errors.append(f"{path}.{cls.attribute_map[attr]}: required field missing")


def _is_int_or_string(cls: type, attr: str) -> bool:
    """True for an IntOrString field (ports, maxUnavailable), which the types call ``object``."""
    kinds: set[type] = set()

    def collect(annotation: Any) -> None:
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Annotated:
            collect(args[0])
        elif args:
            for arg in args:
                collect(arg)
        elif isinstance(annotation, type) and annotation is not type(None):
            kinds.add(annotation)

    collect(cls.model_fields[attr].annotation)
    return kinds == {int, str}


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _expect(kinds: tuple[type, ...], what: str):
    def check(value: Any) -> str | None:
        if isinstance(value, bool) and bool not in kinds:
            return f"expected {what}, got {_describe(value)}"
        return None if isinstance(value, kinds) else f"expected {what}, got {_describe(value)}"

    return check


def _base64(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a base64 string, got {_describe(value)}"
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return f"not valid base64: {value[:40]!r}"
    return None


_PRIMITIVES = {
    "str": _expect((str,), "a string"),
    "int": _expect((int,), "an integer"),
    "float": _expect((int, float), "a number"),
    "bool": _expect((bool,), "a boolean"),
    "bytes": _base64,
    # YAML reads an unquoted timestamp as a datetime; the API takes it as RFC 3339 text.
    "datetime": _expect((str, datetime.datetime), "an RFC 3339 timestamp"),
    "date": _expect((str, datetime.date), "a date"),
    "object": lambda value: None,  # free-form (RawExtension and the like)
}
