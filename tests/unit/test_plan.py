"""The plan phase without a cluster: which objects an app's plan applies (as labelled),
with which identities, and what it prunes, for plain apps and apps with a Helm release.
Discovery is answered by a fake wire under a real KubeClient. The same plan applied and
shown on the sandbox: tests/cluster/test_reconcile.py (diff, then reconcile)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from conveyor.cluster.apply import APP_LABEL, SCOPE_LABEL
from conveyor.cluster.client import KubeClient
from conveyor.cluster.kubeconfig import ClusterCredentials
from conveyor.cluster.objects import ObjectRef
from conveyor.cluster.ownership import (
    ADOPT_ANNOTATION,
    OWNER_LABEL,
    SOURCE_ANNOTATION,
    EnvironmentIdentity,
)
from conveyor.reconcile.plan import AppPlan, apps_left, plan_app
from conveyor.reconcile.status import SOURCE_KIND, AppStatus
from conveyor.render.discover import AppSource
from conveyor.render.render import RenderedApp
from tests.unit.test_engine_robustness import released

Obj = dict[str, Any]
IDENTITY = EnvironmentIdentity.of(
    "https://git.example/config.git", branch="main", path="envs/staging", name="staging"
)
RESOURCES = {
    "/api/v1": [
        {"name": "configmaps", "kind": "ConfigMap", "namespaced": True},
        {"name": "namespaces", "kind": "Namespace", "namespaced": False},
    ],
    "/apis/apps/v1": [{"name": "deployments", "kind": "Deployment", "namespaced": True}],
}


def config_map(name: str, namespace: str | None = "team", **metadata: Any) -> Obj:
    meta: Obj = {"name": name, **metadata}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": name}}


def plain(*objects: Obj) -> RenderedApp:
    return RenderedApp(
        source=AppSource(name="web", kind="manifests", path="envs/staging/web"),
        objects=list(objects),
        helm=None,
        fingerprint="f",
        depends_on=[],
        suspend=False,
        drift="enabled",
    )


def ref(name: str, namespace: str = "team", kind: str = "ConfigMap") -> ObjectRef:
    return ObjectRef("v1", kind, namespace, name)


def plan_of(
    app: RenderedApp, status: AppStatus | None, *, prune: bool = True
) -> tuple[AppPlan, list[tuple[str, str]]]:
    """The plan, and the requests it cost (discovery only, never a write)."""
    seen: list[tuple[str, str]] = []

    def apiserver(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        resources = RESOURCES.get(request.url.path)
        if resources is None:
            return httpx.Response(404, json={"kind": "Status", "code": 404})
        return httpx.Response(200, json={"resources": resources})

    async def scenario() -> AppPlan:
        credentials = ClusterCredentials(server="https://kube.test", context="t", token="tok")
        async with KubeClient(credentials, transport=httpx.MockTransport(apiserver)) as kube:
            plan = await plan_app(
                kube, app, status, identity=IDENTITY, scope="staging", prune=prune
            )
            assert kube.writes == 0
            return plan

    return asyncio.run(scenario()), seen


def test_a_plan_holds_the_objects_as_applied_with_the_namespaces_they_really_get() -> None:
    app = plain(
        config_map("settings", labels={"tier": "web"}, annotations={ADOPT_ANNOTATION: "x"}),
        config_map("defaults", namespace=None),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team", "namespace": "x"}},
    )
    plan, requests = plan_of(app, None)
    assert plan.name == "web" and plan.app is app and plan.helm is None
    assert plan.refs == [ref("settings"), ref("defaults", "default"), ref("team", "", "Namespace")]
    labels = plan.objects[0]["metadata"]["labels"]
    assert labels == {
        "tier": "web",
        APP_LABEL: "web",
        SCOPE_LABEL: "staging",
        OWNER_LABEL: IDENTITY.id,
    }
    # The adopt request is for conveyor, not part of the object applied.
    assert plan.objects[0]["metadata"]["annotations"] == {SOURCE_ANNOTATION: IDENTITY.source}
    assert app.objects[0]["metadata"]["labels"] == {"tier": "web"}  # the render is untouched
    assert plan.desired == list(zip(plan.refs, plan.objects, strict=True))
    assert plan.prune == []  # nothing was applied before
    assert requests == [("GET", "/api/v1")]  # discovery once, nothing written


def test_a_plain_app_prunes_what_its_inventory_holds_and_it_no_longer_has() -> None:
    status = AppStatus(scope="staging", app="web")
    status.inventory = [
        ObjectRef("apps/v1", "Deployment", "team", "old-worker"),
        ref("settings"),
        ref("gone"),
        ref("defaults", "default"),
    ]
    plan, _ = plan_of(plain(config_map("settings"), config_map("defaults", None)), status)
    assert plan.prune == [ObjectRef("apps/v1", "Deployment", "team", "old-worker"), ref("gone")]
    # An object of the same group under another API version is the same object.
    status.inventory = [ObjectRef("apps/v1beta2", "Deployment", "team", "worker")]
    worker: Obj = {"apiVersion": "apps/v1", "kind": "Deployment"}
    worker["metadata"] = {"name": "worker", "namespace": "team"}
    assert plan_of(plain(worker), status)[0].prune == []


def test_prune_off_and_helm_apps_prune_nothing_of_their_inventory() -> None:
    status = AppStatus(scope="staging", app="web")
    status.inventory = [ref("gone")]
    assert plan_of(plain(config_map("settings")), status, prune=False)[0].prune == []
    app = released("web")
    plan, requests = plan_of(app, status)
    assert plan.helm is app.helm and plan.objects == [] and plan.refs == []
    assert plan.prune == []  # Helm prunes its release's objects itself
    assert requests == []


def test_an_empty_render_plans_to_prune_all_the_app_had() -> None:
    status = AppStatus(scope="staging", app="web")
    status.inventory = [ref("settings"), ref("gone")]
    plan, _ = plan_of(plain(), status)
    assert plan.app.empty and plan.prune == [ref("settings"), ref("gone")]


def test_apps_that_left_git_are_those_of_the_environment_not_rendered_never_its_source() -> None:
    statuses = {
        "": AppStatus(scope="staging", app="", kind=SOURCE_KIND),
        "web": AppStatus(scope="staging", app="web"),
        "old": AppStatus(scope="staging", app="old"),
    }
    assert [s.app for s in apps_left(statuses, ["web"])] == ["old"]
    assert apps_left(statuses, {"web", "old"}) == []
