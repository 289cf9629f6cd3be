"""deploy/grafana/paramserve.json: a well-formed Grafana dashboard whose every PromQL query
names series a real server exports, with labels those series carry.

The exported names come from scraping a running server after a sync round, a duplicate, a
pull and a snapshot, so each labelled family has samples. prometheus_client's exposition
names a counter's samples ``<name>_total`` (and ``<name>_created``), a histogram's
``<name>_bucket``, ``<name>_sum`` and ``<name>_count``, a gauge's ``<name>``.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.models.tiny import SGD_JSON, grads_for, initial_variables
from tests.support.processes import REPO, free_port

DASHBOARD = REPO / "deploy" / "grafana" / "paramserve.json"

# Labels Prometheus adds at scrape time, and the histogram's bucket bound.
SCRAPE_LABELS = {"job", "instance"}
# PromQL functions, aggregations and keywords this dashboard may use.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "rate", "irate", "increase",
    "deriv", "delta", "histogram_quantile", "label_values", "on", "ignoring", "and", "or",
    "unless", "bool", "topk", "bottomk", "clamp_min", "time", "timestamp", "offset",
}  # fmt: skip
# What a series may be fed to: counters only to rate-like functions, buckets only to
# histogram_quantile (checked on the function name right before the selector's group).
RATE_FUNCTIONS = {"rate", "irate", "increase"}

IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
DURATION = re.compile(r"\[[^\]]*\]")
MATCHERS = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def expressions(dash: dict[str, Any]) -> list[str]:
    """Every PromQL text: panel targets and templating queries."""
    exprs = [t["expr"] for p in all_panels(dash["panels"]) for t in p.get("targets", [])]
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """``(metric, {label names in its matchers})`` for every ``metric{...}`` selector."""
    found = []
    for name, body in MATCHERS.findall(STRING.sub('""', expr)):
        labels = {m.split("=")[0].rstrip("!~ ").strip() for m in body.split(",") if m.strip()}
        found.append((name, labels))
    return found


def metric_names(expr: str) -> set[str]:
    """The series names an expression reads: identifiers that are not functions, keywords,
    label names (in matchers or groupings) or inside strings and range durations."""
    text = DURATION.sub("", STRING.sub('""', expr))
    text = re.sub(r"label_values\((.*),\s*[A-Za-z_]\w*\s*\)", r"\1", text)  # its label
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = GROUPING.sub("", text)  # by (...), without (...)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "", text)  # numbers
    names = set(IDENT.findall(text)) - PROMQL_WORDS
    return {n for n in names if not n.startswith("$")}


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for body in GROUPING.findall(expr):
        labels |= {label.strip() for label in body.split(",") if label.strip()}
    return labels


def test_the_extraction_of_names_understands_promql():
    expr = (
        'histogram_quantile(0.99, sum by (le, method) (rate(a_bucket{job=~"$job", '
        'code!="OK"}[1m]))) / sum(increase(b_total[5m])) + on (instance) c'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert selectors(expr) == [("a_bucket", {"job", "code"})]
    assert grouping_labels(expr) == {"le", "method", "instance"}
    assert metric_names('label_values(d{job=~"$job"}, instance)') == {"d"}


def test_the_dashboard_is_a_grafana_dashboard():
    dash = dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 30
    assert dash["title"] and dash["uid"]
    panels = list(all_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["title"], panel
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= variables.keys()
    # Every panel query is narrowed to the chosen job and servers.
    for expr in expressions(dash):
        for _name, labels in selectors(expr):
            if not expr.startswith("label_values"):
                assert {"job", "instance"} <= labels, expr


@pytest.fixture
def exported(start_server, connect, tmp_path) -> dict[str, dict[str, Any]]:
    """``{series name: {"type": family type, "labels": label names}}`` of a real server's
    ``/metrics`` once something of everything has happened."""
    port = free_port()
    server = start_server(
        mode="sync", replicas=1, checkpoint_dir=tmp_path / "ckpt", metrics_port=port
    )
    client = connect(server, worker_id="w0")
    client.create_model(initial_variables(), json.loads(SGD_JSON))
    first = client.push(grads_for())  # a full round
    client.push(grads_for(), sequence=client.last_sequence)  # a duplicate
    client.pull()
    client.snapshot()
    assert first.version == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("paramserve_"):
            continue
        for sample in family.samples:
            entry = series.setdefault(sample.name, {"type": family.type, "labels": set()})
            entry["labels"] |= set(sample.labels)
    return series


def test_every_query_reads_series_a_server_exports(exported):
    dash = dashboard()
    used: set[str] = set()
    for expr in expressions(dash):
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        for name in names:
            assert name in exported, f"{expr!r} reads {name!r}, which no server exports"
            series = exported[name]
            if series["type"] == "counter":
                assert name.endswith("_total"), name
            used.add(name)
        for name, labels in selectors(expr):
            unknown = labels - SCRAPE_LABELS - exported[name]["labels"]
            assert not unknown, f"{expr!r}: {name} has no label {sorted(unknown)}"
        available = SCRAPE_LABELS | {"le"}
        for name in names:
            available |= exported[name]["labels"]
        missing = grouping_labels(expr) - available
        assert not missing, f"{expr!r} groups by {sorted(missing)}, which its series lack"
        # Counters go through rate/increase, histogram buckets through histogram_quantile.
        for name in names:
            before = expr[: expr.index(name)]
            if name.endswith("_bucket"):
                assert "histogram_quantile(" in before, expr
            elif exported[name]["type"] in ("counter", "histogram"):
                calls = re.findall(r"([a-z_]+)\(", before)
                assert calls and calls[-1] in RATE_FUNCTIONS, expr
    # And the dashboard shows every family the server exports.
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exported}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families - shown == set(), "families without a panel"
