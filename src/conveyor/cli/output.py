"""Shared output helpers: one console, machine formats, and error exits.

Every command prints tables for people and `-o json|yaml` for scripts through here,
so the formats and exit codes stay the same across commands.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Any, NoReturn

import typer
import yaml
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


def print_machine(data: Any, fmt: OutputFormat) -> None:
    """Plain stdout (no rich markup or wrapping) so the output parses."""
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


def fail(message: str, *, code: int = 2) -> NoReturn:
    # soft_wrap: one error stays one line, whatever the terminal width (scripts grep it).
    err_console.print(
        f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True
    )
    raise typer.Exit(code)


def check_listen(listen: str) -> None:
    """`--listen` wants HOST:PORT (or a port alone); anything else is an error exit,
    before any server starts."""
    port = listen.rpartition(":")[2]
    if not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"--listen wants HOST:PORT, not {listen!r}")
