"""`conveyor images scan|update|verify`: image automation and version checks."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from conveyor.cli.output import OutputFormat, console, err_console, fail, print_machine
from conveyor.config.project import safe_relative_path
from conveyor.images.credentials import CredentialsError, DockerConfig
from conveyor.images.reference import ImageReferenceError
from conveyor.images.registry import RegistrySettings
from conveyor.images.scan import Row, ScanResult, Status, scan
from conveyor.images.verify import check_tags, image_names
from conveyor.images.writeback import (
    DEFAULT_MESSAGE,
    MessageTemplateError,
    check_template,
    update_repository,
)
from conveyor.images.yamltext import YamlTextError
from conveyor.source.git import Author, Checkout, GitError, PushRaceLost, default_branch

app = typer.Typer(
    help="Watch registries, choose tags by policy, write them back to git.",
    no_args_is_help=True,
)

RepoOption = typer.Option(..., "--repo", help="Config repository URL or path.")
BranchOption = typer.Option(
    None, "--branch", help="Branch to read (and write); default: the repository's HEAD."
)
PathOption = typer.Option(".", "--path", help="Folder of the repository to scan.")
InsecureOption = typer.Option(
    [],
    "--insecure-registry",
    help="Registry HOST[:PORT] reached over plain http (loopback registries always are).",
)
ConcurrencyOption = typer.Option(16, "--concurrency", min=1, help="Registry requests in flight.")
TimeoutOption = typer.Option(10.0, "--timeout", min=0.1, help="Seconds per registry request.")
OutputOption = typer.Option(OutputFormat.table, "--output", "-o")

STATUS_STYLE = {
    Status.current: "green",
    Status.update: "yellow",
    Status.no_match: "dim",
    Status.undecided: "yellow",
    Status.pinned: "magenta",
    Status.error: "red",
}


def _settings(insecure: list[str], concurrency: int, timeout: float) -> RegistrySettings:
    return RegistrySettings(concurrency=concurrency, timeout=timeout, insecure=frozenset(insecure))


def _credentials() -> DockerConfig:
    try:
        return DockerConfig.load()
    except CredentialsError as error:
        fail(escape(str(error)))


def _folder(path: str) -> str:
    try:
        return safe_relative_path(path)
    except ValueError as error:
        fail(str(error))


@contextmanager
def _checkout(repo: str, branch: str | None) -> Iterator[Checkout]:
    with tempfile.TemporaryDirectory(prefix="conveyor-images-") as scratch:
        try:
            branch = branch or default_branch(repo)
            checkout = Checkout.open(repo, Path(scratch) / "repo", branch=branch)
        except GitError as error:
            fail(escape(str(error)))
        if checkout.head() is None:
            fail(f"branch {branch!r} of {escape(repo)} has no commits")
        yield checkout


def _scan(checkout: Checkout, folder: str, settings: RegistrySettings) -> ScanResult:
    if not (checkout.path / folder).is_dir():
        fail(f"no folder {folder!r} in the repository")
    return scan(checkout.path, folder, settings=settings, credentials=_credentials())


def _where(row: Row) -> str:
    """`file:line,line` per file holding the automation's values."""
    lines: dict[str, list[str]] = {}
    for site in row.automation.sites:
        lines.setdefault(site.file, []).append(str(site.scalar.line))
    return ", ".join(f"{file}:{','.join(numbers)}" for file, numbers in lines.items()) or "-"


def _print_scan(result: ScanResult) -> None:
    table = Table(title="image automation")
    for column in ("automation", "image", "policy", "current", "latest", "status", "where"):
        table.add_column(column, overflow="fold")
    for row in result.rows:
        automation = row.automation
        status = row.status
        table.add_row(
            escape(automation.name),
            escape(str(automation.watch.image)),
            escape(automation.watch.policy.description),
            escape(automation.current or ""),
            escape(row.outcome.latest or ""),
            f"[{STATUS_STYLE[status]}]{status.value}",
            escape(_where(row)),
        )
    console.print(table)
    # Who holds each pinned tag and why, a line each (a table cell would fold it).
    for row in result.rows:
        if row.automation.pin is not None:
            console.print(
                f"[magenta]{escape(row.automation.name)}[/] ({escape(_where(row))}): "
                f"{escape(row.automation.pin.describe())}",
                highlight=False,
                soft_wrap=True,
            )
    for row in result.rows:
        if row.outcome.error:
            err_console.print(f"[red]{escape(row.automation.name)}:[/] {escape(row.outcome.error)}")
    _print_warnings(result)
    for problem in result.problems:
        err_console.print(f"[yellow]{escape(problem.file)}:[/] {escape(problem.message)}")


def _print_warnings(result: ScanResult) -> None:
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def _scan_dict(result: ScanResult) -> dict[str, object]:
    return {
        "automations": [row.to_dict() for row in result.rows],
        "problems": [{"file": p.file, "message": p.message} for p in result.problems],
        "warnings": result.warnings,
        "requests": result.requests,
    }


@app.command("scan")
def scan_command(
    repo: str = RepoOption,
    branch: str | None = BranchOption,
    path: str = PathOption,
    insecure_registry: list[str] = InsecureOption,
    concurrency: int = ConcurrencyOption,
    timeout: float = TimeoutOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Show what each image policy would pick now, without writing anything.

    Exit 1 when a registry could not be asked.
    """
    folder = _folder(path)
    with _checkout(repo, branch) as checkout:
        result = _scan(checkout, folder, _settings(insecure_registry, concurrency, timeout))
    if output is OutputFormat.table:
        _print_scan(result)
    else:
        print_machine(_scan_dict(result), output)
        _print_warnings(result)
    if result.failed:
        raise typer.Exit(1)


@app.command()
def update(
    repo: str = RepoOption,
    branch: str | None = BranchOption,
    path: str = PathOption,
    push_branch: str | None = typer.Option(
        None, "--push-branch", help="Push to this branch for review instead of --branch."
    ),
    author_name: str = typer.Option(Author.name, "--author-name"),
    author_email: str = typer.Option(Author.email, "--author-email"),
    message: str = typer.Option(
        DEFAULT_MESSAGE,
        "--message",
        help="Commit message template; fields {changes} (one '<image>: <old> -> <new>' "
        "line each), {count}, {files}.",
    ),
    insecure_registry: list[str] = InsecureOption,
    concurrency: int = ConcurrencyOption,
    timeout: float = TimeoutOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Write the tags the policies pick into the files, as one commit, and push it.

    Images whose registry failed are left as they are (exit 1); the others are written.
    """
    folder = _folder(path)
    try:
        template = check_template(message)
    except MessageTemplateError as error:
        fail(escape(str(error)))
    with _checkout(repo, branch) as checkout:
        result = _scan(checkout, folder, _settings(insecure_registry, concurrency, timeout))
        try:
            outcome = update_repository(
                checkout,
                result.chosen,
                folder=folder,
                author=Author(author_name, author_email),
                message_template=template,
                push_branch=push_branch,
            )
        except (GitError, PushRaceLost, YamlTextError) as error:
            fail(escape(str(error)))
    if output is OutputFormat.table:
        _print_scan(result)
        if outcome.commit:
            lines = "\n".join(f"  {escape(c.line)} ({escape(c.file)})" for c in outcome.changes)
            err_console.print(f"pushed {outcome.commit[:12]} to {outcome.branch}:\n{lines}")
        elif result.failed:
            failed = sum(1 for row in result.rows if row.status is Status.error)
            err_console.print(f"nothing to update; {failed} automation(s) could not be checked")
        elif result.warnings:
            err_console.print(
                f"nothing to update; {len(result.warnings)} automation(s) undecided keep "
                "their tag (see the warnings)"
            )
        else:
            err_console.print("nothing to update: every file holds the chosen tag")
    else:
        data = _scan_dict(result)
        data["commit"] = outcome.commit
        data["branch"] = outcome.branch
        data["changes"] = [
            {"file": c.file, "image": c.image, "old": c.old, "new": c.new} for c in outcome.changes
        ]
        print_machine(data, output)
        _print_warnings(result)
    if result.failed:
        raise typer.Exit(1)


@app.command()
def verify(
    images: list[str] = typer.Argument(..., help="Images as HOST/REPOSITORY, without a tag."),
    version: str = typer.Option(..., "--version", help="The tag every image must have."),
    immutable: bool = typer.Option(
        False,
        "--immutable",
        help="Before a build re-run: fail if any image already has the tag.",
    ),
    insecure_registry: list[str] = InsecureOption,
    concurrency: int = ConcurrencyOption,
    timeout: float = TimeoutOption,
    output: OutputFormat = OutputOption,
) -> None:
    """Check that every IMAGE has tag --version (exit 1 listing those missing).

    With --immutable, the opposite: exit 1 listing the images where it already exists.
    Exit 2 when a registry could not be asked.
    """
    try:
        names = image_names(images)
    except ImageReferenceError as error:
        fail(escape(str(error)))
    checks = check_tags(
        names,
        version,
        settings=_settings(insecure_registry, concurrency, timeout),
        credentials=_credentials(),
    )
    if output is not OutputFormat.table:
        print_machine([c.to_dict() for c in checks], output)
    else:
        for check in checks:
            state = {True: "[green]present", False: "[red]missing", None: "[red]unknown"}
            console.print(f"{escape(check.image)}:{escape(version)}  {state[check.present]}")
    errors = [c for c in checks if c.present is None]
    for check in errors:
        err_console.print(f"[red]error:[/] {escape(check.error or '')}")
    if errors:
        raise typer.Exit(2)
    offending = [c for c in checks if c.present is immutable]
    if offending:
        what = "already exists" if immutable else "is missing"
        names_text = ", ".join(f"{c.image}:{version}" for c in offending)
        err_console.print(f"[red]{len(offending)} {what}:[/] {escape(names_text)}")
        raise typer.Exit(1)
