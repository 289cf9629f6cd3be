"""The layers hold: every module's imports (read with ast) follow tools/import_graph.py's
rules, and docs/architecture.md, the picture of the graph, is up to date."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools/import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


graph = _load_tool()


def test_every_import_follows_the_layer_rules() -> None:
    assert graph.violations() == []


def test_the_core_imports_no_transport_and_the_sdk_no_server() -> None:
    found = graph.modules()
    edges = graph.imports(found)
    for name, module in found.items():
        if module.layer == "core":
            assert not {"grpc", "google.protobuf", "google.rpc"} & edges[name], name
            assert not any(
                t.startswith(("paramserve.v1", "paramserve.client")) for t in edges[name]
            )
        if module.layer == "client":
            assert not any(t.startswith("paramserve.server") for t in edges[name]), name
    assert found["paramserve.server.core"].layer == "core"
    assert found["paramserve.server.servicer"].layer == "rpc"


def test_a_broken_rule_is_reported(tmp_path: Path) -> None:
    """The check sees function-level and relative imports (a core module importing grpc, the
    servicer and a private module of optim_core), and a module no layer claims."""
    found = graph.modules()
    core = tmp_path / "core.py"
    core.write_text(
        "from paramserve.optim_core import fused\n\n\n"
        "def f():\n    import grpc\n    from .servicer import add_to_server\n"
    )
    found["paramserve.server.core"] = graph.Module("paramserve.server.core", core, "core")
    broken = graph.violations(found)
    assert any("imports grpc" in line for line in broken)
    assert any("imports paramserve.server.servicer (rpc)" in line for line in broken)
    assert any("optim_core.fused, not optim_core's public API" in line for line in broken)
    with pytest.raises(ValueError, match="in no layer"):
        graph.layer_of("paramserve.elsewhere")


def test_the_architecture_picture_is_up_to_date() -> None:
    assert graph.DOC.read_text() == graph.render(), (
        "docs/architecture.md is stale: run python tools/import_graph.py"
    )
