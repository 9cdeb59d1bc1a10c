"""One reconcile pass over an environment: render every app, then for each app determine
its state (reconcile/state.py) and run the action that state calls for
(reconcile/actions/), again after every failed attempt, then report.

Safety rules that the rest of conveyor relies on:
- nothing is pruned after a failed fetch or render, and an app whose render came out
  empty is not emptied unless that is explicitly allowed;
- an unchanged app (same fingerprint, no drift, healthy) costs no API write;
- every failure is reported per app; one broken app never stops the others;
- a failed attempt is retried, then rolled back to the last good revision; the failure
  count starts again with a new revision, so there is no dead end;
- only what carries this environment's identity is changed, pruned or reported;
- with a gate check, apps whose new content the environment's gates hold wait
  (WaitingForGate) until the gates open; meanwhile they are held to the content they
  last applied, drift corrected as for any app.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from conveyor.cluster.apply import ApplyError
from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.flux import FluxInstallation, FluxObject, flux_origin, needs_takeover
from conveyor.cluster.flux import refusal_message as flux_refusal_message
from conveyor.cluster.helm_storage import (
    ReleaseOwnership,
    claim_release,
    move_release,
    release_ownership,
)
from conveyor.cluster.lease import NotLeaderError
from conveyor.cluster.live import LiveCache, OutsideNamespacesError
from conveyor.cluster.ownership import (
    EnvironmentIdentity,
    Owner,
    adoption_requested,
    foreign_owner,
    owner_of,
)
from conveyor.cluster.shards import writing_for
from conveyor.notify.notifier import Notifier
from conveyor.reconcile.actions import (
    ActionContext,
    AppFailed,
    DesiredObjects,
    ReleaseLocked,
    RenderPast,
)
from conveyor.reconcile.actions.apply import install_or_upgrade, record_applied
from conveyor.reconcile.actions.correct_drift import correct_drift
from conveyor.reconcile.actions.hold import GateHold, GateVerdict, correct_held_drift, hold
from conveyor.reconcile.actions.prune import prune_app
from conveyor.reconcile.actions.rollback import roll_back
from conveyor.reconcile.actions.settle import settle
from conveyor.reconcile.actions.take_over import take_over_from_flux
from conveyor.reconcile.actions.unlock import unlock_release
from conveyor.reconcile.actions.verify import drift_of, release_objects, watched
from conveyor.reconcile.plan import AppPlan, Desired, apps_left
from conveyor.reconcile.report import EventRecorder, Metrics, error_summary, notification_for
from conveyor.reconcile.requests import ShardAnswer
from conveyor.reconcile.state import AppState, Attempt, Observation, determine_state
from conveyor.reconcile.status import (
    READY,
    SOURCE_KIND,
    SUSPENDED,
    AppStatus,
    Reason,
    StatusStore,
    release_key,
    split_release,
)
from conveyor.render.dependencies import resolve_dependencies
from conveyor.render.discover import AppSource, EnvironmentTree
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI, HelmError, parse_manifest
from conveyor.render.render import HelmPlan, RenderedApp, Renderer
from conveyor.source.git import GitError, LogEntry, last_change

log = logging.getLogger("conveyor.reconcile")


def _details(error: BaseException) -> str | None:
    """What a failure said in full, where it says more than its one-line summary."""
    if isinstance(error, AppFailed | ApplyError):
        return error.details
    if isinstance(error, HelmError):
        return error.output
    return str(error)


@dataclass
class EngineOptions:
    scope: str  # this environment's prefix in the cluster (StatusStore.scope_for)
    identity: EnvironmentIdentity  # what it owns
    timeout: float = 300.0  # health timeout for apps that do not set their own
    retries: int = 1  # extra attempts before an app is Stalled / rolled back
    prune: bool = True
    allow_empty: frozenset[str] = frozenset()
    concurrency: int = 16
    helm_concurrency: int = 4
    poll_interval: float = 0.5
    # An agent confined to these namespaces (namespaced RBAC) watches only them; None
    # watches cluster-wide.
    namespaces: frozenset[str] | None = None
    # This engine's shard identity (agent --shards), recorded in the statuses it writes.
    shard: str | None = None


# Called with the apps whose content would change, and whether apps left git (to be
# pruned); says which of them the gates hold.
GateCheck = Callable[[list[AppSource], bool], Awaitable[GateVerdict]]


@dataclass
class PassResult:
    revision: str
    statuses: dict[str, AppStatus]
    pruned_apps: list[str] = field(default_factory=list)
    writes: int = 0
    held: GateHold | None = None  # every hold of the pass as one
    undelivered: int = 0  # notifications a one-shot pass could not deliver before exit
    # Asked of shards, for all apps: each shard's part, and those that died before theirs.
    shards: list[ShardAnswer] = field(default_factory=list)
    gone_shards: list[str] = field(default_factory=list)

    @property
    def all_ready(self) -> bool:
        return all(s.ready for s in self.statuses.values())


class Engine:
    """Orchestrates passes; what it works with is handed to it (`build_engine` wires the
    usual parts), so that each part can be replaced in a test."""

    def __init__(
        self,
        kube: KubeClient,
        helm: HelmCLI,
        *,
        options: EngineOptions,
        store: StatusStore,
        live: LiveCache,
        desired: DesiredObjects,
        events: EventRecorder,
        metrics: Metrics | None = None,
        may_write: Callable[[], bool] = lambda: True,
        notifier: Notifier | None = None,
        render_past: RenderPast | None = None,
        owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.kube = kube
        self.helm = helm
        self.options = options
        self.store = store
        self.live = live
        self.desired = desired
        self.events = events
        self.metrics = metrics or Metrics()
        self.may_write = may_write
        self.notifier = notifier
        self.render_past = render_past
        # A shard's: which apps are its own (cluster/shards.py). The others' statuses are
        # read afresh each pass (their dependants read them), never written or pruned.
        self.owns = owns
        self._owned: set[str] = set()  # the apps owned in the last pass
        self.statuses: dict[str, AppStatus] = {}
        # Statuses of this scope written before identities: claimed when rendered again.
        self._legacy: dict[str, AppStatus] = {}
        self._releases_checked: set[str] = set()  # releases whose owner was looked at
        self._flux = FluxInstallation(kube)  # read afresh each pass
        self._loaded = False
        self._apply_slots = asyncio.Semaphore(options.concurrency)
        self._helm_slots = asyncio.Semaphore(options.helm_concurrency)

    @property
    def drifted(self) -> asyncio.Queue[str]:
        """Apps whose objects drifted, as the watches saw it."""
        return self.desired.drifted

    async def close(self) -> None:
        await self.live.close()

    def _context(self, revision: str) -> ActionContext:
        return ActionContext(
            kube=self.kube,
            helm=self.helm,
            live=self.live,
            identity=self.options.identity,
            scope=self.options.scope,
            revision=revision,
            desired=self.desired,
            apply_slots=self._apply_slots,
            helm_slots=self._helm_slots,
            prune=self.options.prune,
            timeout=self.options.timeout,
            poll_interval=self.options.poll_interval,
            render_past=self.render_past,
        )

    # -- the pass ------------------------------------------------------------------

    async def run_pass(
        self,
        tree: EnvironmentTree,
        renderer: Renderer,
        *,
        revision: str,
        only: str | None = None,
        gate: GateCheck | None = None,
    ) -> PassResult:
        writes_before = self.kube.writes
        self._flux = FluxInstallation(self.kube)
        ctx = self._context(revision)
        await self._load()
        if not tree.expanded:
            await renderer.expand(tree)
        rendered: dict[str, RenderedApp | RenderError] = {}

        async def render(app: AppSource) -> None:
            try:
                rendered[app.name] = await renderer.render(app)
            except RenderError as error:
                rendered[app.name] = error
            except Exception as error:  # a bug or a failed fetch of one app's chart
                log.error("%s: render failed", app.name, exc_info=error, extra={"app": app.name})
                rendered[app.name] = RenderError(error_summary(error), file=app.path)

        apps = [a for a in tree.apps if (only is None or a.name == only) and self._is_own(a.name)]
        names = [a.name for a in apps]
        known = {a.name for a in tree.apps}
        await asyncio.gather(*(render(a) for a in apps))
        resolve_dependencies(rendered)
        verdict = GateVerdict()
        changed = self._changed(names, rendered)
        leaving = only is None and self.options.prune and bool(self._left(known))
        if gate is not None and (changed or leaving):
            verdict = await gate([r.source for r in changed], leaving)
        held = verdict.held
        done: dict[str, asyncio.Future[AppStatus]] = {
            n: asyncio.get_running_loop().create_future() for n in names
        }

        async def run(name: str) -> None:
            try:
                with writing_for(name):  # a shard's write guard asks whether it owns `name`
                    done[name].set_result(
                        await self._reconcile_one(
                            ctx,
                            name,
                            rendered[name],
                            done,
                            verdict.apps.get(name),
                            root=renderer.repo_root,
                            known=known,
                        )
                    )
            except asyncio.CancelledError:
                done[name].cancel()  # a dependant waiting on it is cancelled too
                raise
            except BaseException as error:
                done[name].set_exception(error)
                raise

        await asyncio.gather(*(run(n) for n in names))
        result = PassResult(
            revision=revision, statuses={n: done[n].result() for n in names}, held=held
        )
        render_failed = any(isinstance(r, RenderError) for r in rendered.values())
        if held is not None and only is None:
            log.info("revision %s waits for gate %s: %s", revision[:12], held.gate, held.message)
        elif only is None and self.options.prune and not render_failed:
            result.pruned_apps = await self._prune_missing_apps(ctx, known)
        elif only is None:
            missing = sorted(s.app for s in self._left(known))
            if missing:
                log.warning(
                    "not pruning apps missing from git (%s): a render failed", ", ".join(missing)
                )
        result.writes = self.kube.writes - writes_before
        self.metrics.writes.labels(self.options.scope).inc(result.writes)
        return result

    def _changed(
        self, names: list[str], rendered: dict[str, RenderedApp | RenderError]
    ) -> list[RenderedApp]:
        """Rendered apps whose content differs from what was last applied (not suspended)."""
        result = []
        for name in names:
            app = rendered[name]
            status = self.statuses.get(name)
            if not isinstance(app, RenderedApp) or app.suspend:
                continue
            if status is None or (app.fingerprint != status.fingerprint and not status.suspended):
                result.append(app)
        return result

    def _is_own(self, app: str) -> bool:
        return self.owns is None or self.owns(app)

    def _left(self, present: set[str]) -> list[AppStatus]:
        """The apps that left git and are this engine's to prune."""
        return [s for s in apps_left(self.statuses, present) if self._is_own(s.app)]

    async def _load(self) -> None:
        """Statuses from the cluster on the first pass; later passes only pick up what
        people change there (suspend/resume, adopt), one list call. A shard also takes
        afresh the statuses of the apps it did not own in its last pass: another shard
        wrote them (an app that comes to it starts from what its last owner recorded)."""
        if not self._loaded:
            await self.store.install()
        loaded, legacy = await self.store.load_environment(
            self.options.identity, scope=self.options.scope, with_legacy=not self._loaded
        )
        if not self._loaded:
            self.statuses = {n: s for n, s in loaded.items() if s.kind != SOURCE_KIND}
            self._legacy = {n: s for n, s in legacy.items() if s.kind != SOURCE_KIND}
            self._loaded = True
        if self.owns is not None:
            self._take_others(loaded)
        for name, stored in loaded.items():
            if name in self.statuses:
                self.statuses[name].suspended = stored.suspended
                self.statuses[name].adopt_from = stored.adopt_from
                self.statuses[name].generation = stored.generation

    def _take_others(self, loaded: dict[str, AppStatus]) -> None:
        for name in [n for n in self.statuses if n not in self._owned and n not in loaded]:
            del self.statuses[name]  # pruned by the shard that owned it
        for name, stored in loaded.items():
            if stored.kind != SOURCE_KIND and name not in self._owned:
                self.statuses[name] = stored
        owned = {name for name in self.statuses if self._is_own(name)}
        for name in self._owned - owned:
            self.desired.forget(name)  # its drift is its new owner's to correct
        self._owned = owned

    def _status_for(self, name: str) -> AppStatus:
        """The app's status: its own, a claimed one from before identities, or new."""
        status = self.statuses.get(name)
        if status is None:
            status = self._legacy.pop(name, None)
            if status is not None:
                log.info(
                    "%s: claiming its status, written before environment identities, for %s",
                    name,
                    self.options.identity.source,
                )
            else:
                status = AppStatus(scope=self.options.scope, app=name)
            self.store.stamp(status, self.options.identity)
            self.statuses[name] = status
        return status

    # -- one app ---------------------------------------------------------------------

    async def _reconcile_one(
        self,
        ctx: ActionContext,
        name: str,
        rendered: RenderedApp | RenderError,
        done: dict[str, asyncio.Future[AppStatus]],
        held: GateHold | None,
        *,
        root: Path,
        known: set[str],
    ) -> AppStatus:
        status = self._status_for(name)
        reported = dict(self.store.stored(status))  # what people saw before this pass
        started = time.monotonic()
        try:
            await self._reconcile_app(ctx, status, rendered, done, held, known=known)
            result = "success" if status.ready else "not-ready"
        except (
            ApiError,
            UnknownKindError,
            OutsideNamespacesError,
            OSError,
            httpx.HTTPError,
            HelmError,
        ) as error:
            # The cluster away or refusing (helm says so when even its history cannot be
            # read; a confined agent, for an object outside its namespaces): not this
            # content's fault, so not counted against its retries. A kind it does not
            # serve may come with a CRD later; the file and line say which.
            if isinstance(error, UnknownKindError) and isinstance(rendered, RenderedApp):
                error = rendered.located(error)
            log.warning("%s: %s", name, error, extra={"app": name})
            ctx.set(status, Reason.API_ERROR, error_summary(error), details=_details(error))
            result = "error"
        except NotLeaderError as error:
            # No longer this writer's to write (the Lease lost, or the app now another
            # shard's): its status is not ours to write either; its writer reports it.
            log.info("%s: left alone: %s", name, error, extra={"app": name})
            return status
        except Exception as error:  # a bug in one app's reconcile never stops the others
            log.error("%s: reconcile failed", name, exc_info=error, extra={"app": name})
            ctx.set(status, Reason.INTERNAL_ERROR, error_summary(error))
            result = "error"
        warning = (
            not status.ready
            and status.state != SUSPENDED
            and status.reason
            not in (
                Reason.DEPENDENCY_NOT_READY,
                Reason.GATE_CLOSED,
            )
        )
        source = rendered.source if isinstance(rendered, RenderedApp) else None
        await self._report(status, warning=warning, source=source, root=root, before=reported)
        if isinstance(rendered, RenderedApp):
            self.metrics.reconciles.labels(self.options.scope, name, result).inc()
            self.metrics.duration.labels(self.options.scope).observe(time.monotonic() - started)
            self.metrics.ready.labels(self.options.scope, name).set(1 if status.ready else 0)
        return status

    async def _observe(
        self,
        status: AppStatus,
        rendered: RenderedApp | RenderError,
        done: dict[str, asyncio.Future[AppStatus]],
        held: GateHold | None,
        *,
        known: set[str],
    ) -> Observation:
        """What determines the app's state before anything is looked up in the cluster.
        `known`: every app of the environment; a pass over one app reads the status of
        the others it depends on."""
        if isinstance(rendered, RenderError):
            return Observation(render_error=str(rendered))
        status.kind = rendered.source.kind
        missing = tuple(d for d in rendered.depends_on if d not in done and d not in known)
        not_ready = []
        for dependency in rendered.depends_on:
            if dependency in done:
                found: AppStatus | None = await asyncio.shield(done[dependency])
            else:
                found = self.statuses.get(dependency)
            if found is not None and not found.ready:
                not_ready.append(f"{dependency} ({found.reason})")
            elif found is None and dependency in known:
                not_ready.append(f"{dependency} (not reconciled yet)")
        new_content = rendered.fingerprint != status.fingerprint
        if new_content and status.failed_fingerprint != rendered.fingerprint:
            status.failures = 0
        retries = self.options.retries
        if rendered.helm is not None:
            spec = rendered.helm.spec
            retries = max(spec.upgrade_retries, spec.install_retries, retries)
        return Observation(
            dependencies_missing=missing,
            dependencies_not_ready=tuple(not_ready),
            suspended=status.suspended or rendered.suspend,
            held=held is not None,
            empty=rendered.empty,
            empty_allowed=rendered.name in self.options.allow_empty,
            has_inventory=bool(status.inventory),
            new_content=new_content,
            given_up=status.failed_fingerprint == rendered.fingerprint and status.failures > 0,
            drift_mode=rendered.drift,
            may_write=self.may_write(),
            retries=retries,
        )

    async def _desired(self, status: AppStatus, plan: AppPlan, *, new_content: bool) -> Desired:
        """The plan's objects and, when the app's content is unchanged, its release's (for
        drift), with their kinds watched."""
        desired = plan.desired
        if plan.helm is not None and not new_content:
            desired += await self._helm_objects(status, plan.app)
        for ref, _ in desired:
            await self.live.ensure(ref)
        return desired

    async def _reconcile_app(
        self,
        ctx: ActionContext,
        status: AppStatus,
        rendered: RenderedApp | RenderError,
        done: dict[str, asyncio.Future[AppStatus]],
        held: GateHold | None,
        *,
        known: set[str],
    ) -> None:
        seen = await self._observe(status, rendered, done, held, known=known)
        decision = determine_state(seen)
        if isinstance(rendered, RenderError):
            ctx.set(status, Reason.RENDER_FAILED, str(rendered))
            return
        app = rendered
        if decision.state is AppState.DEPENDENCY_MISSING:
            names = ", ".join(repr(d) for d in decision.detail)
            file, line = app.source.where()
            ctx.set(
                status,
                Reason.DEPENDENCY_NOT_FOUND,
                f"{file}{f':{line}' if line else ''}: depends on {names}, "
                "which is not in this environment",
            )
            return
        if decision.state is AppState.DEPENDENCY_NOT_READY:
            waiting = ", ".join(decision.detail)
            ctx.set(status, Reason.DEPENDENCY_NOT_READY, f"waiting for {waiting} to be Ready")
            return
        if decision.state is AppState.SUSPENDED:
            ctx.set(status, Reason.SUSPENDED, "reconciliation is suspended")
            return
        if decision.state is AppState.EMPTY_RENDER:
            ctx.set(
                status,
                Reason.EMPTY_RENDER,
                f"{app.source.path} rendered no objects; refusing to prune "
                f"{len(status.inventory)} objects (allow it with --allow-empty {app.name})",
            )
            return
        if decision.state is AppState.HELD and held is not None:
            await self._hold(ctx, status, app, seen, held)
            return
        # The plan phase: what this pass applies and prunes for the app, built as
        # `conveyor diff` builds it (reconcile/plan.py).
        plan = await ctx.plan(app, status)
        desired = await self._desired(status, plan, new_content=seen.new_content)
        conflicts = self._object_conflicts(status, app, plan.desired)
        release: ReleaseOwnership | None = None
        if app.helm is not None and (
            seen.new_content or release_key(app.helm.spec) not in self._releases_checked
        ):
            release = await self._find_release(app.helm)
        flux_refusal = await self._flux_refusal(app, desired, release)
        if app.helm is not None and release is not None:
            conflicts += await self._release_conflicts(
                status, app, app.helm, release, flux_refuses=flux_refusal is not None
            )
        marked = [ref for ref, _ in plan.desired if needs_takeover(self.live.get(ref))]
        seen = replace(
            seen,
            conflicts=tuple(conflicts),
            flux_reconciles=flux_refusal,
            flux_marked=tuple(str(ref) for ref in marked),
            drift=tuple(drift_of(self.live, desired)),
        )
        last_error: AppFailed | None = None
        while True:
            decision = determine_state(seen)
            state = decision.state
            if state is AppState.OWNERSHIP_CONFLICT:
                ctx.set(status, Reason.OWNERSHIP_CONFLICT, "; ".join(decision.detail))
                return
            if state is AppState.FLUX_STILL_MANAGES:
                ctx.set(status, Reason.FLUX_STILL_MANAGES, "; ".join(decision.detail))
                return
            if state is AppState.TAKE_OVER_FROM_FLUX:
                await take_over_from_flux(ctx, app.name, marked)
                # Applied as new content even if it was before: what kustomize-controller
                # set and git no longer has is conveyor's now, and goes with this apply.
                seen = replace(seen, flux_marked=(), new_content=True)
                continue
            if state is AppState.EXHAUSTED:
                return  # this exact content failed and was given up on: wait for new content
            if state is AppState.UNCHANGED:
                status.drift = None
                settle(ctx, status, app.name, desired, watched=watched(app, desired))
                return
            if state is AppState.DRIFT_REPORTED:
                if app.drift == "warn":
                    status.drift = "; ".join(decision.detail)[:1000]
                    settle(ctx, status, app.name, desired, watched=watched(app, desired))
                return
            if state is AppState.NOT_LEADER:
                ctx.set(status, Reason.NOT_LEADER, "another agent holds the lease")
                return
            if state is AppState.PENDING_RELEASE and app.helm is not None:
                unlocked = await unlock_release(ctx, app.name, app.helm)
                if unlocked:  # a release locked by a crash is no fault of this content
                    status.failures -= 1
                seen = replace(seen, unlocked=True, failures=seen.failures - unlocked)
                continue
            if state is AppState.NEEDS_ROLLBACK and last_error is not None:
                await self._give_up(ctx, status, app, last_error)
                return
            try:
                if seen.new_content:
                    await self._attempting(ctx, status)
                    await install_or_upgrade(ctx, status, plan)
                    record_applied(ctx, status, plan, corrected=[])
                else:
                    await correct_drift(ctx, status, plan, desired)
                    record_applied(ctx, status, plan, corrected=list(seen.drift))
                return
            except AppFailed as error:
                last_error = error
                status.failures += 1
                log.warning("%s: attempt %d failed: %s", app.name, seen.failures + 1, error)
                attempt = (
                    Attempt.RELEASE_LOCKED if isinstance(error, ReleaseLocked) else Attempt.FAILED
                )
                seen = replace(seen, attempt=attempt, failures=seen.failures + 1)

    async def _hold(
        self,
        ctx: ActionContext,
        status: AppStatus,
        app: RenderedApp,
        seen: Observation,
        held: GateHold,
    ) -> None:
        """New content waits for a gate: the app is held to what it last applied, and
        what drifted from that is put back (the watches then see that content)."""
        applied = await self._last_applied(ctx, status, app)
        seen = replace(seen, drift=tuple(drift_of(self.live, applied)))
        corrected: list[str] = []
        if determine_state(seen).state is AppState.HELD_DRIFTED:
            corrected = await correct_held_drift(ctx, app.name, applied)
        hold(ctx, status, held, corrected=corrected)

    async def _last_applied(
        self, ctx: ActionContext, status: AppStatus, app: RenderedApp
    ) -> Desired:
        """The objects of the content the app last applied, with their kinds watched:
        as remembered, or (after a restart) its last applied revision rendered again
        and its release's objects read from Helm. Empty when neither can be had."""
        applied = self.desired.by_app.get(app.name)
        if applied is None and status.last_applied_revision and self.render_past is not None:
            try:
                past = await self.render_past(app.name, status.last_applied_revision)
            except (RenderError, GitError, HelmError, OSError) as error:
                log.warning(
                    "%s: cannot render its applied revision %s to hold it there: %s",
                    app.name,
                    status.last_applied_revision[:12],
                    error,
                    extra={"app": app.name},
                )
                return []
            # The plan that content had, with its release's objects: what runs.
            applied = await self._desired(status, await ctx.plan(past, status), new_content=False)
        if not applied:
            return []
        for ref, _ in applied:
            await self.live.ensure(ref)
        self.desired.remember(app.name, applied)
        return applied

    async def _attempting(self, ctx: ActionContext, status: AppStatus) -> None:
        """Before new content is applied: an app whose status says Ready (at the revision
        it runs) says at once that a newer revision is being applied, so that neither a
        long rollout nor a crash in it leaves a Ready at the old revision unqualified."""
        if self.store.stored(status).get("state") != READY:
            return  # not Ready (or new): its status claims nothing of the old revision
        ctx.set(status, Reason.PROGRESSING, f"applying revision {ctx.revision[:12]}")
        try:
            await self.store.save(status)
        except (ApiError, httpx.HTTPError, OSError) as error:  # the report writes it again
            log.warning("%s: could not save its status: %s", status.app, error_summary(error))

    async def _give_up(
        self, ctx: ActionContext, status: AppStatus, app: RenderedApp, error: AppFailed
    ) -> None:
        """Retries are exhausted for this content: roll back to what last worked, and
        leave this content alone until a new revision."""
        status.failed_fingerprint = app.fingerprint
        message, details = str(error), error.details
        try:
            restored = await roll_back(ctx, status, app)
        except (
            AppFailed,
            GitError,
            HelmError,
            RenderError,
            ApiError,
            UnknownKindError,
            OSError,
        ) as failure:
            message += f"; rollback failed: {error_summary(failure)}"
            details = "\n\n".join(d for d in (details, _details(failure)) if d)
        else:
            if restored is not None:
                ctx.set(
                    status,
                    Reason.ROLLED_BACK,
                    f"{message}; rolled back to {restored} (retries exhausted for this "
                    "revision; a new revision is tried again)",
                    details=details,
                )
                return
        ctx.set(status, error.reason, message, details=details)

    # -- ownership ---------------------------------------------------------------------

    def _object_conflicts(self, status: AppStatus, app: RenderedApp, desired: Desired) -> list[str]:
        """Objects of the app that another environment owns, unless a takeover from that
        environment was asked for. Objects nobody owns yet (applied by hand, or by a
        conveyor from before identities) are claimed by applying them, logged once."""
        conflicts, unowned = [], 0
        for (ref, _), in_git in zip(desired, app.objects, strict=True):
            live = self.live.get(ref)
            if live is None:
                continue
            owner = foreign_owner(live, self.options.identity)
            if owner is None:
                unowned += owner_of(live) is None
            elif adoption_requested(in_git, owner, requested=status.adopt_from):
                log.warning("%s: taking %s over from %s, as asked", app.name, ref, owner.describe())
            else:
                conflicts.append(_conflict_message(f"{ref}", owner, app.name))
        if unowned and status.fingerprint is None:
            log.info(
                "%s: claiming %d existing objects that no environment owned", app.name, unowned
            )
        return conflicts

    async def _flux_refusal(
        self, app: RenderedApp, desired: Desired, release: ReleaseOwnership | None
    ) -> str | None:
        """Why Flux would still reconcile the app, if its controllers run: the Flux
        objects its live objects (or its release's) name, each there and not suspended.
        No API call for an app that carries none of Flux's marks."""
        managed: dict[FluxObject, list[str]] = {}
        for ref, _ in desired:
            origin = flux_origin(self.live.get(ref))
            if origin is not None:
                managed.setdefault(origin, []).append(str(ref))
        if release is not None and release.flux is not None and app.helm is not None:
            managed.setdefault(release.flux, []).append(
                f"Helm release {release_key(app.helm.spec)}"
            )
        if not managed:
            return None
        still = await self._flux.still_reconciling(managed)
        if not still:
            return None
        return flux_refusal_message({origin: managed[origin] for origin in still})

    async def _find_release(self, plan: HelmPlan) -> ReleaseOwnership:
        """The app's release in Helm's storage: where conveyor's helm keeps it (the target
        namespace), else where Flux's helm-controller kept it."""
        spec = plan.spec
        found = await release_ownership(
            self.kube, release=spec.release_name, namespace=spec.target_namespace
        )
        if found.exists or spec.flux_storage_namespace in (None, spec.target_namespace):
            return found
        kept = await release_ownership(
            self.kube, release=spec.release_name, namespace=spec.flux_storage_namespace
        )
        # Only helm-controller's own for this HelmRelease (its objects say so): another
        # release of that name there is someone else's, and conveyor never keeps one there.
        flux_release = FluxObject("HelmRelease", spec.namespace, spec.name)
        return kept if kept.owner is None and kept.flux == flux_release else found

    async def _release_conflicts(
        self,
        status: AppStatus,
        app: RenderedApp,
        plan: HelmPlan,
        ownership: ReleaseOwnership,
        *,
        flux_refuses: bool,
    ) -> list[str]:
        """The app's Helm release, if another environment installed it. A release that
        no environment owns (installed before identities, or by Flux's helm-controller)
        is stamped as this one's (its stored revisions moved first to the target
        namespace, where helm reads them, if Flux kept them elsewhere), unless Flux still
        reconciles it: then nothing of it changes and it is looked at again next pass."""
        spec = plan.spec
        key = release_key(plan.spec)
        if ownership.owner is not None and ownership.owner != self.options.identity.id:
            owner = Owner(ownership.owner, await self.store.source_of(ownership.owner))
            in_git = app.source.helm_release.obj if app.source.helm_release else {}
            if not adoption_requested(in_git, owner, requested=status.adopt_from):
                return [_conflict_message(f"Helm release {key}", owner, app.name)]
            log.warning(
                "%s: taking Helm release %s over from %s, as asked", app.name, key, owner.describe()
            )
        elif flux_refuses:
            return []
        elif ownership.exists and ownership.owner is None and self.may_write():
            origin = f"installed by Flux for {ownership.flux}" if ownership.flux else "unowned"
            log.info("%s: claiming Helm release %s (%s)", app.name, key, origin)
            if ownership.namespace != spec.target_namespace:
                moved = await move_release(
                    self.kube,
                    release=spec.release_name,
                    source=ownership.namespace,
                    target=spec.target_namespace,
                )
                log.info(
                    "%s: moved the %d stored revisions of Helm release %s from %s, where "
                    "Flux kept them, to %s, where helm reads them",
                    app.name,
                    moved,
                    key,
                    ownership.namespace,
                    spec.target_namespace,
                )
            await claim_release(
                self.kube,
                release=spec.release_name,
                namespace=spec.target_namespace,
                identity=self.options.identity,
            )
        self._releases_checked.add(key)
        return []

    async def _helm_objects(self, status: AppStatus, app: RenderedApp) -> Desired:
        """The release's objects for drift checks: remembered, or read once from Helm."""
        inventory = {x.key() for x in status.inventory}
        known = [
            (r, o)
            for r, o in self.desired.by_app.get(app.name, [])
            if o not in app.objects and r.key() not in inventory
        ]
        if known or not status.release:
            return known
        namespace, release = split_release(status.release)
        try:
            manifest = await self.helm.manifest(release, namespace)
        except HelmError:
            return []
        return await release_objects(self.kube, parse_manifest(manifest), namespace=namespace)

    # -- pruning whole apps ------------------------------------------------------------

    async def _prune_missing_apps(self, ctx: ActionContext, present: set[str]) -> list[str]:
        pruned = []
        for status in self._left(present):
            name = status.app
            if not self.may_write():
                break
            with writing_for(name):
                await prune_app(ctx, status)
                await self.events.record(
                    status,
                    warning=False,
                    reason="Pruned",
                    message=f"{name} left git; deleted its objects",
                )
                await self.store.delete(status)
            del self.statuses[name]
            pruned.append(name)
        return pruned

    # -- report --------------------------------------------------------------------------

    async def _report(
        self,
        status: AppStatus,
        *,
        warning: bool,
        source: AppSource | None = None,
        root: Path | None = None,
        before: dict[str, Any] | None = None,
    ) -> None:
        """Save the status if it changed; an Event and a notification when its state or
        applied revision changed since `before` (default: as stored)."""
        before = self.store.stored(status) if before is None else before
        changed_state = (before.get("state"), before.get("reason")) != (status.state, status.reason)
        newly_applied = before.get("lastAppliedRevision") != status.last_applied_revision
        try:
            if not await self.store.save(status):
                return
        except Exception as error:  # the apiserver away: one app's report never ends the pass
            # The store still holds what was written before, so a later pass writes it.
            log.warning("%s: could not save its status: %s", status.app, error_summary(error))
            return
        if changed_state:
            await self.events.record(
                status,
                warning=warning,
                reason=status.reason,
                message=status.message,
                details=status.details,
            )
        if (
            self.notifier is not None
            and self.notifier.has_rules
            and (changed_state or newly_applied)
        ):
            change = None
            if newly_applied and status.ready and source is not None and root is not None:
                change = await _change_of(root, source, status.attempted_revision)
            note = notification_for(
                status, identity=self.options.identity, newly_applied=newly_applied, change=change
            )
            if note is not None:
                self.notifier.publish(note)


async def _change_of(root: Path, source: AppSource, revision: str) -> LogEntry | None:
    """The commit that brought an app's content at `revision`, so that a promotion or a
    rollback (their commits say so) is announced as such; None when git cannot tell."""
    try:
        return await asyncio.to_thread(last_change, root, [source.path], revision=revision)
    except (GitError, OSError) as error:  # a notification never fails a reconcile
        log.debug("%s: no commit found for its content: %s", source.name, error)
        return None


def build_engine(
    kube: KubeClient,
    helm: HelmCLI,
    *,
    options: EngineOptions,
    metrics: Metrics | None = None,
    may_write: Callable[[], bool] = lambda: True,
    notifier: Notifier | None = None,
    render_past: RenderPast | None = None,
    owns: Callable[[str], bool] | None = None,
) -> Engine:
    """An engine with the usual parts: statuses in ConveyorApps, a watch cache that
    reports drift of what the engine applied, Events."""
    desired = DesiredObjects()
    return Engine(
        kube,
        helm,
        options=options,
        store=StatusStore(kube, writer=options.shard),
        live=LiveCache(kube, on_change=desired.on_change, namespaces=options.namespaces),
        desired=desired,
        events=EventRecorder(kube),
        metrics=metrics,
        may_write=may_write,
        notifier=notifier,
        render_past=render_past,
        owns=owns,
    )


def _conflict_message(what: str, owner: Owner, app: str) -> str:
    return (
        f"{what} belongs to environment {owner.describe()}; nothing of it was changed "
        f"(take it over with: conveyor adopt {app} --from {owner.id})"
    )
