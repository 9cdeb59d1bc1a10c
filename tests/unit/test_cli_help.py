"""Every command's --help renders (help text is rich markup: a stray bracket breaks it)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from conveyor.cli.main import app


def _command_paths(command: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, sub in getattr(command, "commands", {}).items():
        paths += _command_paths(sub, (*prefix, name))
    return paths


PATHS = _command_paths(typer.main.get_command(app))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "conveyor")
def test_help_renders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_every_documented_command_exists() -> None:
    top = {p[0] for p in PATHS if p}
    assert {
        "sandbox",
        "reconcile",
        "agent",
        "get",
        "diff",
        "suspend",
        "resume",
        "version",
        "publish",
        "guard",
        "ci-privileges",
        "images",
        "serve",
    } <= top
