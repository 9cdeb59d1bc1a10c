"""One reconcile pass from the command line: fetch, render, apply, verify, report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.config.project import ConfigError
from conveyor.notify.notifier import Notifier, project_rules
from conveyor.reconcile.engine import EngineOptions, PassResult, build_engine
from conveyor.reconcile.plan import AppPlan, plan_environment
from conveyor.reconcile.status import SOURCE_KIND, STALLED, AppStatus, Reason, StatusStore
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
) -> PassResult | SourceFailure:
    say = progress or (lambda _m: None)
    say(f"fetching {target.repo}")
    try:
        resolved = fetch_target(target, purpose="reconcile")
    except (GitError, ConfigError, RenderError) as error:
        scope = await record_source_failure(target, str(error))
        return SourceFailure(scope=scope, message=str(error))
    kube = kube_client(resolved)
    helm = helm_cli(resolved)
    scope = await StatusStore(kube).scope_for(resolved.identity, scope=resolved.scope)
    notifier = Notifier(project_rules(resolved.checkout.path))
    await notifier.start()
    engine = build_engine(
        kube,
        helm,
        options=EngineOptions(
            scope=scope, identity=resolved.identity, timeout=timeout, allow_empty=allow_empty
        ),
        notifier=notifier,
        render_past=past_renders(resolved, kube, helm),
    )
    try:
        say(f"rendering {resolved.env_path} at {resolved.revision[:12]}")
        try:
            tree = discover_target(resolved)
        except RenderError as error:
            await record_source_failure(target, str(error), resolved=resolved)
            return SourceFailure(scope=scope, message=str(error))
        renderer = build_renderer(resolved, tree, kube, helm)
        say(f"reconciling {len(tree.apps)} apps")
        result = await engine.run_pass(tree, renderer, revision=resolved.revision, only=app)
        await _store_source(engine.store, source_fetched(target, resolved, scope=scope))
    finally:
        await engine.close()
        await kube.aclose()
        # One pass then exit: give queued notifications a bounded chance to go out.
        undelivered = await notifier.close(grace=notify_grace)
    result.undelivered = undelivered
    return result


def source_fetched(target: Target, resolved: ResolvedTarget, *, scope: str) -> AppStatus:
    """The source's own status after a good fetch: which repo, branch and revision."""
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
    )
    StatusStore.stamp(status, resolved.identity)
    return status


async def _store_source(store: StatusStore, status: AppStatus) -> None:
    await store.load_all(scope=status.scope)
    await store.save(status)


async def record_source_failure(
    target: Target,
    message: str,
    *,
    resolved: ResolvedTarget | None = None,
    reason: Reason = Reason.FETCH_FAILED,
) -> str:
    """Everything stays as applied; the source's own status says why nothing moved.
    Before a fetch there is no branch to know the environment by: the status goes to
    the one environment of that repository and name the cluster knows, if there is one.
    Returns the scope it was recorded under."""
    name = scope_name(environment=target.env, path=target.path or ".")
    if resolved is not None:
        kube = kube_client(resolved)
    else:
        kube = kube_client(kubeconfig_path=target.kubeconfig, context=target.context)
    try:
        store = StatusStore(kube)
        await store.install()
        if resolved is not None:
            identity: EnvironmentIdentity | None = resolved.identity
            scope = await store.scope_for(resolved.identity, scope=resolved.scope)
        else:
            identity, scope = await store.find_source(target.repo, name=name)
        status = AppStatus(
            scope=scope,
            app="",
            kind=SOURCE_KIND,
            state=STALLED,
            reason=reason,
            message=message,
        )
        if identity is not None:
            StatusStore.stamp(status, identity)
        await _store_source(store, status)
        return scope
    finally:
        await kube.aclose()


async def plan_target(
    target: Target, *, app: str | None = None, purpose: str = "diff"
) -> tuple[list[AppPlan], str]:
    """Fetch, render and dry-run against the live cluster (one app, or all); nothing is
    written. `purpose` keeps separate clones for callers that may run at the same time."""
    resolved = fetch_target(target, purpose=purpose)
    kube = kube_client(resolved)
    helm = helm_cli(resolved)
    try:
        tree = discover_target(resolved)
        renderer = build_renderer(resolved, tree, kube, helm)
        plans = await plan_environment(
            tree, renderer, kube, helm, identity=resolved.identity, only=app
        )
    finally:
        await kube.aclose()
    return plans, f"{resolved.env_path} at {resolved.revision[:12]}"
