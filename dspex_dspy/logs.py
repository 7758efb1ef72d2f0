"""Operational logging: stdlib ``logging`` with structured fields, as text or one JSON object per line.

The package logs through ``logging.getLogger(__name__)`` everywhere and adds structured fields
with ``extra=`` (``event``, ``session_id``, ``variable``, ``version``, ``source`` ...). What it logs:

- INFO: a session created (``session_created``), cleaned up (``session_cleanup``) or expired
  (``session_expired``); a context switched to a bridge; a bridge started and stopped;
- DEBUG: every accepted write (``variable_write``: session, variable, version, writer);
- WARNING: a worker cache that stopped serving reads (``cache_degraded``) and failed
  authentication (``auth_failed``).

:func:`configure_logging` sets up the root logger for the ``dspex-bridge`` command; a library user
configures logging as usual (the fields are on each ``LogRecord``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

__all__ = ["JsonFormatter", "configure_logging"]

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object: time, level, logger, message and every extra field.

    Example:
        >>> record = logging.LogRecord("dspex", logging.INFO, "", 0, "hi %s", ("there",), None)
        >>> record.session_id = "s1"
        >>> sorted(json.loads(JsonFormatter().format(record)))
        ['level', 'logger', 'message', 'session_id', 'time']
    """

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure_logging(level: str | int = "INFO", *, json_lines: bool = False, stream: TextIO | None = None) -> None:
    """Send log records at ``level`` and above to ``stream`` (stderr), as text or JSON lines.

    Replaces the root logger's handlers, so calling it again reconfigures.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
