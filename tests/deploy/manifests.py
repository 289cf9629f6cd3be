"""Reading the rendered deploy/k8s objects: lookups, quantities, mounted files, container starts."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.kustomize import get_field


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return get_field(workload, f"spec.template.spec.containers.[name={name}]")


def env_entry(c: dict[str, Any], name: str) -> dict[str, Any]:
    return get_field(c, f"env.[name={name}]")


def port_of(c: dict[str, Any], name: str) -> int:
    return get_field(c, f"ports.[name={name}].containerPort")


def job_shape(kustomization: Path) -> dict[str, int]:
    """The job-shape literals of a kustomization.yaml: ``{"shards": 3, "workers": 2}``."""
    data = yaml.safe_load(kustomization.read_text())
    (generator,) = [g for g in data["configMapGenerator"] if g["name"] == "job-shape"]
    return {k: int(v) for k, _, v in (lit.partition("=") for lit in generator["literals"])}


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_FACTORS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def quantity(text: str) -> float:
    """A Kubernetes resource quantity as a number: ``"4Gi"`` -> 4294967296, ``"500m"`` -> 0.5."""
    match = _QUANTITY.match(str(text))
    assert match, f"not a quantity: {text!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


_VOLUME_SOURCES = (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name"))


def mounted_files(
    workload: dict[str, Any], c: dict[str, Any], *, sources: dict[tuple[str, str], set[str]]
) -> set[str]:
    """Absolute paths of the Secret and ConfigMap files ``c`` sees; ``sources`` gives each
    ``(kind, name)``'s keys."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    files = set()
    for mount in c.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        for kind, field, name_key in _VOLUME_SOURCES:
            if field not in volume:
                continue
            source = volume[field]
            keys = sources[(kind, source[name_key])]
            items = source.get("items") or [{"key": k, "path": k} for k in sorted(keys)]
            for item in items:
                assert item["key"] in keys, f"{kind} {source[name_key]} has no key {item['key']}"
                files.add(f"{mount['mountPath']}/{item['path']}")
    return files


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """``$(VAR)`` references in a command or argument, expanded as the kubelet does: a defined
    variable is substituted, ``$$`` is a literal ``$``, anything else stays as written."""
    out, i = [], 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
        elif text[i + 1] == "$":
            out.append("$")
            i += 2
        elif text[i + 1] == "(" and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2 : end]
            out.append(env[name] if name in env else text[i : end + 1])
            i = end + 1
        else:
            out.append(text[i : i + 2])
            i += 2
    return "".join(out)


def resolve_env(c: dict[str, Any], *, pod_labels: dict[str, str]) -> dict[str, str]:
    """The container's environment with made-up values for Secrets and the pod's labels."""
    env = {}
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[entry["name"]] = f"fake-{ref['name']}-{ref['key']}"
        elif "fieldRef" in source:
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", source["fieldRef"]["fieldPath"])
            assert label, f"only label fieldRefs are handled: {source}"
            env[entry["name"]] = pod_labels[label.group(1)]
        else:
            raise AssertionError(f"{entry['name']}: unhandled valueFrom {source}")
    return env


def argv_of_started_command(
    c: dict[str, Any], env: dict[str, str], program: str, tmp_path: Path
) -> list[str]:
    """The arguments ``program`` receives when the container's command runs with ``env``:
    the command is run for real (kubelet expansion, then /bin/sh) with a stand-in ``program``
    on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / f"{program}.argv.json"
    stand_in = bin_dir / program
    stand_in.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
    )
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    argv = [kubelet_expand(a, env) for a in [*c["command"], *c.get("args", [])]]
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    subprocess.run(argv, env={**env, "PATH": path}, check=True, timeout=30)
    return json.loads(record.read_text())
