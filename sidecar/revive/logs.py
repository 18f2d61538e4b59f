"""Logging set-up: one JSON event per line, and redaction enforced at the handler.

Every record passes through ``RedactingFilter`` before it is formatted, so a token that
slips into a message or an argument is masked no matter which module logged it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from revive.redact import redact


class RedactingFilter(logging.Filter):
    """Masks token-shaped strings and registered secrets in every record."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        record.msg = redact(message, self.secrets)
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "run_id", "case_id", "connection_id"):
            value = getattr(record, key, None)
            if value is not None:
                event[key] = value
        return json.dumps(event, ensure_ascii=False)


def configure_logging(level: str = "info") -> RedactingFilter:
    """Install the JSON handler on the ``revive`` logger; returns the redaction filter."""
    handler = logging.StreamHandler(sys.stderr)
    redactor = RedactingFilter()
    handler.addFilter(redactor)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("revive")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return redactor
