"""Many clusters, the fast parts: which cluster an environment names, which columns the
matrix keeps (nothing current: gone; an unreachable cluster: kept, marked stale), and
which cluster a scope is read from. The real clusters: tests/cluster/test_fleet.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import yaml

from conveyor.cluster.client import KubeClient
from conveyor.cluster.kubeconfig import ClusterCredentials
from conveyor.config.project import Cluster, Environment
from conveyor.reconcile.fleet import read_environments
from conveyor.reconcile.status import API_VERSION, READY, SOURCE_KIND, STALLED, AppStatus
from conveyor.reconcile.target import ClusterRef, environment_cluster
from conveyor.web import views
from conveyor.web.fleet import Fleet, WatchedCluster
from conveyor.web.sse import StatusChange, StatusHub

OWNER = "0123456789abcdef"


def source(scope: str, *, apps: list[str] | None, owner: str | None = OWNER) -> AppStatus:
    return AppStatus(
        scope=scope,
        app="",
        kind=SOURCE_KIND,
        state=READY,
        last_applied_revision="c" * 40,
        owner=owner,
        apps=apps,
    )


def app(scope: str, name: str, *, owner: str | None = OWNER, state: str = READY) -> AppStatus:
    return AppStatus(
        scope=scope, app=name, state=state, last_applied_revision="c" * 40, owner=owner
    )


def test_an_environment_names_its_cluster_else_the_default_is_used() -> None:
    default = ClusterRef("/home/me/.kube/config", "laptop")
    plain = Environment(name="dev", path="dev")
    assert environment_cluster(plain, default=default) == default
    context_only = Environment(name="prod", path="prod", cluster=Cluster(context="eks-prod"))
    assert environment_cluster(context_only, default=default) == ClusterRef(
        "/home/me/.kube/config", "eks-prod"
    )
    own_file = Environment(name="ci", path="ci", cluster=Cluster(kubeconfig="/etc/ci.yaml"))
    assert environment_cluster(own_file, default=default) == ClusterRef("/etc/ci.yaml", None)


def test_columns_with_nothing_current_disappear_and_stale_cells_are_marked() -> None:
    statuses = [
        # live: one app in git, one left behind by an earlier pass
        source("staging", apps=["api"]),
        app("staging", "api"),
        app("staging", "old-worker"),
        # every app deleted from git (statuses not pruned yet): no column
        source("emptied", apps=[]),
        app("emptied", "api"),
        # the source status is gone, its apps stamped by an environment: no column
        app("orphaned", "api"),
        # written by hand or before owners: kept as it was
        app("legacy", "tool", owner=None),
        # a source with no app statuses left: no column
        source("nothing", apps=["api"]),
        # written by another environment of the same scope name
        source("shared", apps=["api"]),
        app("shared", "api", owner="fedcba9876543210"),
    ]
    matrix = views.matrix(statuses, {}, order=["staging"])
    assert [e.name for e in matrix.environments] == ["staging", "legacy", "shared"]
    staging = matrix.cell("staging", "api")
    left = matrix.cell("staging", "old-worker")
    assert staging is not None and staging.stale is None
    assert left is not None and left.stale == f"not in git at {'c' * 12}: left from an earlier pass"
    shared = matrix.cell("shared", "api")
    assert shared is not None and shared.stale and "another environment" in shared.stale
    legacy = matrix.cell("legacy", "tool")
    assert legacy is not None and legacy.stale is None
    assert matrix.environments[0].apps == 2 and matrix.environments[0].ready == 2


def test_an_unreachable_cluster_keeps_its_columns_marked_stale() -> None:
    statuses = [
        source("staging", apps=["api"]),
        app("staging", "api"),
        source("production", apps=["api"]),
        app("production", "api", state=STALLED),
        source("emptied", apps=[]),  # on the unreachable cluster: shown as last read
        app("emptied", "api"),
    ]
    clusters = [
        views.ClusterOut(name="eks-staging", reachable=True, last_read="2026-12-01T10:00:00Z"),
        views.ClusterOut(
            name="eks-prod",
            reachable=False,
            last_read="2026-12-01T09:58:00Z",
            error="connection refused",
            environments=["production", "emptied", "canary"],
        ),
    ]
    placed = {"staging": "eks-staging", "production": "eks-prod", "emptied": "eks-prod"}
    placed["canary"] = "eks-prod"
    matrix = views.matrix(
        statuses,
        {},
        order=["staging", "canary", "production"],
        clusters=clusters,
        cluster_of=placed,
    )
    names = [e.name for e in matrix.environments]
    assert names == ["staging", "canary", "production", "emptied"]  # canary: never read
    production = next(e for e in matrix.environments if e.name == "production")
    assert (production.cluster, production.reachable) == ("eks-prod", False)
    assert production.last_read == "2026-12-01T09:58:00Z"
    cell = matrix.cell("production", "api")
    assert cell is not None
    assert cell.stale == "cluster eks-prod unreachable; last read 2026-12-01T09:58:00Z"
    live = matrix.cell("staging", "api")
    assert live is not None and live.stale is None
    assert [c.name for c in matrix.clusters] == ["eks-staging", "eks-prod"]


def _watched(name: str, statuses: list[AppStatus], environments: list[str]) -> WatchedCluster:
    kube = KubeClient(ClusterCredentials(server="https://127.0.0.1:1", context=name))

    async def version(_status: AppStatus) -> str:
        return ""

    hub = StatusHub(kube, version_of=version, cluster=name)
    hub.statuses = {s.name: s for s in statuses}
    return WatchedCluster(name, ClusterRef(None, name), kube, hub, environments)


def test_a_scope_is_read_from_its_environments_cluster_only() -> None:
    fleet = Fleet(default=ClusterRef())
    staging = _watched(
        "eks-staging",
        [source("staging", apps=["api"]), app("staging", "api"), app("team-b", "tool")],
        ["staging"],
    )
    # production's cluster also holds a leftover `staging` scope: never shown
    production = _watched(
        "eks-prod",
        [
            source("production", apps=["api"]),
            app("production", "api"),
            app("staging", "api"),
            app("team-b", "tool"),
        ],
        ["production"],
    )
    fleet.clusters = {"eks-staging": staging, "eks-prod": production}
    fleet.declared = {"staging": "eks-staging", "production": "eks-prod"}
    placed = {(c.name, s.name) for c, s in fleet.placed()}
    assert placed == {
        ("eks-staging", "staging"),
        ("eks-staging", "staging.api"),
        ("eks-staging", "team-b.tool"),  # not in conveyor.yaml: the first cluster with it
        ("eks-prod", "production"),
        ("eks-prod", "production.api"),
    }
    cluster = fleet.cluster_of("production")
    assert cluster is not None and cluster.name == "eks-prod"
    assert fleet.shown(StatusChange("staging.api", app("staging", "api"), hub="eks-staging"))
    assert not fleet.shown(StatusChange("staging.api", app("staging", "api"), hub="eks-prod"))


def test_an_environment_whose_cluster_is_not_in_the_kubeconfig_is_reported(
    tmp_path: Path,
) -> None:
    config = tmp_path / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "a", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "a", "user": {"token": "t"}}],
                "contexts": [{"name": "a", "context": {"cluster": "a", "user": "a"}}],
                "current-context": "a",
            }
        )
    )
    environments = [Environment(name="prod", path="prod", cluster=Cluster(context="eks-prod"))]
    (read,) = asyncio.run(
        read_environments(environments, default=ClusterRef(str(config), None), timeout=5)
    )
    assert not read.reachable and read.statuses == []
    assert read.error is not None and "no context named 'eks-prod'" in read.error


class FakeApiserver:
    """A ConveyorApp list and a watch that stays open, until `down`: then every request
    is refused, as a stopped apiserver's port refuses them."""

    def __init__(self) -> None:
        self.down = asyncio.Event()
        self.item = {
            "metadata": {"name": "staging.api", "resourceVersion": "5"},
            "spec": {"scope": "staging", "app": "api"},
            "status": {"state": READY, "lastAppliedRevision": "a" * 40},
        }

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down.is_set():
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == f"/apis/{API_VERSION}":
            resource = {"name": "conveyorapps", "kind": "ConveyorApp", "namespaced": True}
            return httpx.Response(200, json={"resources": [resource]})
        if request.url.path == "/version":
            return httpx.Response(200, json={"major": "1"})
        if request.url.params.get("watch") == "true":
            down = self.down

            async def lines() -> AsyncIterator[bytes]:
                await down.wait()  # a watch that ends when the server goes away
                raise httpx.ReadError("connection reset")
                yield b""  # an async generator

            return httpx.Response(200, content=lines())
        return httpx.Response(
            200, json={"metadata": {"resourceVersion": "5"}, "items": [self.item]}
        )


def test_a_hub_says_when_its_cluster_stops_answering_and_reads_it_again() -> None:
    async def scenario() -> None:
        server = FakeApiserver()
        credentials = ClusterCredentials(server="https://kube.test", context="eks-prod", token="t")
        kube = KubeClient(credentials, transport=httpx.MockTransport(server))

        async def version(_status: AppStatus) -> str:
            return "1.0.0"

        hub = StatusHub(kube, version_of=version, cluster="eks-prod", probe_seconds=0.1)
        queue = hub.subscribe()
        hub.start()
        try:
            await asyncio.wait_for(hub.synced.wait(), 5)
            assert hub.reachable and hub.state().last_read is not None
            assert list(hub.statuses) == ["staging.api"]
            server.down.set()
            changes = []
            while not changes or changes[-1].cluster is None or changes[-1].cluster.reachable:
                changes.append(await asyncio.wait_for(queue.get(), 10))
            down = changes[-1].cluster
            assert down is not None and down.name == "eks-prod" and down.error
            assert not hub.reachable and list(hub.statuses) == ["staging.api"]  # kept
            server.down.clear()
            back = None
            while back is None or not back.reachable:
                change = await asyncio.wait_for(queue.get(), 15)
                if change is not None and change.cluster is not None:
                    back = change.cluster
            assert hub.reachable and hub.error is None
        finally:
            await hub.close()
            await kube.aclose()

    asyncio.run(scenario())
