"""Structured logs: one JSON object per line on stdout, with the app, scope and revision
when known; or plain lines for a person at a terminal.

In a Pod (`KUBERNETES_SERVICE_HOST` set) the default is JSON, which log collectors read
from the container's stdout; elsewhere it is text. Bearer tokens (service-account JWTs
and `Bearer ...` values) are masked in every message, whatever logged them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from enum import StrEnum
from typing import TextIO


class LogFormat(StrEnum):
    json = "json"
    text = "text"


_EXTRA_FIELDS = ("app", "scope", "reason", "revision", "actor", "action", "remote")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_JWT = re.compile(r"\beyJ[\w-]{8,}\.[\w-]+\.[\w-]+")  # a service-account token's shape
MASK = "[redacted]"


def mask_secrets(text: str) -> str:
    return _JWT.sub(MASK, _BEARER.sub(rf"\g<1>{MASK}", text))


def _timestamp(record: logging.LogRecord) -> str:
    clock = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{clock}.{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_secrets(record.getMessage()),
        }
        for field in _EXTRA_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["error"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{field}={getattr(record, field)}" for field in _EXTRA_FIELDS if hasattr(record, field)
        )
        line = f"{_timestamp(record)} {record.levelname.lower():<7} {record.name}: "
        line += mask_secrets(record.getMessage()) + (f" ({fields})" if fields else "")
        if record.exc_info:
            line += "\n" + mask_secrets(self.formatException(record.exc_info))
        return line


def default_format() -> LogFormat:
    return LogFormat.json if os.environ.get("KUBERNETES_SERVICE_HOST") else LogFormat.text


def configure(
    *, level: str = "INFO", log_format: LogFormat | None = None, stream: TextIO | None = None
) -> None:
    handler = logging.StreamHandler(stream or sys.stdout)
    chosen = log_format or default_format()
    handler.setFormatter(JsonFormatter() if chosen is LogFormat.json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
