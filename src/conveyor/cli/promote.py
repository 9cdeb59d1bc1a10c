"""`conveyor promote`, `rollback`, `unpin`, `hotfix start` and `notes`: versions between
environments."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

import typer
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from conveyor.cli.output import OutputFormat, console, err_console, fail, print_machine
from conveyor.cli.reconcile import (
    BranchOption,
    ContextOption,
    KubeconfigOption,
    NotifyWaitOption,
    RepoOption,
    show_progress,
    status_table,
    warn_undelivered,
)
from conveyor.cluster.kubeconfig import KubeconfigError
from conveyor.cluster.lease import NotLeaderError
from conveyor.config.helmrelease import HelmReleaseError, parse_duration
from conveyor.config.project import ConfigError
from conveyor.promote.gates import cluster_client
from conveyor.promote.hotfix import start_hotfix
from conveyor.promote.notes import release_notes, render_notes
from conveyor.promote.pinning import unpin_in_repo
from conveyor.promote.pipeline import PromotionError, Workspace
from conveyor.promote.promotion import GatesClosed, PromotionRequest, PromotionResult, promote
from conveyor.promote.rollback import rollback_in_repo
from conveyor.promote.versions import VersionError
from conveyor.publish.template import TemplateError
from conveyor.publish.version import image_tag
from conveyor.reconcile.engine import PassResult
from conveyor.reconcile.once import SourceFailure, reconcile_once
from conveyor.reconcile.requests import RequestTimeoutError
from conveyor.reconcile.target import Target
from conveyor.render.helm import HelmCLI
from conveyor.source.git import Author, GitError, PushRaceLost, mask_url

AuthorNameOption = typer.Option(Author.name, "--author-name", help="Commit author name.")
AuthorEmailOption = typer.Option(Author.email, "--author-email", help="Commit author email.")
BAD_INPUT = (PromotionError, ConfigError, VersionError, TemplateError, HelmReleaseError)


class Mode(StrEnum):
    commit = "commit"
    branch = "branch"


def _apply(
    repo: str,
    env: str,
    app: str | None,
    kubeconfig: str | None,
    context: str | None,
    *,
    notify_wait: float,
    branch: str | None = None,
) -> PassResult:
    target = Target(repo=repo, branch=branch, env=env, kubeconfig=kubeconfig, context=context)
    with err_console.status("applying") as spinner:
        try:
            result = asyncio.run(
                reconcile_once(
                    target, app=app, progress=show_progress(spinner), notify_grace=notify_wait
                )
            )
        except KubeconfigError as error:
            fail(str(error))
        except (RequestTimeoutError, NotLeaderError) as error:
            fail(f"applying: {escape(str(error))}", code=1)
    if isinstance(result, SourceFailure):
        fail(f"applying: {escape(result.message)}", code=1)
    warn_undelivered(result)
    return result


@contextmanager
def refusals() -> Iterator[None]:
    """Bad input: one line, exit 2; git that fails: exit 1 (a URL's password masked)."""
    try:
        yield
    except BAD_INPUT as error:
        fail(escape(str(error)))
    except (GitError, PushRaceLost) as error:
        fail(escape(mask_url(str(error))), code=1)


def _print_promotion(result: PromotionResult) -> None:
    table = Table(title=f"{result.source or 'version'} → {result.target}")
    for column in ("app", "from", "to", "file", "fields"):
        table.add_column(column, overflow="fold")
    for app in result.apps:
        table.add_row(
            app.app, app.before or "", app.after or "", app.path, escape("\n".join(app.fields))
        )
    if result.apps:
        console.print(table)
    for app in result.apps:
        if app.pin is not None:
            held = "lifted" if app.unpinned else "kept (--keep-pin)"
            console.print(f"{app.app}: {escape(app.pin.describe())}; {held}", highlight=False)
    for gate in result.gates:
        console.print(f"gate {escape(gate.gate)}: open ({escape(gate.message)})", highlight=False)
    if result.unchanged:
        console.print(f"already there: {', '.join(result.unchanged)}", highlight=False)
    if result.skipped:
        console.print(
            f"not in {result.target} (skipped): {', '.join(result.skipped)}", highlight=False
        )
    if not result.apps:
        console.print(f"nothing to promote: {result.target} has these versions already")
    elif result.commit:
        console.print(f"committed {result.commit[:12]} to {result.branch}", highlight=False)


def _waiting(spinner: Status, message: str) -> None:
    """A wait on a gate: on a terminal, in the spinner; in a CI log, where a spinner
    shows nothing, as a line."""
    spinner.update(escape(message))
    if not err_console.is_terminal:
        err_console.print(escape(message), highlight=False, soft_wrap=True)


def promote_command(
    repo: str = RepoOption,
    to: str = typer.Option(..., "--to", help="Environment to write to."),
    source: str | None = typer.Option(None, "--from", help="Environment to copy versions from."),
    app: str | None = typer.Option(None, "--app", help="Only this app."),
    version: str | None = typer.Option(
        None, "--version", help="Deploy exactly this version (a hotfix, any version for tests)."
    ),
    mode: Mode = typer.Option(
        Mode.commit, "--mode", help="commit: to the target's branch; branch: candidates/<name>."
    ),
    candidate: str | None = typer.Option(None, "--candidate", help="Name under candidates/."),
    gate_timeout: str | None = typer.Option(
        None,
        "--gate-timeout",
        help="Wait this long for closed gates (e.g. 10m), for all (default: each gate's "
        "`timeout`), checking each at its `interval` (default 10s). An approval gate is not "
        "waited for: approvals are read from the config repo as fetched when promote "
        "starts, so record the approval (`conveyor approve`) and run promote again.",
    ),
    apply: bool = typer.Option(False, "--apply", help="Reconcile the promoted apps at once."),
    keep_pin: bool = typer.Option(
        False,
        "--keep-pin",
        help="Keep a rollback's pin on the promoted apps (by default a promotion lifts it, "
        "and image automation follows them again).",
    ),
    outfile: Path | None = typer.Option(None, "--outfile", help="Write branch mode's diff here."),
    author_name: str = AuthorNameOption,
    author_email: str = AuthorEmailOption,
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
    notify_wait: float = NotifyWaitOption,
) -> None:
    """Copy what identifies a release (image tags, chart version or ref) from one
    environment to another, after the target's gates pass. Exit 1 when a gate stays
    closed (nothing written), 2 on bad input."""
    if apply and mode is Mode.branch:
        fail("--apply goes with --mode commit (a candidate branch is applied once merged)")
    try:
        wait = parse_duration(gate_timeout, default=0.0) if gate_timeout is not None else None
    except HelmReleaseError as error:
        fail(f"--gate-timeout: {error}")
    request = PromotionRequest(
        repo=repo,
        target=to,
        source=source,
        app=app,
        version=version,
        mode="branch" if mode is Mode.branch else "commit",
        candidate=candidate,
        gate_timeout=wait,
        keep_pin=keep_pin,
    )
    with (
        tempfile.TemporaryDirectory(prefix="conveyor-promote-") as workdir,
        err_console.status("promoting") as spinner,
    ):
        try:
            result = asyncio.run(
                promote(
                    request,
                    workspace=Workspace(repo, Path(workdir)),
                    author=Author(author_name, author_email),
                    kube=cluster_client,
                    helm=HelmCLI(),
                    progress=lambda m: spinner.update(escape(m)),
                    waiting=lambda m: _waiting(spinner, m),
                )
            )
        except BAD_INPUT as error:
            fail(escape(str(error)))
        except GatesClosed as error:
            fail(f"{escape(str(error))}; nothing was written", code=1)
        except (GitError, PushRaceLost) as error:
            fail(escape(mask_url(str(error))), code=1)
    if output is not OutputFormat.table:
        print_machine(result.to_dict() | {"diff": result.diff}, output)
    else:
        _print_promotion(result)
    if result.diff is not None:
        if outfile is not None:
            outfile.write_text(result.diff)
            err_console.print(
                f"wrote {result.branch} ({(result.commit or '')[:12]}); diff in {outfile}"
            )
        elif output is OutputFormat.table:
            console.print(f"wrote {result.branch} ({(result.commit or '')[:12]})", highlight=False)
            typer.echo(result.diff, nl=False)
    if apply and result.commit:
        applied = _apply(repo, to, app, kubeconfig, context, notify_wait=notify_wait)
        if output is OutputFormat.table:
            console.print(status_table(list(applied.statuses.values()), title=f"applied in {to}"))
        raise typer.Exit(0 if applied.all_ready else 1)


def rollback(
    repo: str = RepoOption,
    branch: str | None = BranchOption,
    env: str = typer.Option(..., "--env", help="Environment to roll back in."),
    app: str = typer.Option(..., "--app", help="The app to roll back."),
    to: str | None = typer.Option(None, "--to", help="This version (default: the previous)."),
    reason: str | None = typer.Option(
        None, "--reason", help="Why, recorded on the pin (default: from and to which version)."
    ),
    apply: bool = typer.Option(True, "--apply/--no-apply", help="Reconcile the app at once."),
    author_name: str = AuthorNameOption,
    author_email: str = AuthorEmailOption,
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
    notify_wait: float = NotifyWaitOption,
) -> None:
    """Restore the app's previous (or given) version by a git commit, then apply it, so
    git and the cluster agree. The commit pins the app against image automation (by
    --author-name, for --reason) until `conveyor unpin` or a promotion lifts the pin."""
    with tempfile.TemporaryDirectory(prefix="conveyor-rollback-") as workdir, refusals():
        result = rollback_in_repo(
            repo,
            Path(workdir),
            env=env,
            app=app,
            to=to,
            author=Author(author_name, author_email),
            reason=reason,
            branch=branch,
        )
        plan = result.plan
    if output is not OutputFormat.table:
        print_machine(result.to_dict(), output)
    else:
        console.print(
            f"{app} in {env}: {plan.current} → {plan.version} (as of {plan.revision[:12]})"
            + (f", committed {result.commit[:12]}" if result.commit else ", git had it already"),
            highlight=False,
        )
        if result.pin is not None:
            console.print(
                f"{app} in {env}: {escape(result.pin.describe())}; image automation leaves it "
                f"alone until `conveyor unpin {app} --env {env}` or a promotion",
                highlight=False,
            )
    if apply:
        applied = _apply(
            repo, env, app, kubeconfig, context, notify_wait=notify_wait, branch=branch
        )
        if output is OutputFormat.table:
            console.print(status_table(list(applied.statuses.values()), title=f"applied in {env}"))
        raise typer.Exit(0 if applied.all_ready else 1)


def unpin(
    app: str = typer.Argument(..., help="The app to unpin."),
    repo: str = RepoOption,
    branch: str | None = BranchOption,
    env: str = typer.Option(..., "--env", help="Environment the app is pinned in."),
    author_name: str = AuthorNameOption,
    author_email: str = AuthorEmailOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Lift a rollback's pin (a Flux v1 lock or conveyor's pin) by a git commit, so image
    automation follows the app again. No commit when the app is not pinned."""
    with tempfile.TemporaryDirectory(prefix="conveyor-unpin-") as workdir, refusals():
        result = unpin_in_repo(
            Workspace(repo, Path(workdir), branch=branch),
            env=env,
            app=app,
            author=Author(author_name, author_email),
        )
    if output is not OutputFormat.table:
        print_machine(result.to_dict(), output)
    elif result.pin is None:
        console.print(f"{app} in {env} is not pinned; nothing to do", highlight=False)
    else:
        console.print(
            f"{app} in {env}: lifted the pin ({escape(result.pin.describe())}), committed "
            f"{(result.commit or '')[:12]}; image automation follows it again",
            highlight=False,
        )


hotfix_app = typer.Typer(help="Hotfix branches from release tags.", no_args_is_help=True)


@hotfix_app.command("start")
def hotfix_start(
    from_tag: str = typer.Option(..., "--from-tag", help="The release tag to fix, e.g. v1.4.2."),
    repo: Path = typer.Option(Path("."), "--repo", help="The app repository (a local clone)."),
    push: bool = typer.Option(False, "--push", help="Push the branch to origin."),
) -> None:
    """Create `hotfix/<tag>` from the release tag. Release the fix with a new tag on it,
    then `conveyor promote --version` it through the environments and their gates."""
    try:
        hotfix = start_hotfix(repo, from_tag, push=push)
    except PromotionError as error:
        fail(escape(str(error)))
    except GitError as error:
        fail(escape(mask_url(str(error))), code=1)
    pushed = " and pushed it" if hotfix.pushed else ""
    console.print(f"created {hotfix.branch} at {hotfix.commit[:12]}{pushed}", highlight=False)
    if hotfix.next_version:
        console.print(
            f"next: fix, tag {hotfix.next_version} on {hotfix.branch}, then `conveyor promote "
            f"--repo CONFIG_REPO_URL --to staging --version {hotfix.next_version}` (image tag "
            f"{image_tag(hotfix.next_version)})",
            highlight=False,
        )


def notes(
    from_ref: str = typer.Option(..., "--from", help="The earlier version (tag or commit)."),
    to_ref: str = typer.Option(..., "--to", help="The later version."),
    repo: Path = typer.Option(Path("."), "--repo", help="The app repository (a local clone)."),
    outfile: Path | None = typer.Option(None, "--outfile", help="Write the notes to a file."),
) -> None:
    """Release notes in markdown: pull requests merged and commits between two versions."""
    try:
        text = render_notes(release_notes(repo, from_ref, to_ref))
    except PromotionError as error:
        fail(escape(str(error)))
    except GitError as error:
        fail(f"unknown revision or not a repository: {escape(error.stderr or str(error))}")
    if outfile is not None:
        outfile.write_text(text)
    else:
        typer.echo(text, nl=False)
