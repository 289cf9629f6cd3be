"""Structured logs: one event per line on stderr; `--log-format json` gives one JSON object each."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import sys
import time
import warnings
from datetime import datetime

from paramserve.server.cli import JsonLogFormatter, TextLogFormatter, configure_logging
from paramserve.v1 import parameter_server_pb2 as pb
from tests.support.models.tiny import grads_for, initial_variables
from tests.support.wire import create_model_requests, push_requests

LEVELS = {"debug", "info", "warning", "error", "critical"}
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S"
)


def _lifecycle(server) -> str:
    """Create, push, snapshot over RPC, then SIGTERM; returns the snapshot id."""
    with server.channel() as channel:
        stub = server.stub(channel)
        stub.CreateModel(create_model_requests(initial_variables()), timeout=20)
        stub.Push(iter(push_requests(grads_for())), timeout=20)
        snapshot_id = stub.CreateSnapshot(pb.CreateSnapshotRequest(), timeout=20).id
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0, server.stderr
    return snapshot_id


def test_json_logs_are_one_object_per_line_with_event_fields(start_process, tmp_path):
    server = start_process("--mode", "async", "--checkpoint-dir", str(tmp_path / "ckpt"))
    snapshot_id = _lifecycle(server)
    entries = []
    for line in server.lines:  # every line: no stray prints, warnings or tracebacks
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert entry["level"] in LEVELS and entry["logger"] and entry["message"]
        assert datetime.fromisoformat(entry["time"]).tzinfo is not None
        entries.append(entry)
    events = [e["event"] for e in entries if "event" in e]
    assert events[0] == "listening" and events[-1] == "stopped"
    tail = events[events.index("signal") :]
    assert tail[:2] == ["signal", "shutdown_started"], events
    listening = entries[0]
    assert listening["address"] == server.address and listening["version"] == 0
    assert next(e for e in entries if e.get("event") == "signal")["signal"] == "SIGTERM"
    assert next(e for e in entries if e.get("event") == "shutdown_started")["grace_s"] == 10.0
    # Both snapshots (the RPC's, then the final one at exit) are named in the log.
    written = [e for e in entries if "written" in e["message"] and "snap-" in e["message"]]
    assert len(written) == 2 and snapshot_id in written[0]["message"]
    assert [e.get("event") for e in written] == ["snapshot_written"] * 2
    assert written[0]["snapshot_id"] == snapshot_id and written[1]["trigger"] == "exit"


def test_text_logs_are_one_event_per_line(start_process, tmp_path):
    server = start_process("--mode", "async", log_format="text")
    _lifecycle_text(server)
    assert server.lines
    for line in server.lines:
        assert TEXT_LINE.match(line), line
    assert any("event=listening" in line and "address=127.0.0.1:" in line for line in server.lines)
    assert "event=stopped" in server.lines[-1]


def _lifecycle_text(server) -> None:
    """Wait for the text-format server's first line, then SIGINT it."""
    deadline = time.monotonic() + 60
    while not any("event=listening" in line for line in server.lines):
        assert time.monotonic() < deadline and server.proc.poll() is None, server.stderr
        time.sleep(0.05)
    server.send_signal(signal.SIGINT)
    assert server.wait(60) == 0, server.stderr


def _record(exc_info=None, **extra) -> logging.LogRecord:
    record = logging.LogRecord(
        "paramserve.server.app", logging.ERROR, __file__, 1, "failed %s\nline two", ("x",), exc_info
    )
    record.__dict__.update(extra)
    return record


def test_formatters_keep_tracebacks_and_fields_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record(exc_info, event="snapshot_failed", snapshot_id="snap-1", version=3)
    text = TextLogFormatter().format(record)
    assert "\n" not in text
    assert "event=snapshot_failed snapshot_id=snap-1 version=3 traceback=" in text
    assert "ValueError: boom" in text and "failed x\\nline two" in text
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry["event"] == "snapshot_failed" and entry["version"] == 3
    assert entry["message"] == "failed x\nline two" and "ValueError: boom" in entry["traceback"]
    assert "\n" not in JsonLogFormatter().format(record)


def test_configure_logging_routes_python_warnings_through_the_formatter():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    with warnings.catch_warnings():  # restores warnings.showwarning, which capture replaces
        warnings.simplefilter("always")
        logging.captureWarnings(False)  # an earlier in-process CLI call may have turned it on
        try:
            configure_logging(level="info", log_format="json")
            root.handlers[0].setStream(stream)
            warnings.warn("deprecated thing", UserWarning, stacklevel=1)
        finally:
            logging.captureWarnings(False)
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
    # Every line is one JSON entry. Other threads of this test process (a server another
    # test left draining, say) may log through the root handler meanwhile, and with the
    # "always" filter a warning of their own (a ResourceWarning from an object an earlier
    # test left to the garbage collector) may come through too: pick this one.
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    warned = [
        e for e in entries if e["logger"] == "py.warnings" and "deprecated thing" in e["message"]
    ]
    assert len(warned) == 1, entries
    assert "UserWarning" in warned[0]["message"] and warned[0]["level"] == "warning"
