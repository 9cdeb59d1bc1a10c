"""The long-running agent: poll or get a webhook, fetch, reconcile, watch for drift.

One loop runs passes one at a time (a new revision, the interval, or drift in one app
trigger them), so apply order stays predictable. Only the holder of the environment's
Lease writes to the cluster; a standby agent keeps its caches warm and takes over when
the lease expires. A fetch that fails leaves the cluster exactly as it was. With a gate
check, a revision the environment's gates hold back waits, and is looked at again as
often as the closed gate asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from conveyor.cluster.client import ApiError
from conveyor.cluster.lease import LeaderElector
from conveyor.config.project import ConfigError
from conveyor.notify.notifier import Notifier, project_rules
from conveyor.reconcile.actions.hold import GateHold
from conveyor.reconcile.engine import Engine, EngineOptions, GateCheck, build_engine
from conveyor.reconcile.once import record_source_failure, source_fetched
from conveyor.reconcile.report import Metrics
from conveyor.reconcile.status import NAMESPACE, STALLED, StatusStore
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
from conveyor.render.discover import AppSource, EnvironmentTree
from conveyor.render.documents import RenderError
from conveyor.render.render import Renderer
from conveyor.source.git import GitError

log = logging.getLogger("conveyor.agent")

# The environment's gates for a fetched revision and the apps it would change.
AgentGate = Callable[[ResolvedTarget, list[AppSource]], Awaitable[GateHold | None]]


def verify_signature(secret: bytes, body: bytes, header: str | None) -> bool:
    """GitHub's X-Hub-Signature-256: `sha256=` + hex HMAC of the raw body."""
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header.removeprefix("sha256="))


@dataclass
class AgentOptions:
    interval: float = 60.0
    listen: str | None = None  # host:port for hooks, metrics and probes
    webhook_secret: bytes | None = None
    timeout: float = 300.0
    lease_duration: float = 15.0
    identity: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )


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

    # -- HTTP: webhook, metrics, probes ---------------------------------------------

    def http_app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            secret = self.options.webhook_secret
            if secret is None or not verify_signature(
                secret, body, request.headers.get("X-Hub-Signature-256")
            ):
                return JSONResponse({"error": "invalid or missing signature"}, status_code=401)
            self.trigger.set()
            return JSONResponse({"status": "reconcile scheduled"}, status_code=202)

        async def metrics(_request: Request) -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        async def healthz(_request: Request) -> Response:
            return PlainTextResponse("ok")

        async def readyz(_request: Request) -> Response:
            if self.ready:
                return PlainTextResponse("ok")
            return PlainTextResponse("not ready: first pass not done", status_code=503)

        return Starlette(
            routes=[
                Route("/hooks/git", hook, methods=["POST"]),
                Route("/metrics", metrics),
                Route("/healthz", healthz),
                Route("/readyz", readyz),
            ]
        )

    async def _serve(self) -> None:
        if not self.options.listen:
            return
        host, _, port = self.options.listen.rpartition(":")
        config = uvicorn.Config(
            self.http_app(),
            host=host or "127.0.0.1",
            port=int(port),
            log_level="warning",
            lifespan="off",
        )
        await uvicorn.Server(config).serve()

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        server = asyncio.create_task(self._serve())
        await self.notifier.start()
        try:
            resolved = await self._fetch()
            while resolved is None:
                await self._wait_trigger(self.options.interval)
                resolved = await self._fetch()
            kube = kube_client(resolved)
            lease_kube = kube_client(resolved)  # lease traffic apart from reconcile writes
            while True:  # the apiserver may still be starting: wait for it, do not exit
                try:
                    scope = await StatusStore(kube).scope_for(
                        resolved.identity, scope=resolved.scope
                    )
                    break
                except (ApiError, httpx.HTTPError, OSError) as error:
                    log.error("cannot reach the cluster yet: %s; retrying", error)
                    await asyncio.sleep(2.0)
            elector = LeaderElector(
                lease_kube,
                namespace=NAMESPACE,
                name=f"conveyor-{scope}"[:63],
                identity=self.options.identity,
                lease_duration=self.options.lease_duration,
                renew_interval=self.options.lease_duration / 3,
            )
            helm = helm_cli(resolved)
            engine = build_engine(
                kube,
                helm,
                options=EngineOptions(
                    scope=scope, identity=resolved.identity, timeout=self.options.timeout
                ),
                metrics=self.metrics,
                may_write=lambda: elector.is_leader,
                notifier=self.notifier,
                render_past=past_renders(resolved, kube, helm),
            )
            while True:  # the apiserver may still be starting: wait for it, do not exit
                try:
                    await engine.store.install()
                    break
                except (ApiError, httpx.HTTPError, OSError) as error:
                    log.error("cannot reach the cluster yet: %s; retrying", error)
                    await asyncio.sleep(2.0)
            try:
                await self._lead(elector, engine, resolved)
            finally:
                await engine.close()
                with contextlib.suppress(Exception):
                    await elector.release()
                await kube.aclose()
                await lease_kube.aclose()
        finally:
            await self.notifier.close(grace=2.0)
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server

    async def _lead(
        self, elector: LeaderElector, engine: Engine, resolved: ResolvedTarget | None
    ) -> None:
        while True:
            log.info("waiting to lead %s as %s", engine.options.scope, self.options.identity)
            await elector.acquire()
            log.info("leading %s", engine.options.scope)
            renewals = asyncio.create_task(elector.run_renewals())
            try:
                await self._loop(engine, elector, resolved)
            finally:
                renewals.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewals
            log.warning("lost the lease for %s; standing by", engine.options.scope)
            resolved = None

    async def _loop(
        self, engine: Engine, elector: LeaderElector, resolved: ResolvedTarget | None
    ) -> None:
        full_pass_due = True
        while elector.is_leader:
            if full_pass_due:
                resolved = resolved or await self._fetch()
                if resolved is not None:
                    try:
                        await self._pass(engine, resolved)
                    except (ApiError, httpx.HTTPError, OSError) as error:
                        # The apiserver went away mid-pass: nothing is lost, the next
                        # pass (soon) picks up where this one stopped.
                        log.error("pass interrupted: %s; retrying shortly", error)
                        full_pass_due, resolved = True, None
                        await asyncio.sleep(2.0)
                        continue
                resolved = None
            interval = self.options.interval
            if self.held is not None:
                interval = min(interval, self.held.retry_after)
            full_pass_due, drifted = await self._wait_trigger(
                interval, engine=engine, elector=elector
            )
            for app in drifted:
                if self._tree is not None and self._renderer is not None and elector.is_leader:
                    log.info("drift in %s; reconciling it", app, extra={"app": app})
                    await engine.run_pass(
                        self._tree,
                        self._renderer,
                        revision=self.last_revision or "",
                        only=app,
                        gate=self._gate_check(self._resolved),
                    )

    async def _wait_trigger(
        self, timeout: float, *, engine: Engine | None = None, elector: LeaderElector | None = None
    ) -> tuple[bool, list[str]]:
        """Wait for the interval, a webhook, or drifted apps. Returns whether a full pass
        is due, and the apps that drifted."""
        waiters: list[asyncio.Task[object]] = [asyncio.create_task(self.trigger.wait())]
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
        self.trigger.clear()
        return full_pass_due, sorted(set(drifted))

    def _gate_check(self, resolved: ResolvedTarget | None) -> GateCheck | None:
        gate = self.gate
        if gate is None or resolved is None:
            return None

        async def check(apps: list[AppSource]) -> GateHold | None:
            return await gate(resolved, apps)

        return check

    async def _fetch(self) -> ResolvedTarget | None:
        try:
            resolved = await asyncio.to_thread(fetch_target, self.target)
        except (GitError, ConfigError) as error:
            log.error("fetch failed; keeping everything as applied: %s", error)
            await record_source_failure(self.target, str(error), resolved=self._resolved)
            self.metrics.fetches.labels("error").inc()
            self.ready = True
            return None
        self.metrics.fetches.labels("ok").inc()
        self._resolved = resolved
        return resolved

    async def _pass(self, engine: Engine, resolved: ResolvedTarget) -> None:
        try:
            tree = discover_target(resolved)
        except RenderError as error:
            await record_source_failure(self.target, str(error), resolved=resolved)
            return
        started = time.monotonic()
        self.notifier.set_rules(project_rules(resolved.checkout.path))
        renderer = build_renderer(resolved, tree, engine.kube, engine.helm)
        result = await engine.run_pass(
            tree, renderer, revision=resolved.revision, gate=self._gate_check(resolved)
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
        await engine.store.save(source_fetched(self.target, resolved, scope=engine.options.scope))
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
