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

# Long-running commands (agent, serve) log to stdout in this format.
LogFormatOption = typer.Option(
    None, "--log-format", help="Logs on stdout as json or text (default: json inside a Pod)."
)

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
