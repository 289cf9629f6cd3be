"""A pure-Python `kustomize build` of the few features deploy/k8s uses, so CI needs no kubectl.

Supported: ``resources`` (files), ``images`` (newName, newTag), ``configMapGenerator``
(files, literals; ``disableNameSuffixHash``, annotations, labels), ``replacements`` (a source
field copied into target fields selected by kind and name, without options) and the
``config.kubernetes.io/local-config`` annotation. Anything else raises
:class:`UnsupportedKustomization` rather than render something kustomize would not: where
kubectl is installed, tests/deploy compare this output with ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

LOCAL_CONFIG = "config.kubernetes.io/local-config"
_KEYS = {"apiVersion", "kind", "resources", "images", "configMapGenerator", "replacements"}
_GENERATOR_KEYS = {"name", "files", "literals", "options"}
_GENERATOR_OPTIONS = {"disableNameSuffixHash", "annotations", "labels"}


class UnsupportedKustomization(ValueError):
    """The kustomization uses something this renderer does not implement."""


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` outputs, in the order of ``resources``."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KEYS
    if unknown:
        raise UnsupportedKustomization(f"kustomization keys not implemented: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if not path.is_file():
            raise UnsupportedKustomization(f"resource {resource!r}: only files are implemented")
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    for generator in kustomization.get("configMapGenerator", []):
        objects.append(_config_map(directory, generator))
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    for replacement in kustomization.get("replacements", []):
        _replace(objects, replacement)
    return [
        obj
        for obj in objects
        if obj.get("metadata", {}).get("annotations", {}).get(LOCAL_CONFIG) != "true"
    ]


def _config_map(directory: Path, generator: dict[str, Any]) -> dict[str, Any]:
    unknown = set(generator) - _GENERATOR_KEYS
    options = generator.get("options", {})
    unknown |= set(options) - _GENERATOR_OPTIONS
    if unknown:
        raise UnsupportedKustomization(f"configMapGenerator keys not implemented: {unknown}")
    if not options.get("disableNameSuffixHash"):
        raise UnsupportedKustomization("name suffix hashes are not implemented")
    data: dict[str, str] = {}
    for entry in generator.get("files", []):
        key, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        data[key or Path(path).name] = (directory / path).read_text()
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    metadata: dict[str, Any] = {"name": generator["name"]}
    for field in ("annotations", "labels"):
        if options.get(field):
            metadata[field] = dict(options[field])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def split_image(image: str) -> tuple[str, str]:
    """``(name, suffix)``: ``registry:5000/a/b:tag`` -> ``("registry:5000/a/b", ":tag")``."""
    name, at, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:] + at + digest
    return name, at + digest


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container and init container anywhere in ``obj`` (a pod template's, a Pod's)."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(c for c in value if isinstance(c, dict))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(obj)
    return found


def _set_image(objects: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    unknown = set(entry) - {"name", "newName", "newTag"}
    if unknown:
        raise UnsupportedKustomization(f"images keys not implemented: {sorted(unknown)}")
    for obj in objects:
        for container in containers(obj):
            name, suffix = split_image(container.get("image", ""))
            if name != entry["name"]:
                continue
            new_name = entry.get("newName", name)
            tag = f":{entry['newTag']}" if "newTag" in entry else suffix
            container["image"] = new_name + tag


def parse_field_path(path: str) -> list[str]:
    """``a.b.[name=x].c`` -> ``["a", "b", "[name=x]", "c"]`` (a dot inside brackets stays)."""
    if "\\" in path or "*" in path:
        raise UnsupportedKustomization(f"escapes and wildcards are not implemented: {path!r}")
    segments, current, depth = [], "", 0
    for char in path:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "." and depth == 0:
            segments.append(current)
            current = ""
        else:
            current += char
    segments.append(current)
    if depth != 0 or "" in segments:
        raise UnsupportedKustomization(f"cannot parse field path {path!r}")
    return segments


def _step(node: Any, segment: str, path: str) -> tuple[Any, Any]:
    """``(container, key)`` such that ``container[key]`` is ``segment`` of ``node``."""
    if segment.startswith("["):
        field, _, value = segment[1:-1].partition("=")
        if not isinstance(node, list):
            raise KeyError(f"{path}: {segment} needs a list")
        matches = [i for i, item in enumerate(node) if str(item.get(field)) == value]
        if len(matches) != 1:
            raise KeyError(f"{path}: {len(matches)} items match {segment}")
        return node, matches[0]
    if isinstance(node, list):
        if not segment.isdigit() or int(segment) >= len(node):
            raise KeyError(f"{path}: no item {segment}")
        return node, int(segment)
    if not isinstance(node, dict) or segment not in node:
        raise KeyError(f"{path}: no field {segment!r}")
    return node, segment


def get_field(obj: dict[str, Any], path: str) -> Any:
    """The value at a kustomize field path; KeyError when it does not exist."""
    node: Any = obj
    for segment in parse_field_path(path):
        parent, key = _step(node, segment, path)
        node = parent[key]
    return node


def _set_field(obj: dict[str, Any], path: str, value: Any) -> None:
    *head, last = parse_field_path(path)
    node: Any = obj
    for segment in head:
        parent, key = _step(node, segment, path)
        node = parent[key]
    parent, key = _step(node, last, path)
    old = parent[key]
    # kustomize keeps the target's YAML type: "3" into `replicas: 1` gives the integer 3.
    if isinstance(old, bool) or not isinstance(old, int | str):
        raise UnsupportedKustomization(f"{path}: only string and integer targets are implemented")
    parent[key] = int(value) if isinstance(old, int) else str(value)


def _select(objects: list[dict[str, Any]], select: dict[str, Any]) -> list[dict[str, Any]]:
    unknown = set(select) - {"kind", "name"}
    if unknown:
        raise UnsupportedKustomization(f"select keys not implemented: {sorted(unknown)}")
    return [
        obj
        for obj in objects
        if all(
            (obj.get("kind") if k == "kind" else obj.get("metadata", {}).get("name")) == v
            for k, v in select.items()
        )
    ]


def _replace(objects: list[dict[str, Any]], replacement: dict[str, Any]) -> None:
    source = replacement["source"]
    if set(source) - {"kind", "name", "fieldPath"} or set(replacement) - {"source", "targets"}:
        raise UnsupportedKustomization(f"replacement not implemented: {replacement}")
    matches = _select(objects, {"kind": source["kind"], "name": source["name"]})
    if len(matches) != 1:
        raise KeyError(f"replacement source {source}: {len(matches)} objects match")
    value = copy.deepcopy(get_field(matches[0], source["fieldPath"]))
    for target in replacement["targets"]:
        if set(target) - {"select", "fieldPaths"}:
            raise UnsupportedKustomization(f"replacement target not implemented: {target}")
        selected = _select(objects, target["select"])
        if not selected:
            raise KeyError(f"replacement target {target['select']}: no object matches")
        for obj in selected:
            for path in target["fieldPaths"]:
                _set_field(obj, path, value)
