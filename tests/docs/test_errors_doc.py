"""docs/errors.md, the table of what the daemon answers, agrees with the server's catalogue of
reasons (``paramserve.server.errors.REASONS``): each row's reason answers with the row's code,
and every reason the server may send has a row."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from paramserve.server.errors import REASONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
COLUMNS = ["request", "condition", "gRPC code", "reason", "metadata", "example message"]


def table_rows() -> list[dict[str, str]]:
    """The rows of the table whose header is COLUMNS, as {column: cell}."""
    lines = DOC.read_text().splitlines()
    header = "| " + " | ".join(COLUMNS) + " |"
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"a row of {len(cells)} cells: {line}"
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


def test_the_table_has_rows() -> None:
    assert len(table_rows()) >= len(REASONS)


def test_each_row_names_one_known_reason_and_its_code() -> None:
    for row in table_rows():
        reason = re.fullmatch(r"`([A-Z_]+)`", row["reason"])
        assert reason, f"the reason cell must be one `REASON`: {row}"
        assert reason.group(1) in REASONS, f"{reason.group(1)} is not in the server's catalogue"
        code, _ = REASONS[reason.group(1)]
        assert row["gRPC code"] == code, f"{reason.group(1)} answers {code}, the doc says {row}"
        assert hasattr(grpc.StatusCode, row["gRPC code"])


def test_every_reason_of_the_catalogue_has_a_row() -> None:
    documented = {row["reason"].strip("`") for row in table_rows()}
    assert set(REASONS) - documented == set()
