"""The agent's logs: JSON lines on stdout inside a Pod, text elsewhere, no secrets."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from conveyor.reconcile import logs
from conveyor.reconcile.logs import LogFormat

TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJl"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_once(log_format: LogFormat | None) -> str:
    stream = io.StringIO()
    logs.configure(log_format=log_format, stream=stream)
    logging.getLogger("conveyor.test").info(
        "applied %s with Authorization: Bearer %s", "ui", TOKEN, extra={"app": "ui"}
    )
    return stream.getvalue()


def test_json_lines_carry_fields_and_mask_tokens() -> None:
    (line,) = _log_once(LogFormat.json).splitlines()
    entry = json.loads(line)
    assert entry["level"] == "info" and entry["app"] == "ui"
    assert entry["message"] == "applied ui with Authorization: Bearer [redacted]"
    assert TOKEN not in line


def test_text_masks_tokens_too() -> None:
    text = _log_once(LogFormat.text)
    assert "conveyor.test: applied ui with Authorization: Bearer [redacted] (app=ui)" in text
    assert TOKEN not in text


def test_a_bare_service_account_token_is_masked() -> None:
    assert logs.mask_secrets(f"token {TOKEN} rejected") == "token [redacted] rejected"


def test_json_is_the_default_inside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert logs.default_format() is LogFormat.json
    json.loads(_log_once(None))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert logs.default_format() is LogFormat.text


def test_logs_go_to_stdout() -> None:
    """A real process: log collectors read the container's stdout."""
    code = (
        "import logging; from conveyor.reconcile import logs; "
        "logs.configure(log_format=logs.LogFormat.json); "
        "logging.getLogger('conveyor').warning('hello')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout)["message"] == "hello"
    assert result.stderr == ""
