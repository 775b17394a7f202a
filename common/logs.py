"""Process-wide logging to stderr, so that supervisord passes every line to the container log.

``LOG_FORMAT=json`` (default): one JSON object per line, ready for a log pipeline; a request's line
carries its fields (``common.observe``) at the top level. ``LOG_FORMAT=text``: plain lines, the
request fields appended as ``key=value``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any


class _StackHandler(logging.StreamHandler):
    """The handler this module installs; marked by its class so it is installed once."""


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str):
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self.process_name,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "request", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, process_name: str):
        super().__init__(f"%(asctime)s [{process_name}:%(process)d] %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "request", None)
        if fields:
            line += "".join(f" {key}={_text_value(value)}" for key, value in fields.items())
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{key}:{inner}" for key, inner in value.items()) or "-"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def stack_formatter(process_name: str, log_format: str) -> logging.Formatter:
    """The formatter of ``LOG_FORMAT`` for a process (also gunicorn's, via its logconfig_dict)."""
    return JsonFormatter(process_name) if log_format == "json" else TextFormatter(process_name)


def configure_logging(process_name: str, level: str = "INFO", log_format: str = "json") -> None:
    """Install one stderr handler on the root logger unless the host program already did."""
    root = logging.getLogger()
    if any(isinstance(handler, _StackHandler) for handler in root.handlers):
        return
    handler = _StackHandler()
    handler.setFormatter(stack_formatter(process_name, log_format))
    root.addHandler(handler)
    root.setLevel(level)
