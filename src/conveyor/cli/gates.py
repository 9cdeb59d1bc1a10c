"""`conveyor gate check` and `conveyor approve`: an environment's gates, on demand."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from conveyor.cli.output import OutputFormat, console, fail, print_machine
from conveyor.cli.promote import BAD_INPUT, AuthorEmailOption, AuthorNameOption
from conveyor.cli.reconcile import RepoOption
from conveyor.promote.approvals import approve_in_repo
from conveyor.promote.gates import GateContext, GateResult, check_gates, cluster_client
from conveyor.promote.pipeline import Workspace, environment
from conveyor.promote.versions import check_version, read_app_version
from conveyor.source.git import Author, GitError, PushRaceLost, mask_url

app = typer.Typer(help="Gates of an environment.", no_args_is_help=True)


def _check(repo: str, env: str, version: str | None, app_name: str | None) -> list[GateResult]:
    with tempfile.TemporaryDirectory(prefix="conveyor-gates-") as workdir:
        workspace = Workspace(repo, Path(workdir))
        project = workspace.project()
        target = environment(project, env)
        root = workspace.env_root(target)
        apps = [workspace.app(target, app_name)] if app_name else workspace.tree(target).apps
        if version is not None:
            versions = {a.name: check_version(version) for a in apps}
        else:
            found = {a.name: read_app_version(root, a).version for a in apps}
            versions = {name: v for name, v in found.items() if v}
        context = GateContext(
            project=project,
            environment=target,
            versions=versions,
            approvals_root=root,
            kube=cluster_client,
            version_at=workspace.version_at,
            repository=workspace.url,
        )
        return asyncio.run(check_gates(context))


@app.command("check")
def check(
    repo: str = RepoOption,
    env: str = typer.Option(..., "--env", help="The gated environment."),
    version: str | None = typer.Option(
        None, "--version", help="The version to deploy (default: what its git has now)."
    ),
    app_name: str | None = typer.Option(None, "--app", help="Only this app's version."),
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Each gate of ENV and its state, checked once. Exit 0: all open, 1: one is closed."""
    try:
        results = _check(repo, env, version, app_name)
    except BAD_INPUT as error:
        fail(escape(str(error)))
    except GitError as error:
        fail(escape(mask_url(str(error))), code=1)
    if output is not OutputFormat.table:
        print_machine(
            {
                "environment": env,
                "open": all(r.open for r in results),
                "gates": [r.to_dict() for r in results],
            },
            output,
        )
    elif not results:
        console.print(f"{env} has no gates")
    else:
        table = Table(title=f"gates of {env}")
        for column in ("gate", "type", "state", "message"):
            table.add_column(column, overflow="fold")
        for result in results:
            state = "[green]open" if result.open else "[red]closed"
            table.add_row(escape(result.gate), result.type, state, escape(result.message))
        console.print(table)
    raise typer.Exit(0 if all(r.open for r in results) else 1)


def approve(
    repo: str = RepoOption,
    env: str = typer.Option(..., "--env", help="The environment the version may go to."),
    version: str = typer.Option(..., "--version", help="The approved version."),
    by: str = typer.Option(..., "--by", help="Who approves."),
    author_name: str = AuthorNameOption,
    author_email: str = AuthorEmailOption,
) -> None:
    """Record an approval in git (approvals/<env>/<version>.yaml on the env's branch)."""
    if not by.strip():
        fail("--by must name someone")
    with tempfile.TemporaryDirectory(prefix="conveyor-approve-") as workdir:
        try:
            branch, commit = approve_in_repo(
                repo,
                Path(workdir),
                env=env,
                version=version,
                by=by.strip(),
                author=Author(author_name, author_email),
            )
        except BAD_INPUT as error:
            fail(escape(str(error)))
        except (GitError, PushRaceLost) as error:
            fail(escape(mask_url(str(error))), code=1)
    if commit is None:
        console.print(f"{by} had approved {version} for {env} already", highlight=False)
    else:
        console.print(
            f"approved {version} for {env} by {by} ({commit[:12]} on {branch})",
            highlight=False,
        )
