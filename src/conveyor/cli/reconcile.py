"""`conveyor reconcile`, `get apps`, `suspend`, `resume`: the agent's work on demand."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import tempfile
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from urllib.parse import unquote, urlparse

import typer
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from conveyor.cli.channels import (
    ChannelAppOption,
    ChannelFileOption,
    Driver,
    DriverOption,
    RootOption,
    SecretsDirOption,
    channel_diff,
)
from conveyor.cli.output import (
    LogFormatOption,
    OutputFormat,
    check_listen,
    console,
    err_console,
    fail,
    print_machine,
)
from conveyor.cluster.client import ApiError
from conveyor.cluster.kubeconfig import KubeconfigError
from conveyor.cluster.lease import NotLeaderError
from conveyor.cluster.shards import ShardShare, live_shards, shard_owners, shard_shares
from conveyor.config.helmrelease import parse_duration
from conveyor.config.names import UnsafeValueError, kubernetes_namespace
from conveyor.config.project import ConfigError
from conveyor.promote.gates import agent_gate
from conveyor.promote.offline_diff import diff_against_live, diff_revisions
from conveyor.reconcile.agent import SHUTDOWN_GRACE, Agent, AgentOptions
from conveyor.reconcile.engine import PassResult
from conveyor.reconcile.fleet import project_environments, read_environments
from conveyor.reconcile.logs import LogFormat
from conveyor.reconcile.logs import configure as configure_logging
from conveyor.reconcile.once import SourceFailure, plan_target, reconcile_once
from conveyor.reconcile.plan import PlanDiff, render_markdown, render_text
from conveyor.reconcile.requests import RequestTimeoutError
from conveyor.reconcile.status import NAMESPACE as STATUS_NAMESPACE
from conveyor.reconcile.status import (
    READY,
    SOURCE_KIND,
    STALLED,
    AppStatus,
    StatusError,
    StatusStore,
)
from conveyor.reconcile.target import ClusterRef, Target, kube_client
from conveyor.render.discover import app_name
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI
from conveyor.render.sops import AgeKeys, DecryptionError, local_keys
from conveyor.source.git import GitError, mask_url
from conveyor.source.webhook import WebhookError, load_secret

RepoOption = typer.Option(..., "--repo", help="Config repository URL or path.")
BranchOption = typer.Option(None, "--branch", help="Branch (default: the repo's HEAD).")
PathOption = typer.Option(None, "--path", help="Folder of the repo to reconcile.")
EnvOption = typer.Option(None, "--env", help="Environment named in conveyor.yaml.")
# $KUBECONFIG is the fallback, never an override of the cluster conveyor.yaml names.
KubeconfigOption = typer.Option(
    None,
    "--kubeconfig",
    help="kubeconfig file (default: the environment's in conveyor.yaml, else $KUBECONFIG).",
)
ContextOption = typer.Option(
    None, "--context", help="kubeconfig context (default: the environment's)."
)

# A one-shot command exits after its pass: this long, at most, for notifications to go.
NotifyWaitOption = typer.Option(
    2.0,
    "--notify-wait",
    min=0.0,
    help="Seconds to wait at exit for notifications still being delivered.",
)

STATE_STYLE = {READY: "green", STALLED: "red"}


def warn_undelivered(result: PassResult) -> None:
    """Lost notifications are said, never silent (the receivers' side shows nothing)."""
    if result.undelivered:
        err_console.print(
            f"[yellow]warning[/]: {result.undelivered} notification(s) not delivered "
            "(receiver down or slow; see the log, or raise --notify-wait)",
            highlight=False,
        )


def show_progress(spinner: Status) -> Callable[[str], None]:
    """Progress on the spinner; off a terminal (CI logs), as lines: who holds the lease
    and what the command waits for must be readable there too."""

    def show(message: str) -> None:
        spinner.update(escape(message))
        if not err_console.is_terminal:
            err_console.print(escape(message), highlight=False, soft_wrap=True)

    return show


def status_table(
    statuses: list[AppStatus], *, title: str, shards: dict[str, str] | None = None
) -> Table:
    """`shards`: the shard that owns each app (by status name), for sharded environments."""
    table = Table(title=title)
    columns = ["app", "kind", "state", "reason", "revision", "helm", "applied", "message"]
    if shards:
        columns.insert(1, "shard")
    for column in columns:
        table.add_column(column, overflow="fold")
    for s in sorted(statuses, key=lambda s: s.app):
        style = STATE_STYLE.get(s.state, "yellow")
        cells = [
            s.app or "(source)",
            s.kind,
            f"[{style}]{s.state}",
            s.reason,
            (s.last_applied_revision or "")[:12],
            str(s.helm_revision or ""),
            s.last_applied_time or "",
            escape(s.message),
        ]
        if shards:
            cells.insert(1, shards.get(s.name, ""))
        table.add_row(*cells)
    return table


def reconcile(
    repo: str = RepoOption,
    branch: str | None = BranchOption,
    path: str | None = PathOption,
    env: str | None = EnvOption,
    app: str | None = typer.Option(None, "--app", help="Only this app."),
    timeout: float = typer.Option(
        300.0,
        "--timeout",
        help="Health timeout per app (s); also how long to wait for the environment's "
        "lease, or for the agent holding it to answer.",
    ),
    allow_empty: list[str] = typer.Option(
        [], "--allow-empty", help="App allowed to render empty (prunes all)."
    ),
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
    notify_wait: float = NotifyWaitOption,
) -> None:
    """One pass: exits 0 when every app is Ready, 1 when any is not.

    Only the holder of the environment's lease writes: an agent holding it is asked to
    run the pass (and its answer shown); otherwise this command takes the lease for its
    pass, waiting while another holder is live."""
    if bool(path) == bool(env):
        fail("give exactly one of --path DIR or --env NAME")
    target = Target(
        repo=repo, branch=branch, path=path, env=env, kubeconfig=kubeconfig, context=context
    )
    started = time.monotonic()
    with err_console.status("reconciling") as spinner:
        try:
            result = asyncio.run(
                reconcile_once(
                    target,
                    app=app,
                    timeout=timeout,
                    allow_empty=frozenset(allow_empty),
                    progress=show_progress(spinner),
                    notify_grace=notify_wait,
                )
            )
        except KubeconfigError as error:
            fail(str(error))
        except (RequestTimeoutError, NotLeaderError) as error:
            fail(escape(str(error)), code=1)
    if isinstance(result, SourceFailure):
        err_console.print(
            f"[red]source failed[/]: {escape(result.message)}\n"
            "nothing was applied or pruned; the cluster keeps the last "
            "applied revision"
        )
        raise typer.Exit(1)
    _print_result(result, output, seconds=time.monotonic() - started)
    warn_undelivered(result)
    raise typer.Exit(0 if result.all_ready else 1)


def _print_result(result: PassResult, output: OutputFormat, *, seconds: float) -> None:
    statuses = list(result.statuses.values())
    if output is not OutputFormat.table:
        print_machine(
            {
                "revision": result.revision,
                "writes": result.writes,
                "pruned": result.pruned_apps,
                "undeliveredNotifications": result.undelivered,
                "items": [s.to_summary() for s in statuses],
                "shards": [a.to_json() for a in result.shards],
                "goneShards": result.gone_shards,
            },
            output,
        )
        return
    console.print(status_table(statuses, title=f"revision {result.revision[:12]}"))
    ready = sum(s.ready for s in statuses)
    pruned = f"; pruned apps: {', '.join(result.pruned_apps)}" if result.pruned_apps else ""
    console.print(
        f"{ready}/{len(statuses)} apps Ready in {seconds:.1f}s, {result.writes} API writes{pruned}"
    )
    for answer in result.shards:
        failure = f", source failed: {answer.source_failure}" if answer.source_failure else ""
        console.print(
            escape(f"shard {answer.shard}: {answer.apps} apps, {answer.writes} writes{failure}"),
            highlight=False,
        )
    for shard in result.gone_shards:
        console.print(
            f"[yellow]shard {escape(shard)}: died before answering[/]; "
            "the other shards take its apps over",
            highlight=False,
        )


get_app = typer.Typer(help="Show status kept in the cluster.", no_args_is_help=True)


@get_app.command("apps")
def get_apps(
    scope: str | None = typer.Option(
        None, "--scope", "--env", help="Only this environment (or path scope)."
    ),
    all_environments: bool = typer.Option(
        False,
        "--all-environments",
        help="Every environment of --repo's conveyor.yaml, each from its own cluster; "
        "exit 1 when a cluster cannot be read.",
    ),
    repo: str | None = typer.Option(
        None, "--repo", help="Config repository (with --all-environments)."
    ),
    branch: str | None = BranchOption,
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """Apps and their state: Ready / Reconciling / Stalled, reason, revision."""
    if all_environments:
        if repo is None:
            fail("--all-environments reads conveyor.yaml: give --repo URL")
        if scope is not None:
            fail("give either --env NAME or --all-environments")
        _get_all_environments(repo, branch, ClusterRef(kubeconfig, context), output)
        return

    async def load() -> tuple[list[AppStatus], dict[str, str]]:
        async with kube_client(kubeconfig_path=kubeconfig, context=context) as kube:
            statuses = await StatusStore(kube).list_all(scope=scope)
            keys = [(s.name, s.owner, s.app) for s in statuses if s.owner]
            return statuses, await shard_owners(kube, keys, namespace=STATUS_NAMESPACE)

    try:
        statuses, shards = asyncio.run(load())
    except (KubeconfigError, ApiError, OSError) as error:
        fail(str(error))
    apps = [s for s in statuses if s.kind != SOURCE_KIND]
    if output is not OutputFormat.table:
        print_machine(
            {
                "items": [{**s.to_summary(), "shard": shards.get(s.name)} for s in apps],
                "sources": [s.to_summary() for s in statuses if s.kind == SOURCE_KIND],
            },
            output,
        )
        return
    console.print(status_table(statuses, title="apps", shards=shards))


@get_app.command("shards")
def get_shards(
    scope: str = typer.Option(..., "--env", "--scope", help="Environment (or path scope)."),
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    output: OutputFormat = typer.Option(OutputFormat.table, "--output", "-o"),
) -> None:
    """The live shards of an environment split over agent replicas (agent --shards): the
    apps each owns now, and its last pass. None when the environment runs unsharded."""

    async def load() -> list[ShardShare] | None:
        async with kube_client(kubeconfig_path=kubeconfig, context=context) as kube:
            statuses = await StatusStore(kube).list_all(scope=scope)
            source = next((s for s in statuses if s.kind == SOURCE_KIND), None)
            if source is None or not source.owner:
                return None
            loads = await live_shards(kube, namespace=STATUS_NAMESPACE, environment=source.owner)
            return shard_shares(loads, [s.app for s in statuses if s.kind != SOURCE_KIND])

    try:
        shares = asyncio.run(load())
    except (KubeconfigError, ApiError, OSError) as error:
        fail(str(error))
    if shares is None:
        fail(f"no environment {scope} in this cluster: no agent or reconcile has run it yet")
    if output is not OutputFormat.table:
        rows = [
            {
                "shard": share.load.identity,
                "apps": share.owned,
                "lastPassApps": share.load.apps,
                "passSeconds": share.load.pass_seconds,
            }
            for share in shares
        ]
        print_machine({"environment": scope, "shards": rows}, output)
        return
    if not shares:
        console.print(f"{escape(scope)} runs unsharded: one agent holds its Lease")
        return
    table = Table(title=f"shards of {escape(scope)}")
    for column in ("shard", "apps", "last pass: apps", "last pass: seconds"):
        table.add_column(column, overflow="fold")
    for share in shares:
        seconds = share.load.pass_seconds
        table.add_row(
            escape(share.load.identity),
            str(share.owned),
            "" if share.load.apps is None else str(share.load.apps),
            "" if seconds is None else f"{seconds:.1f}",
        )
    console.print(table)


def _get_all_environments(
    repo: str, branch: str | None, default: ClusterRef, output: OutputFormat
) -> None:
    try:
        environments = project_environments(repo, branch=branch)
    except GitError as error:
        fail(escape(mask_url(error.stderr or str(error))))
    except ConfigError as error:
        fail(escape(str(error)))
    if not environments:
        fail("conveyor.yaml of --repo declares no environments")
    reads = asyncio.run(read_environments(environments, default=default))
    if output is not OutputFormat.table:
        print_machine(
            {
                "items": [
                    {**s.to_summary(), "cluster": r.cluster}
                    for r in reads
                    for s in r.statuses
                    if s.kind != SOURCE_KIND
                ],
                "sources": [
                    {**s.to_summary(), "cluster": r.cluster}
                    for r in reads
                    for s in r.statuses
                    if s.kind == SOURCE_KIND
                ],
                "environments": [
                    {
                        "name": r.environment,
                        "scope": r.scope,
                        "cluster": r.cluster,
                        "reachable": r.reachable,
                        "error": r.error,
                        "apps": sum(s.kind != SOURCE_KIND for s in r.statuses),
                        "ready": sum(s.ready for s in r.statuses if s.kind != SOURCE_KIND),
                    }
                    for r in reads
                ],
            },
            output,
        )
    else:
        for read in reads:
            title = f"{read.environment} (cluster {read.cluster})"
            if read.reachable:
                console.print(status_table(read.statuses, title=title))
            else:
                console.print(f"[red]{escape(title)}: unreachable[/]: {escape(str(read.error))}")
    if not all(r.reachable for r in reads):
        raise typer.Exit(1)


def _request(
    app: str,
    environment: str,
    kubeconfig: str | None,
    context: str | None,
    *,
    suspended: bool | None = None,
    adopt_from: str | None = None,
) -> str:
    """Record a person's request on the app's status, for its environment's writer.
    Returns the scope of the environment that has the app."""

    async def run() -> str:
        async with kube_client(kubeconfig_path=kubeconfig, context=context) as kube:
            store = StatusStore(kube)
            await store.install()
            status = await store.find_app(app_name(environment), app)
            if suspended is not None:
                await store.set_suspended(status.scope, app, suspended)
            if adopt_from is not None:
                await store.set_adopt_from(status.scope, app, adopt_from)
            return status.scope

    try:
        return asyncio.run(run())
    except (KubeconfigError, ApiError, StatusError, OSError) as error:
        fail(str(error))


def _set_suspended(
    app: str, scope: str, suspended: bool, kubeconfig: str | None, context: str | None
) -> None:
    found = _request(app, scope, kubeconfig, context, suspended=suspended)
    console.print(f"{app} {'suspended' if suspended else 'resumed'} in {found}")


ScopeArgument = typer.Option(..., "--env", "--scope", help="Environment (or path scope).")


def suspend(
    app: str,
    scope: str = ScopeArgument,
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
) -> None:
    """Stop reconciling APP (its objects stay as they are)."""
    _set_suspended(app, scope, True, kubeconfig, context)


def resume(
    app: str,
    scope: str = ScopeArgument,
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
) -> None:
    """Reconcile APP again."""
    _set_suspended(app, scope, False, kubeconfig, context)


def adopt(
    app: str,
    source: str = typer.Option(
        ...,
        "--from",
        help="The environment to take APP's objects and Helm release over from: its owner "
        "id or source, as the OwnershipConflict message names it.",
    ),
    scope: str = ScopeArgument,
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
) -> None:
    """Let APP take over what another environment owns (its next pass applies it)."""
    found = _request(app, scope, kubeconfig, context, adopt_from=source)
    console.print(
        f"{app} in {found} will take over what {source} owns on its next pass "
        "(conveyor reconcile, or the agent's next interval)"
    )


class DiffFormat(StrEnum):
    text = "text"
    markdown = "markdown"


class Against(StrEnum):
    base = "base"
    live = "live"


def print_diff(text: str, fmt: DiffFormat, outfile: str | None) -> None:
    if outfile:
        Path(outfile).write_text(text)
    elif fmt is DiffFormat.markdown:
        typer.echo(text, nl=False)
    else:
        for line in text.splitlines():
            style = (
                "green"
                if line.startswith("+")
                else "red"
                if line.startswith("-")
                else "bold"
                if line.startswith("#")
                else None
            )
            console.print(escape(line), style=style, highlight=False)


def _local_clone(repo: str) -> Path:
    """The clone that --base/--head read: a path, or a `file://` URL as every other
    command takes; a remote URL is refused with what to do instead."""
    parsed = urlparse(repo)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme or re.match(r"^[\w.-]+@[\w.-]+:", repo):
        fail(f"--base/--head read a local clone, not {mask_url(repo)}: clone it and pass its path")
    return Path(repo)


def _diff_revisions(
    repo: str,
    base: str | None,
    head: str,
    against: Against,
    target: Target,
    *,
    age_keys: Callable[[], AgeKeys],
) -> tuple[list[PlanDiff], str]:
    """Two revisions of a local clone rendered offline, or the head against the cluster."""
    clone = _local_clone(repo)
    with tempfile.TemporaryDirectory(prefix="conveyor-diff-") as workdir:
        if against is Against.live:
            return asyncio.run(
                diff_against_live(
                    clone,
                    head,
                    env=target.env,
                    path=target.path,
                    kubeconfig=target.kubeconfig,
                    context=target.context,
                    helm=HelmCLI(),
                    workdir=Path(workdir),
                    age_keys=age_keys,
                )
            )
        if base is None:
            fail("give --base REF (or --against live)")
        return asyncio.run(
            diff_revisions(
                clone,
                base,
                head,
                env=target.env,
                path=target.path,
                helm=HelmCLI(),
                workdir=Path(workdir),
                age_keys=age_keys,
            )
        )


def diff(
    repo: str | None = typer.Option(
        None, "--repo", help="Config repository URL or path (with --head: a clone, default .)."
    ),
    branch: str | None = BranchOption,
    path: str | None = PathOption,
    env: str | None = EnvOption,
    base: str | None = typer.Option(None, "--base", help="Pull request: the base revision."),
    head: str | None = typer.Option(None, "--head", help="Pull request: the head revision."),
    against: Against = typer.Option(
        Against.base, "--against", help="Compare --head with --base (offline) or the cluster."
    ),
    channel_file: Path | None = ChannelFileOption,
    channel_app: str | None = ChannelAppOption,
    driver: Driver | None = DriverOption,
    root: Path | None = RootOption,
    secrets_dir: Path | None = SecretsDirOption,
    fmt: DiffFormat = typer.Option(DiffFormat.text, "--format"),
    outfile: str | None = typer.Option(None, "--outfile", help="Write the diff to a file."),
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    sops_age_key_file: Path | None = typer.Option(
        None,
        "--sops-age-key-file",
        help="age keys for SOPS-encrypted files (instead of $SOPS_AGE_KEY_FILE).",
    ),
) -> None:
    """Desired against live (server-side dry run); with --base/--head, two revisions of
    a pull request rendered offline; with -f, a cal-itp channel as its PR comment.
    Exit 0: no changes, 1: changes, 2: error. Secret values are masked."""
    if channel_file is not None:
        if path or env or head or base:
            fail("-f (a channel file) goes without --path, --env, --base and --head")
        text, plans = channel_diff(
            channel_file,
            app=channel_app,
            driver=driver,
            root=root,
            secrets_dir=secrets_dir,
            kubeconfig=kubeconfig,
            context=context,
        )
        print_diff(text, DiffFormat.markdown, outfile)
        raise typer.Exit(
            2 if any(p.error for p in plans) else 1 if any(p.changes for p in plans) else 0
        )
    if bool(path) == bool(env):
        fail("give exactly one of --path DIR or --env NAME")
    target = Target(
        repo=repo or ".", branch=branch, path=path, env=env, kubeconfig=kubeconfig, context=context
    )
    try:
        # Read once, here: a key file that cannot be read stops the diff with one line.
        keys = local_keys(key_file=sops_age_key_file)
    except DecryptionError as error:
        fail(escape(str(error)))
    try:
        if head is not None or base is not None:
            if head is None:
                fail("give --head REF with --base")
            plans, title = _diff_revisions(
                repo or ".", base, head, against, target, age_keys=lambda: keys
            )
        elif repo is None:
            fail("give --repo URL (or --base/--head for a pull request)")
        else:
            plans, title = asyncio.run(plan_target(target, age_keys=lambda: keys))
    except GitError as error:
        fail(escape(mask_url(error.stderr or str(error))))
    except (ConfigError, RenderError, KubeconfigError, ApiError, OSError) as error:
        fail(escape(str(error)))
    text = render_markdown(plans, title=title) if fmt is DiffFormat.markdown else render_text(plans)
    print_diff(text, fmt, outfile)
    if any(p.error for p in plans):
        raise typer.Exit(2)
    raise typer.Exit(1 if any(p.changes for p in plans) else 0)


def agent(
    repo: str = RepoOption,
    branch: str | None = BranchOption,
    path: str | None = PathOption,
    env: str | None = EnvOption,
    interval: str = typer.Option("60s", "--interval", help="Poll interval (e.g. 30s, 5m)."),
    listen: str | None = typer.Option(
        None, "--listen", help="127.0.0.1:PORT for /hooks/git, /metrics, probes."
    ),
    webhook_secret_file: Path | None = typer.Option(None, "--webhook-secret-file"),
    timeout: float = typer.Option(300.0, "--timeout", help="Health timeout per app (s)."),
    lease_duration: float = typer.Option(15.0, "--lease-duration"),
    shutdown_grace: float = typer.Option(
        SHUTDOWN_GRACE,
        "--shutdown-grace",
        help="On SIGTERM, seconds the pass in flight may take to finish before it is abandoned.",
    ),
    namespaces: list[str] = typer.Option(
        [],
        "--namespace",
        help="Confine the agent to this namespace (repeat it; namespaced RBAC): watches "
        "only these, creates no namespace, refuses objects elsewhere. conveyor-system is "
        "always among them.",
    ),
    shards: int | None = typer.Option(
        None,
        "--shards",
        help="Split the environment's apps over N agent replicas (run N, each with "
        "--shards N): each holds a Lease of its own and owns the apps consistent hashing "
        "gives it among the live shards.",
    ),
    kubeconfig: str | None = KubeconfigOption,
    context: str | None = ContextOption,
    log_format: LogFormat | None = LogFormatOption,
) -> None:
    """The long-running agent: reconcile on every new revision, interval and webhook.
    With --env, new content waits until the environment's gates are open."""
    if bool(path) == bool(env):
        fail("give exactly one of --path DIR or --env NAME")
    for namespace in namespaces:
        try:
            kubernetes_namespace(namespace)
        except UnsafeValueError as error:
            fail(f"--namespace: {error}")
    # Startup misconfiguration stops the agent here, with one line; everything after
    # this is retried (see reconcile/agent.py).
    if listen is not None:
        check_listen(listen)
    if lease_duration <= 0:
        fail(f"--lease-duration must be positive, not {lease_duration}")
    if shards is not None and shards < 1:
        fail(f"--shards must be at least 1, not {shards}")
    if shutdown_grace < 0:
        fail(f"--shutdown-grace must not be negative, not {shutdown_grace}")
    try:
        poll_interval = parse_duration(interval, default=60.0)
    except ValueError as error:
        fail(f"--interval: {error}")
    secret = None
    if webhook_secret_file is not None:
        try:
            secret = load_secret(webhook_secret_file)
        except WebhookError as error:
            fail(str(error))
    configure_logging(log_format=log_format)
    options = AgentOptions(
        interval=poll_interval,
        listen=listen,
        webhook_secret=secret,
        timeout=timeout,
        lease_duration=lease_duration,
        shutdown_grace=shutdown_grace,
        namespaces=frozenset([*namespaces, STATUS_NAMESPACE]) if namespaces else None,
        shards=shards,
    )
    target = Target(
        repo=repo, branch=branch, path=path, env=env, kubeconfig=kubeconfig, context=context
    )
    gate = agent_gate(repo) if env else None

    async def run_until_stopped() -> None:
        # SIGTERM (a pod being stopped) ends the agent cleanly: the pass in flight
        # finishes or is abandoned safely, and the Lease is released, so a successor
        # takes over at once instead of waiting for the lease to expire.
        agent = Agent(target, options=options, gate=gate)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, agent.stop)
        await agent.run()

    try:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            asyncio.run(run_until_stopped())
    except KubeconfigError as error:  # the one error at run time that no retry can mend
        fail(escape(str(error)))
