"""What the dashboard and the API show, shaped once for both from the stored status and
the live cluster: the pipeline and the matrix, versions, objects with their health,
events, gates, and where each version went.

The models are the API's schema (camelCase, like `conveyor get apps -o json`); pages
render the same objects, so the two never disagree.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr
from pydantic.alias_generators import to_camel

from conveyor.cluster.client import ApiError, KubeClient, UnknownKindError
from conveyor.cluster.health import assess
from conveyor.cluster.helm_storage import ReleaseRevision, release_history
from conveyor.cluster.objects import ObjectRef
from conveyor.cluster.shards import ShardLoad, live_shards, shard_shares
from conveyor.images.reference import split_reference
from conveyor.reconcile.status import (
    API_VERSION,
    KIND,
    NAMESPACE,
    READY,
    SOURCE_KIND,
    STALLED,
    WAITING_FOR_GATE,
    AppStatus,
    split_release,
)
from conveyor.render.helm import parse_manifest
from conveyor.sandboxes.manifest import Sandbox

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class Cell(Model):
    environment: str
    app: str
    kind: str
    state: str
    reason: str
    message: str  # one line: the cause of a failure
    details: str | None = None  # a failure's full text, capped
    revision: str
    helm_revision: int | None = None
    version: str
    last_applied_time: str | None = None
    drift: str | None = None
    suspended: bool = False
    since: str
    # Why this cell may not be what runs now (its cluster is unreachable, or the last
    # pass of its environment had no such app); None: as read from a live cluster.
    stale: str | None = None
    shard: str | None = None  # the agent shard that wrote the status last (agent --shards)


class ClusterOut(Model):
    """A cluster the dashboard reads, and whether it answers."""

    name: str  # its kubeconfig context (`in-cluster` inside a Pod)
    reachable: bool
    last_read: str | None = None  # RFC 3339: the last good read of its statuses
    error: str | None = None  # why it is unreachable
    environments: list[str] = []  # conveyor.yaml's environments deployed there


class Environment(Model):
    name: str
    state: str
    reason: str
    message: str
    revision: str
    apps: int
    ready: int = 0
    cluster: str = ""  # ClusterOut.name; "" before the cluster is known
    reachable: bool = True  # False: the columns below are the last read, not live
    last_read: str | None = None


class ShardOut(Model):
    """A live shard of an environment split over agent replicas (agent --shards), and
    its load as it last published it on its Lease."""

    shard: str  # its identity, as `conveyor get apps` names it
    apps: int  # the apps it owns now, by hashing over the live shards
    last_pass_apps: int | None = None  # the apps its last pass reconciled
    pass_seconds: float | None = None  # how long that pass took


class Waiting(Model):
    """What would change the version a cell runs, and why it has not yet."""

    kind: str  # previous (a newer version there) | gate (closed) | git (ahead of the cluster)
    version: str  # the version waiting; "" when unknown
    message: str  # one line: `staging runs 1.5.0`, the gate's message, `git has 1.5.0`
    environment: str | None = None  # for `previous`: the environment it runs in


class PipelineCell(Cell):
    waiting: list[Waiting] = []
    promote_from: str | None = None  # promote applies: copy from this environment
    approve_version: str | None = None  # approve applies: the version a gate holds
    diff: bool = False  # git differs from the cluster: the diff has something to show


CellT = TypeVar("CellT", bound=Cell)


class Grid(Model, Generic[CellT]):
    environments: list[Environment]
    apps: list[str]
    cells: list[CellT]
    clusters: list[ClusterOut] = []
    _index: dict[tuple[str, str], CellT] | None = PrivateAttr(None)

    def cell(self, environment: str, app: str) -> CellT | None:
        if self._index is None:  # pages look up every cell: 720 and more
            self._index = {(c.environment, c.app): c for c in self.cells}
        return self._index.get((environment, app))


class Matrix(Grid[Cell]):
    """Environments by apps, as they are."""


class Pipeline(Grid[PipelineCell]):
    """Environments in promotion order by apps, with what waits to reach each cell."""


class ObjectOut(Model):
    api_version: str
    kind: str
    namespace: str
    name: str
    managed_by: str  # conveyor | helm
    health: str  # Current | InProgress | Failed | Missing
    message: str


class AppDetail(Cell):
    release: str | None = None
    inventory: list[dict[str, str]] = []
    actions: list[str] = []


class EventOut(Model):
    type: str
    reason: str
    message: str  # its first line: the cause
    details: str | None = None  # the full text recorded after it
    time: str
    count: int
    component: str


class GitCommit(Model):
    sha: str
    date: str
    author: str
    subject: str
    change: str
    version: str


class HelmRevision(Model):
    revision: int
    status: str
    description: str
    updated: str
    chart: str
    app_version: str
    version: str


class PinOut(Model):
    """A rollback's hold against image automation, as the app's files carry it."""

    by: str | None = None
    reason: str | None = None
    at: str | None = None
    annotation: str
    text: str  # `pinned by alice: ...`, as `images scan` shows it


class History(Model):
    git: list[GitCommit] = []
    helm: list[HelmRevision] = []
    notes: list[str] = []
    pin: PinOut | None = None


class Arrival(Model):
    """A commit that brought a version to an environment."""

    sha: str
    date: str
    change: str  # publish | image-automation | promotion | rollback | manual
    author: str
    subject: str


class JourneyRow(Model):
    version: str
    arrivals: dict[str, list[Arrival]]  # environment → its arrivals there, newest first


class Journey(Model):
    """Where each version of an app went and when, per environment, newest first."""

    app: str
    environments: list[str]
    running: dict[str, str]  # environment → the version it runs
    versions: list[JourneyRow]
    notes: list[str] = []


class Notes(Model):
    """`conveyor notes` between the versions two environments run."""

    app: str
    base: str  # the environment whose version the notes start from
    head: str
    base_version: str
    head_version: str
    text: str = ""  # markdown
    error: str | None = None


class Change(Model):
    object: str
    action: str
    diff: str


class Diff(Model):
    title: str
    changes: list[Change]
    error: str | None = None


class Gate(Model):
    environment: str
    app: str
    reason: str
    message: str
    revision: str
    since: str


# -- versions -----------------------------------------------------------------------


def images_in(value: Any) -> list[str]:
    """Every image named in an object: container `image:` strings and Helm-style
    `image: {repository, tag}` values, in order of appearance."""
    found: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "image" and isinstance(item, str):
                found.append(item)
            elif key == "image" and isinstance(item, dict) and item.get("tag") is not None:
                found.append(f"{item.get('repository', '')}:{item['tag']}")
            else:
                found.extend(images_in(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(images_in(item))
    return found


def tags_of(images: list[str]) -> list[str]:
    """The tags (or digests) of image references, de-duplicated in order."""
    tags = []
    for image in images:
        _, tag, digest = split_reference(image)
        if digest is not None:
            tags.append(digest[:19])
        else:
            tags.append(tag if tag is not None else "latest")
    return list(dict.fromkeys(tags))


async def live_version(kube: KubeClient, status: AppStatus) -> str:
    """The image tags running now: the app's workloads, else its Helm release's
    workloads (or chart appVersion); the git revision when there is neither."""
    tags: list[str] = []
    for ref in status.inventory:
        if ref.kind in WORKLOADS:
            live = await kube.get(
                ref.api_version, ref.kind, ref.name, namespace=ref.namespace or None
            )
            if live is not None:
                tags.extend(tags_of(images_in(live.get("spec"))))
    if not tags and status.release:
        namespace, name = split_release(status.release)
        history = await release_history(kube, release=name, namespace=namespace)
        deployed = [r for r in history if r.status == "deployed"] or history
        if deployed:
            tags = _release_tags(deployed[-1]) or [deployed[-1].app_version]
    tags = [t for t in dict.fromkeys(tags) if t]
    return ", ".join(tags) if tags else (status.last_applied_revision or "")[:12]


def _release_tags(revision: ReleaseRevision) -> list[str]:
    images: list[str] = []
    for obj in parse_manifest(revision.manifest):
        if obj.get("kind") in WORKLOADS:
            images.extend(images_in(obj.get("spec")))
    return tags_of(images)


# -- shaping statuses ----------------------------------------------------------------


def shards(loads: list[ShardLoad], apps: list[str]) -> list[ShardOut]:
    """Each live shard with the apps it owns now among `apps` and its published load."""
    return [
        ShardOut(
            shard=share.load.identity,
            apps=share.owned,
            last_pass_apps=share.load.apps,
            pass_seconds=share.load.pass_seconds,
        )
        for share in shard_shares(loads, apps)
    ]


async def environment_shards(
    kube: KubeClient, source: AppStatus | None, apps: list[str]
) -> list[ShardOut]:
    """The live shards of the environment whose source status is `source` (none when
    it runs unsharded, or before its first pass)."""
    if source is None or not source.owner:
        return []
    loads = await live_shards(kube, namespace=NAMESPACE, environment=source.owner)
    return shards(loads, apps)


def cell(status: AppStatus, version: str) -> Cell:
    return Cell(
        environment=status.scope,
        app=status.app,
        kind=status.kind,
        state=status.state,
        reason=status.reason,
        message=status.message,
        details=status.details,
        revision=status.last_applied_revision or "",
        helm_revision=status.helm_revision,
        version=version,
        last_applied_time=status.last_applied_time,
        drift=status.drift,
        suspended=status.suspended,
        since=status.transition_time,
        shard=status.shard,
    )


def _hidden(scope: str, apps: list[AppStatus], source: AppStatus | None) -> bool:
    """A column of a live cluster that holds nothing current: no apps, none left in
    git at its last pass, or apps stamped by an environment whose source status is
    gone (a status without an owner, written by hand or before owners, stays)."""
    if not apps or (source is not None and source.apps == []):
        return True
    return source is None and all(s.owner for s in apps)


def stale_reason(status: AppStatus, source: AppStatus | None) -> str | None:
    """Why a live cluster's status of an app may not be current: its environment's
    last pass (`source`) had no such app, or another environment wrote it."""
    if source is None:
        return None
    if source.apps is not None and status.app not in source.apps:
        revision = (source.last_applied_revision or "")[:12]
        return f"not in git at {revision}: left from an earlier pass"
    if source.owner and status.owner and source.owner != status.owner:
        return f"written by another environment ({status.source or status.owner})"
    return None


def matrix(
    statuses: list[AppStatus],
    versions: Mapping[str, str],
    *,
    order: list[str] | None = None,
    clusters: list[ClusterOut] | None = None,
    cluster_of: dict[str, str] | None = None,
) -> Matrix:
    """Environments in promotion order (conveyor.yaml), then any others by name.

    `clusters` says which clusters answer and `cluster_of` which cluster each scope
    was read from: the columns of an unreachable cluster stay (its declared
    environments too, read or not), their cells marked stale; columns of a live one
    that hold nothing current disappear."""
    known = {c.name: c for c in clusters or []}
    placed = dict(cluster_of or {})
    apps = [s for s in statuses if s.kind != SOURCE_KIND]
    sources = {s.scope: s for s in statuses if s.kind == SOURCE_KIND}
    by_scope: dict[str, list[AppStatus]] = {}
    for status in apps:
        by_scope.setdefault(status.scope, []).append(status)
    down = {name for name, c in known.items() if not c.reachable}
    scopes = {s.scope for s in statuses} | {
        e for c in known.values() if not c.reachable for e in c.environments
    }
    scopes = {
        scope
        for scope in scopes
        if placed.get(scope) in down
        or not _hidden(scope, by_scope.get(scope, []), sources.get(scope))
    }
    ordered = [e for e in order or [] if e in scopes] + sorted(scopes - set(order or []))
    environments = []
    cells = []
    for name in ordered:
        source = sources.get(name)
        cluster = known.get(placed.get(name, ""))
        reachable = cluster is None or cluster.reachable
        here = by_scope.get(name, [])
        environments.append(
            Environment(
                name=name,
                state=source.state if source else "",
                reason=source.reason if source else "",
                message=source.message if source else "",
                revision=(source.last_applied_revision or "") if source else "",
                apps=len(here),
                ready=sum(s.ready for s in here),
                cluster=cluster.name if cluster else "",
                reachable=reachable,
                last_read=cluster.last_read if cluster else None,
            )
        )
        unreachable = (
            f"cluster {cluster.name} unreachable; last read {cluster.last_read or 'never'}"
            if cluster is not None and not reachable
            else None
        )
        for status in here:
            shaped = cell(
                status, versions.get(status.name, (status.last_applied_revision or "")[:12])
            )
            shaped.stale = unreachable or stale_reason(status, source)
            cells.append(shaped)
    return Matrix(
        environments=environments,
        apps=sorted({c.app for c in cells}),
        cells=cells,
        clusters=list(known.values()),
    )


def pipeline(
    grid: Matrix,
    statuses: Mapping[str, AppStatus],
    *,
    order: list[str],
    desired: Mapping[str, str],
    held: Mapping[str, str],
    approvals: set[str],
) -> Pipeline:
    """The matrix (its environments and cells as read, from however many clusters) with
    what waits per cell. `statuses`, `desired` (the version git has for an app, at the
    newest revision known) and `held` (the version a closed gate holds) are by
    ConveyorApp name. `order` is conveyor.yaml's promotion order (an environment outside
    it has no previous); `approvals`: the environments with an approval gate."""
    previous = dict(zip(order[1:], order, strict=False))
    cells = []
    for plain in grid.cells:
        status = statuses.get(f"{plain.environment}.{plain.app}")
        if status is None:
            continue
        before = previous.get(plain.environment)
        cells.append(
            pipeline_cell(
                plain,
                status,
                upstream=grid.cell(before, plain.app) if before else None,
                desired=desired.get(status.name, ""),
                held=held.get(status.name, ""),
                approvals=approvals,
            )
        )
    return Pipeline(
        environments=grid.environments, apps=grid.apps, cells=cells, clusters=grid.clusters
    )


def pipeline_cell(
    plain: Cell,
    status: AppStatus,
    *,
    upstream: Cell | None,
    desired: str,
    held: str,
    approvals: set[str],
) -> PipelineCell:
    running = plain.version
    waiting: list[Waiting] = []
    approve_version = promote_from = None
    diff = False
    if status.state == WAITING_FOR_GATE:
        waiting.append(Waiting(kind="gate", version=held, message=status.message))
        if plain.environment in approvals and held:
            approve_version = held
        diff = True
    if desired and desired not in (running, held):
        why = f" ({status.reason})" if status.state == STALLED else ""
        waiting.append(Waiting(kind="git", version=desired, message=f"git has {desired}{why}"))
        diff = True
    if (
        upstream is not None
        and upstream.version
        and upstream.version not in (running, desired, held)
        and not _older(upstream.version, running)
    ):
        state = "" if upstream.state == READY else f" ({upstream.state})"
        waiting.append(
            Waiting(
                kind="previous",
                version=upstream.version,
                message=f"{upstream.environment} runs {upstream.version}{state}",
                environment=upstream.environment,
            )
        )
        promote_from = upstream.environment
    # From the cell's __dict__: pydantic's dump (or model_construct) costs several times
    # the validation, and a page shapes every cell.
    return PipelineCell(
        **plain.__dict__,
        waiting=waiting,
        promote_from=promote_from,
        approve_version=approve_version,
        diff=diff,
    )


_NUMBERED = re.compile(r"^v?(\d+(?:\.\d+)*)")


def _older(version: str, than: str) -> bool:
    """Whether `version` is an older release than `than`, when both are numbered (1.4.2,
    v2.0); unknown otherwise (tags such as SHAs), which counts as not older."""
    a, b = _NUMBERED.match(version), _NUMBERED.match(than)
    if a is None or b is None:
        return False
    return tuple(map(int, a.group(1).split("."))) < tuple(map(int, b.group(1).split(".")))


def journey(
    app: str,
    commits: Mapping[str, list[GitCommit]],
    *,
    running: Mapping[str, str],
    notes: list[str] | None = None,
) -> Journey:
    """Each environment's commits to the app (newest first, in promotion order) turned
    into arrivals: a commit whose version differs from the one before it there."""
    rows: dict[str, dict[str, list[Arrival]]] = {}
    for environment, history in commits.items():
        known = [c for c in history if c.version]
        for index, commit in enumerate(known):
            earlier = known[index + 1].version if index + 1 < len(known) else None
            if commit.version == earlier:
                continue
            arrival = Arrival(
                sha=commit.sha,
                date=commit.date,
                change=commit.change,
                author=commit.author,
                subject=commit.subject,
            )
            rows.setdefault(commit.version, {}).setdefault(environment, []).append(arrival)

    def first_seen(version: str) -> str:
        return min(_utc(a.date) for found in rows[version].values() for a in found)

    return Journey(
        app=app,
        environments=list(commits),
        running=dict(running),
        versions=[
            JourneyRow(version=v, arrivals=rows[v])
            for v in sorted(rows, key=first_seen, reverse=True)
        ],
        notes=notes or [],
    )


def _utc(date: str) -> str:
    """An ISO 8601 time with an offset as UTC text, which sorts as time does."""
    try:
        return dt.datetime.fromisoformat(date).astimezone(dt.UTC).isoformat()
    except ValueError:
        return date


def gates(statuses: list[AppStatus]) -> list[Gate]:
    return [
        Gate(
            environment=s.scope,
            app=s.app,
            reason=s.reason,
            message=s.message,
            revision=s.attempted_revision,
            since=s.transition_time,
        )
        for s in sorted(statuses, key=lambda s: (s.scope, s.app))
        if s.state == WAITING_FOR_GATE
    ]


# -- the live cluster, for one app ---------------------------------------------------


async def objects(kube: KubeClient, status: AppStatus) -> list[ObjectOut]:
    """The app's objects (conveyor's inventory, and its Helm release's) with health."""
    refs = [(ref, "conveyor") for ref in status.inventory]
    if status.release:
        namespace, name = split_release(status.release)
        history = await release_history(kube, release=name, namespace=namespace)
        deployed = [r for r in history if r.status == "deployed"] or history
        if deployed:
            for obj in parse_manifest(deployed[-1].manifest):
                meta = obj.get("metadata") or {}
                if not obj.get("kind") or not meta.get("name"):
                    continue
                refs.append(
                    (
                        ObjectRef(
                            str(obj.get("apiVersion", "")),
                            str(obj["kind"]),
                            str(meta.get("namespace") or namespace),
                            str(meta["name"]),
                        ),
                        "helm",
                    )
                )
    limit = asyncio.Semaphore(16)

    async def one(ref: ObjectRef, manager: str) -> ObjectOut:
        async with limit:
            try:
                live = await kube.get(
                    ref.api_version, ref.kind, ref.name, namespace=ref.namespace or None
                )
            except (ApiError, UnknownKindError) as error:
                health, message = "Unknown", str(error)
            else:
                if live is None:
                    health, message = "Missing", "not found in the cluster"
                else:
                    judged = assess(live)
                    health, message = judged.status.value, judged.message
        return ObjectOut(
            api_version=ref.api_version,
            kind=ref.kind,
            namespace=ref.namespace,
            name=ref.name,
            managed_by=manager,
            health=health,
            message=message,
        )

    return list(await asyncio.gather(*(one(r, m) for r, m in refs)))


async def events(kube: KubeClient, status: AppStatus, *, limit: int = 50) -> list[EventOut]:
    """Kubernetes Events about the app's ConveyorApp object, newest first."""
    body = await kube.request(
        "GET",
        f"/api/v1/namespaces/{NAMESPACE}/events",
        params={"fieldSelector": f"involvedObject.name={status.name},involvedObject.kind={KIND}"},
    )
    found = []
    for item in body.get("items", []):
        involved = item.get("involvedObject") or {}
        if involved.get("apiVersion", API_VERSION) != API_VERSION:
            continue
        message, _, details = str(item.get("message", "")).partition("\n\n")
        found.append(
            EventOut(
                type=str(item.get("type", "")),
                reason=str(item.get("reason", "")),
                message=message,
                details=details or None,
                time=str(
                    item.get("lastTimestamp")
                    or item.get("eventTime")
                    or item.get("metadata", {}).get("creationTimestamp", "")
                ),
                count=int(item.get("count") or 1),
                component=str((item.get("source") or {}).get("component", "")),
            )
        )
    found.sort(key=lambda e: e.time, reverse=True)
    return found[:limit]


async def helm_history(kube: KubeClient, status: AppStatus) -> list[HelmRevision]:
    if not status.release:
        return []
    namespace, name = split_release(status.release)
    history = await release_history(kube, release=name, namespace=namespace)
    return [
        HelmRevision(
            revision=r.revision,
            status=r.status,
            description=r.description,
            updated=r.updated,
            chart=r.chart,
            app_version=r.app_version,
            version=", ".join(_release_tags(r)) or r.app_version,
        )
        for r in reversed(history)
    ]


class SandboxAppOut(Model):
    app: str
    ref: str
    pinned: bool
    chart_ref: str | None = None
    namespace: str | None = None
    images: list[str] = []
    state: str | None = None
    message: str | None = None


class SandboxOut(Model):
    id: str
    file: str
    staged_by: str | None = None
    staged_at: str | None = None
    expires_at: str | None = None
    auto: bool = False
    state: str | None = None
    url: str | None = None
    apps: list[SandboxAppOut] = []


class Sandboxes(Model):
    environment: str | None = None  # the scope whose actions act on them
    sandboxes: list[SandboxOut] = []
    error: str | None = None


def sandboxes(environment: str, found: list[Sandbox], *, url: str | None) -> Sandboxes:
    """The page's (and the API's) view of the environment's sandboxes."""
    return Sandboxes(
        environment=environment,
        sandboxes=[
            SandboxOut.model_validate({**s.to_dict(), "url": url.format(id=s.id) if url else None})
            for s in found
        ],
    )
