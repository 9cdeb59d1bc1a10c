"""One reconcile pass from the command line or the dashboard: fetch, render, apply,
verify, report, by the environment's one writer (see `reconcile_once`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from conveyor.cluster.client import KubeClient
from conveyor.cluster.lease import LeaderElector, LeaseNotAcquiredError
from conveyor.cluster.lease_loop import LeaseLoop
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.cluster.shards import live_shards
from conveyor.config.project import ConfigError
from conveyor.notify.notifier import Notifier, project_rules
from conveyor.reconcile.engine import EngineOptions, PassResult, build_engine
from conveyor.reconcile.plan import PlanDiff, plan_environment
from conveyor.reconcile.requests import (
    LEASE_DURATION,
    RequestTimeoutError,
    answers_requests,
    environment_elector,
    one_pass_identity,
    request_reconcile,
    wait_handled,
)
from conveyor.reconcile.status import (
    NAMESPACE,
    SOURCE_KIND,
    STALLED,
    AppStatus,
    Reason,
    StatusStore,
)
from conveyor.reconcile.target import (
    ResolvedTarget,
    Target,
    build_renderer,
    discover_target,
    fetch_target,
    helm_cli,
    kube_client,
    past_renders,
)
from conveyor.render.discover import scope_name
from conveyor.render.documents import RenderError
from conveyor.render.sops import AgeKeys, local_keys
from conveyor.source.git import GitError

Progress = Callable[[str], None]


@dataclass
class SourceFailure:
    scope: str
    message: str


async def reconcile_once(
    target: Target,
    *,
    app: str | None = None,
    timeout: float = 300.0,
    allow_empty: frozenset[str] = frozenset(),
    progress: Progress | None = None,
    notify_grace: float = 2.0,
    identity: str | None = None,
    lease_duration: float = LEASE_DURATION,
) -> PassResult | SourceFailure:
    """One pass by the environment's one writer. An agent holding the Lease is asked to
    run it (and its answer read back); with no live holder this process takes the Lease
    for the pass and releases it after; a holder that stopped renewing is waited out.
    `timeout` bounds each app's health wait, the wait for the Lease and the wait for the
    agent's answer (RequestTimeoutError). `identity` names this writer in the Lease and
    the audit log (default `cli-<host>-<pid>-<random>`)."""
    say = progress or (lambda _m: None)
    writer = identity or one_pass_identity("cli")
    say(f"fetching {target.repo}")
    try:
        resolved = fetch_target(target, purpose="reconcile")
    except (GitError, ConfigError, RenderError) as error:
        scope = await record_source_failure(
            target, str(error), writer=writer, lease_duration=lease_duration, progress=say
        )
        return SourceFailure(scope=scope, message=str(error))
    kube = kube_client(resolved)
    # Lease traffic apart from the pass's writes, on a loop of its own (as an agent's):
    # a pass's steps over thousands of apps cannot hold back a renewal.
    lease_kube = kube_client(resolved)
    lease_loop = LeaseLoop()
    for client in (kube, lease_kube):
        client.identify(writer)
    try:
        store = StatusStore(kube)
        # The CRD and namespace the lease and statuses live in: idempotent, and written
        # only on a cluster conveyor never ran on, so it precedes the lease (as for agents).
        await store.install()
        scope = await store.scope_for(resolved.identity, scope=resolved.scope)
        elector = environment_elector(
            lease_kube, scope, identity=writer, lease_duration=lease_duration, runner=lease_loop
        )
        deadline = time.monotonic() + timeout

        async def shards_live() -> bool:
            listed = live_shards(lease_kube, namespace=NAMESPACE, environment=resolved.identity.id)
            return bool(await elector.on_runner(listed))

        while True:
            if await shards_live():  # sharded agents write this environment: ask them
                answer = await _ask_holder(
                    kube,
                    resolved,
                    "the environment's shards",
                    still_asked=shards_live,
                    scope=scope,
                    app=app,
                    timeout=timeout,
                    say=say,
                )
                if answer is not None:
                    return answer
                if time.monotonic() > deadline:
                    raise RequestTimeoutError(f"the shards of {scope} did not answer")
                continue
            with contextlib.suppress(LeaseNotAcquiredError):
                async with elector.hold(timeout=0):
                    say(f"holding lease {elector.name} as {writer}")
                    return await _own_pass(
                        target,
                        resolved,
                        kube,
                        elector,
                        scope=scope,
                        app=app,
                        timeout=timeout,
                        allow_empty=allow_empty,
                        say=say,
                        notify_grace=notify_grace,
                    )
            holder = elector.holder or "another writer"
            renewed = elector.holder_renewed_ago()
            left = deadline - time.monotonic()
            if answers_requests(holder) and elector.holder_renews():
                answer = await _ask_holder(
                    kube,
                    resolved,
                    f"agent {holder} (lease {elector.name})",
                    still_asked=partial(_still_held, elector, holder),
                    scope=scope,
                    app=app,
                    timeout=timeout,
                    say=say,
                )
                if answer is not None:
                    return answer
                if left > 0:
                    continue  # the agent went away before answering: the lease is to be had
            if left <= 0:
                raise RequestTimeoutError(
                    f"lease {elector.name} still held by {holder} after {timeout:g}s"
                )
            renewed_text = f"renewed {renewed:.0f}s ago, " if renewed is not None else ""
            say(
                f"waiting for lease {elector.name} held by {holder} "
                f"({renewed_text}free in at most {elector.holder_expires_in():.0f}s)"
            )
            await asyncio.sleep(min(1.0, left))
    finally:
        await kube.aclose()
        await lease_loop.run(lease_kube.aclose())
        lease_loop.close()


async def _own_pass(
    target: Target,
    resolved: ResolvedTarget,
    kube: KubeClient,
    elector: LeaderElector,
    *,
    scope: str,
    app: str | None,
    timeout: float,
    allow_empty: frozenset[str],
    say: Progress,
    notify_grace: float,
) -> PassResult | SourceFailure:
    """The pass itself, while this process holds the Lease: every write it makes, to the
    API or through helm, is checked against the lease first."""
    kube.write_guard = elector.write_budget
    helm = helm_cli(resolved)
    helm.write_guard = elector.write_budget
    notifier = Notifier(project_rules(resolved.checkout.path))
    await notifier.start()
    engine = build_engine(
        kube,
        helm,
        options=EngineOptions(
            scope=scope, identity=resolved.identity, timeout=timeout, allow_empty=allow_empty
        ),
        notifier=notifier,
        may_write=lambda: elector.may_write,
        render_past=past_renders(resolved, kube, helm),
    )
    try:
        say(f"rendering {resolved.env_path} at {resolved.revision[:12]}")
        try:
            tree = discover_target(resolved)
        except RenderError as error:
            failed = source_failed(scope, str(error), identity=resolved.identity)
            await store_source(engine.store, failed)  # under the lease this pass holds
            return SourceFailure(scope=scope, message=str(error))
        renderer = build_renderer(resolved, tree, kube, helm)
        await renderer.expand(tree)
        for notice in tree.notices:
            say(notice)
        say(f"reconciling {len(tree.apps)} apps")
        result = await engine.run_pass(tree, renderer, revision=resolved.revision, only=app)
        await store_source(
            engine.store,
            source_fetched(target, resolved, scope=scope, apps=[a.name for a in tree.apps]),
        )
    finally:
        await engine.close()
        # One pass then exit: give queued notifications a bounded chance to go out.
        undelivered = await notifier.close(grace=notify_grace)
    result.undelivered = undelivered
    return result


async def _still_held(elector: LeaderElector, holder: str) -> bool:
    return await elector.observe() == holder


async def _ask_holder(
    kube: KubeClient,
    resolved: ResolvedTarget,
    holder: str,
    *,
    still_asked: Callable[[], Awaitable[bool]],
    scope: str,
    app: str | None,
    timeout: float,
    say: Progress,
) -> PassResult | SourceFailure | None:
    """Ask the writer (`holder` says who: an agent holding the Lease, or the shards)
    for the pass and wait for its answer; None when `still_asked` turns False first."""
    token = await request_reconcile(kube, scope, app=app)
    if token is None:  # its first pass has not ended: wait for it like for any holder
        say(f"waiting for the first pass of {holder} to end")
        await asyncio.sleep(1.0)
        return None
    handled = await wait_handled(
        kube,
        scope,
        token,
        timeout=timeout,
        still_asked=still_asked,
        progress=lambda elapsed: say(
            f"asked {holder} to reconcile {app or 'all apps'}; waiting for it ({elapsed:.0f}s)"
        ),
    )
    if handled is None:
        return None
    if handled.source_failure is not None:
        return SourceFailure(scope=scope, message=handled.source_failure)
    own, _legacy = await StatusStore(kube).load_environment(resolved.identity, scope=scope)
    statuses = {
        name: status
        for name, status in own.items()
        if status.kind != SOURCE_KIND and (app is None or name == app)
    }
    return PassResult(
        revision=handled.revision,
        statuses=statuses,
        pruned_apps=handled.pruned_apps,
        writes=handled.writes,
        shards=handled.shards,
        gone_shards=handled.gone_shards,
    )


def source_fetched(
    target: Target, resolved: ResolvedTarget, *, scope: str, apps: list[str]
) -> AppStatus:
    """The source's own status after a good pass: which repo, branch and revision, and
    the apps it has."""
    status = AppStatus(
        scope=scope,
        app="",
        kind=SOURCE_KIND,
        state="Ready",
        reason="Fetched",
        message=f"fetched {resolved.revision[:12]} of {target.repo}@{resolved.checkout.branch}",
        attempted_revision=resolved.revision,
        last_applied_revision=resolved.revision,
        repository=target.repo,
        branch=resolved.checkout.branch,
        apps=sorted(apps),
    )
    StatusStore.stamp(status, resolved.identity)
    return status


def source_failed(
    scope: str,
    message: str,
    *,
    identity: EnvironmentIdentity | None,
    reason: Reason = Reason.FETCH_FAILED,
) -> AppStatus:
    """The source's own status after a failed fetch or render: everything stays as
    applied, and this says why nothing moved."""
    status = AppStatus(
        scope=scope, app="", kind=SOURCE_KIND, state=STALLED, reason=reason, message=message
    )
    if identity is not None:
        StatusStore.stamp(status, identity)
    return status


async def store_source(store: StatusStore, status: AppStatus) -> None:
    """Save the source's status through `store`, whose client must be the Lease holder's."""
    await store.load_all(scope=status.scope)
    await store.save(status)


async def record_source_failure(
    target: Target,
    message: str,
    *,
    writer: str,
    resolved: ResolvedTarget | None = None,
    reason: Reason = Reason.FETCH_FAILED,
    lease_duration: float = LEASE_DURATION,
    progress: Progress | None = None,
) -> str:
    """Record a failed fetch or render on the source's status, for a process that does
    not hold the environment's Lease: it takes the Lease as `writer` for that one write
    if the Lease is free, and writes nothing when another writer holds it (that writer
    fetches the same source and records what it finds; a stale one is not waited for,
    since nothing else is to be done). Before a fetch there is no branch to know the
    environment by: the status goes to the one environment of that repository and name
    the cluster knows, if there is one. Returns the scope it belongs to."""
    say = progress or (lambda _m: None)
    name = scope_name(environment=target.env, path=target.path or ".")
    if resolved is not None:
        kube, lease_kube = kube_client(resolved), kube_client(resolved)
    else:
        kube = kube_client(kubeconfig_path=target.kubeconfig, context=target.context)
        lease_kube = kube_client(kubeconfig_path=target.kubeconfig, context=target.context)
    for client in (kube, lease_kube):
        client.identify(writer)
    try:
        store = StatusStore(kube)
        await store.install()  # idempotent, and before the lease, as for every writer
        if resolved is not None:
            identity: EnvironmentIdentity | None = resolved.identity
            scope = await store.scope_for(resolved.identity, scope=resolved.scope)
        else:
            identity, scope = await store.find_source(target.repo, name=name)
        if identity is not None and await live_shards(
            lease_kube, namespace=NAMESPACE, environment=identity.id
        ):
            say("not recording the failure on the source's status: its shards run, and fetch it")
            return scope
        elector = environment_elector(
            lease_kube, scope, identity=writer, lease_duration=lease_duration
        )
        try:
            async with elector.hold(timeout=0):
                kube.write_guard = elector.write_budget
                failed = source_failed(scope, message, identity=identity, reason=reason)
                await store_source(store, failed)
        except LeaseNotAcquiredError as error:
            say(f"not recording the failure on the source's status: {error}, whose own fetch does")
        return scope
    finally:
        await kube.aclose()
        await lease_kube.aclose()


async def plan_target(
    target: Target,
    *,
    app: str | None = None,
    purpose: str = "diff",
    age_keys: Callable[[], AgeKeys] = local_keys,
) -> tuple[list[PlanDiff], str]:
    """Fetch, render and dry-run against the live cluster (one app, or all); nothing is
    written. `purpose` keeps separate clones for callers that may run at the same time;
    `age_keys` decrypt SOPS files when the environment names no decryption Secret."""
    resolved = fetch_target(target, purpose=purpose)
    kube = kube_client(resolved)
    helm = helm_cli(resolved)
    try:
        tree = discover_target(resolved)
        renderer = build_renderer(resolved, tree, kube, helm, age_keys=age_keys)
        plans = await plan_environment(
            tree, renderer, kube, helm, identity=resolved.identity, only=app
        )
    finally:
        await kube.aclose()
    return plans, f"{resolved.env_path} at {resolved.revision[:12]}"
