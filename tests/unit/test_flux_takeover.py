"""Taking over from Flux without a cluster: which Flux object an object or a stored
release names, how kustomize-controller's fields become conveyor's, and when Flux counts
as still running (its Deployments and objects answered by a fake wire under a real
KubeClient). The same on the sandbox: tests/cluster/test_flux_takeover.py."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from conveyor.cluster.client import KubeClient
from conveyor.cluster.flux import (
    FluxInstallation,
    FluxObject,
    flux_origin,
    needs_takeover,
    refusal_message,
    release_origin,
    taken_over_fields,
)
from conveyor.cluster.kubeconfig import ClusterCredentials

Obj = dict[str, Any]
APPS = FluxObject("Kustomization", "flux-system", "apps")
WEB = FluxObject("HelmRelease", "team", "web")


def labelled(**labels: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labels": labels}}


def entry(manager: str, fields: Obj, *, api_version: str = "v1", **extra: str) -> Obj:
    return {
        "manager": manager,
        "operation": "Apply",
        "apiVersion": api_version,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
        **extra,
    }


def managed(*entries: Obj) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"managedFields": list(entries)}}


def test_the_flux_object_an_object_names() -> None:
    kustomized = labelled(
        **{
            "kustomize.toolkit.fluxcd.io/name": "apps",
            "kustomize.toolkit.fluxcd.io/namespace": "flux-system",
        }
    )
    assert flux_origin(kustomized) == APPS
    released = labelled(
        **{"helm.toolkit.fluxcd.io/name": "web", "helm.toolkit.fluxcd.io/namespace": "team"}
    )
    assert flux_origin(released) == WEB
    assert flux_origin(labelled(**{"kustomize.toolkit.fluxcd.io/name": "apps"})) is None
    assert flux_origin(labelled(app="web")) is None
    assert flux_origin(None) is None
    assert str(WEB) == "HelmRelease team/web"
    assert WEB.suspend_command == "flux suspend helmrelease web -n team"
    assert APPS.suspend_command == "flux suspend kustomization apps -n flux-system"


def test_a_stored_release_names_its_helmrelease_by_its_objects_labels() -> None:
    manifest = """---
# Source: service/templates/service.yaml
apiVersion: v1
kind: Service
metadata:
  name: web
  labels:
    helm.toolkit.fluxcd.io/name: web
    helm.toolkit.fluxcd.io/namespace: team
"""
    assert release_origin(manifest) == WEB
    assert release_origin("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n") is None
    assert release_origin("") is None
    assert release_origin("a: [unclosed") is None


def test_kustomize_controllers_fields_become_conveyors() -> None:
    flux = entry("kustomize-controller", {"f:data": {"f:a": {}, "f:b": {}}})
    status = entry("kube-controller-manager", {"f:status": {}}, subresource="status")
    fields = taken_over_fields(managed(flux, status))
    assert fields == [
        status,
        {**flux, "manager": "conveyor", "fieldsV1": {"f:data": {"f:a": {}, "f:b": {}}}},
    ]
    # Beside conveyor's own entry: one set, owned by conveyor.
    ours = entry("conveyor", {"f:data": {"f:a": {}}, "f:metadata": {"f:labels": {}}})
    fields = taken_over_fields(managed(ours, flux))
    assert fields == [
        {**ours, "fieldsV1": {"f:data": {"f:a": {}, "f:b": {}}, "f:metadata": {"f:labels": {}}}}
    ]
    # Recorded at another apiVersion: left unowned, not merged into the wrong schema.
    old = entry("kustomize-controller", {"f:spec": {}}, api_version="autoscaling/v2beta2")
    assert taken_over_fields(managed(ours, old)) == [ours]
    assert taken_over_fields(managed(ours, status)) is None


def test_what_needs_taking_over() -> None:
    assert needs_takeover(labelled(**{"helm.toolkit.fluxcd.io/name": "web"}))
    assert needs_takeover(managed(entry("kustomize-controller", {"f:data": {}})))
    assert not needs_takeover(managed(entry("conveyor", {"f:data": {}})))
    assert not needs_takeover(labelled(app="web"))
    assert not needs_takeover(None)


def test_the_refusal_names_the_flux_objects_and_how_to_suspend_them() -> None:
    message = refusal_message({APPS: ["ConfigMap team/c"], WEB: ["Helm release team/web"]})
    assert "HelmRelease team/web (helm-controller is running) for Helm release team/web" in message
    assert "Kustomization flux-system/apps (kustomize-controller is running)" in message
    assert "flux suspend kustomization apps -n flux-system" in message
    assert "flux suspend helmrelease web -n team" in message
    assert "kubectl -n flux-system scale deploy --all --replicas=0" in message
    assert "nothing of it was changed" in message


def controller(replicas: int, ready: int | None) -> Obj:
    status = {"readyReplicas": ready} if ready is not None else {}
    return {"kind": "Deployment", "spec": {"replicas": replicas}, "status": status}


RESOURCES = {
    "/apis/apps/v1": [{"name": "deployments", "kind": "Deployment", "namespaced": True}],
    "/apis/kustomize.toolkit.fluxcd.io/v1": [
        {"name": "kustomizations", "kind": "Kustomization", "namespaced": True}
    ],
}


def still_reconciling(
    objects: dict[str, Obj], *, crds: bool = True, forbidden: tuple[str, ...] = ()
) -> tuple[list[str], int]:
    """Which of APPS and WEB Flux still reconciles with these objects in the cluster
    (path → object), and how many requests it took to know."""
    requests: list[str] = []

    def apiserver(request: httpx.Request) -> httpx.Response:
        requests.append(request.url.path)
        if any(request.url.path.startswith(path) for path in forbidden):
            return httpx.Response(403, json={"kind": "Status", "code": 403, "reason": "Forbidden"})
        resources = RESOURCES.get(request.url.path)
        if resources is not None and (crds or "toolkit" not in request.url.path):
            return httpx.Response(200, json={"resources": resources})
        if request.url.path in objects:
            return httpx.Response(200, json=objects[request.url.path])
        return httpx.Response(404, json={"kind": "Status", "code": 404, "reason": "NotFound"})

    async def scenario() -> list[str]:
        credentials = ClusterCredentials(server="https://kube.test", context="t", token="tok")
        async with KubeClient(credentials, transport=httpx.MockTransport(apiserver)) as kube:
            flux = FluxInstallation(kube)
            first = await flux.still_reconciling([APPS, WEB, APPS])
            again = await flux.still_reconciling([APPS])  # read once per pass
            assert again == [o for o in first if o == APPS]
            return [str(o) for o in first]

    return asyncio.run(scenario()), len(requests)


DEPLOYMENTS = "/apis/apps/v1/namespaces/flux-system/deployments"
KUSTOMIZATION = "/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/flux-system/kustomizations/apps"


@pytest.mark.parametrize(
    ("objects", "crds", "expected"),
    [
        # No Flux in the cluster at all.
        ({}, True, []),
        # kustomize-controller runs and its Kustomization is there, not suspended.
        (
            {f"{DEPLOYMENTS}/kustomize-controller": controller(1, 1), KUSTOMIZATION: {}},
            True,
            ["Kustomization flux-system/apps"],
        ),
        # ... suspended (`flux suspend kustomization apps`): conveyor takes over.
        (
            {
                f"{DEPLOYMENTS}/kustomize-controller": controller(1, 1),
                KUSTOMIZATION: {"spec": {"suspend": True}},
            },
            True,
            [],
        ),
        # ... deleted: nothing reconciles it.
        ({f"{DEPLOYMENTS}/kustomize-controller": controller(1, 1)}, True, []),
        # Without Flux's CRDs, the running controllers alone decide.
        (
            {f"{DEPLOYMENTS}/kustomize-controller": controller(1, 1)},
            False,
            ["Kustomization flux-system/apps"],
        ),
        (
            {f"{DEPLOYMENTS}/helm-controller": controller(1, 1)},
            False,
            ["HelmRelease team/web"],
        ),
        # Scaled to 0 (its pods may still be terminating), or never ready.
        ({f"{DEPLOYMENTS}/kustomize-controller": controller(0, 1)}, False, []),
        ({f"{DEPLOYMENTS}/helm-controller": controller(1, None)}, False, []),
    ],
)
def test_whether_flux_still_reconciles(
    objects: dict[str, Obj], crds: bool, expected: list[str]
) -> None:
    found, _ = still_reconciling(objects, crds=crds)
    assert found == expected


def test_what_rbac_hides_counts_as_flux_running_unless_its_crds_are_gone() -> None:
    """An agent confined to its namespaces may not read flux-system."""
    hidden = (DEPLOYMENTS, "/apis/kustomize.toolkit.fluxcd.io/v1/namespaces")
    found, _ = still_reconciling({}, forbidden=hidden)
    assert found == ["Kustomization flux-system/apps"]
    found, _ = still_reconciling(
        {KUSTOMIZATION: {"spec": {"suspend": True}}}, forbidden=(DEPLOYMENTS,)
    )
    assert found == []
    found, _ = still_reconciling({}, crds=False, forbidden=(DEPLOYMENTS,))
    assert found == []


def test_without_flux_the_check_is_two_reads() -> None:
    """Both controllers' Deployments missing: nothing else is looked up."""
    _, requests = still_reconciling({})
    assert requests == 3  # discovery of apps/v1, then one GET per controller
