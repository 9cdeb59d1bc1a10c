"""The long-running agent: poll or get a webhook, fetch, reconcile, watch for drift.

One loop runs passes one at a time (a new revision, the interval, or drift in one app
trigger them), so apply order stays predictable. Only the holder of the environment's
Lease writes to the cluster; a standby agent keeps its caches warm and takes over when
the lease expires. A fetch that fails leaves the cluster exactly as it was. With a gate
check, a revision the environment's gates hold back waits, and is looked at again as
often as the closed gate asks.

The agent outlives every error of a pass: the apiserver going away, Helm or git failing,
a network error, a bug. The error is logged with its traceback, recorded on the source's
status (reason ReconcileFailed) and counted in `conveyor_pass_failures_total`; the pass is
tried again after an exponential backoff (capped), which a good pass resets. Only a
startup misconfiguration stops it, because no retry can fix it: the command line
(checked before `run`), and a kubeconfig or context that cannot be loaded
(`KubeconfigError` from `run`). A repository that cannot be fetched or a broken
conveyor.yaml are not: a push can mend them, so they are recorded (FetchFailed) and
fetched again at the poll interval.

On SIGTERM (`stop`: a Pod being stopped) the agent starts no new pass; the pass in
flight may finish for `shutdown_grace` seconds (20 s, under Kubernetes' default
terminationGracePeriodSeconds of 30), and is then abandoned: cancelled, which asks a
helm upgrade in flight to stop (helm marks the release failed, not pending; see
render/helm.py). Either way the Lease is released on the way out, so a standby takes
over within its retry interval (2 s) instead of waiting for the lease to expire.

With `shards` (agent --shards N, the chart's sharding), each replica holds a Lease of its
own and works on the apps it owns by consistent hashing over the live shard Leases
(cluster/shards.py): every write asks whether this shard owns that write's app under a
fresh view. Each shard prunes only its own apps; the source's status is written by the
shard that owns the environment's key; a request for one app is handled by that app's
owner (or, when it dies first, by the app's next owner); a request for all apps is run by
every shard, each recording its own outcome, and answered by the environment key's owner
once every live shard has answered (reconcile/requests.py `AnswerCollector`). A change
of the live set starts a pass, so a dead shard's apps are taken over once its Lease has
expired.

The leader also answers requests (`conveyor reconcile`, the dashboard, `promote --apply`
write one on the source's status, see reconcile/requests.py): it polls that one object
each second and runs the pass asked for, then records the request as handled. Every
write it makes, to the API or through helm, is checked against the lease first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from conveyor.cluster.client import KubeClient
from conveyor.cluster.lease import LeaderElector
from conveyor.cluster.lease_loop import LeaseLoop
from conveyor.cluster.objects import Obj
from conveyor.cluster.shards import (
    ENVIRONMENT_KEY,
    ShardSet,
    live_shards,
    writing_for,
    writing_own,
)
from conveyor.config.project import ConfigError
from conveyor.notify.notifier import Notifier, project_rules
from conveyor.reconcile.actions.hold import GateHold, GateVerdict
from conveyor.reconcile.engine import Engine, EngineOptions, GateCheck, PassResult, build_engine
from conveyor.reconcile.once import (
    record_source_failure,
    source_failed,
    source_fetched,
    store_source,
)
from conveyor.reconcile.report import Metrics, error_summary
from conveyor.reconcile.requests import (
    AnswerCollector,
    ReconcileRequest,
    ShardAnswer,
    environment_elector,
    pending_request,
    read_source,
    record_handled,
    record_shard_answer,
)
from conveyor.reconcile.status import NAMESPACE, STALLED, Reason, StatusStore
from conveyor.reconcile.target import (
    ResolvedTarget,
    Target,
    build_renderer,
    checkout_path,
    discover_target,
    fetch_target,
    helm_cli,
    kube_client,
    past_renders,
)
from conveyor.render.discover import AppSource, EnvironmentTree
from conveyor.render.documents import RenderError
from conveyor.render.render import Renderer
from conveyor.sandboxes.housekeeping import run_housekeeping
from conveyor.source.git import GitError
from conveyor.source.webhook import GitWebhook, ListenerLimits, listener_config

log = logging.getLogger("conveyor.agent")

SHARD_LABEL = "conveyor.dev/shard"  # on a Helm release's revisions: the shard that wrote it

# The environment's gates for a fetched revision, the apps it would change, and whether
# apps left git.
AgentGate = Callable[[ResolvedTarget, list[AppSource], bool], Awaitable[GateVerdict]]


# Seconds a pass in flight may take to finish after SIGTERM: Kubernetes kills the Pod 30 s
# after it (the default terminationGracePeriodSeconds); the rest is for helm to stop
# (render/helm.HELM_STOP_GRACE) and the Lease to be released.
SHUTDOWN_GRACE = 20.0


@dataclass
class Backoff:
    """How long to wait after failures in a row: `first`, doubled each time, at most `cap`."""

    first: float = 1.0
    cap: float = 30.0
    failures: int = 0

    def next_delay(self) -> float:
        delay = min(self.first * 2.0 ** min(self.failures, 32), self.cap)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


@dataclass
class AgentOptions:
    interval: float = 60.0
    listen: str | None = None  # host:port for hooks, metrics and probes
    webhook_secret: bytes | None = None
    timeout: float = 300.0
    lease_duration: float = 15.0
    backoff_first: float = 1.0  # after a failed pass; doubled while passes keep failing
    backoff_cap: float = 30.0
    request_poll: float = 1.0  # how often the leader looks for a reconcile request
    shutdown_grace: float = SHUTDOWN_GRACE  # for the pass in flight, after SIGTERM
    # Confined to these namespaces (the chart's namespaced RBAC): watches per namespace,
    # helm creates none. None: cluster-wide.
    namespaces: frozenset[str] | None = None
    # Replicas expected to share the environment's apps (agent --shards N); None: one
    # writer for the whole environment, elected through the environment's Lease.
    shards: int | None = None
    identity: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )


def _label_value(identity: str) -> str:
    """A shard identity as a label value (63 characters, alphanumeric at the ends)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in identity)[:63].strip("-_.")


class _Listener(uvicorn.Server):
    """uvicorn without its own signal handlers: SIGTERM is the agent's (`Agent.stop`),
    and the listener ends with the agent. uvicorn's would shut the listener (and so the
    probes) down at once, then raise the signal again on its way out, which would cut
    the grace of the pass in flight short."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


PROBE_TIMEOUT = 2.0  # seconds the readiness probe waits for the apiserver


class Agent:
    def __init__(
        self, target: Target, *, options: AgentOptions, gate: AgentGate | None = None
    ) -> None:
        self.target = target
        self.options = options
        self.gate = gate
        self.held: GateHold | None = None
        self.metrics = Metrics()
        self.notifier = Notifier(registry=self.metrics.registry)
        self.trigger = asyncio.Event()
        self.ready = False
        self.last_revision: str | None = None
        self.passes = 0
        self._tree: EnvironmentTree | None = None
        self._renderer: Renderer | None = None
        self._resolved: ResolvedTarget | None = None
        self._kube: KubeClient | None = None  # for the readiness probe's cluster check
        self._git_error: str | None = None  # the last fetch's, when git could not be reached
        self._backoff = Backoff(first=options.backoff_first, cap=options.backoff_cap)
        self._request: ReconcileRequest | None = None  # seen, not yet taken by a pass
        self._request_taken: ReconcileRequest | None = None  # the last one it ran
        self._answers = AnswerCollector()  # for a request for all apps among shards
        self._task: asyncio.Task[None] | None = None  # `run`, which `stop` ends
        self._stopping = False
        self._busy = False  # a pass in flight: what `stop` lets finish
        self._standing_by = False  # waiting for the Lease another replica holds
        # The writer, once the cluster is known: its engine (whose client every write
        # goes through, guarded by the lease) and its candidacy for the lease.
        self._engine: Engine | None = None
        self._elector: LeaderElector | None = None
        self._shards: ShardSet | None = None  # this replica's shard, when sharded

    # -- HTTP: webhook, metrics, probes ---------------------------------------------

    def http_app(self) -> Starlette:
        hook = GitWebhook(
            self.options.webhook_secret,
            on_push=self.trigger.set,
            tracked_branch=lambda: self._resolved.checkout.branch if self._resolved else None,
        )

        async def metrics(_request: Request) -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        async def healthz(_request: Request) -> Response:
            return PlainTextResponse("ok")

        async def readyz(_request: Request) -> Response:
            problem = await self.readiness()
            if problem is None:
                return PlainTextResponse("ok")
            return PlainTextResponse(f"not ready: {problem}", status_code=503)

        return Starlette(
            routes=[
                Route("/hooks/git", hook.receive, methods=["POST"]),
                Route("/metrics", metrics),
                Route("/healthz", healthz),
                Route("/readyz", readyz),
            ]
        )

    async def readiness(self) -> str | None:
        """Why the agent is not ready, or None. Ready means it can do its work: the first
        pass is done (or, for a standby, it is waiting for the Lease another replica holds),
        the last fetch reached git, and the cluster answers now (asked on each probe, so
        an apiserver that went away is seen at once). Liveness stays `ok` meanwhile:
        restarting the agent would mend neither. A standby counts as ready so that a
        Deployment of two replicas becomes available and rolls one Pod at a time."""
        if not self.ready and not self._standing_by:
            return "first pass not done"
        if self._git_error is not None:
            return f"git: {self._git_error}"
        if self._kube is None:
            return "no cluster client yet"
        try:
            await asyncio.wait_for(self._kube.request("GET", "/version"), timeout=PROBE_TIMEOUT)
        except Exception as error:  # away, refusing or slow: all mean not ready
            return f"cluster: {error_summary(error)}"
        return None

    async def _serve(self) -> None:
        if not self.options.listen:
            return
        config = listener_config(
            self.http_app(),
            self.options.listen,
            limits=ListenerLimits(concurrency=64),
            log_level="warning",
            lifespan="off",
        )
        await _Listener(config).serve()

    # -- the loop ---------------------------------------------------------------------

    def stop(self) -> None:
        """End `run` (the SIGTERM handler): at once when no pass is in flight or when
        asked a second time; else after the pass, or after `shutdown_grace` seconds
        (the pass is then cancelled). `run` releases the Lease on its way out."""
        task = self._task
        if task is None or task.done():
            return
        if self._busy and not self._stopping:
            self._stopping = True
            grace = self.options.shutdown_grace
            log.info("stopping: letting the pass in flight finish (at most %gs)", grace)
            asyncio.get_running_loop().call_later(grace, self._abandon)
            return
        self._stopping = True
        log.info("stopping")
        task.cancel()

    def _abandon(self) -> None:
        if self._busy and self._task is not None and not self._task.done():
            log.warning(
                "stopping: the pass did not finish within %gs; abandoning it",
                self.options.shutdown_grace,
            )
            self._task.cancel()

    @contextlib.contextmanager
    def _pass_in_flight(self) -> Iterator[None]:
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    async def run(self) -> None:
        self._task = asyncio.current_task()
        server = asyncio.create_task(self._serve())
        await self.notifier.start()
        try:
            resolved = await self._fetch()
            while resolved is None:
                await self._wait_trigger(self.options.interval)
                resolved = await self._fetch()
            kube = self._kube = kube_client(resolved)
            # Lease traffic apart from reconcile writes, and on a loop of its own so that
            # a pass over thousands of apps cannot hold back a renewal (cluster/lease_loop).
            lease_kube = kube_client(resolved)
            lease_loop = LeaseLoop()
            for client in (kube, lease_kube):
                client.identify(self.options.identity)
            while True:  # the apiserver may still be starting: wait for it, do not exit
                try:
                    scope = await StatusStore(kube).scope_for(
                        resolved.identity, scope=resolved.scope
                    )
                    break
                except Exception as error:  # away, or refusing (RBAC): both can be mended
                    await self._cluster_not_ready(error)
            shards = None
            if self.options.shards is not None:
                shards = ShardSet(
                    lease_kube,
                    namespace=NAMESPACE,
                    scope=scope,
                    environment=resolved.identity.id,
                    identity=self.options.identity,
                    lease_duration=self.options.lease_duration,
                    runner=lease_loop,
                )
                elector = shards.elector
            else:
                elector = environment_elector(
                    lease_kube,
                    scope,
                    identity=self.options.identity,
                    lease_duration=self.options.lease_duration,
                    runner=lease_loop,
                )
            helm = helm_cli(resolved, create_namespace=self.options.namespaces is None)
            if shards is not None:
                # Each revision of a release says which shard wrote it (helm history).
                helm.labels = {SHARD_LABEL: _label_value(self.options.identity)}
            engine = build_engine(
                kube,
                helm,
                options=EngineOptions(
                    scope=scope,
                    identity=resolved.identity,
                    timeout=self.options.timeout,
                    namespaces=self.options.namespaces,
                    shard=self.options.identity if shards else None,
                ),
                metrics=self.metrics,
                may_write=(lambda: shards.may_write) if shards else (lambda: elector.may_write),
                notifier=self.notifier,
                render_past=past_renders(resolved, kube, helm),
                owns=shards.owns if shards else None,
            )
            while True:  # the apiserver may still be starting: wait for it, do not exit
                try:
                    await engine.store.install()
                    break
                except Exception as error:  # as above
                    await self._cluster_not_ready(error)
            self._backoff.reset()
            # From here on, every write waits on the lease (installing came first: it is
            # idempotent, and a standby must not be refused it).
            guard = shards.write_budget if shards else elector.write_budget
            kube.write_guard = helm.write_guard = guard
            self._engine, self._elector, self._shards = engine, elector, shards
            try:
                await self._lead(elector, engine, resolved)
            finally:
                self._engine = self._elector = self._shards = None
                await engine.close()
                with contextlib.suppress(Exception):
                    await (shards.leave() if shards else elector.release())
                await kube.aclose()
                await lease_loop.run(lease_kube.aclose())
                lease_loop.close()
        finally:
            await self.notifier.close(grace=2.0)
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server

    async def _cluster_not_ready(self, error: Exception) -> None:
        delay = self._backoff.next_delay()
        log.error("cannot use the cluster yet: %s; retrying in %gs", error_summary(error), delay)
        await asyncio.sleep(delay)

    async def _lead(
        self, elector: LeaderElector, engine: Engine, resolved: ResolvedTarget | None
    ) -> None:
        while True:
            if self._shards is not None:
                await self._join(self._shards, engine)
                resolved = None
                if self._stopping:
                    return
                continue
            log.info("waiting to lead %s as %s", engine.options.scope, self.options.identity)
            try:
                await self._wait_for_no_shards(engine, elector)
                # One attempt first: only a Lease another replica holds makes this a standby.
                if not await elector.acquire(timeout=0):
                    self._standing_by = True
                    await elector.acquire()  # retries by itself while the apiserver is away
            except Exception as error:  # refused for good (RBAC): fixable without a restart
                await self._failed(engine.options.scope, error, what="taking the lease")
                continue
            finally:
                self._standing_by = False
            log.info("leading %s", engine.options.scope)
            renewals = asyncio.create_task(elector.run_renewals())
            requests = asyncio.create_task(self._watch_requests(engine))
            try:
                await self._loop(engine, elector, resolved)
            finally:
                for task in (renewals, requests):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self._stopping:
                log.info("pass finished; stopping")
                return
            log.warning("lost the lease for %s; standing by", engine.options.scope)
            resolved = None

    async def _join(self, shards: ShardSet, engine: Engine) -> None:
        """One term of a shard: take its own Lease, wait out the views older than it,
        then reconcile its apps until the Lease lapses or the agent stops."""
        scope = engine.options.scope
        try:
            await shards.join()
        except Exception as error:  # refused for good (RBAC): fixable without a restart
            await self._failed(scope, error, what="taking the shard's lease")
            return
        log.info("shard %s of %s: settling for %.1fs", shards.identity, scope, shards.settles_in())
        tasks = [
            asyncio.create_task(shards.elector.run_renewals()),
            asyncio.create_task(shards.run_refreshes()),
            asyncio.create_task(self._watch_requests(engine)),
        ]
        try:
            while (wait := shards.settles_in()) > 0 and shards.elector.is_leader:
                await asyncio.sleep(wait)
            log.info("shard %s of %s: reconciling its apps", shards.identity, scope)
            await self._loop(engine, shards.elector, None)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not self._stopping:
            log.warning("shard %s lost its lease; joining again", shards.identity)

    async def _wait_for_no_shards(self, engine: Engine, elector: LeaderElector) -> None:
        """An agent without --shards does not take the environment's Lease while shards
        of the environment are live (a rollout between the two modes): they write."""
        warned = False
        while await live_shards(
            engine.kube, namespace=NAMESPACE, environment=engine.options.identity.id
        ):
            if not warned:
                log.warning("shards of %s are live: standing by", engine.options.scope)
                warned = True
            self._standing_by = True
            await asyncio.sleep(elector.retry_interval)

    def _owns(self, key: str) -> bool:
        """Whether this agent writes for `key` (an app, or ENVIRONMENT_KEY): always
        when it is the environment's one writer, by the hash when it is a shard."""
        return self._shards is None or self._shards.owns(key)

    async def _loop(
        self, engine: Engine, elector: LeaderElector, resolved: ResolvedTarget | None
    ) -> None:
        full_pass_due = True
        while elector.is_leader and not self._stopping:
            request = None
            try:
                if full_pass_due:
                    request, self._request = self._request, None
                    if self._shards is not None:
                        self._shards.changed.clear()  # this pass sees the set as it is now
                    with self._pass_in_flight():
                        resolved = resolved or await self._fetch()
                        if resolved is None and request is not None:
                            await self._answer(
                                engine,
                                request,
                                source_failure="fetch failed: see the source's status",
                            )
                        if resolved is not None:
                            await self._pass(engine, resolved, request=request)
                            self._backoff.reset()
                    request = resolved = None
                    if self._stopping:
                        return
                interval = self.options.interval
                if self.held is not None:
                    interval = min(interval, self.held.retry_after)
                full_pass_due, drifted = await self._wait_trigger(
                    interval, engine=engine, elector=elector
                )
                with self._pass_in_flight():
                    await self._correct_drift(engine, elector, drifted)
            except Exception as error:  # the agent outlives any error of a pass
                # Nothing is lost: the next pass starts from a fresh fetch and picks up
                # where this one stopped, and answers the request this one could not
                # (unless the lease is gone: then the requester sees the holder change).
                self._request = self._request or request
                await self._failed(engine.options.scope, error, what="pass")
                full_pass_due, resolved = True, None

    async def _sandboxes(self, resolved: ResolvedTarget) -> ResolvedTarget:
        """As the writer of the sandboxes' environment: expire sandboxes and (auto mode)
        stage, restage and unstage them, each a commit (sandboxes/housekeeping.py); with
        a commit made, the pass runs on the revision it made. A failure is logged and the
        pass goes on with what git holds."""
        project, environment = resolved.project, resolved.environment
        if project is None or environment is None or project.sandboxes.env != environment.name:
            return resolved
        try:
            commits = await asyncio.to_thread(
                run_housekeeping,
                self.target.repo,
                checkout_path(self.target.repo, environment.branch, purpose="sandboxes"),
                env=environment.name,
                env_path=resolved.env_path,
                checkout_root=resolved.checkout.path,
                config=project.sandboxes,
            )
        except Exception as error:  # git away, a push race lost: the next pass tries again
            log.error("sandbox housekeeping failed: %s", error_summary(error))
            return resolved
        return (await self._fetch() or resolved) if commits else resolved

    async def _correct_drift(
        self, engine: Engine, elector: LeaderElector, drifted: list[str]
    ) -> None:
        for app in drifted:
            if self._stopping or not elector.is_leader:
                return
            if self._tree is not None and self._renderer is not None:
                log.info("drift in %s; reconciling it", app, extra={"app": app})
                await engine.run_pass(
                    self._tree,
                    self._renderer,
                    revision=self.last_revision or "",
                    only=app,
                    gate=self._gate_check(self._resolved),
                )

    async def _failed(self, scope: str, error: Exception, *, what: str) -> None:
        """Log the error with its traceback, count it, record it on the source's status
        (when the cluster answers) and wait out the backoff."""
        delay = self._backoff.next_delay()
        summary = error_summary(error)
        log.error(
            "%s failed: %s; retrying in %gs",
            what,
            summary,
            delay,
            exc_info=error,
            extra={"scope": scope},
        )
        self.metrics.pass_failures.labels(type(error).__name__).inc()
        await self._record_source_failure(
            f"{what} failed: {summary}", resolved=self._resolved, reason=Reason.RECONCILE_FAILED
        )
        await asyncio.sleep(delay)

    async def _record_source_failure(
        self, message: str, *, resolved: ResolvedTarget | None, reason: Reason
    ) -> None:
        """The failure on the source's status, written as every write is, by the Lease
        holder: while leading, through the engine's guarded client; before the agent has
        a cluster to lead (its first fetch failed), under the Lease taken for that write
        if it is free; while standing by, not at all (the leader records its own). When
        the cluster is what failed, only logged."""
        engine, elector = self._engine, self._elector
        try:
            if (engine is None or elector is None) and self.options.shards is not None:
                # Taking the environment's Lease for this write would write beside the
                # shards: the one that owns the environment's key records its own fetch.
                log.info("a shard: the failure is not recorded on the source's status")
            elif engine is None or elector is None:
                await record_source_failure(
                    self.target,
                    message,
                    writer=self.options.identity,
                    resolved=resolved,
                    reason=reason,
                    lease_duration=self.options.lease_duration,
                    progress=log.info,
                )
            elif not elector.may_write or not self._owns(ENVIRONMENT_KEY):
                log.info("standing by: the failure is not recorded on the source's status")
            else:
                options = engine.options
                failed = source_failed(
                    options.scope, message, identity=options.identity, reason=reason
                )
                await store_source(engine.store, failed)
        except Exception as error:  # recording is best effort: the agent goes on without it
            log.warning("could not record the failure on its status: %s", error_summary(error))

    async def _watch_requests(self, engine: Engine) -> None:
        """While leading: look at the source's status each `request_poll` seconds, and
        trigger a pass for a request not handled yet (the newest covers all before it)."""
        scope = engine.options.scope
        while True:
            try:
                source = await read_source(engine.kube, scope)
            except Exception as error:  # the apiserver away: the loop's own errors say so
                log.debug("cannot read reconcile requests: %s", error)
                source = None
            request = pending_request(source)
            # A shard runs a request for all apps, and one for an app it owns: also one
            # whose owner died before answering, once the app is this shard's.
            if (
                request is not None
                and request != self._request_taken
                and (request.app is None or self._owns(request.app))
            ):
                log.info("reconcile of %s requested", request.app or "all apps")
                self._request_taken = self._request = request
                self.trigger.set()
            if request is not None and request.app is None and self._shards is not None:
                await self._collect_answers(engine, self._shards, source, request)
            await asyncio.sleep(self.options.request_poll)

    async def _collect_answers(
        self, engine: Engine, shards: ShardSet, source: Obj | None, request: ReconcileRequest
    ) -> None:
        """Among shards: note who is live while a request for all apps waits, and, as the
        owner of the environment's key, answer it once every live shard has."""
        view = shards.view
        if view is None:
            return
        collected = self._answers.collect(source, request, live=view.live)
        if collected is None or not self._owns(ENVIRONMENT_KEY):
            return
        if collected.gone:
            log.warning(
                "reconcile of all apps: shard(s) %s died before answering",
                ", ".join(collected.gone),
            )
        try:
            with writing_for(ENVIRONMENT_KEY):
                await record_handled(
                    engine.kube,
                    engine.options.scope,
                    request,
                    by=self.options.identity,
                    revision="",
                    collected=collected,
                )
        except Exception as error:  # refused or away: the next poll answers it
            log.warning("cannot answer the reconcile request: %s", error_summary(error))

    async def _answer(
        self,
        engine: Engine,
        request: ReconcileRequest,
        *,
        result: PassResult | None = None,
        source_failure: str | None = None,
    ) -> None:
        """Record on the source's status that `request` was handled, and how it went.
        Among shards, the app's owner answers; for all apps each shard records its own
        outcome, which the environment key's owner sums up (`_collect_answers`)."""
        if self._shards is not None and request.app is None:
            answer = ShardAnswer(
                shard=self.options.identity,
                token=request.token,
                revision=result.revision if result else "",
                apps=len(result.statuses) if result else 0,
                writes=result.writes if result else 0,
                pruned_apps=result.pruned_apps if result else [],
                source_failure=source_failure,
            )
            with writing_own():
                await record_shard_answer(engine.kube, engine.options.scope, answer)
            return
        key = request.app or ENVIRONMENT_KEY
        if not self._owns(key):
            return
        with writing_for(key):
            await record_handled(
                engine.kube,
                engine.options.scope,
                request,
                by=self.options.identity,
                revision=result.revision if result else "",
                writes=result.writes if result else 0,
                pruned_apps=result.pruned_apps if result else [],
                source_failure=source_failure,
            )

    async def _wait_trigger(
        self, timeout: float, *, engine: Engine | None = None, elector: LeaderElector | None = None
    ) -> tuple[bool, list[str]]:
        """Wait for the interval, a webhook, or drifted apps. Returns whether a full pass
        is due, and the apps that drifted."""
        waiters: list[asyncio.Task[object]] = [asyncio.create_task(self.trigger.wait())]
        shards = self._shards
        if shards is not None:
            waiters.append(asyncio.create_task(shards.changed.wait()))
        if engine is not None:
            waiters.append(asyncio.create_task(engine.drifted.get()))
        if elector is not None:
            waiters.append(asyncio.create_task(elector.lost.wait()))
        done, pending = await asyncio.wait(
            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        drifted = [r for r in (t.result() for t in done) if isinstance(r, str)]
        if engine is not None and drifted:
            await asyncio.sleep(0.05)  # let a burst of watch events arrive together
            while not engine.drifted.empty():
                drifted.append(engine.drifted.get_nowait())
        full_pass_due = not done or self.trigger.is_set()
        if shards is not None and shards.changed.is_set():
            full_pass_due = True  # the apps this shard owns changed
        self.trigger.clear()
        return full_pass_due, sorted(set(drifted))

    def _publish_load(self, scope: str, shards: ShardSet, apps: int, seconds: float) -> None:
        shards.publish_load(apps=apps, pass_seconds=seconds)
        self.metrics.shard_apps.labels(scope, shards.identity).set(apps)
        self.metrics.shard_pass.labels(scope, shards.identity).set(seconds)
        if shards.view is not None:
            self.metrics.shards_live.labels(scope).set(len(shards.view.live))

    def _gate_check(self, resolved: ResolvedTarget | None) -> GateCheck | None:
        gate = self.gate
        if gate is None or resolved is None:
            return None

        async def check(apps: list[AppSource], removing: bool) -> GateVerdict:
            return await gate(resolved, apps, removing)

        return check

    async def _fetch(self) -> ResolvedTarget | None:
        try:
            resolved = await asyncio.to_thread(fetch_target, self.target)
        except Exception as error:  # GitError, ConfigError; anything else is a surprise
            expected = isinstance(error, GitError | ConfigError)
            log.error(
                "fetch failed; keeping everything as applied: %s",
                error,
                exc_info=None if expected else error,
            )
            await self._record_source_failure(
                str(error), resolved=self._resolved, reason=Reason.FETCH_FAILED
            )
            self.metrics.fetches.labels("error").inc()
            self._git_error = error_summary(error) if isinstance(error, GitError) else None
            self.ready = True
            return None
        self._git_error = None
        self.metrics.fetches.labels("ok").inc()
        self._resolved = resolved
        return resolved

    async def _pass(
        self, engine: Engine, resolved: ResolvedTarget, *, request: ReconcileRequest | None = None
    ) -> None:
        """A full pass, or the pass `request` asks for (which is then answered); sandbox
        housekeeping first, so that the pass applies what it committed."""
        resolved = await self._sandboxes(resolved)
        try:
            # In a thread: reading ten thousand apps' files takes long enough to starve
            # the Lease's renewals if the event loop did it.
            tree = await asyncio.to_thread(discover_target, resolved)
        except RenderError as error:
            await self._record_source_failure(
                str(error), resolved=resolved, reason=Reason.FETCH_FAILED
            )
            if request is not None:
                await self._answer(engine, request, source_failure=str(error))
            return
        started = time.monotonic()
        self.notifier.set_rules(project_rules(resolved.checkout.path))
        renderer = build_renderer(resolved, tree, engine.kube, engine.helm)
        result = await engine.run_pass(
            tree,
            renderer,
            revision=resolved.revision,
            gate=self._gate_check(resolved),
            only=request.app if request else None,
        )
        seconds = time.monotonic() - started
        self._tree, self._renderer = tree, renderer
        self.held = result.held
        if self.last_revision != resolved.revision:
            if self.last_revision is not None:
                self.metrics.revision.remove(engine.options.scope, self.last_revision)
            self.metrics.revision.labels(engine.options.scope, resolved.revision).set(1)
        self.last_revision = resolved.revision
        self.passes += 1
        if self._owns(ENVIRONMENT_KEY):
            await engine.store.save(
                source_fetched(
                    self.target,
                    resolved,
                    scope=engine.options.scope,
                    apps=[a.name for a in tree.apps],
                )
            )
        if self._shards is not None and request is None:
            self._publish_load(engine.options.scope, self._shards, len(result.statuses), seconds)
        if request is not None:
            await self._answer(engine, request, result=result)
        ready = sum(s.ready for s in result.statuses.values())
        stalled = [n for n, s in result.statuses.items() if s.state == STALLED]
        held = f", waiting for gate {result.held.gate}" if result.held else ""
        log.info(
            "pass done: %d/%d Ready, %d writes, %.3fs%s%s",
            ready,
            len(result.statuses),
            result.writes,
            seconds,
            f", stalled: {', '.join(stalled)}" if stalled else "",
            held,
            extra={"revision": resolved.revision, "scope": resolved.scope},
        )
        self.ready = True
