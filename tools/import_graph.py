"""The layers of paramserve and its import graph: the rules, the check, and the picture.

Every module of the installed packages (``[tool.setuptools.package-dir]`` in pyproject.toml)
belongs to one layer, and a layer may import only the layers listed for it in ``RULES``
(itself included) and none of the third-party packages listed in ``FORBIDDEN``. Imports
are read with ``ast`` (nothing is imported), every ``import`` statement counts: inside
functions and ``if TYPE_CHECKING:`` too.

    python tools/import_graph.py            # rewrite docs/architecture.md from the sources
    python tools/import_graph.py --check    # exit 1 if it is stale or a rule is broken

``tests/test_layers.py`` runs the same checks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"

# Layer -> what it is, in dependency order (a layer imports only earlier ones and itself).
LAYERS: dict[str, str] = {
    "generated": "paramserve.v1: the protobuf and gRPC code generated from the .proto files",
    "wire": "paramserve.wire: the tensor codec, chunk framing, sizes and names both sides share",
    "optim_core": "paramserve.optim_core: the Keras 3 optimizers on NumPy or CuPy arrays",
    "core": "the daemon's transport-neutral service: store, aggregation, snapshots, settings",
    "rpc": "the daemon's gRPC layer: servicer, streams, messages, status, auth, metrics",
    "app": "the daemon assembled: gRPC server, health, reflection, metrics endpoint, signals",
    "cli": "the paramserve command, the demo and the health probe",
    "client": "paramserve.client: the SDK",
}
# Layer -> the layers it may import.
RULES: dict[str, frozenset[str]] = {
    "generated": frozenset({"generated"}),
    "wire": frozenset({"generated", "wire"}),
    "optim_core": frozenset({"optim_core"}),
    "core": frozenset({"wire", "optim_core", "core"}),
    "rpc": frozenset({"generated", "wire", "optim_core", "core", "rpc"}),
    "app": frozenset({"generated", "wire", "optim_core", "core", "rpc", "app"}),
    "cli": frozenset({"generated", "wire", "optim_core", "core", "rpc", "app", "cli", "client"}),
    "client": frozenset({"generated", "wire", "optim_core", "client"}),
}
_TRANSPORT = frozenset(
    {
        "grpc",
        "grpc_health",
        "grpc_reflection",
        "grpc_status",
        "google.protobuf",
        "google.rpc",
        "prometheus_client",
    }
)
# Layer -> third-party packages it must not import (the core knows no transport).
FORBIDDEN: dict[str, frozenset[str]] = {
    "wire": frozenset({"grpc", "grpc_health", "grpc_reflection", "grpc_status"}),
    "optim_core": _TRANSPORT,
    "core": _TRANSPORT,
}
# Other layers use optim_core through its public API only: the package and its schedules.
OPTIM_CORE_API = frozenset({"paramserve.optim_core", "paramserve.optim_core.schedules"})
# Modules of paramserve.server by layer; the server's other modules are "core".
SERVER_LAYERS: dict[str, str] = {
    "status": "rpc",
    "metrics": "rpc",
    "streams": "rpc",
    "messages": "rpc",
    "servicer": "rpc",
    "auth": "rpc",
    "reflection": "rpc",
    "app": "app",
    "__main__": "cli",
    "cli": "cli",
    "demo": "cli",
    "healthcheck": "cli",
    "client_flags": "cli",
    "top": "cli",
}
_PACKAGE_LAYERS = {
    "paramserve.v1": "generated",
    "paramserve.wire": "wire",
    "paramserve.optim_core": "optim_core",
    "paramserve.client": "client",
}
# Drawn as one node each in the module picture.
_COLLAPSED = ("paramserve.v1", "paramserve.optim_core", "paramserve.client")


@dataclass(frozen=True)
class Module:
    """One module of an installed package: its dotted name, file and layer."""

    name: str
    path: Path
    layer: str

    @property
    def package(self) -> str:
        """The package the module belongs to (itself for an ``__init__``)."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def layer_of(name: str) -> str:
    """The layer of a module of paramserve, by its dotted name."""
    for package, layer in _PACKAGE_LAYERS.items():
        if name == package or name.startswith(package + "."):
            return layer
    if name == "paramserve.server" or name.startswith("paramserve.server."):
        return SERVER_LAYERS.get(name.rpartition(".")[2], "core")
    raise ValueError(f"{name} is in no layer")


def modules(repo: Path = REPO) -> dict[str, Module]:
    """Every module of the packages pyproject.toml installs, by dotted name."""
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    found = {}
    for package, directory in pyproject["tool"]["setuptools"]["package-dir"].items():
        for path in sorted((repo / directory).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = Module(name, path, layer_of(name))
    return found


def _imported(module: Module, known: dict[str, Module]) -> Iterable[str]:
    """The dotted names ``module`` imports: modules of ours where they resolve, else as
    written (third-party and standard library)."""
    tree = ast.parse(module.path.read_text(), filename=str(module.path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base


def imports(found: dict[str, Module] | None = None) -> dict[str, set[str]]:
    """Module -> what it imports: our modules by name, others by their top-level name
    (``google.protobuf`` and ``google.rpc`` by their two first)."""
    found = modules() if found is None else found
    graph: dict[str, set[str]] = {}
    for name, module in found.items():
        targets = set()
        for target in _imported(module, found):
            if target in found:
                targets.add(target)
            elif target == "paramserve" or target.startswith("paramserve."):
                raise ValueError(f"{name} imports {target}, which is not a module of ours")
            else:
                depth = 2 if target.startswith("google.") else 1
                targets.add(".".join(target.split(".")[:depth]))
        graph[name] = targets
    return graph


def violations(found: dict[str, Module] | None = None) -> list[str]:
    """Every import that breaks a layer rule, in words (empty when the layers hold)."""
    found = modules() if found is None else found
    out = []
    for name, targets in sorted(imports(found).items()):
        layer = found[name].layer
        for target in sorted(targets):
            if target in found:
                if found[target].layer not in RULES[layer]:
                    out.append(
                        f"{name} ({layer}) imports {target} ({found[target].layer}); "
                        f"{layer} may import only {sorted(RULES[layer])}"
                    )
                elif found[target].layer == "optim_core" != layer and target not in OPTIM_CORE_API:
                    out.append(
                        f"{name} ({layer}) imports {target}, not optim_core's public API "
                        f"({', '.join(sorted(OPTIM_CORE_API))})"
                    )
            elif target in FORBIDDEN.get(layer, ()):
                out.append(f"{name} ({layer}) imports {target}, which {layer} must not")
    return out


# --- the picture -------------------------------------------------------------------------------
def _node(name: str) -> str:
    for package in _COLLAPSED:
        if name == package or name.startswith(package + "."):
            return package
    return name


def _id(node: str) -> str:
    return node.replace("paramserve.", "").replace(".", "_")


def _label(node: str) -> str:
    if node in _COLLAPSED or node in ("paramserve.wire", "paramserve.server"):
        return node
    return node.rpartition(".")[2]


def render(found: dict[str, Module] | None = None) -> str:
    """docs/architecture.md: the layers, what each may import, and the module graph."""
    found = modules() if found is None else found
    graph = imports(found)
    layer_edges = sorted(
        {
            (found[a].layer, found[b].layer)
            for a, targets in graph.items()
            for b in targets
            if b in found and found[a].layer != found[b].layer
        }
    )
    lines = [
        "# Architecture: the layers and the import graph",
        "",
        "<!-- Generated by `python tools/import_graph.py` from the sources; do not edit.",
        "     tests/test_layers.py fails when this file is stale or a layer rule is broken. -->",
        "",
        "Each module belongs to one layer; a layer imports only the layers before it that its",
        "row lists (and itself), never a later one. The layers of `paramserve.server` are the",
        "core (transport-neutral: no gRPC, protobuf or Prometheus), the gRPC layer over it, the",
        "assembled daemon, and the command line (which also uses the SDK). Outside optim_core,",
        "only its public API is imported: `paramserve.optim_core` and its `schedules`.",
        "",
        "| layer | what it is | may import | must not import |",
        "| --- | --- | --- | --- |",
    ]
    for layer, what in LAYERS.items():
        allowed = ", ".join(x for x in LAYERS if x in RULES[layer] and x != layer) or "-"
        forbidden = ", ".join(f"`{p}`" for p in sorted(FORBIDDEN.get(layer, ()))) or "-"
        lines.append(f"| {layer} | {what} | {allowed} | {forbidden} |")
    lines += ["", "## Layers", "", "`A --> B`: a module of layer A imports one of layer B.", ""]
    lines += ["```mermaid", "flowchart TD"]
    lines += [f"    {layer}[{layer}]" for layer in LAYERS]
    lines += [f"    {a} --> {b}" for a, b in layer_edges]
    lines += ["```", "", "## Modules", ""]
    lines += [
        "Every import between modules (`A --> B`: A imports B). The generated code, optim_core",
        "and the SDK are drawn as one node each.",
        "",
        "```mermaid",
        "flowchart TD",
    ]
    nodes_by_layer: dict[str, list[str]] = {layer: [] for layer in LAYERS}
    for name, module in found.items():
        node = _node(name)
        if node not in nodes_by_layer[module.layer]:
            nodes_by_layer[module.layer].append(node)
    for layer, nodes in nodes_by_layer.items():
        lines.append(f"    subgraph layer_{layer} [{layer}]")
        lines += [f'        {_id(n)}["{_label(n)}"]' for n in sorted(nodes)]
        lines.append("    end")
    edges = sorted(
        {
            (_node(a), _node(b))
            for a, targets in graph.items()
            for b in targets
            if b in found and _node(a) != _node(b)
        }
    )
    lines += [f"    {_id(a)} --> {_id(b)}" for a, b in edges]
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/architecture.md, or with --check report a stale one and broken rules."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    broken = violations()
    for line in broken:
        print(f"layer rule broken: {line}", file=sys.stderr)
    text = render()
    if args.check:
        stale = not DOC.exists() or DOC.read_text() != text
        if stale:
            print(f"{DOC.relative_to(REPO)} is stale: run python tools/import_graph.py")
        return 1 if stale or broken else 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(REPO)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
