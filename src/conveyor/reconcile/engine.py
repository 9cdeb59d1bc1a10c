"""One reconcile pass over an environment, app by app, with the same phases for every
app: render → plan → apply → prune → verify → report.

Safety rules that the rest of conveyor relies on:
- nothing is pruned after a failed fetch or render, and an app whose render came out
  empty is not emptied unless that is explicitly allowed;
- an unchanged app (same fingerprint, no drift, healthy) costs no API write;
- every failure is reported per app; one broken app never stops the others;
- a failed Helm upgrade is retried, then rolled back to the last good revision; the
  failure count starts again with a new revision, so there is no dead end;
- with a gate check, apps whose content changed wait (WaitingForGate, nothing but their
  status written) until the environment's gates are open; drift is still corrected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from conveyor.cluster.apply import (
    ApplyError,
    apply_objects,
    delete_objects,
    labelled,
    namespaced_ref,
)
from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.health import Health, HealthStatus, aggregate, assess
from conveyor.cluster.helm_storage import (
    claim_release,
    release_ownership,
    unlock_pending_release,
)
from conveyor.cluster.live import LiveCache
from conveyor.cluster.objects import Obj, ObjectRef, drift_paths
from conveyor.cluster.ownership import (
    EnvironmentIdentity,
    Owner,
    adoption_requested,
    foreign_owner,
    owner_of,
)
from conveyor.notify.notifier import Notifier
from conveyor.reconcile.report import EventRecorder, Metrics, error_summary, notification_for
from conveyor.reconcile.status import (
    READY,
    SOURCE_KIND,
    SUSPENDED,
    AppStatus,
    Reason,
    StatusStore,
    now,
)
from conveyor.render.discover import AppSource, EnvironmentTree
from conveyor.render.documents import RenderError
from conveyor.render.helm import HelmCLI, HelmError, parse_manifest
from conveyor.render.render import HelmPlan, RenderedApp, Renderer
from conveyor.source.git import GitError

log = logging.getLogger("conveyor.reconcile")


@dataclass
class EngineOptions:
    scope: str  # this environment's prefix in the cluster (StatusStore.claim_scope)
    identity: EnvironmentIdentity  # what it owns
    timeout: float = 300.0  # health timeout for apps that do not set their own
    retries: int = 1  # extra attempts before an app is Stalled / rolled back
    prune: bool = True
    allow_empty: frozenset[str] = frozenset()
    concurrency: int = 16
    helm_concurrency: int = 4
    poll_interval: float = 0.5


@dataclass(frozen=True)
class GateHold:
    """A closed gate keeps new content out: which gate, why, and when to look again."""

    gate: str
    message: str
    retry_after: float


# Called with the apps whose content would change; None lets them through.
GateCheck = Callable[[list[AppSource]], Awaitable[GateHold | None]]

# Renders app NAME as it was at REVISION: a plain app's last good objects, to roll back to.
RenderPast = Callable[[str, str], Awaitable[RenderedApp]]


@dataclass
class PassResult:
    revision: str
    statuses: dict[str, AppStatus]
    pruned_apps: list[str] = field(default_factory=list)
    writes: int = 0
    held: GateHold | None = None

    @property
    def all_ready(self) -> bool:
        return all(s.ready for s in self.statuses.values())


class AppFailed(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class Engine:
    def __init__(
        self,
        kube: KubeClient,
        helm: HelmCLI,
        *,
        options: EngineOptions,
        metrics: Metrics | None = None,
        may_write: Callable[[], bool] = lambda: True,
        notifier: Notifier | None = None,
        render_past: RenderPast | None = None,
    ) -> None:
        self.kube = kube
        self.render_past = render_past
        self.helm = helm
        self.options = options
        self.live = LiveCache(kube, on_change=self._on_live_change)
        self.store = StatusStore(kube)
        self.events = EventRecorder(kube)
        self.metrics = metrics or Metrics()
        self.may_write = may_write
        self.notifier = notifier
        self.statuses: dict[str, AppStatus] = {}
        self.desired: dict[str, list[tuple[ObjectRef, Obj]]] = {}  # app → managed objects
        self._owner: dict[tuple[str, str, str, str], str] = {}
        # Statuses of this scope written before identities: claimed when rendered again.
        self._legacy: dict[str, AppStatus] = {}
        self._releases_checked: set[str] = set()  # releases whose owner was looked at
        self._loaded = False
        self._revision = ""
        self._apps = asyncio.Semaphore(options.concurrency)
        self._helm_slots = asyncio.Semaphore(options.helm_concurrency)
        self.drifted: asyncio.Queue[str] = asyncio.Queue()

    async def close(self) -> None:
        await self.live.close()

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
        self._revision = revision
        await self._load()
        rendered: dict[str, RenderedApp | RenderError] = {}

        async def render(app_name: str) -> None:
            app = next(a for a in tree.apps if a.name == app_name)
            try:
                rendered[app_name] = await renderer.render(app)
            except RenderError as error:
                rendered[app_name] = error
            except Exception as error:  # a bug or a failed fetch of one app's chart
                log.error("%s: render failed", app_name, exc_info=error, extra={"app": app_name})
                rendered[app_name] = RenderError(error_summary(error), file=app.path)

        names = [a.name for a in tree.apps if only is None or a.name == only]
        await asyncio.gather(*(render(n) for n in names))
        held: GateHold | None = None
        changed = self._changed(names, rendered)
        leaving = only is None and self.options.prune and bool(set(self.statuses) - set(names))
        if gate is not None and (changed or leaving):
            held = await gate([r.source for r in changed])
        done: dict[str, asyncio.Future[AppStatus]] = {
            n: asyncio.get_running_loop().create_future() for n in names
        }
        waiting = {r.name for r in changed} if held is not None else set()

        async def run(name: str) -> None:
            try:
                if name in waiting and held is not None:
                    status = await self._hold(name, rendered[name], held)
                else:
                    status = await self._reconcile_one(name, rendered[name], revision, done)
                done[name].set_result(status)
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
            result.pruned_apps = await self._prune_missing_apps(set(names))
        elif only is None:
            missing = sorted(set(self.statuses) - set(names))
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

    async def _hold(
        self, name: str, rendered: RenderedApp | RenderError, held: GateHold
    ) -> AppStatus:
        """Only the status changes: the app keeps running what it ran before."""
        status = self._status_for(name)
        if isinstance(rendered, RenderedApp):
            status.kind = rendered.source.kind
        self._set(
            status,
            Reason.GATE_CLOSED,
            f"revision {self._revision[:12]} waits for gate {held.gate}: {held.message}",
        )
        await self._report(status, warning=False)
        return status

    async def _load(self) -> None:
        """Statuses from the cluster on the first pass; later passes only pick up what
        users change there (suspend/resume), one list call."""
        if not self._loaded:
            await self.store.install()
        loaded, legacy = await self.store.load_environment(
            self.options.identity, scope=self.options.scope
        )
        if not self._loaded:
            self.statuses = {n: s for n, s in loaded.items() if s.kind != SOURCE_KIND}
            self._legacy = {n: s for n, s in legacy.items() if s.kind != SOURCE_KIND}
            self._loaded = True
        for name, stored in loaded.items():
            if name in self.statuses:
                self.statuses[name].suspended = stored.suspended
                self.statuses[name].adopt_from = stored.adopt_from
                self.statuses[name].generation = stored.generation

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

    async def _reconcile_one(
        self,
        name: str,
        rendered: RenderedApp | RenderError,
        revision: str,
        done: dict[str, asyncio.Future[AppStatus]],
    ) -> AppStatus:
        status = self._status_for(name)
        started = time.monotonic()
        if isinstance(rendered, RenderError):
            self._set(status, Reason.RENDER_FAILED, str(rendered))
            await self._report(status, warning=True)
            return status
        status.kind = rendered.source.kind
        for dependency in rendered.depends_on:
            if dependency not in done:
                self._set(
                    status,
                    Reason.DEPENDENCY_NOT_FOUND,
                    f"depends on {dependency!r}, which is not in this environment",
                )
                await self._report(status, warning=True)
                return status
            dependency_status = await asyncio.shield(done[dependency])
            if not dependency_status.ready:
                self._set(
                    status,
                    Reason.DEPENDENCY_NOT_READY,
                    f"waiting for {dependency} to be Ready ({dependency_status.reason})",
                )
                await self._report(status, warning=False)
                return status
        try:
            await self._reconcile_app(status, rendered)
            result = "success" if status.ready else "not-ready"
        except (ApiError, UnknownKindError, OSError, httpx.HTTPError, HelmError) as error:
            # The cluster away or refusing (helm says so when even its history cannot be
            # read): not this content's fault, so not counted against its retries.
            log.warning("%s: %s", name, error, extra={"app": name})
            self._set(status, Reason.API_ERROR, error_summary(error))
            result = "error"
        except Exception as error:  # a bug in one app's reconcile never stops the others
            log.error("%s: reconcile failed", name, exc_info=error, extra={"app": name})
            self._set(status, Reason.INTERNAL_ERROR, error_summary(error))
            result = "error"
        await self._report(status, warning=not status.ready and status.state != SUSPENDED)
        self.metrics.reconciles.labels(self.options.scope, name, result).inc()
        self.metrics.duration.labels(self.options.scope).observe(time.monotonic() - started)
        self.metrics.ready.labels(self.options.scope, name).set(1 if status.ready else 0)
        return status

    # -- one app ---------------------------------------------------------------------

    async def _reconcile_app(self, status: AppStatus, app: RenderedApp) -> None:
        if status.suspended or app.suspend:
            self._set(status, Reason.SUSPENDED, "reconciliation is suspended")
            return
        if app.empty and status.inventory and app.name not in self.options.allow_empty:
            self._set(
                status,
                Reason.EMPTY_RENDER,
                f"{app.source.path} rendered no objects; refusing to prune "
                f"{len(status.inventory)} objects (allow it with --allow-empty {app.name})",
            )
            return
        new_content = app.fingerprint != status.fingerprint
        if new_content and status.failed_fingerprint == app.fingerprint and status.failures:
            # This exact content failed before and was given up on: wait for a new revision.
            return
        if new_content and status.failed_fingerprint != app.fingerprint:
            status.failures = 0
        objects = self._labelled(app)
        desired = [(await namespaced_ref(self.kube, o), o) for o in objects]
        if app.helm is not None and not new_content:
            desired += await self._helm_objects(status, app)
        for ref, _ in desired:
            await self.live.ensure(ref.api_version, ref.kind)
        conflicts = self._object_conflicts(status, app, desired[: len(objects)])
        if app.helm is not None and (
            new_content or _release_key(app.helm) not in self._releases_checked
        ):
            conflicts += await self._release_conflicts(status, app, app.helm)
        if conflicts:
            self._set(status, Reason.OWNERSHIP_CONFLICT, "; ".join(conflicts))
            return
        drift = self._drift(desired)
        if not new_content and not drift:
            status.drift = None
            await self._settle(status, app, desired)
            return
        if not new_content and app.drift != "enabled":
            if app.drift == "warn":
                status.drift = "; ".join(drift)[:1000]
                await self._settle(status, app, desired)
            return
        if not self.may_write():
            self._set(status, Reason.NOT_LEADER, "another agent holds the lease")
            return
        await self._apply_with_remediation(status, app, objects, desired, drift, new_content)

    def _labelled(self, app: RenderedApp) -> list[Obj]:
        return [
            labelled(o, app=app.name, identity=self.options.identity, scope=self.options.scope)
            for o in app.objects
        ]

    def _object_conflicts(
        self, status: AppStatus, app: RenderedApp, desired: list[tuple[ObjectRef, Obj]]
    ) -> list[str]:
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

    async def _release_conflicts(
        self, status: AppStatus, app: RenderedApp, plan: HelmPlan
    ) -> list[str]:
        """The app's Helm release, if another environment installed it. A release that
        no environment owns (installed before identities) is stamped as this one's."""
        spec = plan.spec
        ownership = await release_ownership(
            self.kube, release=spec.release_name, namespace=spec.target_namespace
        )
        key = _release_key(plan)
        if ownership.owner is not None and ownership.owner != self.options.identity.id:
            owner = Owner(ownership.owner, await self.store.source_of(ownership.owner))
            in_git = app.source.helm_release.obj if app.source.helm_release else {}
            if not adoption_requested(in_git, owner, requested=status.adopt_from):
                return [_conflict_message(f"Helm release {key}", owner, app.name)]
            log.warning(
                "%s: taking Helm release %s over from %s, as asked", app.name, key, owner.describe()
            )
        elif ownership.exists and ownership.owner is None and self.may_write():
            log.info("%s: claiming Helm release %s, which no environment owned", app.name, key)
            await claim_release(
                self.kube,
                release=spec.release_name,
                namespace=spec.target_namespace,
                identity=self.options.identity,
            )
        self._releases_checked.add(key)
        return []

    async def _apply_with_remediation(
        self,
        status: AppStatus,
        app: RenderedApp,
        objects: list[Obj],
        desired: list[tuple[ObjectRef, Obj]],
        drift: list[str],
        new_content: bool,
    ) -> None:
        retries = self.options.retries
        if app.helm is not None:
            retries = max(app.helm.spec.upgrade_retries, app.helm.spec.install_retries, retries)
        last_error: AppFailed | None = None
        for attempt in range(retries + 1):
            try:
                # Bounded writes; waiting for health is not bounded, so that slow rollouts
                # never hold up the apply of other apps.
                async with self._apps:
                    desired = await self._apply(status, app, objects, desired, new_content)
                await self._verify(app, desired)
            except AppFailed as error:
                last_error = error
                status.failures += 1
                log.warning("%s: attempt %d failed: %s", app.name, attempt + 1, error)
                continue
            corrected = not new_content and drift
            status.fingerprint = app.fingerprint
            status.failures = 0
            status.failed_fingerprint = None
            status.drift = None
            if new_content or status.last_applied_time is None:
                # A drift correction puts the same content back: the version has run since
                # it was first applied, which is what soak gates count from.
                status.last_applied_time = now()
            status.last_applied_revision = status.attempted_revision
            # Helm owns its release's objects; the inventory holds what conveyor applied.
            status.inventory = sorted(ref for ref, obj in desired if obj in objects)
            if app.helm is not None:
                status.last_good_helm_revision = status.helm_revision
            if corrected:
                self._set(
                    status, Reason.DRIFT_CORRECTED, f"corrected drift in {'; '.join(drift)[:500]}"
                )
            else:
                self._set(
                    status,
                    Reason.SUCCEEDED,
                    f"applied revision {status.attempted_revision[:12]}",
                )
            return
        if last_error is None:  # retries >= 0 means at least one attempt was made
            raise RuntimeError("no reconcile attempt was made")
        status.failed_fingerprint = app.fingerprint
        message = str(last_error)
        try:
            restored = await self._roll_back(status, app)
        except (
            AppFailed,
            GitError,
            HelmError,
            RenderError,
            ApiError,
            UnknownKindError,
            OSError,
        ) as error:
            message += f"; rollback failed: {error}"
        else:
            if restored is not None:
                self._set(
                    status,
                    Reason.ROLLED_BACK,
                    f"{message}; rolled back to {restored} (retries exhausted for this "
                    "revision; a new revision is tried again)",
                )
                return
        self._set(status, last_error.reason, message)

    async def _roll_back(self, status: AppStatus, app: RenderedApp) -> str | None:
        """Put back what last worked: the last good Helm revision of a release, or the
        objects of the last good git revision of a plain app (applied, pruned and verified
        as a new revision would be). Returns what was restored; None if nothing to do."""
        if app.helm is not None:
            if not (
                app.helm.spec.rollback_on_failure
                and status.last_good_helm_revision
                and status.release
            ):
                return None
            namespace, release = status.release.split("/", 1)
            try:
                async with self._helm_slots:
                    await self.helm.rollback(
                        release,
                        namespace,
                        status.last_good_helm_revision,
                        timeout=app.helm.spec.timeout_seconds,
                    )
            except HelmError as error:
                raise AppFailed(Reason.ROLLBACK_FAILED, error.message) from None
            history = await self.helm.history(release, namespace)
            status.helm_revision = int(history[-1]["revision"]) if history else None
            self.desired.pop(app.name, None)
            return f"Helm revision {status.last_good_helm_revision}"
        good = status.last_applied_revision
        if self.render_past is None or not good or good == status.attempted_revision:
            return None
        previous = await self.render_past(app.name, good)
        if previous.empty:  # never prune a whole app on the way back
            raise AppFailed(Reason.ROLLBACK_FAILED, f"revision {good[:12]} renders no objects")
        objects = self._labelled(previous)
        desired = [(await namespaced_ref(self.kube, o), o) for o in objects]
        async with self._apps:
            desired = await self._apply(status, previous, objects, desired, True)
        await self._verify(previous, desired)
        return f"revision {good[:12]}"

    async def _apply(
        self,
        status: AppStatus,
        app: RenderedApp,
        objects: list[Obj],
        desired: list[tuple[ObjectRef, Obj]],
        new_content: bool,
    ) -> list[tuple[ObjectRef, Obj]]:
        self._set(status, Reason.PROGRESSING, f"applying revision {status.attempted_revision[:12]}")
        try:
            self.live.seed(await apply_objects(self.kube, objects))
        except ApplyError as error:
            raise AppFailed(Reason.APPLY_FAILED, str(error)) from None
        desired_refs = [ref for ref, _ in desired]
        if app.helm is None:
            if self.options.prune:
                gone = [
                    r for r in status.inventory if r.key() not in {d.key() for d in desired_refs}
                ]
                try:
                    await delete_objects(self.kube, gone, identity=self.options.identity)
                except ApplyError as error:
                    raise AppFailed(Reason.PRUNE_FAILED, str(error)) from None
            # Applied, healthy or not: a later revision or a rollback prunes from here.
            status.inventory = sorted(desired_refs)
            self._remember(app.name, desired)
            return desired
        plan = app.helm
        spec = plan.spec
        status.release = f"{spec.target_namespace}/{spec.release_name}"
        if not new_content:
            # Drift in a Helm release: put the drifted objects back with server-side apply,
            # without a new Helm revision.
            try:
                self.live.seed(
                    await apply_objects(self.kube, [o for _, o in desired if o not in objects])
                )
            except ApplyError as error:
                raise AppFailed(Reason.DRIFT_CORRECTION_FAILED, str(error)) from None
            return desired
        async with self._helm_slots:
            try:
                release = await self._upgrade_install(app.name, plan, status.attempted_revision)
            except HelmError as error:
                if not await self._refresh_helm_revision(status, spec):
                    # Helm cannot read the release either: the cluster is out of reach,
                    # which is no fault of this content. Not counted against its
                    # retries; the next pass tries again.
                    raise
                raise AppFailed(Reason.UPGRADE_FAILED, error.message) from None
        status.helm_revision = int(release.get("version", 0)) or None
        helm_desired = await self._refs_for(
            parse_manifest(release.get("manifest", "")), default_namespace=spec.target_namespace
        )
        full = [(r, o) for r, o in desired if o in objects] + helm_desired
        self._remember(app.name, full)
        return full

    async def _upgrade_install(self, app: str, plan: HelmPlan, revision: str) -> dict[str, Any]:
        spec = plan.spec

        async def upgrade_install() -> dict[str, Any]:
            return await self.helm.upgrade_install(
                spec.release_name,
                spec.target_namespace,
                plan.chart.path,
                plan.values,
                timeout=spec.timeout_seconds,
                description=f"conveyor {revision[:12]}",
                labels=self.options.identity.labels(),
            )

        try:
            return await upgrade_install()
        except HelmError as error:
            # A crash mid-operation leaves the release pending-*, and helm refuses it until
            # that revision is marked failed. Looked at only when helm says so, so that the
            # usual upgrade costs no extra API call.
            if "another operation" not in error.message or not await unlock_pending_release(
                self.kube, release=spec.release_name, namespace=spec.target_namespace
            ):
                raise
        log.warning(
            "%s: release was left pending by an interrupted operation; marked it failed "
            "to continue",
            app,
        )
        return await upgrade_install()

    async def _refresh_helm_revision(self, status: AppStatus, spec: Any) -> bool:
        """After a failed upgrade, the release's latest revision into `status`. False when
        helm cannot read the history either (logged, never raised): `helm_revision` then
        stays as it was."""
        try:
            history = await self.helm.history(spec.release_name, spec.target_namespace)
        except HelmError as error:
            log.warning("%s: cannot read the release history: %s", status.app, error.message)
            return False
        status.helm_revision = int(history[-1]["revision"]) if history else None
        return True

    async def _verify(self, app: RenderedApp, desired: list[tuple[ObjectRef, Obj]]) -> None:
        timeout = app.helm.spec.timeout_seconds if app.helm else self.options.timeout
        timeout = min(timeout, self.options.timeout)
        for ref, _ in desired:
            await self.live.ensure(ref.api_version, ref.kind)
        deadline = time.monotonic() + timeout
        while True:
            health = self._health(desired)
            if health.status is HealthStatus.CURRENT:
                return
            if health.status is HealthStatus.FAILED:
                raise AppFailed(Reason.HEALTH_CHECK_FAILED, health.message)
            if time.monotonic() > deadline:
                raise AppFailed(
                    Reason.HEALTH_CHECK_FAILED,
                    f"not healthy within {timeout:.0f}s: {health.message}",
                )
            await asyncio.sleep(self.options.poll_interval)

    async def _settle(
        self, status: AppStatus, app: RenderedApp, desired: list[tuple[ObjectRef, Obj]]
    ) -> None:
        """Unchanged app: only re-read health from the watch cache (no API call)."""
        health = self._health(desired)
        if health.status is HealthStatus.CURRENT:
            if status.drift:
                self._set(status, Reason.DRIFT_DETECTED, f"drift (warn only): {status.drift}")
            elif status.state != READY:
                applied = status.last_applied_revision or self._revision
                self._set(status, Reason.SUCCEEDED, f"applied revision {applied[:12]}")
        elif health.status is HealthStatus.FAILED:
            self._set(status, Reason.HEALTH_CHECK_FAILED, health.message)
        else:
            self._set(status, Reason.PROGRESSING, health.message)
        self._remember(app.name, desired)

    def _health(self, desired: list[tuple[ObjectRef, Obj]]) -> Health:
        results = []
        for ref, _ in desired:
            live = self.live.get(ref)
            results.append(
                (
                    str(ref),
                    assess(live)
                    if live is not None
                    else Health(HealthStatus.IN_PROGRESS, f"{ref} does not exist yet"),
                )
            )
        return aggregate(results)

    def _drift(self, desired: list[tuple[ObjectRef, Obj]]) -> list[str]:
        found = []
        for ref, obj in desired:
            live = self.live.get(ref)
            if live is None:
                found.append(f"{ref} is missing")
                continue
            paths = drift_paths(obj, live)
            if paths:
                found.append(f"{ref} {', '.join(paths[:5])}")
        return found

    async def _helm_objects(
        self, status: AppStatus, app: RenderedApp
    ) -> list[tuple[ObjectRef, Obj]]:
        """The release's objects for drift checks: remembered, or read once from Helm."""
        known = [
            (r, o)
            for r, o in self.desired.get(app.name, [])
            if o not in app.objects and r.key() not in {x.key() for x in status.inventory}
        ]
        if known or not status.release:
            return known
        namespace, release = status.release.split("/", 1)
        try:
            manifest = await self.helm.manifest(release, namespace)
        except HelmError:
            return []
        return await self._refs_for(parse_manifest(manifest), default_namespace=namespace)

    async def _refs_for(
        self, objects: list[Obj], *, default_namespace: str
    ) -> list[tuple[ObjectRef, Obj]]:
        """Helm leaves the namespace out of its manifest: it is the release's namespace.
        Set it, so that drift corrections go to the object Helm created."""
        result = []
        for obj in objects:
            ref = await namespaced_ref(self.kube, obj)
            if ref.namespace == "default" and not obj.get("metadata", {}).get("namespace"):
                ref = ObjectRef(ref.api_version, ref.kind, default_namespace, ref.name)
                obj = {**obj, "metadata": {**obj["metadata"], "namespace": default_namespace}}
            result.append((ref, obj))
        return result

    def _remember(self, app: str, desired: list[tuple[ObjectRef, Obj]]) -> None:
        self.desired[app] = desired
        for ref, _ in desired:
            self._owner[ref.key()] = app

    def _on_live_change(self, ref: ObjectRef, obj: Obj | None) -> None:
        """A watched object changed: if it belongs to an app and drifted, queue the app."""
        app = self._owner.get(ref.key())
        if app is None:
            return
        wanted = next((o for r, o in self.desired.get(app, []) if r.key() == ref.key()), None)
        if wanted is None:
            return
        if obj is None or drift_paths(wanted, obj):
            self.drifted.put_nowait(app)

    # -- pruning whole apps ------------------------------------------------------------

    async def _prune_missing_apps(self, present: set[str]) -> list[str]:
        pruned = []
        for name, status in list(self.statuses.items()):
            if name in present:
                continue
            if not self.may_write():
                break
            if status.release:
                namespace, release = status.release.split("/", 1)
                ownership = await release_ownership(self.kube, release=release, namespace=namespace)
                if ownership.owner in (None, self.options.identity.id):
                    await self.helm.uninstall(release, namespace)
                else:
                    log.warning(
                        "%s: not uninstalling Helm release %s: another environment owns it now",
                        name,
                        status.release,
                    )
            await delete_objects(self.kube, status.inventory, identity=self.options.identity)
            await self.events.record(
                status,
                warning=False,
                reason="Pruned",
                message=f"{name} left git; deleted its objects",
            )
            await self.store.delete(status)
            del self.statuses[name]
            self.desired.pop(name, None)
            pruned.append(name)
        return pruned

    # -- report --------------------------------------------------------------------------

    def _set(self, status: AppStatus, reason: Reason, message: str) -> None:
        # The revision moves with the app's state, not with every commit to the repo, so
        # a commit that does not touch an app writes nothing for it.
        status.attempted_revision = self._revision
        status.state = reason.state
        status.reason = reason
        status.message = message

    async def _report(self, status: AppStatus, *, warning: bool) -> None:
        before = self.store.stored(status)
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
                status, warning=warning, reason=status.reason, message=status.message
            )
        if self.notifier is not None and (changed_state or newly_applied):
            note = notification_for(status, newly_applied=newly_applied)
            if note is not None:
                self.notifier.publish(note)


def _release_key(plan: HelmPlan) -> str:
    return f"{plan.spec.target_namespace}/{plan.spec.release_name}"


def _conflict_message(what: str, owner: Owner, app: str) -> str:
    return (
        f"{what} belongs to environment {owner.describe()}; nothing of it was changed "
        f"(take it over with: conveyor adopt {app} --from {owner.id})"
    )
