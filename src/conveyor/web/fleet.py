"""Every environment's cluster, read at once: one watched `StatusHub` per distinct cluster.

Teams run one cluster per environment, so the dashboard reads each environment's
cluster as conveyor.yaml names it (`cluster.context`, `cluster.kubeconfig`), and the
command line's (else $KUBECONFIG's) for the rest. Environments that share a context
share a hub. Each hub lists, watches and probes its own cluster, so one that is down
(shown as unreachable, with its last good read) never holds up the others, and all of
them publish to the same open pages. An environment's statuses are taken from its own
cluster only; a scope no conveyor.yaml names, from the first cluster that has it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from conveyor.cluster.client import KubeClient
from conveyor.cluster.kubeconfig import KubeconfigError
from conveyor.config.project import Environment
from conveyor.reconcile.status import AppStatus, resource_name
from conveyor.reconcile.target import ClusterRef, environment_cluster, kube_client
from conveyor.web import views
from conveyor.web.sse import ClusterState, StatusChange, StatusHub, Subscribers

log = logging.getLogger("conveyor.web")
SETTLE_SECONDS = 10.0  # a page waits at most this long for a cluster's first read
Clients = Callable[[ClusterRef], KubeClient]
ClusterVersionOf = Callable[[KubeClient, AppStatus], Awaitable[str]]


@dataclass
class WatchedCluster:
    name: str
    ref: ClusterRef  # with its context made explicit
    kube: KubeClient
    hub: StatusHub
    environments: list[str] = field(default_factory=list)

    def out(self) -> views.ClusterOut:
        state = self.hub.state()
        return views.ClusterOut(
            name=self.name,
            reachable=state.reachable,
            last_read=state.last_read,
            error=state.error,
            environments=self.environments,
        )


def default_clients(ref: ClusterRef) -> KubeClient:
    return kube_client(kubeconfig_path=ref.kubeconfig, context=ref.context)


class Fleet:
    """The hubs of every cluster, seen as one: what the pages read and stream."""

    def __init__(
        self,
        *,
        default: ClusterRef,
        kube: KubeClient | None = None,
        clients: Clients = default_clients,
        version_of: ClusterVersionOf = views.live_version,
    ) -> None:
        """`version_of` gives the version a hub shows for an app, read with the client
        of the app's cluster."""
        self.default = default
        self._version_of = version_of
        self._default_kube = kube  # given by the caller (tests): used for `default`
        self._clients = clients
        self.subscribers = Subscribers()
        self.clusters: dict[str, WatchedCluster] = {}  # by name, in conveyor.yaml's order
        self.declared: dict[str, str] = {}  # environment → the name of its cluster
        self.unconfigured: dict[str, str] = {}  # environment → why its cluster is unknown
        self._stopping: set[asyncio.Task[None]] = set()
        self._resolved: dict[ClusterRef, tuple[ClusterRef, str]] = {}

    # -- which clusters ------------------------------------------------------------

    def configure(self, environments: list[Environment]) -> None:
        """Watch the clusters of these environments (none: the default cluster); start
        hubs for new ones, stop those no environment names any more."""
        wanted: dict[str, tuple[ClusterRef, list[str]]] = {}
        declared: dict[str, str] = {}
        unconfigured: dict[str, str] = {}
        refs: list[tuple[str | None, ClusterRef]] = [
            (e.name, environment_cluster(e, default=self.default)) for e in environments
        ]
        for environment, ref in refs or [(None, self.default)]:
            try:
                resolved, name = self._resolve(ref)
            except KubeconfigError as error:
                if environment is None:
                    raise
                unconfigured[environment] = str(error)
                continue
            entry = wanted.setdefault(name, (resolved, []))
            if environment is not None:
                entry[1].append(environment)
                declared[environment] = name
        for name in [n for n in self.clusters if n not in wanted]:
            gone = self.clusters.pop(name)
            log.info("cluster %s is no longer named by any environment", name)
            task = asyncio.get_running_loop().create_task(self._stop(gone))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        for name, (ref, names) in wanted.items():
            if name in self.clusters:
                self.clusters[name].environments = names
            else:
                self.clusters[name] = self._watch(name, ref, names)
        self.declared, self.unconfigured = declared, unconfigured

    def _resolve(self, ref: ClusterRef) -> tuple[ClusterRef, str]:
        if self._default_kube is not None and ref == self.default:
            return ref, self._default_kube.credentials.context
        # Once per cluster: conveyor.yaml is read again every half minute, and loading a
        # kubeconfig writes its inline certificates to files.
        if ref not in self._resolved:
            self._resolved[ref] = ref.resolve()
        return self._resolved[ref]

    def _watch(self, name: str, ref: ClusterRef, environments: list[str]) -> WatchedCluster:
        injected = self._default_kube is not None and ref == self.default
        kube = self._default_kube if injected and self._default_kube else self._clients(ref)
        hub = StatusHub(
            kube,
            version_of=lambda status: self._version_of(kube, status),
            cluster=name,
            subscribers=self.subscribers,
        )
        hub.start()
        return WatchedCluster(name, ref, kube, hub, environments)

    async def _stop(self, cluster: WatchedCluster) -> None:
        await cluster.hub.close()
        if cluster.kube is not self._default_kube:
            await cluster.kube.aclose()

    async def close(self) -> None:
        for cluster in self.clusters.values():
            await self._stop(cluster)
        self.subscribers.close()

    # -- reading -------------------------------------------------------------------

    async def settled(self) -> None:
        """Every cluster read once, or failed to be, within SETTLE_SECONDS."""
        waits = [c.hub.settled.wait() for c in self.clusters.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), SETTLE_SECONDS)
        except TimeoutError:
            pass

    @property
    def ready(self) -> bool:
        return all(c.hub.settled.is_set() for c in self.clusters.values())

    def _owner(self, scope: str) -> WatchedCluster | None:
        """The cluster a scope is read from."""
        name = self.declared.get(scope)
        if name is not None:
            return self.clusters.get(name)
        if scope in self.unconfigured:
            return None
        clusters = list(self.clusters.values())
        source = resource_name(scope, "")
        return next((c for c in clusters if source in c.hub.statuses), None) or next(
            (c for c in clusters if any(s.scope == scope for s in c.hub.statuses.values())),
            None,
        )

    def placed(self) -> list[tuple[WatchedCluster, AppStatus]]:
        """Every status with the cluster it was read from, each scope from one cluster."""
        found: list[tuple[WatchedCluster, AppStatus]] = []
        owners: dict[str, WatchedCluster | None] = {}
        for cluster in self.clusters.values():
            for status in cluster.hub.statuses.values():
                if status.scope not in owners:
                    owners[status.scope] = self._owner(status.scope)
                if owners[status.scope] is cluster:
                    found.append((cluster, status))
        return found

    def snapshot(self) -> list[AppStatus]:
        return [status for _cluster, status in self.placed()]

    def cluster_of(self, scope: str) -> WatchedCluster | None:
        return self._owner(scope)

    def shown(self, change: StatusChange) -> bool:
        """Whether a change is of a status the pages show: a cluster's own change, or a
        status of the cluster its scope is read from."""
        if change.cluster is not None:
            return True
        owner = self._owner(change.name.partition(".")[0])
        return owner is None or owner.name == change.hub

    def version(self, status: AppStatus) -> str:
        cluster = self._owner(status.scope)
        fallback = (status.last_applied_revision or "")[:12]
        return cluster.hub.versions.get(status.name, fallback) if cluster else fallback

    def matrix(
        self,
        statuses: list[AppStatus],
        *,
        order: list[str],
        version: Callable[[AppStatus], str],
    ) -> views.Matrix:
        """The matrix of these statuses; `version` names what each app runs."""
        placed = self.placed()
        wanted = {s.name for s in statuses}
        versions = {s.name: version(s) for _c, s in placed if s.name in wanted}
        cluster_of = {s.scope: c.name for c, s in placed}
        cluster_of |= {env: name for env, name in self.declared.items() if env not in cluster_of}
        clusters = [c.out() for c in self.clusters.values()]
        clusters += [
            views.ClusterOut(name=f"({env})", reachable=False, error=why, environments=[env])
            for env, why in self.unconfigured.items()
        ]
        cluster_of |= {env: f"({env})" for env in self.unconfigured}
        return views.matrix(
            [s for _c, s in placed if s.name in wanted],
            versions,
            order=order,
            clusters=clusters,
            cluster_of=cluster_of,
        )

    # -- the hub interface the event streams use -------------------------------------

    def subscribe(self) -> asyncio.Queue[StatusChange | None]:
        return self.subscribers.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[StatusChange | None]) -> None:
        self.subscribers.unsubscribe(queue)

    def states(self) -> list[ClusterState]:
        return [c.hub.state() for c in self.clusters.values()]
