"""The push log: an opt-in audit trail of the pushes that took effect (``--push-log``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


class PushLog:
    """Opt-in audit log of the pushes that took effect, one JSON object a line, in apply order.

    ``{"event": "push", "worker_id", "sequence", "version", "applied"}`` for each push
    recorded in the dedupe table (``applied`` is false for a push skipped as non-finite);
    a sync round writes one line per contribution in worker_id order, all with the round's
    version. ``{"event": "restore", "version"}`` marks a restore (or ``--resume``): later
    lines continue from that version. The aggregator writes under the store lock right
    after the update and flushes, so a ``kill -9`` loses no line of an acknowledged push.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._file: Any = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - see close()
        except OSError as exc:
            raise OSError(f"cannot open the push log {self.path!r}: {exc.strerror}") from None

    def write(self, entries: Iterable[dict[str, Any]]) -> None:
        """Append ``entries``, one JSON line each, and flush (a failure turns the log off)."""
        if self._file is None:
            return
        try:
            self._file.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries))
            self._file.flush()
        except (OSError, ValueError):
            logger.exception("writing the push log %s failed; it is turned off", self.path)
            self.close()

    def close(self) -> None:
        """Close the file; later writes do nothing."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
