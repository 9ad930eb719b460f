"""Structured logs: one JSON object per line on stderr (or plain text for humans).

Why JSON: the request log is consumed by machines (Loki, CloudWatch, jq) that must filter on
``request_id`` / ``code`` without regexes. Fields are passed with ``extra={"fields": {...}}``
and merged into the top level of the object, so a request line reads::

    {"ts": "...", "level": "INFO", "logger": "lychee_server.rpc", "message": "rpc",
     "request_id": "...", "method": "Rerank", "code": "OK", "duration_ms": 12.3, "pairs": 8}

The module is called ``logs`` (not ``logging``) so that it never shadows the standard library.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["JsonFormatter", "configure_logging", "log_fields", "rpc_logger"]

rpc_logger = logging.getLogger("lychee_server.rpc")
_HANDLER_MARK = "_lychee_handler"


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line; ``record.fields`` (a dict) is merged at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(str(key), value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _PlainFormatter(logging.Formatter):
    """Human-readable lines with the structured fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def log_fields(**fields: Any) -> dict[str, Any]:
    """``extra=`` for a structured record: ``log.info("msg", extra=log_fields(a=1))``."""
    return {"fields": fields}


def configure_logging(json_logs: bool = True, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Install one stderr handler on the root logger (idempotent: replaces our previous one)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else _PlainFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
