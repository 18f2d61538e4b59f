"""Logging set-up: one JSON event per line, and redaction enforced at the handler.

Every record passes through ``RedactingFilter`` before it is formatted, so a token that
slips into a message or an argument is masked no matter which module logged it. Events
carry the request they belong to (request id, the ``traceparent`` trace id, connection,
run) from a context variable the proxy sets once per request; ``case_id`` comes with the
events that concern a case. Nothing is logged per request on the hot path.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from revive.redact import redact


RequestContext = tuple[int, str | None, str, str | None]
"""(request number, raw ``traceparent``, connection id, run id)."""

_REQUEST: ContextVar[RequestContext | None] = ContextVar("revive_request", default=None)
_NUMBERS = itertools.count(1)


def bind_request(traceparent: str | None, connection_id: str, run_id: str | None) -> None:
    """Tag every event logged while serving this request (and by tasks it starts)."""
    _REQUEST.set((next(_NUMBERS), traceparent, connection_id, run_id))


def _trace_id(traceparent: str | None) -> str | None:
    # W3C trace context: version-traceid-parentid-flags; only a well-formed id is reported.
    if traceparent and len(traceparent) >= 55 and traceparent[2] == "-":
        trace = traceparent[3:35]
        if all(c in "0123456789abcdef" for c in trace) and trace.strip("0"):
            return trace
    return None


class ContextFilter(logging.Filter):
    """Copies the current request's identity onto each record (unless the call set it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _REQUEST.get()
        if bound is not None:
            number, traceparent, connection_id, run_id = bound
            record.__dict__.setdefault("request_id", f"req-{number}")
            record.__dict__.setdefault("trace_id", _trace_id(traceparent))
            record.__dict__.setdefault("connection_id", connection_id)
            record.__dict__.setdefault("run_id", run_id)
        return True


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
    handler.addFilter(ContextFilter())
    handler.addFilter(redactor)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("revive")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    return redactor
