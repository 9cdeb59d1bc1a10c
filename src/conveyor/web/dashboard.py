"""The dashboard's state, shared by the pages and the API: what they read and how they act.

Everything shown comes from the ConveyorApp status the CLI reads (watched once per
cluster, see `fleet.Fleet`), the live clusters, and the config repository; every action
goes through the action registry, which calls the same code as the CLI, against the
cluster of the environment it acts on, and records who acted.

A version is what promotion copies (`promote/versions.py`), read from git at the
revision an app runs; git is read off the pages' path (when a status changes, or in the
background), so a page is served from what is already known and never waits for git.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.ownership import EnvironmentIdentity, normalise_repository_url
from conveyor.config.project import ConfigError, Project
from conveyor.promote.pipeline import PromotionError
from conveyor.reconcile.once import plan_target
from conveyor.reconcile.report import EventRecorder
from conveyor.reconcile.status import SOURCE_KIND, WAITING_FOR_GATE, AppStatus, resource_name
from conveyor.reconcile.target import ClusterRef, Target
from conveyor.render.documents import RenderError
from conveyor.sandboxes.manifest import read_sandboxes
from conveyor.sandboxes.stage import cluster_states
from conveyor.source.git import GitError, mask_url
from conveyor.web import views
from conveyor.web.actions import ActionError, ActionRegistry, ActionRequest, ActionResult
from conveyor.web.actions import default_registry as default_actions
from conveyor.web.auth import Auth, Principal
from conveyor.web.fleet import Clients, Fleet, WatchedCluster, default_clients
from conveyor.web.repo import ConfigRepo, Repos, app_release_notes, built_from

log = logging.getLogger("conveyor.web")
audit = logging.getLogger("conveyor.audit")
ORDER_MAX_AGE = 30.0
JOURNEY_COMMITS = 20  # per environment: a version's way through the last few releases
HEAD_MAX_AGE = 10.0  # how stale the dashboard's own view of git's head may get


class NotFound(LookupError):
    """An unknown environment, app or action; the message says which and what exists."""


@dataclass(frozen=True)
class ServeOptions:
    listen: str = "127.0.0.1:8080"
    tokens: dict[str, str] | None = None  # token → name; None: read-only dashboard
    kubeconfig: str | None = None
    context: str | None = None
    repo: str | None = None
    branch: str | None = None


@dataclass(frozen=True)
class ClusterContext:
    """The ActionContext of one action: the dashboard, bound to the cluster of the
    environment acted on (so suspend writes there, and reconcile asks its agent)."""

    board: Dashboard
    cluster: WatchedCluster

    @property
    def kube(self) -> KubeClient:
        return self.cluster.kube

    async def target(self, environment: str) -> Target:
        return await self.board.target(environment)

    def background(self, key: str, work: Coroutine[Any, Any, None]) -> None:
        self.board.background(key, work)


class Dashboard:
    """The server's state: the clusters it reads, the config repository, the actions."""

    def __init__(
        self,
        options: ServeOptions,
        *,
        kube: KubeClient | None = None,
        actions: ActionRegistry | None = None,
        clients: Clients = default_clients,
    ) -> None:
        """`kube` is the default cluster's client (else made from the options)."""
        self.options = options
        self.auth = Auth(options.tokens)
        self.actions = actions or default_actions()
        self.fleet = Fleet(
            default=ClusterRef(options.kubeconfig, options.context),
            kube=kube,
            clients=clients,
            version_of=self.version_of,
        )
        self.repos = Repos(
            default=options.repo,
            branch=options.branch,
            kubeconfig=options.kubeconfig,
            context=options.context,
        )
        self._project: Project | None = None
        self._order_time = 0.0
        self._head_time = 0.0
        self._running: dict[str, asyncio.Task[None]] = {}
        self._diff_lock = asyncio.Lock()
        self._head_refresh: asyncio.Task[None] | None = None
        # Every change the hub publishes, counted: a rendered page stays valid until one.
        self._changes = self.fleet.subscribe()
        self._generation = 0
        self.rendered: OrderedDict[tuple[object, ...], str] = OrderedDict()  # pages.py's

    async def start(self) -> None:
        """Watch every environment's cluster (conveyor.yaml's, with --repo), else the
        default one."""
        await self.order()
        if not self.fleet.clusters:
            self.fleet.configure([])

    async def close(self) -> None:
        self.fleet.unsubscribe(self._changes)
        await self.fleet.close()
        if self._head_refresh is not None:
            self._head_refresh.cancel()
        for task in self._running.values():
            task.cancel()
        for task in self._running.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- reads ---------------------------------------------------------------------------

    async def statuses(self) -> list[AppStatus]:
        await self.fleet.settled()
        return self.fleet.snapshot()

    async def project(self) -> Project | None:
        """conveyor.yaml of `--repo`, read again every 30 s; None without `--repo`."""
        if self.options.repo and time.monotonic() - self._order_time > ORDER_MAX_AGE:
            self._order_time = time.monotonic()
            repo = self.repos.get(None)
            if repo is not None:
                try:
                    self._project = await repo.project()
                except (GitError, ConfigError) as error:
                    log.warning("environments unknown: %s", error)
                else:
                    self.fleet.configure(self._project.environments)
        return self._project

    async def order(self) -> list[str]:
        """Environments in conveyor.yaml's promotion order (when the repo is known),
        re-read now and then: the clusters watched follow the file."""
        project = await self.project()
        return [e.name for e in project.environments] if project else []

    async def matrix(self, *, only: list[str] | None = None) -> views.Matrix:
        """The matrix of every environment, or of those in `only` (names or `a,b` lists)."""
        statuses = await self.statuses()
        wanted = {name.strip() for value in only or [] for name in value.split(",")} - {""}
        if wanted:
            statuses = [s for s in statuses if s.scope in wanted]
        matrix = self.fleet.matrix(statuses, order=await self.order(), version=self.version)
        if wanted:  # an unreachable cluster's environments come without statuses
            matrix.environments = [e for e in matrix.environments if e.name in wanted]
        return matrix

    async def pipeline(self, *, only: list[str] | None = None) -> views.Pipeline:
        """The matrix in promotion order, with what waits to reach each cell."""
        grid = await self.matrix(only=only)
        self.refresh_head()
        return self._pipeline(grid, await self.statuses(), await self.project())

    def generation(self) -> tuple[object, ...]:
        """What the pages show depends on beyond the request: it changes with every
        status change the hub publishes (versions read from git included), git's head,
        the versions known and conveyor.yaml."""
        while True:
            try:
                change = self._changes.get_nowait()
            except asyncio.QueueEmpty:
                break
            self._generation += 1
            if change is None:  # fell behind (the hub dropped this queue): again
                self._changes = self.fleet.subscribe()
        repo = self.repos.get(None)
        known = (repo.head, repo.known_count) if repo is not None else None
        return (self._generation, known, id(self._project))

    def pipeline_row(self, app: str) -> views.Pipeline:
        """One app's row of the pipeline, from what is known now (for the live stream)."""
        statuses = [s for s in self.fleet.snapshot() if s.app == app or s.kind == SOURCE_KIND]
        order = [e.name for e in self._project.environments] if self._project else []
        grid = self.fleet.matrix(statuses, order=order, version=self.version)
        return self._pipeline(grid, statuses, self._project)

    def _pipeline(
        self, grid: views.Matrix, statuses: list[AppStatus], project: Project | None
    ) -> views.Pipeline:
        desired: dict[str, str] = {}
        held: dict[str, str] = {}
        repos: dict[str, ConfigRepo | None] = {}  # by scope: a page asks 720 times
        for status in statuses:
            if status.kind == SOURCE_KIND:
                continue
            if status.scope not in repos:
                repos[status.scope] = self.repos.get(self.source(status.scope))
            repo = repos[status.scope]
            if repo is None:
                continue
            if status.state == WAITING_FOR_GATE and status.attempted_revision:
                held[status.name] = self._release(repo, status, status.attempted_revision)
            revision = self._git_revision(repo, status, project)
            if revision:
                desired[status.name] = self._release(repo, status, revision)
        environments = project.environments if project else []
        return views.pipeline(
            grid,
            {s.name: s for s in statuses},
            order=[e.name for e in environments],
            desired=desired,
            held=held,
            approvals={e.name for e in environments if any(g.type == "approval" for g in e.gates)},
        )

    def _git_revision(
        self, repo: ConfigRepo, status: AppStatus, project: Project | None
    ) -> str | None:
        """The newest revision of git known for the app's environment: the dashboard's
        own fetch of its branch, once that has the revision the app runs (so it is not
        behind the cluster), else what the environment's writer last fetched."""
        source = self.source(status.scope)
        branch = next(
            (e.branch for e in (project.environments if project else []) if e.name == status.scope),
            source.branch if source else None,
        )
        applied = status.last_applied_revision
        if (
            repo.head
            and branch == repo.branch_name
            and applied
            and repo.known_releases(status.scope, applied) is not None
        ):
            return repo.head
        return source.attempted_revision if source and source.attempted_revision else None

    def _release(self, repo: ConfigRepo, status: AppStatus, revision: str) -> str:
        """The app's release version at `revision` if git was read there; else "" and
        git is read in the background for the next page."""
        known = repo.known_releases(status.scope, revision)
        if known is None:
            self._want(repo, status.scope, revision)
            return ""
        return known.get(status.app, "")

    def refresh_head(self) -> None:
        """Fetch the dashboard's clone in the background, at most every 10 s, so that a
        commit no writer has applied yet shows as git ahead of the cluster."""
        repo = self.repos.get(None)
        running = self._head_refresh is not None and not self._head_refresh.done()
        if repo is None or running or time.monotonic() - self._head_time < HEAD_MAX_AGE:
            return
        self._head_time = time.monotonic()

        async def fetch() -> None:
            try:
                await repo.checkout(max_age=HEAD_MAX_AGE)
            except (GitError, ConfigError, OSError) as error:
                log.warning("git head unknown: %s", error)

        self._head_refresh = asyncio.create_task(fetch())

    async def environment(self, name: str) -> list[AppStatus]:
        statuses = await self.statuses()
        found = [s for s in statuses if s.scope == name]
        if not found:
            known = sorted({s.scope for s in statuses})
            raise NotFound(
                f"unknown environment {name!r} (known: {', '.join(known) or 'none yet'})"
            )
        return found

    async def status(self, environment: str, app: str) -> AppStatus:
        statuses = await self.environment(environment)
        for status in statuses:
            if status.app == app and status.kind != SOURCE_KIND:
                return status
        known = sorted(s.app for s in statuses if s.kind != SOURCE_KIND)
        raise NotFound(
            f"unknown app {app!r} in environment {environment!r} "
            f"(known: {', '.join(known) or 'none'})"
        )

    async def version_of(self, kube: KubeClient, status: AppStatus) -> str:
        """For a cluster's hub, on each change of what an app runs: the image tags running now,
        shown until git's release versions at its revisions are read; those are asked
        for in the background (a cold read of a folder takes seconds, and the hub's
        watch must not wait), and the pages told when they are known."""
        repo = self.repos.get(self.source(status.scope))
        if repo is not None:
            for revision in {status.last_applied_revision, status.attempted_revision}:
                if revision:
                    self._want(repo, status.scope, revision)
        return await views.live_version(kube, status)

    def _want(self, repo: ConfigRepo, scope: str, revision: str) -> None:
        """Read the versions at `revision` unless known; then redraw the pages' `scope`."""

        def redraw() -> None:
            cluster = self.fleet.cluster_of(scope)
            if cluster is not None:
                cluster.hub.touch(resource_name(scope, ""))

        repo.request(scope, revision, then=redraw)

    def version(self, status: AppStatus) -> str:
        """The release the app runs: its version in git at the revision it runs (as
        promotion reads it), else the image tags running, else (nothing names a version)
        the revision."""
        repo = self.repos.get(self.source(status.scope))
        applied = status.last_applied_revision
        if repo is not None and applied:
            known = repo.known_releases(status.scope, applied)
            if known and known.get(status.app):
                return known[status.app]
        return self.fleet.version(status)

    def cluster(self, environment: str) -> WatchedCluster:
        """The cluster an environment's statuses are read from, where it is acted on."""
        cluster = self.fleet.cluster_of(environment)
        if cluster is None:
            why = self.fleet.unconfigured.get(environment, "none of the clusters read has it")
            raise ActionError(409, f"the cluster of {environment!r} is unknown: {why}")
        return cluster

    def kube_for(self, status: AppStatus) -> KubeClient:
        return self.cluster(status.scope).kube

    def cell(self, status: AppStatus, version: str) -> views.Cell:
        """An app's cell as the matrix shows it, stale mark included."""
        shaped = views.cell(status, version)
        cluster = self.fleet.cluster_of(status.scope)
        if cluster is not None and not cluster.hub.reachable:
            state = cluster.hub.state()
            shaped.stale = (
                f"cluster {cluster.name} unreachable; last read {state.last_read or 'never'}"
            )
        else:
            shaped.stale = views.stale_reason(status, self.source(status.scope))
        return shaped

    async def detail(self, status: AppStatus) -> views.AppDetail:
        return views.AppDetail(
            **self.cell(status, self.version(status)).model_dump(),
            release=status.release,
            inventory=[r.to_dict() for r in status.inventory],
            actions=[a.name for a in self.actions.for_app(status)],
        )

    async def shards(self, environment: str) -> list[views.ShardOut]:
        """The live shards of `environment` and the load each published; none when it
        runs unsharded."""
        statuses = await self.environment(environment)
        apps = [s.app for s in statuses if s.kind != SOURCE_KIND]
        kube = self.cluster(environment).kube
        return await views.environment_shards(kube, self.source(environment), apps)

    def source(self, environment: str) -> AppStatus | None:
        cluster = self.fleet.cluster_of(environment)
        return cluster.hub.statuses.get(resource_name(environment, "")) if cluster else None

    async def history(self, status: AppStatus) -> views.History:
        history = views.History(helm=await views.helm_history(self.kube_for(status), status))
        source = self.source(status.scope)
        repo = self.repos.get(source)
        if repo is None:
            history.notes.append(
                "git history needs the config repository: start `conveyor serve --repo URL`"
            )
            return history
        try:
            # The app's own revision first: the hub can hold an app's new status before
            # the source's, and the clone must reach at least the commit the app runs.
            wanted = status.attempted_revision or (source.attempted_revision if source else None)
            commits = await repo.history(status.scope, status.app, revision=wanted or None)
            pin = await repo.pin(status.scope, status.app, revision=wanted or None)
        except (GitError, ConfigError) as error:
            history.notes.append(f"git history unavailable: {error}")
            return history
        history.git = [views.GitCommit(**c.__dict__) for c in commits]
        if pin is not None:
            history.pin = views.PinOut(**pin.to_dict(), text=pin.describe())
        return history

    async def journey(self, app: str) -> views.Journey:
        """Where each version of `app` went and when: the commits to its files in each
        environment that has it, in promotion order."""
        order = await self.order()
        rank = {name: index for index, name in enumerate(order)}
        found = [s for s in await self.statuses() if s.app == app and s.kind != SOURCE_KIND]
        found.sort(key=lambda s: (rank.get(s.scope, len(rank)), s.scope))
        commits: dict[str, list[views.GitCommit]] = {}
        notes = []
        for status in found:
            source = self.source(status.scope)
            repo = self.repos.get(source)
            if repo is None:
                notes.append(f"{status.scope}: git history needs the config repository")
                continue
            wanted = status.attempted_revision or (source.attempted_revision if source else None)
            try:
                history = await repo.history(
                    status.scope, app, revision=wanted or None, limit=JOURNEY_COMMITS
                )
            except (GitError, ConfigError) as error:
                notes.append(f"{status.scope}: git history unavailable: {error}")
                continue
            commits[status.scope] = [views.GitCommit(**c.__dict__) for c in history]
        running = {s.scope: self.version(s) for s in found}
        return views.journey(app, commits, running=running, notes=notes)

    async def notes(self, app: str, *, base: str, head: str) -> views.Notes:
        """The release notes between the versions `base` and `head` run: the pull
        requests and commits of the app's repository between the commits their versions
        were built from (the publish commits that brought them name both)."""
        journey = await self.journey(app)
        notes = views.Notes(
            app=app,
            base=base,
            head=head,
            base_version=journey.running.get(base, ""),
            head_version=journey.running.get(head, ""),
        )
        built: dict[str, tuple[str, str]] = {}
        for row in journey.versions:
            for arrival in (a for found in row.arrivals.values() for a in found):
                source = built_from(arrival.subject)
                if source is not None and arrival.change == "publish":
                    built.setdefault(row.version, source)
        missing = [v for v in (notes.base_version, notes.head_version) if v not in built]
        if missing:
            notes.error = (
                f"no publish commit of {app} names the commit {missing[0] or 'its version'} "
                "was built from (`Update from <repository>/commit/<sha>`)"
            )
            return notes
        (base_repo, base_sha), (head_repo, head_sha) = (
            built[notes.base_version],
            built[notes.head_version],
        )
        if base_repo != head_repo:
            notes.error = (
                f"{notes.base_version} and {notes.head_version} come from two repositories"
            )
            return notes
        try:
            notes.text = await app_release_notes(head_repo, base_sha, head_sha)
        except (GitError, PromotionError) as error:
            notes.error = f"release notes unavailable: {mask_url(str(error))}"
        return notes

    async def diff(self, status: AppStatus) -> views.Diff:
        target = await self.target(status.scope)
        async with self._diff_lock:  # one clone for diffs: one diff at a time
            try:
                plans, title = await asyncio.to_thread(
                    asyncio.run, plan_target(target, app=status.app, purpose="web-diff")
                )
            except (GitError, ConfigError, RenderError, ApiError, OSError) as error:
                return views.Diff(title=status.scope, changes=[], error=str(error))
        changes = [
            views.Change(object=str(c.ref), action=c.action, diff=c.diff)
            for p in plans
            for c in p.changes
        ]
        errors = [p.error for p in plans if p.error]
        return views.Diff(title=title, changes=changes, error="; ".join(errors) or None)

    async def sandboxes(self) -> views.Sandboxes:
        """The staging sandboxes of the environment conveyor.yaml's `sandboxes.env` names,
        as its branch holds them, each app's state from its status."""
        for source in [s for s in await self.statuses() if s.kind == SOURCE_KIND]:
            identity = EnvironmentIdentity.parse(source.source or "") if source.source else None
            repo = self.repos.get(source)
            if identity is None or repo is None:
                continue
            if identity.repository != normalise_repository_url(repo.url):
                continue  # another repository's environment of the same name
            try:
                project = await repo.project()
                if project.sandboxes.env != identity.name:
                    continue
                # Fetched for each look: the page follows each extend or unstage at once.
                checkout = await repo.checkout(max_age=0)
                found = await asyncio.to_thread(read_sandboxes, checkout.path, identity.path)
            except (GitError, ConfigError) as error:
                return views.Sandboxes(environment=source.scope, error=str(error))
            await cluster_states(self.cluster(source.scope).kube, found)
            return views.sandboxes(source.scope, found, url=project.sandboxes.url)
        return views.Sandboxes(
            error="no environment here runs sandboxes (conveyor.yaml's sandboxes.env)"
        )

    # -- ActionContext -------------------------------------------------------------------

    async def target(self, environment: str) -> Target:
        source = self.source(environment)
        repo = self.repos.get(source)
        if repo is None:
            raise ActionError(
                409,
                f"the config repository of {environment!r} is unknown: start "
                "`conveyor serve --repo URL` or reconcile it once from the CLI",
            )
        identity = EnvironmentIdentity.parse(source.source or "") if source else None
        cluster = self.cluster(environment)
        try:
            target = await repo.target(environment, identity=identity)
        except (GitError, ConfigError) as error:
            raise ActionError(409, str(error)) from None
        # The cluster the environment was read from, which its one writer (the agent
        # there, asked through its status) runs in.
        return dataclasses.replace(
            target, kubeconfig=cluster.ref.kubeconfig, context=cluster.ref.context
        )

    def background(self, key: str, work: Coroutine[Any, Any, None]) -> None:
        running = self._running.get(key)
        if running is not None and not running.done():
            work.close()
            raise ActionError(409, f"{key.replace(':', ' of ', 1)} is already running")

        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("background action %s failed", key)

        self._running[key] = asyncio.create_task(guarded())

    # -- acting --------------------------------------------------------------------------

    async def act(
        self,
        name: str,
        principal: Principal,
        *,
        environment: str,
        app: str | None,
        reason: str | None = None,
        params: dict[str, str] | None = None,
    ) -> ActionResult:
        action = self.actions.get(name)
        if action is None:
            known = ", ".join(a.name for a in self.actions)
            raise NotFound(f"unknown action {name!r} (known: {known})")
        if app is None:
            await self.environment(environment)
            if "environment" not in action.scopes and "sandbox" not in action.scopes:
                raise ActionError(400, f"{name} acts on one app: name the app")
            subject = AppStatus(scope=environment, app="")
        else:
            subject = await self.status(environment, app)
            if "app" not in action.scopes:
                raise ActionError(400, f"{name} acts on a whole environment, not an app")
            if not action.when(subject):
                raise ActionError(409, f"{name} does not apply to {environment}/{app} now")
        request = ActionRequest(
            environment=environment,
            app=app,
            actor=principal.name,
            reason=reason,
            params=params or {},
        )
        try:
            cluster = self.cluster(environment)
            if not cluster.hub.reachable:
                state = cluster.hub.state()
                raise ActionError(
                    503,
                    f"the cluster of {environment!r}, {cluster.name}, is unreachable "
                    f"(last read {state.last_read or 'never'}: {state.error}); nothing was done",
                )
            result = await action.handler(ClusterContext(self, cluster), request)
        except ActionError as error:
            self._audit(principal, name, request, f"refused: {error}")
            raise
        self._audit(principal, name, request, result.message)
        because = f" ({reason})" if reason else ""
        await EventRecorder(cluster.kube, component="conveyor-dashboard").record(
            subject,
            warning=False,
            reason=f"{name.capitalize()}Requested",
            message=f"{result.message} by {principal.name} via {principal.via} "
            f"from {principal.remote}{because}",
        )
        return result

    def _audit(
        self, principal: Principal, action: str, request: ActionRequest, outcome: str
    ) -> None:
        audit.info(
            "%s %s on %s by %s via %s from %s: %s",
            "action",
            action,
            request.subject,
            principal.name,
            principal.via,
            principal.remote,
            outcome,
            extra={
                "actor": principal.name,
                "action": action,
                "scope": request.environment,
                "app": request.app or "",
                "remote": principal.remote,
            },
        )

    def refused(self, request_path: str, remote: str, why: str) -> None:
        audit.warning(
            "action refused on %s from %s: %s",
            request_path,
            remote,
            why,
            extra={"remote": remote, "action": request_path},
        )
