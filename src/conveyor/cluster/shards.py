"""Shards: one environment's apps split over several agent replicas, each holding a
Lease of its own, so that an environment too big for one process scales out through
Kubernetes' own objects instead of a coordinator of ours.

An app belongs to the live shard that rendezvous hashing (HRW) ranks first for its name
among the shard Leases it sees, so a shard's loss moves only its apps, and a new shard
takes only the apps it now ranks first for (about 1/N). Views of the live set differ
between replicas for a while, so a shard writes an app only when all of these hold:

- its own Lease is valid (the elector's `write_budget`);
- it ranks first for the app in a *fresh* view: the Lease list was sent less than
  `view_ttl` ago. A view is the shard's claim on its apps, and it lapses by itself;
- it is *settled*: `view_ttl` has passed since its Lease was (re)acquired, so every
  view another replica took before it joined has lapsed. A new owner thereby waits out
  the old owner's claim; an owner that died stops writing when its own Lease validity
  ends, which is before any other shard judges that Lease expired (judged, as in
  cluster/lease.py, from when the record was last seen to change, never from the
  holder's timestamps), and a released Lease is released only after its last write.

Each write carries the smallest of those budgets as its deadline, minus the elector's
write margin, as the environment's one Lease does for a single writer. Which app a write
is for is the `writing_for` context of the task that sends it; a write outside any app
(the source's status, a request's answer) is for `ENVIRONMENT_KEY`, which one shard owns
like an app; a write of this shard's own record (`writing_own`: its part of the answer to
a request for all apps, which no other shard writes) needs every rule but ownership.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.lease import LEASE_API_VERSION, LeaderElector, NotLeaderError
from conveyor.cluster.lease_loop import CrossLoopEvent, LeaseLoop
from conveyor.cluster.objects import Obj

log = logging.getLogger(__name__)

SHARDS_LABEL = "conveyor.dev/shards-of"  # on a shard Lease: the environment's id
APPS_ANNOTATION = "conveyor.dev/shard-apps"  # on a shard Lease: apps it owned last pass
PASS_ANNOTATION = "conveyor.dev/shard-pass-seconds"  # noqa: S105 (a name) and how long that pass took
ENVIRONMENT_KEY = ""  # the key of writes for no app: the source's status, answers
# The key of the writes only this shard makes, whoever owns the apps: its own answer to
# a request for all apps (no app name holds a NUL).
OWN_KEY = "\0own"

_writing_for: ContextVar[str] = ContextVar("conveyor_shard_key", default=ENVIRONMENT_KEY)


@contextlib.contextmanager
def writing_for(app: str) -> Iterator[None]:
    """Writes sent inside this block (and tasks started in it) are for `app`."""
    token = _writing_for.set(app)
    try:
        yield
    finally:
        _writing_for.reset(token)


def writing_own() -> contextlib.AbstractContextManager[None]:
    """Writes sent inside this block are this shard's own record, no app's."""
    return writing_for(OWN_KEY)


class NotShardOwnerError(NotLeaderError):
    """A write refused because this shard does not own its app under a fresh view."""

    def __init__(self, identity: str, key: str, why: str) -> None:
        what = f"app {key}" if key else "the environment's own status"
        if key == OWN_KEY:
            what = "its own answer"
        # NotLeaderError's own message names a Lease; this one says which rule refused.
        Exception.__init__(self, f"shard {identity} may not write {what}: {why}")


def rank(shard: str, key: str) -> bytes:
    """The HRW weight of `shard` for `key`: the highest weight owns the key."""
    return hashlib.sha256(f"{shard}\0{key}".encode()).digest()


def owner_of(key: str, shards: tuple[str, ...] | list[str] | frozenset[str]) -> str | None:
    """The shard that owns `key` among `shards` (None when there are none)."""
    return max(shards, key=lambda shard: rank(shard, key), default=None)


def environment_lease_name(scope: str) -> str:
    """The environment's own Lease: its one writer's when it runs without shards."""
    return f"conveyor-{scope}"[:63]


def shard_lease_name(scope: str, identity: str) -> str:
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"conveyor-{scope[:36]}-shard-{digest}"


@dataclass(frozen=True)
class ShardView:
    """The live shards as one Lease list showed them, and when that list was sent."""

    live: frozenset[str]
    read_at: float  # monotonic
    # A live holder of the environment's own Lease (an agent without --shards, or a
    # command's one pass): while there is one, no shard writes.
    single_writer: str | None = None


@dataclass(frozen=True)
class ShardLoad:
    """A live shard and the load it last published on its Lease."""

    identity: str
    apps: int | None
    pass_seconds: float | None


@dataclass
class _Seen:
    spec: Obj
    at: float  # monotonic time this spec was first seen


def _renewed_ago(spec: Obj) -> float | None:
    renew_time = spec.get("renewTime")
    if not renew_time:
        return None
    renewed = datetime.fromisoformat(str(renew_time).replace("Z", "+00:00"))
    return (datetime.now(UTC) - renewed).total_seconds()


async def list_shard_leases(kube: KubeClient, *, namespace: str, environment: str) -> list[Obj]:
    selector = f"{SHARDS_LABEL}={environment}"
    return await kube.list(LEASE_API_VERSION, "Lease", namespace=namespace, label_selector=selector)


async def live_shards(kube: KubeClient, *, namespace: str, environment: str) -> list[ShardLoad]:
    """The shards that renewed their Lease within its duration, by the holders' own
    timestamps: for commands and the dashboard, to show who owns what and to decide
    whether to ask shards rather than write. Who may *write* is decided by each shard's
    `ShardSet`, which clock skew cannot fool."""
    result = []
    for lease in await list_shard_leases(kube, namespace=namespace, environment=environment):
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        renewed = _renewed_ago(spec)
        duration = int(spec.get("leaseDurationSeconds") or 0)
        if not holder or renewed is None or renewed >= duration:
            continue
        annotations = (lease.get("metadata") or {}).get("annotations") or {}
        apps, seconds = annotations.get(APPS_ANNOTATION), annotations.get(PASS_ANNOTATION)
        result.append(
            ShardLoad(
                identity=str(holder),
                apps=int(apps) if apps is not None and str(apps).isdigit() else None,
                pass_seconds=float(seconds) if seconds else None,
            )
        )
    return sorted(result, key=lambda s: s.identity)


@dataclass(frozen=True)
class ShardShare:
    """A live shard with the apps it owns now (by hashing over the live shards) beside
    the load it last published: what `conveyor get shards` and the dashboard show."""

    load: ShardLoad
    owned: int


def shard_shares(loads: list[ShardLoad], apps: list[str]) -> list[ShardShare]:
    """Each of `loads` with how many of `apps` it owns now; none when there are none
    (an environment that runs unsharded)."""
    live = [load.identity for load in loads]
    owners = [owner_of(app, live) for app in apps]
    return [ShardShare(load=load, owned=owners.count(load.identity)) for load in loads]


async def shard_owners(
    kube: KubeClient, apps: list[tuple[str, str, str]], *, namespace: str
) -> dict[str, str]:
    """The live shard that owns each of `apps` (key, environment id, app name), for the
    environments that run sharded; apps of the others are left out."""
    live: dict[str, list[str]] = {}
    result = {}
    for key, environment, app in apps:
        if environment not in live:
            shards = await live_shards(kube, namespace=namespace, environment=environment)
            live[environment] = [s.identity for s in shards]
        owner = owner_of(app, live[environment])
        if owner is not None:
            result[key] = owner
    return result


@dataclass
class ShardSet:
    """This replica's shard: its Lease, its view of the live shards, and the write guard
    that asks both for the app each write is for."""

    client: KubeClient  # lease traffic only (no write guard on it)
    namespace: str
    scope: str
    environment: str  # EnvironmentIdentity.id: the label that finds the shard Leases
    identity: str
    lease_duration: float = 15.0
    refresh_interval: float = 2.0
    elector: LeaderElector = field(init=False)
    view: ShardView | None = field(default=None, init=False)
    runner: LeaseLoop | None = None  # the loop `client`'s traffic runs on (the agent's)
    changed: CrossLoopEvent = field(default_factory=CrossLoopEvent, init=False)
    """Set when the live set changes: the apps this shard owns may have changed."""
    _joined_at: float | None = field(default=None, init=False)
    _seen: dict[str, _Seen] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.elector = LeaderElector(
            self.client,
            namespace=self.namespace,
            name=shard_lease_name(self.scope, self.identity),
            identity=self.identity,
            lease_duration=self.lease_duration,
            renew_interval=self.lease_duration / 3,
            labels={SHARDS_LABEL: self.environment},
            runner=self.runner,
        )
        if not 0 < self.refresh_interval < self.view_ttl:
            raise ValueError("refresh_interval must be shorter than the lease duration")

    @property
    def view_ttl(self) -> float:
        """How long a view of the live set is a claim: a lease duration, so that a write
        sent just before a refresh still has as long as a single writer's (a dead shard's
        apps pass on when its Lease expires, which this does not delay)."""
        return self.lease_duration

    # -- membership ------------------------------------------------------------------

    async def join(self) -> None:
        """Take this shard's own Lease (retrying while the apiserver is away) and start
        the settling wait."""
        await self.elector.acquire()
        self._joined_at = time.monotonic()
        self.view = None
        self.changed.set()

    def settles_in(self) -> float:
        """Seconds until this shard may write (0: settled); a full `view_ttl` if not joined."""
        if self._joined_at is None or not self.elector.is_leader:
            return self.view_ttl
        return max(self._joined_at + self.view_ttl - time.monotonic(), 0.0)

    async def refresh(self) -> None:
        """List the shard Leases and judge which are live (from when each record was last
        seen to change); sets `changed` when the live set differs from the last view."""
        await self.elector.on_runner(self._refresh())

    async def _refresh(self) -> None:
        sent_at = time.monotonic()
        leases = await list_shard_leases(
            self.client, namespace=self.namespace, environment=self.environment
        )
        single = await self.client.get(
            LEASE_API_VERSION, "Lease", environment_lease_name(self.scope), namespace=self.namespace
        )
        live = set()
        names = set()
        single_writer = None
        if single is not None:
            names.add(environment_lease_name(self.scope))
            if self._judge(single, sent_at):
                single_writer = str(single["spec"]["holderIdentity"])
        for lease in leases:
            names.add(str(lease["metadata"]["name"]))
            holder = (lease.get("spec") or {}).get("holderIdentity")
            if holder == self.identity:
                if self.elector.is_leader:
                    live.add(str(holder))
            elif self._judge(lease, sent_at):
                live.add(str(holder))
        for gone in set(self._seen) - names:
            del self._seen[gone]
        if self.elector.is_leader:
            live.add(self.identity)  # our own, even if the list raced our acquire
        previous = self.view
        self.view = ShardView(live=frozenset(live), read_at=sent_at, single_writer=single_writer)
        if single_writer and (previous is None or previous.single_writer != single_writer):
            log.warning(
                "shards of %s: %s holds the environment's Lease; writing nothing meanwhile",
                self.scope,
                single_writer,
            )
        if previous is None or previous.live != self.view.live:
            log.info("shards of %s: %d live (%s)", self.scope, len(live), ", ".join(sorted(live)))
            self.changed.set()

    def _judge(self, lease: Obj, sent_at: float) -> bool:
        """Whether another holder has `lease` and, by this replica's clock, from when it
        saw the record last change, has not let it expire."""
        name = str(lease["metadata"]["name"])
        spec = lease.get("spec") or {}
        seen = self._seen.get(name)
        if seen is None or seen.spec != spec:
            seen = self._seen[name] = _Seen(dict(spec), sent_at)
        holder = spec.get("holderIdentity")
        if not holder or holder == self.identity:
            return False
        duration = int(spec.get("leaseDurationSeconds") or math.ceil(self.lease_duration))
        return time.monotonic() < seen.at + duration

    async def run_refreshes(self) -> None:
        """Refresh the view every `refresh_interval` while the Lease is held; a failed
        list leaves the view to lapse (writes are refused until a list succeeds)."""
        await self.elector.on_runner(self._run_refreshes())

    async def _run_refreshes(self) -> None:
        while self.elector.is_leader:
            try:
                await self._refresh()
            except (ApiError, httpx.HTTPError) as error:
                log.warning("shards of %s: cannot list the shard Leases: %s", self.scope, error)
            await asyncio.sleep(self.refresh_interval)

    async def leave(self) -> None:
        """Stop writing and delete this shard's Lease, so the others take its apps at once
        (a Deployment's replicas get new names: a Lease kept would only pile up)."""
        await self.elector.release()
        with contextlib.suppress(ApiError, httpx.HTTPError):
            await self.elector.on_runner(
                self.client.delete(
                    LEASE_API_VERSION, "Lease", self.elector.name, namespace=self.namespace
                )
            )

    def publish_load(self, *, apps: int, pass_seconds: float) -> None:
        """Put this shard's load on its Lease at the next renewal (for get and the
        dashboard): a renewal writes the Lease anyway, so this costs no write."""
        self.elector.annotations = {
            APPS_ANNOTATION: str(apps),
            PASS_ANNOTATION: f"{pass_seconds:.3f}",
        }

    # -- ownership -------------------------------------------------------------------

    def owns(self, app: str) -> bool:
        """Whether this shard ranks first for `app` in its current view (no freshness
        check: for choosing which apps a pass works on; writes ask `write_budget`)."""
        return self.view is not None and owner_of(app, self.view.live) == self.identity

    def owned(self, apps: list[str]) -> list[str]:
        return [app for app in apps if self.owns(app)]

    @property
    def may_write(self) -> bool:
        """True while a write for an app this shard owns would be let through."""
        try:
            self._budget()
        except NotLeaderError:
            return False
        return True

    def write_budget(self) -> float:
        """The write guard: seconds a write for the current `writing_for` app may take,
        or NotLeaderError (NotShardOwnerError) when it must not be sent."""
        key = _writing_for.get()
        budget, view = self._budget()
        if key != OWN_KEY and owner_of(key, view.live) != self.identity:
            raise NotShardOwnerError(self.identity, key, "another shard owns it")
        return budget

    def _budget(self) -> tuple[float, ShardView]:
        budget = self.elector.write_budget()
        if self.settles_in() > 0:
            raise NotShardOwnerError(
                self.identity, _writing_for.get(), "still waiting out older views of the shards"
            )
        view = self.view
        if view is None:
            raise NotShardOwnerError(self.identity, _writing_for.get(), "no view of the shards")
        if view.single_writer is not None:
            raise NotShardOwnerError(
                self.identity,
                _writing_for.get(),
                f"{view.single_writer} holds the environment's Lease",
            )
        fresh = view.read_at + self.view_ttl - time.monotonic() - self.elector.write_margin
        if fresh <= 0:
            raise NotShardOwnerError(
                self.identity, _writing_for.get(), "its view of the shards is too old"
            )
        return min(budget, fresh), view
