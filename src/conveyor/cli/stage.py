"""`conveyor stage`, `conveyor stage list` and `conveyor unstage`: staging sandboxes."""

from __future__ import annotations

import asyncio
import getpass
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from conveyor.cli.output import OutputFormat, console, err_console, fail, print_machine
from conveyor.cli.reconcile import ContextOption, KubeconfigOption, RepoOption
from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.kubeconfig import KubeconfigError
from conveyor.config.project import ConfigError
from conveyor.promote.pipeline import PromotionError, Workspace
from conveyor.publish.template import TemplateError
from conveyor.reconcile.target import kube_client
from conveyor.sandboxes.candidates import SandboxError
from conveyor.sandboxes.manifest import Sandbox
from conveyor.sandboxes.stage import (
    StageRequest,
    cluster_states,
    extend,
    list_sandboxes,
    stage,
    unstage,
)
from conveyor.source.git import Author, GitError, PushRaceLost, mask_url

EnvOption = typer.Option(
    None, "--env", help="Environment the sandbox lives in (default: conveyor.yaml's sandboxes.env)."
)


@contextmanager
def _refusals() -> Iterator[None]:
    """Bad input: its message, exit 2 (nothing written); git failing: exit 1."""
    try:
        yield
    except (SandboxError, PromotionError, ConfigError, TemplateError) as error:
        fail(escape(str(error)))
    except (GitError, PushRaceLost) as error:
        fail(escape(mask_url(str(error))), code=1)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "someone"


def stage_command(
    specs: list[str] = typer.Argument(
        None,
        metavar="APP[/PR|/BRANCH]",
        help="api/42 (pull request), ui/my-branch (branch); apps not named come from the "
        "default branch. `list` lists the sandboxes.",
    ),
    repo: str = RepoOption,
    sandbox_id: str | None = typer.Option(
        None, "--id", help="The sandbox's ID (default: from your name and the refs)."
    ),
    pin: list[str] = typer.Option([], "--pin", help="Pin this app (chart at its SHA)."),
    no_pin: list[str] = typer.Option([], "--no-pin", help="Let this app follow its branch."),
    with_rds: bool = typer.Option(False, "--with-rds", help="A database of the sandbox's own."),
    ttl: str | None = typer.Option(None, "--ttl", help="Remove it after this long (72h)."),
    env: str | None = EnvOption,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the file; commit nothing."),
    user: str = typer.Option(None, "--user", help="Who stages it (default: your login)."),
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Stage a sandbox: one commit of `<env>/<id>.yaml`, made of the apps' candidates
    (staging-candidates/<app>/<REF_ID>.yaml). Exit 2, nothing written, on bad input."""
    specs = specs or []
    if specs[:1] == ["list"]:
        if len(specs) > 1:
            fail("`stage list` takes no apps")
        _list(repo, env, kubeconfig, context, output)
        return
    request = StageRequest(
        specs=specs,
        user=user or _user(),
        sandbox_id=sandbox_id,
        pin=pin,
        no_pin=no_pin,
        with_rds=with_rds,
        ttl=ttl,
        env=env,
    )
    with tempfile.TemporaryDirectory(prefix="conveyor-stage-") as workdir, _refusals():
        result = stage(
            Workspace(repo, Path(workdir)),
            request,
            author=Author(name=request.user),
            dry_run=dry_run,
        )
    if dry_run:
        typer.echo(result.text, nl=False)
        return
    if output is not OutputFormat.table:
        print_machine(result.to_dict(), output)
        return
    apps = ", ".join(f"{c.app} {c.ref_id}" for c in result.choices)
    console.print(f"sandbox {result.sandbox_id}: {apps}", highlight=False)
    if result.pins:
        console.print(f"pinned: {', '.join(result.pins)}", highlight=False)
    if result.expires_at:
        console.print(f"expires {result.expires_at}", highlight=False)
    if result.url:
        console.print(f"url: {result.url}", highlight=False)
    console.print(f"committed {(result.commit or '')[:12]} as {result.file}", highlight=False)


def _list(
    repo: str, env: str | None, kubeconfig: str | None, context: str | None, output: OutputFormat
) -> None:
    with tempfile.TemporaryDirectory(prefix="conveyor-stage-") as workdir, _refusals():
        environment, sandboxes = list_sandboxes(Workspace(repo, Path(workdir)), env=env)
    if sandboxes:
        try:
            kube = kube_client(
                kubeconfig_path=kubeconfig or environment.cluster.kubeconfig,
                context=context or environment.cluster.context,
            )
            asyncio.run(_states(kube, sandboxes))
        except (KubeconfigError, ApiError, httpx.HTTPError, OSError) as error:
            # The list is git's; the cluster only adds each app's state.
            err_console.print(f"no state from the cluster: {escape(str(error))}", highlight=False)
    if output is not OutputFormat.table:
        print_machine([s.to_dict() for s in sandboxes], output)
        return
    if not sandboxes:
        console.print(f"no sandboxes in {environment.name}")
        return
    table = Table(title=f"sandboxes in {environment.name}")
    for column in ("id", "by", "staged", "expires", "apps", "pinned", "state"):
        table.add_column(column, overflow="fold")
    for sandbox in sandboxes:
        table.add_row(
            sandbox.id,
            sandbox.staged_by or "",
            sandbox.staged_at or "",
            sandbox.expires_at or "never",
            "\n".join(f"{a.app} {a.ref} ({a.chart_ref or '-'})" for a in sandbox.apps),
            ", ".join(a.app for a in sandbox.apps if a.pinned),
            sandbox.state or "unknown",
        )
    console.print(table)


async def _states(kube: KubeClient, sandboxes: list[Sandbox]) -> None:
    try:
        await cluster_states(kube, sandboxes)
    finally:
        await kube.aclose()


def unstage_command(
    ids: list[str] = typer.Argument(..., metavar="ID...", help="Sandboxes to remove."),
    repo: str = RepoOption,
    env: str | None = EnvOption,
    ttl: str | None = typer.Option(
        None, "--extend", help="Keep the sandbox instead, for this long from now (24h)."
    ),
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Remove sandboxes: the delete hooks run, then one commit removes their files; the
    agent prunes their objects, releases and namespaces. With --extend, push the expiry
    of one sandbox out instead."""
    with tempfile.TemporaryDirectory(prefix="conveyor-stage-") as workdir, _refusals():
        workspace = Workspace(repo, Path(workdir))
        if ttl is not None:
            if len(ids) != 1:
                fail("--extend takes one sandbox")
            expires = extend(workspace, ids[0], ttl, env=env, author=Author(name=_user()))
            console.print(f"sandbox {ids[0]} expires {expires}", highlight=False)
            return
        result = unstage(workspace, ids, env=env, author=Author(name=_user()))
    if output is not OutputFormat.table:
        print_machine(result.to_dict(), output)
        return
    console.print(
        f"unstaged {', '.join(result.ids)}: committed {(result.commit or '')[:12]}",
        highlight=False,
    )
