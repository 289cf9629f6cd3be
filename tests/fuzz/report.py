"""The fuzz suite's counts at the end of a run: the summary line and, with ``--junitxml``,
testsuite properties for CI dashboards. A pytest plugin (loaded by tests/conftest.py), so
that under pytest-xdist each worker hands its counts to the controller, which reports them.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import pytest

_TOTALS: dict[str, Counter[str]] = {"cases": Counter(), "rejected": Counter(), "codes": Counter()}


def _counts_here() -> dict[str, dict[str, int]] | None:
    """This process's counts (tests.fuzz.live counts each generated request), if it ran any."""
    live = sys.modules.get("tests.fuzz.live")
    if live is None:
        return None
    return {"cases": dict(live.CASES), "rejected": dict(live.REJECTED), "codes": dict(live.CODES)}


def _add(counts: dict[str, dict[str, int]]) -> None:
    for name, counter in _TOTALS.items():
        counter.update(counts[name])


def _generated() -> dict[str, int]:
    """Generated requests per family (the fixed regression cases are not generated)."""
    return {k: v for k, v in _TOTALS["cases"].items() if k != "regression"}


@pytest.hookimpl(tryfirst=True)  # before the junitxml plugin writes its file
def pytest_sessionfinish(session: pytest.Session) -> None:
    counts = _counts_here()
    workeroutput: Any = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller reports
        if counts:
            workeroutput["fuzz_counts"] = counts
        return
    if counts:
        _add(counts)
    plugins = session.config.pluginmanager.get_plugins()
    junit = next((p for p in plugins if hasattr(p, "add_global_property")), None)
    generated = _generated()
    if junit is None or not generated:
        return
    junit.add_global_property("fuzz_generated_requests", sum(generated.values()))
    junit.add_global_property("fuzz_internal_errors", _TOTALS["codes"].get("INTERNAL", 0))
    for family, count in sorted(generated.items()):
        junit.add_global_property(f"fuzz_cases_{family}", count)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist: a worker finished; add its counts."""
    counts = getattr(node, "workeroutput", {}).get("fuzz_counts")
    if counts:
        _add(counts)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    generated = _generated()
    if not generated:
        return
    codes = _TOTALS["codes"]
    total = sum(generated.values())
    rejected = sum(v for k, v in _TOTALS["rejected"].items() if k != "regression")
    families = ", ".join(f"{k} {v}" for k, v in sorted(generated.items()))
    by_code = ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))
    terminalreporter.write_line(
        f"fuzz: {total} generated requests ({rejected} rejected), "
        f"{codes.get('INTERNAL', 0)} INTERNAL; by family: {families}; by code: {by_code}"
    )
