"""`conveyor guard`: reject changes to release files by anyone but the CI identity."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer
from rich.markup import escape

from conveyor.cli.output import fail
from conveyor.config.project import ConfigError
from conveyor.publish.guard import GuardError, check, format_markdown, format_text


class GuardFormat(StrEnum):
    text = "text"
    markdown = "markdown"


def guard(
    base: str = typer.Option(..., "--base", help="Revision the change starts from (target)."),
    head: str = typer.Option(..., "--head", help="Revision the change ends at."),
    actor: str | None = typer.Option(
        None, "--actor", help="Who proposes the change (e.g. $GITHUB_ACTOR); default: authors."
    ),
    repo: Path = typer.Option(Path("."), "--repo", help="Local clone of the config repo."),
    output_format: GuardFormat = typer.Option(
        GuardFormat.text, "--format", help="markdown: a pull-request comment."
    ),
) -> None:
    """Check every commit from BASE to HEAD against conveyor.yaml's `guard` (at BASE).

    Exits 1 listing each protected file changed by an identity not in
    `guard.identities`, 0 when the change is allowed, 2 on bad input.
    """
    try:
        report = check(repo, base, head, actor=actor)
    except (GuardError, ConfigError) as error:
        fail(escape(str(error)))
    text = format_markdown(report) if output_format is GuardFormat.markdown else format_text(report)
    typer.echo(text.rstrip("\n"))
    if not report.allowed:
        raise typer.Exit(1)
