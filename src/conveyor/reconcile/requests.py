"""Asking the holder of an environment's Lease to reconcile, as `flux reconcile` asks a
Flux controller: only the holder writes, so the CLI and the dashboard write a request
annotation on the environment's source status (the ConveyorApp named after its scope)
and wait until the holder records in that status the request it handled.

Tokens are times (RFC 3339, microseconds, UTC), and every request is written on the
resourceVersion it read, later than the tokens already there: tokens grow in the order
the apiserver accepted them, whatever the requesters' clocks. The holder runs one pass
for the newest request it sees, which covers every older one, and records that token as
`status.lastHandledReconcileAt`; a requester is answered once that is at least its own.
Requests for different apps that meet before being handled become one whole pass.

Among shards (cluster/shards.py) a request for one app is run and answered by the app's
owner. A request for all apps is run by every shard, and each records its own outcome
under `status.shardAnswers.<shard>`; the shard that owns the environment's key answers
the request once every shard it sees live has answered it (`AnswerCollector`), with
each shard's outcome, and names those seen live since the request that died before
answering (they are not waited for: their Leases lapse, and the others take their apps).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.lease import LeaderElector
from conveyor.cluster.lease_loop import LeaseLoop
from conveyor.cluster.shards import environment_lease_name
from conveyor.errors import ConveyorError
from conveyor.reconcile.status import API_VERSION, KIND, NAMESPACE, resource_name

LEASE_DURATION = 15.0
# Identities of commands that take the lease for one pass (they answer no requests).
OnePassKind = Literal["cli", "dashboard"]
ONE_PASS_KINDS: tuple[OnePassKind, ...] = ("cli", "dashboard")

REQUESTED_AT = "conveyor.dev/requestedAt"
REQUESTED_APP = "conveyor.dev/requestedApp"
# Field managers of their own, so neither a status write nor a request undoes the other.
REQUEST_MANAGER = "conveyor-request"
HANDLED_MANAGER = "conveyor-request-handled"
REQUEST_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
SHARD_ANSWERS = "shardAnswers"  # status field: each shard's answer to a request for all

Obj = dict[str, Any]


@dataclass(frozen=True)
class ReconcileRequest:
    token: str
    app: str | None  # None: the whole environment


@dataclass(frozen=True)
class ShardAnswer:
    """One shard's outcome of a request for all apps: the pass over the apps it owns."""

    shard: str
    token: str  # the request it ran
    revision: str
    apps: int  # the apps it reconciled
    writes: int
    pruned_apps: list[str] = field(default_factory=list)
    source_failure: str | None = None

    def to_json(self) -> Obj:
        return {
            "shard": self.shard,
            "token": self.token,
            "revision": self.revision,
            "apps": self.apps,
            "writes": self.writes,
            "prunedApps": self.pruned_apps,
            "sourceFailure": self.source_failure,
        }

    @classmethod
    def from_json(cls, shard: str, raw: Obj) -> ShardAnswer:
        failure = raw.get("sourceFailure")
        return cls(
            shard=shard,
            token=str(raw.get("token") or ""),
            revision=str(raw.get("revision") or ""),
            apps=int(raw.get("apps") or 0),
            writes=int(raw.get("writes") or 0),
            pruned_apps=[str(a) for a in raw.get("prunedApps") or []],
            source_failure=str(failure) if failure else None,
        )


@dataclass(frozen=True)
class HandledRequest:
    """What the holder recorded after handling a request."""

    token: str
    by: str  # the holder's identity
    revision: str
    writes: int
    pruned_apps: list[str]
    source_failure: str | None  # the fetch or render failed: nothing was applied
    # Among shards, for a request for all apps: each shard's outcome, and the shards
    # seen live since the request that died before answering.
    shards: list[ShardAnswer] = field(default_factory=list)
    gone_shards: list[str] = field(default_factory=list)


class RequestTimeoutError(ConveyorError):
    """The holder did not answer (or the lease did not come free) in time."""


def environment_elector(
    kube: KubeClient,
    scope: str,
    *,
    identity: str,
    lease_duration: float = LEASE_DURATION,
    runner: LeaseLoop | None = None,
) -> LeaderElector:
    """The candidate for the Lease of the environment with `scope`: the one writer."""
    return LeaderElector(
        kube,
        namespace=NAMESPACE,
        name=environment_lease_name(scope),
        identity=identity,
        lease_duration=lease_duration,
        renew_interval=lease_duration / 3,
        runner=runner,
    )


def one_pass_identity(kind: OnePassKind) -> str:
    """`cli-<host>-<pid>-<random>`: a command holding the lease for one pass."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def answers_requests(holder: str) -> bool:
    """An agent answers requests; a command holding the lease for its pass does not."""
    return not holder.startswith(tuple(f"{kind}-" for kind in ONE_PASS_KINDS))


def _token_time(token: str) -> datetime | None:
    try:
        return datetime.strptime(token, REQUEST_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def next_token(*seen: str | None, now: datetime | None = None) -> str:
    """Now, or just after the latest token `seen` when that is later (a clock behind)."""
    latest = now or datetime.now(UTC)
    for token in seen:
        at = _token_time(token or "")
        if at is not None and at >= latest:
            latest = at + timedelta(microseconds=1)
    return latest.strftime(REQUEST_TIME_FORMAT)


def is_handled(token: str, handled: str | None) -> bool:
    """Whether the holder's last handled request covers `token` (same format: the
    strings order as the times)."""
    return bool(handled) and str(handled) >= token


def pending_request(source: Obj | None) -> ReconcileRequest | None:
    """The request on a source status that its holder has not handled yet."""
    if source is None:
        return None
    annotations = source.get("metadata", {}).get("annotations") or {}
    token = annotations.get(REQUESTED_AT)
    handled = (source.get("status") or {}).get("lastHandledReconcileAt")
    if not token or is_handled(str(token), handled):
        return None
    return ReconcileRequest(token=str(token), app=annotations.get(REQUESTED_APP) or None)


def handled_request(source: Obj | None) -> HandledRequest | None:
    status = (source or {}).get("status") or {}
    token = status.get("lastHandledReconcileAt")
    if not token:
        return None
    outcome = status.get("lastHandledReconcile") or {}
    return HandledRequest(
        token=str(token),
        by=str(outcome.get("by", "")),
        revision=str(outcome.get("revision", "")),
        writes=int(outcome.get("writes") or 0),
        pruned_apps=list(outcome.get("prunedApps") or []),
        source_failure=outcome.get("sourceFailure"),
        shards=[
            ShardAnswer.from_json(str(raw.get("shard") or ""), raw)
            for raw in outcome.get("shards") or []
        ],
        gone_shards=[str(shard) for shard in outcome.get("goneShards") or []],
    )


def shard_answers(source: Obj | None) -> dict[str, ShardAnswer]:
    """The answers the shards recorded on a source status, by shard."""
    raw = ((source or {}).get("status") or {}).get(SHARD_ANSWERS) or {}
    return {str(shard): ShardAnswer.from_json(str(shard), answer) for shard, answer in raw.items()}


@dataclass(frozen=True)
class CollectedAnswers:
    """Every live shard's answer to one request for all apps: the request is handled."""

    answers: list[ShardAnswer]  # those for this request (or a later one), by shard
    gone: list[str]  # seen live since the request, gone without answering it
    stale: list[str]  # answers of shards no longer live: removed once this is recorded

    @property
    def revision(self) -> str:
        return max((a.revision for a in self.answers), default="")

    @property
    def source_failure(self) -> str | None:
        return next((a.source_failure for a in self.answers if a.source_failure), None)


@dataclass
class AnswerCollector:
    """What the owner of the environment's key needs to answer a request for all apps
    among shards: the shards seen live since the request came (every shard keeps this,
    so that whichever owns the key next knows who was asked)."""

    token: str | None = None
    asked: set[str] = field(default_factory=set)

    def collect(
        self, source: Obj | None, request: ReconcileRequest, *, live: frozenset[str]
    ) -> CollectedAnswers | None:
        """The answers once every shard in `live` has answered `request`, else None."""
        if request.token != self.token:
            self.token, self.asked = request.token, set()
        self.asked |= live
        answers = shard_answers(source)
        done = {s: a for s, a in answers.items() if is_handled(request.token, a.token)}
        if not live <= done.keys():
            return None
        return CollectedAnswers(
            answers=[done[s] for s in sorted(done)],
            gone=sorted(self.asked - live - done.keys()),
            stale=sorted(answers.keys() - live),
        )


async def read_source(kube: KubeClient, scope: str) -> Obj | None:
    return await kube.get(API_VERSION, KIND, resource_name(scope, ""), namespace=NAMESPACE)


async def request_reconcile(kube: KubeClient, scope: str, *, app: str | None) -> str | None:
    """Ask the holder to reconcile (one app, or all); returns the request's token, or None
    while the environment has no source status yet (its first pass has not ended)."""
    while True:
        source = await read_source(kube, scope)
        if source is None:
            return None
        metadata = source["metadata"]
        annotations = metadata.get("annotations") or {}
        handled = (source.get("status") or {}).get("lastHandledReconcileAt")
        unhandled = pending_request(source)
        if unhandled is not None and unhandled.app != app:
            app = None  # two requests for different things meet: one whole pass serves both
        token = next_token(annotations.get(REQUESTED_AT), handled)
        patch = {
            "metadata": {
                "resourceVersion": metadata["resourceVersion"],  # lost race: 409, read again
                "annotations": {REQUESTED_AT: token, REQUESTED_APP: app},
            }
        }
        try:
            await kube.request(
                "PATCH",
                await _path(kube, scope),
                params={"fieldManager": REQUEST_MANAGER},
                content=json.dumps(patch).encode(),
                content_type="application/merge-patch+json",
            )
        except ApiError as error:
            if error.conflict:
                continue
            raise
        return token


async def record_handled(
    kube: KubeClient,
    scope: str,
    request: ReconcileRequest,
    *,
    by: str,
    revision: str,
    writes: int = 0,
    pruned_apps: list[str] | None = None,
    source_failure: str | None = None,
    collected: CollectedAnswers | None = None,
) -> None:
    """The holder's answer: which request it handled, and how the pass went; among
    shards, for all apps, summed up from `collected` (each shard's outcome beside)."""
    outcome: Obj = {
        "by": by,
        "app": request.app,
        "revision": revision,
        "writes": writes,
        "prunedApps": pruned_apps or [],
        "sourceFailure": source_failure,
    }
    if collected is not None:
        outcome |= {
            "revision": collected.revision,
            "writes": sum(a.writes for a in collected.answers),
            "prunedApps": sorted({app for a in collected.answers for app in a.pruned_apps}),
            "sourceFailure": collected.source_failure,
            "shards": [a.to_json() for a in collected.answers],
            "goneShards": collected.gone,
        }
    await kube.apply(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": resource_name(scope, ""), "namespace": NAMESPACE},
            "status": {"lastHandledReconcileAt": request.token, "lastHandledReconcile": outcome},
        },
        field_manager=HANDLED_MANAGER,
        force=True,
        subresource="status",
    )
    if collected is not None and collected.stale:
        # Shards of a Deployment get new names: answers of those gone would pile up.
        await _patch_status(kube, scope, {SHARD_ANSWERS: dict.fromkeys(collected.stale)})


async def record_shard_answer(kube: KubeClient, scope: str, answer: ShardAnswer) -> None:
    """A shard's own outcome of a request for all apps, beside the other shards' (a merge
    patch of its key alone: no shard's answer undoes another's)."""
    await _patch_status(kube, scope, {SHARD_ANSWERS: {answer.shard: answer.to_json()}})


async def _patch_status(kube: KubeClient, scope: str, status: Obj) -> None:
    await kube.request(
        "PATCH",
        await _path(kube, scope) + "/status",
        params={"fieldManager": HANDLED_MANAGER},
        content=json.dumps({"status": status}).encode(),
        content_type="application/merge-patch+json",
    )


async def wait_handled(
    kube: KubeClient,
    scope: str,
    token: str,
    *,
    timeout: float,
    still_asked: Callable[[], Awaitable[bool]],
    progress: Callable[[float], None] = lambda _elapsed: None,
    poll: float = 0.5,
) -> HandledRequest | None:
    """Wait until the holder has handled `token`. None when `still_asked` turns False
    (the holder went away: nobody will answer); RequestTimeoutError after `timeout`."""
    started = time.monotonic()
    while True:
        handled = handled_request(await read_source(kube, scope))
        if handled is not None and is_handled(token, handled.token):
            return handled
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise RequestTimeoutError(
                f"the agent did not handle the reconcile request within {timeout:g}s"
            )
        if not await still_asked():
            return None
        progress(elapsed)
        await asyncio.sleep(poll)


async def _path(kube: KubeClient, scope: str) -> str:
    resource = await kube.resource(API_VERSION, KIND)
    return resource.path(namespace=NAMESPACE, name=resource_name(scope, ""))
