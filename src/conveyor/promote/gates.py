"""Checking an environment's gates before a version is written to it or applied there.

Every gate answers open or closed with a message that names what it saw (the queue and
its counts, the missing approval, the soak time left). Closed gates that time can open
(a queue draining, a soak running) are polled until their timeout; gates waiting cannot
open (no approval recorded, a queue that does not exist) fail at once. A gate that
cannot be checked is closed, never open.

Gates judge a change of release identity (`AppVersion.identity`: image tags, chart
version or ref). For the agent, each changed app is one of three kinds (`ChangeKind`):
a new release, judged by every gate of the environment; a rollback to a release the
environment ran (its status's history), judged only by the gates `rollback.gates` of
conveyor.yaml lists; or a change that keeps the release (replicas, an env var), judged
only by those `config-change.gates` lists.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.kubeconfig import KubeconfigError
from conveyor.cluster.ownership import EnvironmentIdentity
from conveyor.config.gates import (
    ApprovalGate,
    Gate,
    HealthyGate,
    HttpGate,
    QueueEmptyGate,
    SoakGate,
)
from conveyor.config.project import Environment, Project
from conveyor.paths import checkouts_cache
from conveyor.promote.approvals import approvers
from conveyor.promote.pipeline import Workspace, app_version_at
from conveyor.promote.versions import VersionError, read_app_version
from conveyor.reconcile.actions.hold import GateHold, GateVerdict
from conveyor.reconcile.agent import AgentGate
from conveyor.reconcile.status import READY, SOURCE_KIND, SUSPENDED, AppStatus, StatusStore
from conveyor.reconcile.target import ResolvedTarget, kube_client
from conveyor.render.discover import AppSource, scope_name

QUEUE_COUNTS = (
    ("ApproximateNumberOfMessages", "waiting"),
    ("ApproximateNumberOfMessagesNotVisible", "in flight"),
    ("ApproximateNumberOfMessagesDelayed", "delayed"),
)


@dataclass(frozen=True)
class GateResult:
    gate: str
    type: str
    open: bool
    message: str
    final: bool = False  # closed, and waiting cannot open it

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "type": self.type,
            "state": "open" if self.open else "closed",
            "message": self.message,
        }


KubeFactory = Callable[[Environment], KubeClient]
VersionAt = Callable[[Environment, str, str], str | None]


@dataclass
class GateContext:
    """What the gates of `environment` look at for one deployment."""

    project: Project
    environment: Environment
    versions: Mapping[str, str]  # app → the version about to be deployed
    approvals_root: Path  # a working tree of the environment's branch
    kube: KubeFactory  # a client for an environment's cluster
    version_at: VersionAt  # an app's version in an environment at a revision
    repository: str  # the config repo: environments are known by their source
    clock: Callable[[], float] = time.time

    def previous(self, name: str | None) -> Environment | None:
        if name is not None:
            return self.project.environment(name)
        return self.project.previous(self.environment)

    async def statuses(self, env: Environment) -> list[AppStatus]:
        """The environment's stored app statuses (its source status included)."""
        identity = EnvironmentIdentity.of(
            self.repository, branch=env.branch, path=env.path, name=scope_name(environment=env.name)
        )
        async with self.kube(env) as kube:
            return await StatusStore(kube).environment_statuses(identity)


async def check_gate(gate: Gate, ctx: GateContext) -> GateResult:
    try:
        if isinstance(gate, QueueEmptyGate):
            return await asyncio.to_thread(_check_queues, gate)
        if isinstance(gate, HttpGate):
            return await _check_http(gate)
        if isinstance(gate, ApprovalGate):
            return _check_approval(gate, ctx)
        if isinstance(gate, SoakGate):
            return await _check_soak(gate, ctx)
        return await _check_healthy(gate, ctx)
    except (ApiError, KubeconfigError, OSError, httpx.HTTPError) as error:
        return GateResult(gate.label, gate.type, False, f"cannot check: {error}")


async def check_gates(ctx: GateContext, gates: Sequence[Gate] | None = None) -> list[GateResult]:
    """Every gate of the environment (or `gates`), checked once."""
    return [await check_gate(g, ctx) for g in (ctx.environment.gates if gates is None else gates)]


async def wait_for_gates(
    ctx: GateContext,
    *,
    timeout: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[GateResult]:
    """Check until all gates are open at once, or a closed gate cannot open, or a closed
    gate's timeout (or `timeout`, for all) has passed. Returns the last results."""
    gates = ctx.environment.gates
    started = time.monotonic()
    while True:
        results = [await check_gate(g, ctx) for g in gates]
        closed = [(g, r) for g, r in zip(gates, results, strict=True) if not r.open]
        if not closed or any(r.final for _, r in closed):
            return results
        waited = time.monotonic() - started
        limits = [timeout if timeout is not None else g.timeout for g, _ in closed]
        if any(waited >= limit for limit in limits):
            return results
        pause = max(0.0, min(min(g.interval for g, _ in closed), min(limits) - waited))
        if progress is not None:
            for (_, result), limit in zip(closed, limits, strict=True):
                progress(
                    f"waiting on gate {result.gate}: closed ({result.message}); "
                    f"{_seconds(limit - waited)} left, next check in {_seconds(pause)}"
                )
        await asyncio.sleep(pause)


def _seconds(value: float) -> str:
    return f"{max(0, round(value))}s"


# -- queue-empty ---------------------------------------------------------------------


def sqs_endpoint(gate: QueueEmptyGate) -> str | None:
    return (
        gate.endpoint_url
        or os.environ.get("CONVEYOR_SQS_ENDPOINT")
        or os.environ.get("AWS_ENDPOINT_URL_SQS")
    )


def _check_queues(gate: QueueEmptyGate) -> GateResult:
    endpoint = sqs_endpoint(gate)
    busy: list[str] = []
    checked = 0
    config = BotoConfig(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=10)
    regions: list[str | None] = list(gate.regions) or [None]
    for region in regions:
        where = f" in {region}" if region else ""
        try:
            client = boto3.client("sqs", region_name=region, endpoint_url=endpoint, config=config)
        except NoRegionError:
            return _closed(gate, "no AWS region: set `regions` on the gate or AWS_DEFAULT_REGION")
        for queue in gate.queues:
            try:
                url = (
                    queue
                    if queue.startswith(("https://", "http://"))
                    else client.get_queue_url(QueueName=queue)["QueueUrl"]
                )
                attributes = client.get_queue_attributes(
                    QueueUrl=url, AttributeNames=[name for name, _ in QUEUE_COUNTS]
                )["Attributes"]
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if "NonExistentQueue" in code or "QueueDoesNotExist" in code:
                    return _closed(gate, f"queue {queue}{where} does not exist", final=True)
                return _closed(
                    gate, f"queue {queue}{where}: {error}", final=code.startswith("Access")
                )
            except NoCredentialsError:
                return _closed(gate, "no AWS credentials to read the queues", final=True)
            except BotoCoreError as error:
                return _closed(gate, f"queue {queue}{where}: {error}")
            counts = {label: int(attributes.get(name, 0)) for name, label in QUEUE_COUNTS}
            checked += 1
            total = sum(counts.values())
            if total:
                detail = ", ".join(f"{n} {label}" for label, n in counts.items())
                busy.append(f"queue {queue}{where} has {total} messages ({detail})")
    if busy:
        return _closed(gate, "; ".join(busy))
    where = ", ".join(gate.regions) if gate.regions else "the default region"
    return GateResult(gate.label, gate.type, True, f"{checked} queue(s) empty in {where}")


def _closed(gate: Gate, message: str, *, final: bool = False) -> GateResult:
    return GateResult(gate.label, gate.type, False, message, final)


# -- http ------------------------------------------------------------------------------


async def _check_http(gate: HttpGate) -> GateResult:
    async with httpx.AsyncClient(timeout=10.0) as client:
        response = await client.get(gate.url, headers=gate.headers)
    if response.status_code != gate.status:
        return _closed(
            gate, f"GET {gate.url} answered {response.status_code}, expected {gate.status}"
        )
    if gate.json_fields:
        try:
            body = response.json()
        except ValueError:
            return _closed(gate, f"GET {gate.url} did not answer JSON")
        for path, expected in gate.json_fields.items():
            actual = _lookup(body, path)
            if actual != expected:
                return _closed(gate, f"{gate.url}: {path} is {actual!r}, expected {expected!r}")
    return GateResult(
        gate.label, gate.type, True, f"GET {gate.url} answered {response.status_code}"
    )


def _lookup(body: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(body, dict):
            body = body.get(part)
        elif isinstance(body, list) and part.isdigit() and int(part) < len(body):
            body = body[int(part)]
        else:
            return None
    return body


# -- approval --------------------------------------------------------------------------


def _check_approval(gate: ApprovalGate, ctx: GateContext) -> GateResult:
    env = ctx.environment.name
    if not ctx.versions:
        return GateResult(gate.label, gate.type, True, "no version to approve")
    missing, granted = [], []
    for version in sorted(set(ctx.versions.values())):
        names = approvers(ctx.approvals_root, env, version)
        if gate.approvers:
            names = [n for n in names if n in gate.approvers]
        if len(names) < gate.count:
            have = f" (has {', '.join(names)})" if names else ""
            missing.append(f"{version} needs {gate.count} approval(s) for {env}{have}")
        else:
            granted.append(f"{version} approved by {', '.join(names)}")
    if missing:
        hint = "record one with `conveyor approve --env ENV --version V --by NAME`"
        return _closed(gate, f"{'; '.join(missing)}; {hint}", final=True)
    return GateResult(gate.label, gate.type, True, "; ".join(granted))


# -- soak and healthy ------------------------------------------------------------------


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def _minutes(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


async def _check_soak(gate: SoakGate, ctx: GateContext) -> GateResult:
    previous = ctx.previous(gate.environment)
    if previous is None:
        return _closed(gate, f"{ctx.environment.name} has no previous environment", final=True)
    statuses = {s.app: s for s in await ctx.statuses(previous)}
    waiting, soaked = [], []
    for app, version in sorted(ctx.versions.items()):
        status = statuses.get(app)
        if status is None:
            waiting.append(f"{app} is not reported in {previous.name}")
            continue
        there = (
            await asyncio.to_thread(ctx.version_at, previous, app, status.last_applied_revision)
            if status.last_applied_revision
            else None
        )
        since = _parse_time(status.last_applied_time)
        if there != version or since is None:
            waiting.append(f"{app} {version} is not applied in {previous.name} (has {there})")
        elif not status.ready:
            waiting.append(f"{app} {version} is {status.state} in {previous.name}")
        elif (age := ctx.clock() - since) < gate.duration:
            waiting.append(
                f"{app} {version} Ready in {previous.name} for {_minutes(age)} of "
                f"{_minutes(gate.duration)}"
            )
        else:
            soaked.append(f"{app} {version} Ready in {previous.name} for {_minutes(age)}")
    if waiting:
        return _closed(gate, "; ".join(waiting))
    return GateResult(gate.label, gate.type, True, "; ".join(soaked) or "nothing to soak")


async def _check_healthy(gate: HealthyGate, ctx: GateContext) -> GateResult:
    previous = ctx.previous(gate.environment)
    if previous is None:
        return _closed(gate, f"{ctx.environment.name} has no previous environment", final=True)
    statuses = await ctx.statuses(previous)
    apps = [s for s in statuses if s.kind != SOURCE_KIND]
    if not apps:
        return _closed(gate, f"no apps reported in {previous.name} (reconciled with --env?)")
    unready = [
        f"{s.app or 'source'} is {s.state} ({s.reason})"
        for s in statuses
        if s.state not in (READY, SUSPENDED)
    ]
    if unready:
        return _closed(gate, f"{previous.name}: {'; '.join(unready)}")
    return GateResult(gate.label, gate.type, True, f"{previous.name}: {len(apps)} apps Ready")


# -- for the agent ---------------------------------------------------------------------


class ChangeKind(StrEnum):
    """What an app's new content does to its release, compared with what its environment
    applied; it decides which gates judge it."""

    RELEASE = "new release"
    ROLLBACK = "rollback"
    CONFIG = "configuration change"


Identity = frozenset[tuple[str, str]]


def change_kind(
    current: Identity | None, ran: Sequence[str], identity_at: Callable[[str], Identity | None]
) -> ChangeKind:
    """The kind of change from the revisions the app ran (the one applied last first) to
    the release `current` (None: its version fields cannot be read, a new release)."""
    if current is None or not ran:
        return ChangeKind.RELEASE
    if identity_at(ran[0]) == current:
        return ChangeKind.CONFIG
    if any(identity_at(revision) == current for revision in ran[1:]):
        return ChangeKind.ROLLBACK
    return ChangeKind.RELEASE


def gates_for(kind: ChangeKind, env: Environment, project: Project) -> list[Gate]:
    """The environment's gates that judge a change of `kind`."""
    if kind is ChangeKind.RELEASE:
        return list(env.gates)
    chosen = project.rollback if kind is ChangeKind.ROLLBACK else project.config_change
    return [gate for gate in env.gates if chosen.selects(gate)]


def cluster_client(env: Environment) -> KubeClient:
    """A client for the environment's cluster, as conveyor.yaml names it."""
    return kube_client(kubeconfig_path=env.cluster.kubeconfig, context=env.cluster.context)


IDENTITY_CACHE = 4096  # (app, revision) identities an agent keeps; a revision never changes


def agent_gate(repo: str, *, kube: KubeFactory = cluster_client) -> AgentGate:
    """The agent's check before it applies new content: its environment's gates, checked
    once per pass (the agent's loop does the polling), for each kind of change apart."""
    identities: dict[tuple[str, str], Identity | None] = {}

    async def check(resolved: ResolvedTarget, apps: list[AppSource], removing: bool) -> GateVerdict:
        env, project = resolved.environment, resolved.project
        if env is None or project is None or not env.gates:
            return GateVerdict()
        key = hashlib.sha256(f"{repo}#{env.name}".encode()).hexdigest()[:16]
        cache = checkouts_cache("gates") / key
        root = resolved.checkout.path
        async with kube(env) as client:
            ran = {
                s.app: s.applied_revisions
                for s in await StatusStore(client).environment_statuses(resolved.identity)
                if s.kind != SOURCE_KIND
            }
        if len(identities) > IDENTITY_CACHE:
            identities.clear()

        def classify(app: AppSource) -> tuple[ChangeKind, str | None]:
            try:
                current = read_app_version(root, app)
            except VersionError:
                return ChangeKind.RELEASE, None

            def identity_at(revision: str) -> Identity | None:
                if (app.name, revision) not in identities:
                    past = app_version_at(root, resolved.env_path, app.name, revision)
                    identities[app.name, revision] = past.identity if past else None
                return identities[app.name, revision]

            kind = change_kind(current.identity, ran.get(app.name, []), identity_at)
            return kind, current.version

        by_kind: dict[ChangeKind, dict[str, str | None]] = {}
        for app in apps:
            kind, version = await asyncio.to_thread(classify, app)
            by_kind.setdefault(kind, {})[app.name] = version
        if removing:
            by_kind.setdefault(ChangeKind.RELEASE, {})  # removing apps: judged as a release
        held: dict[str, GateHold] = {}
        removal: GateHold | None = None
        for kind, versions in by_kind.items():
            gates = gates_for(kind, env, project)
            if not gates:
                continue
            context = GateContext(
                project=project,
                environment=env,
                versions={app: v for app, v in versions.items() if v},
                approvals_root=root,
                kube=kube,
                version_at=Workspace(repo, cache).version_at,
                repository=repo,
            )
            results = await check_gates(context, gates)
            closed = [(g, r) for g, r in zip(gates, results, strict=True) if not r.open]
            if not closed:
                continue
            what = "" if kind is ChangeKind.RELEASE else f"{kind.value} of {', '.join(versions)}: "
            hold = GateHold(
                gate=", ".join(r.gate for _, r in closed),
                message=what + "; ".join(r.message for _, r in closed),
                retry_after=min(g.interval for g, _ in closed),
            )
            held.update(dict.fromkeys(versions, hold))
            if kind is ChangeKind.RELEASE:
                removal = hold
        return GateVerdict(apps=held, removal=removal if removing else None)

    return check
