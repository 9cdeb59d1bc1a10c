"""`conveyor candidates render|diff|prune`: cal-itp's candidate branches, from CI."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import typer
from rich.markup import escape

from conveyor.cli.output import OutputFormat, console, print_machine
from conveyor.cli.promote import AuthorEmailOption, AuthorNameOption, refusals
from conveyor.cli.reconcile import DiffFormat, RepoOption, print_diff
from conveyor.promote.candidates import (
    BASE_CHANNEL,
    CHANNELS_DIR,
    diff_candidate,
    prune_candidates,
    render_candidate,
)
from conveyor.render.helm import HelmCLI
from conveyor.source.git import Author

app = typer.Typer(
    help="Candidate branches per push (candidates/<branch>), for review into releases/<channel>.",
    no_args_is_help=True,
)
SourceOption = typer.Option(..., "--branch", help="The pushed branch (feat/x works).")
ChannelsDirOption = typer.Option(
    CHANNELS_DIR, "--channels", help="Folder of the channel files (calitp: channel, releases)."
)


@app.command("render")
def render(
    repo: str = RepoOption,
    branch: str = SourceOption,
    paths: list[str] = typer.Option(
        [],
        "--paths",
        help="A deployable path (repeat it; default: conveyor.yaml, the channel files and "
        "what they name, the folders of the environments on releases/ branches).",
    ),
    base_channel: str = typer.Option(
        BASE_CHANNEL, "--base-channel", help="The candidate's parent is releases/<this>."
    ),
    channels_dir: str = ChannelsDirOption,
    author_name: str = AuthorNameOption,
    author_email: str = AuthorEmailOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Render candidates/BRANCH (force-pushed): only the deployable paths of BRANCH's
    head, on top of releases/prod. Exit 2 on bad input."""
    with tempfile.TemporaryDirectory(prefix="conveyor-candidate-") as workdir, refusals():
        result = render_candidate(
            repo,
            branch,
            workdir=Path(workdir),
            author=Author(author_name, author_email),
            paths=paths or None,
            base_channel=base_channel,
            channels_dir=channels_dir,
        )
    if output is not OutputFormat.table:
        print_machine(result.to_dict(), output)
        return
    done = "wrote" if result.changed else "unchanged:"
    onto = f"{result.base} {result.parent[:12]}" if result.parent else "a new root"
    console.print(
        f"{done} {escape(result.branch)} {result.commit[:12]} ({escape(result.source)} "
        f"{result.source_commit[:12]} onto {escape(onto)}): {escape(', '.join(result.paths))}",
        highlight=False,
    )


@app.command("diff")
def diff(
    repo: str = RepoOption,
    branch: str = SourceOption,
    channel: str = typer.Option(
        ..., "--channel", help="The pull request's target releases/<this>."
    ),
    channels_dir: str = ChannelsDirOption,
    outfile: str | None = typer.Option(None, "--outfile", help="Write the comment to a file."),
    author_name: str = AuthorNameOption,
    author_email: str = AuthorEmailOption,
) -> None:
    """The pull request comment for candidates/BRANCH into releases/CHANNEL: what merging
    it changes in the channel's environment, rendered offline (markdown). Exit 0: no
    changes, 1: changes or a merge conflict, 2: error."""
    with tempfile.TemporaryDirectory(prefix="conveyor-candidate-") as workdir, refusals():
        result = asyncio.run(
            diff_candidate(
                repo,
                branch,
                channel,
                workdir=Path(workdir),
                helm=HelmCLI(),
                author=Author(author_name, author_email),
                channels_dir=channels_dir,
            )
        )
    print_diff(result.markdown, DiffFormat.markdown, outfile)
    if any(p.error for p in result.plans):
        raise typer.Exit(2)
    raise typer.Exit(1 if any(p.changes for p in result.plans) else 0)


@app.command("prune")
def prune(
    repo: str = RepoOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Delete the candidate branches whose source branch is gone (candidates/feat/x once
    feat/x is deleted). Promotion candidates (promote --mode branch) are kept."""
    with tempfile.TemporaryDirectory(prefix="conveyor-candidate-") as workdir, refusals():
        result = prune_candidates(repo, workdir=Path(workdir), dry_run=dry_run)
    if output is not OutputFormat.table:
        print_machine(result.to_dict(), output)
        return
    verb = "would delete" if dry_run else "deleted"
    for name in result.deleted:
        console.print(f"{verb} {escape(name)}", highlight=False)
    for reason in result.kept:
        console.print(escape(reason), highlight=False)
    if not result.deleted:
        console.print("no candidate branch to prune", highlight=False)
