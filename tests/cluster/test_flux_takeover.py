"""Moving a cluster from Flux to conveyor, without running Flux: what Flux left behind
is made here as Flux makes it (a release installed by plain `helm` with helm-controller's
labels on its objects, a ConfigMap applied server-side as field manager
`kustomize-controller` with kustomize-controller's labels, and Deployments in
flux-system named like Flux's controllers). While those run, conveyor refuses the apps
they reconcile and says how to suspend them; once they are scaled to 0, it adopts both:
the release's next revision, the ConfigMap's fields, uids unchanged."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.cluster.ownership import OWNER_LABEL
from tests.cluster.gitops import (
    CHART,
    ConfigRepo,
    by_name,
    flux_kustomization,
    kubectl_json,
    reconcile_json,
    wait_for,
)
from tests.cluster.test_flux_v2 import oci_charts  # noqa: F401 (the chart on the registry)
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster

HELM_LABELS = ("helm.toolkit.fluxcd.io/name", "helm.toolkit.fluxcd.io/namespace")
KUSTOMIZE_LABELS = ("kustomize.toolkit.fluxcd.io/name", "kustomize.toolkit.fluxcd.io/namespace")
CONTROLLERS = ("helm-controller", "kustomize-controller")


@pytest.fixture
def flux_controllers(sandbox: SandboxHandle) -> Iterator[None]:
    """Deployments named like Flux's controllers in flux-system, ready (kwok runs their
    pods); deleted afterwards, whatever the test scaled them to."""
    sandbox.run("kubectl", "create", "namespace", "flux-system", check=False)
    for name in CONTROLLERS:
        sandbox.run(
            "kubectl",
            "create",
            "deployment",
            name,
            "-n",
            "flux-system",
            f"--image=ghcr.io/fluxcd/{name}:v1.0.0",
        )
    for name in CONTROLLERS:
        wait_for(
            lambda name=name: (
                (kubectl_json(sandbox, "get", "deployment", name, "-n", "flux-system") or {})
                .get("status", {})
                .get("readyReplicas")
            ),
            what=f"{name} ready",
        )
    yield
    sandbox.run("kubectl", "delete", "deployment", *CONTROLLERS, "-n", "flux-system", check=False)


def install_as_flux(
    sandbox: SandboxHandle, tmp_path: Path, release: str, namespace: str, *, origin: str
) -> None:
    """`helm install` of the chart as helm-controller installs a HelmRelease `origin`
    (NAMESPACE/NAME): a post-renderer labels every object as helm-controller's does
    (internal/postrender/origin_labels.go)."""
    origin_namespace, origin_name = origin.split("/")
    program = tmp_path / f"origin-labels-{origin_name}"
    labels = {HELM_LABELS[0]: origin_name, HELM_LABELS[1]: origin_namespace}
    program.write_text(
        f"#!{sys.executable}\n"
        "import sys, yaml\n"
        "docs = [d for d in yaml.safe_load_all(sys.stdin) if d]\n"
        "for d in docs:\n"
        f"    d.setdefault('metadata', {{}}).setdefault('labels', {{}}).update({labels!r})\n"
        "sys.stdout.write(yaml.safe_dump_all(docs))\n"
    )
    program.chmod(0o755)
    sandbox.run(
        "helm",
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--set",
        f"image.repository=registry.local/{origin_name}",
        f"--post-renderer={program}",
    )


def move_storage(sandbox: SandboxHandle, release: str, source: str, target: str) -> None:
    """Move a release's stored revisions to another namespace: where helm-controller keeps
    a HelmRelease's release when its targetNamespace is not its own namespace."""
    selector = f"owner=helm,name={release}"
    listing = kubectl_json(sandbox, "get", "secret", "-n", source, "-l", selector)
    assert listing is not None and listing["items"]
    for secret in listing["items"]:
        metadata = secret["metadata"]
        secret["metadata"] = {
            "name": metadata["name"],
            "namespace": target,
            "labels": metadata["labels"],
        }
        sandbox.run("kubectl", "create", "-f", "-", input=json.dumps(secret))
    sandbox.run("kubectl", "delete", "secret", "-n", source, "-l", selector)


def settings(namespace: str, data: dict[str, str]) -> str:
    """The ConfigMap as kustomize-controller applied it: with its Kustomization's labels."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "settings",
                "namespace": namespace,
                "labels": {KUSTOMIZE_LABELS[0]: "apps", KUSTOMIZE_LABELS[1]: "flux-system"},
            },
            "data": data,
        }
    )


def flux_repo(repo: ConfigRepo, registry: str, namespace: str) -> None:
    """The repository Flux ran from, in the official example's shape: Kustomization
    `apps` builds apps/staging (the ConfigMap), `releases` apps/releases (HelmRelease
    podinfo, an app of its own that waits for its build), `infra` apps/infra (HelmRelease
    web in flux-system, installed into the test's namespace: Flux keeps its release in
    flux-system); `other` is an app Flux never touched."""
    repo.write("clusters/staging/apps.yaml", flux_kustomization("apps", "./apps/staging"))
    repo.write("clusters/staging/releases.yaml", flux_kustomization("releases", "./apps/releases"))
    repo.write("clusters/staging/other.yaml", flux_kustomization("other", "./apps/other"))
    repo.write("clusters/staging/infra.yaml", flux_kustomization("infra", "./apps/infra"))
    repo.write("apps/infra/kustomization.yaml", "resources: [repository.yaml, web.yaml]\n")
    repo.write(
        "apps/infra/repository.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: HelmRepository
        metadata: {{name: charts, namespace: flux-system}}
        spec: {{type: oci, interval: 5m, url: "{registry}"}}
        """,
    )
    repo.write(
        "apps/infra/web.yaml",
        f"""
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {{name: web, namespace: flux-system}}
        spec:
          interval: 10m
          targetNamespace: {namespace}
          chart:
            spec:
              chart: service
              version: 0.1.0
              sourceRef: {{kind: HelmRepository, name: charts}}
          values:
            image: {{repository: registry.local/web}}
        """,
    )
    repo.write(
        "apps/staging/kustomization.yaml",
        f"""
        namespace: {namespace}
        resources: [settings.yaml]
        """,
    )
    repo.write(
        "apps/releases/kustomization.yaml",
        f"""
        namespace: {namespace}
        resources: [repository.yaml, release.yaml]
        """,
    )
    repo.write(
        "apps/releases/repository.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: HelmRepository
        metadata: {{name: charts}}
        spec: {{type: oci, interval: 5m, url: "{registry}"}}
        """,
    )
    repo.write(
        "apps/releases/release.yaml",
        """
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {name: podinfo}
        spec:
          interval: 10m
          chart:
            spec:
              chart: service
              version: 0.1.0
              sourceRef: {kind: HelmRepository, name: charts}
          values:
            image: {repository: registry.local/podinfo}
        """,
    )
    repo.write(
        "apps/staging/settings.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: settings}
        data: {a: "1", b: "2"}
        """,
    )
    repo.write(
        "apps/other/kustomization.yaml",
        f"namespace: {namespace}\nresources: [other.yaml]\n",
    )
    repo.write(
        "apps/other/other.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\ndata: {k: v}\n",
    )


def live(sandbox: SandboxHandle, kind: str, name: str, namespace: str) -> dict[str, Any]:
    found = kubectl_json(sandbox, "get", kind, name, "-n", namespace, "--show-managed-fields")
    assert found is not None, f"{kind} {namespace}/{name} is gone"
    return found


def managers(obj: dict[str, Any]) -> set[str]:
    return {entry["manager"] for entry in obj["metadata"].get("managedFields", [])}


def labels(obj: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = obj["metadata"].get("labels") or {}
    return found


def revisions(sandbox: SandboxHandle, namespace: str, release: str = "podinfo") -> list[int]:
    out = sandbox.run("helm", "history", release, "-n", namespace, "-o", "json").stdout
    return [int(r["revision"]) for r in json.loads(out)]


def test_refused_while_flux_runs_then_adopted_without_a_reinstall(
    sandbox: SandboxHandle,
    tmp_path: Path,
    oci_charts: str,  # noqa: F811
    namespace: str,
    flux_controllers: None,
) -> None:
    # What Flux left: a release installed by helm-controller, a ConfigMap applied by
    # kustomize-controller.
    install_as_flux(sandbox, tmp_path, "podinfo", namespace, origin=f"{namespace}/podinfo")
    web = f"{namespace}-web"  # helm-controller's name: targetNamespace-name
    install_as_flux(sandbox, tmp_path, web, namespace, origin="flux-system/web")
    move_storage(sandbox, web, namespace, "flux-system")
    web_deployment = live(sandbox, "deployment", web, namespace)
    sandbox.run(
        "kubectl",
        "apply",
        "--server-side",
        "--field-manager=kustomize-controller",
        "-f",
        "-",
        input=settings(namespace, {"a": "1", "b": "2"}),
    )
    deployment = live(sandbox, "deployment", "podinfo", namespace)
    assert set(HELM_LABELS) <= set(labels(deployment))
    config_map = live(sandbox, "configmap", "settings", namespace)
    repo = ConfigRepo(tmp_path / "config")
    flux_repo(repo, oci_charts, namespace)
    repo.commit()

    # Flux's controllers run (and without Flux's CRDs nothing says its objects are
    # suspended): its apps are refused, named, and left as they are; the other goes on.
    code, report = reconcile_json(sandbox, repo, "clusters/staging")
    apps = by_name(report)
    assert code != 0, report
    assert apps["other"]["ready"] and apps["releases"]["ready"], apps
    assert apps["web"]["reason"] == "FluxStillManages", apps["web"]
    assert "flux suspend helmrelease web -n flux-system" in apps["web"]["message"]
    assert apps["podinfo"]["reason"] == "FluxStillManages", apps["podinfo"]
    assert (
        f"HelmRelease {namespace}/podinfo (helm-controller is running)"
        in (apps["podinfo"]["message"])
    )
    assert f"flux suspend helmrelease podinfo -n {namespace}" in apps["podinfo"]["message"]
    assert apps["apps"]["reason"] == "FluxStillManages", apps["apps"]
    assert (
        "Kustomization flux-system/apps (kustomize-controller is running) for ConfigMap "
        in (apps["apps"]["message"])
    )
    assert "flux suspend kustomization apps -n flux-system" in apps["apps"]["message"]
    assert "kubectl -n flux-system scale deploy --all --replicas=0" in apps["apps"]["message"]
    assert revisions(sandbox, namespace) == [1]
    assert revisions(sandbox, "flux-system", web) == [1]
    unchanged = live(sandbox, "configmap", "settings", namespace)
    assert unchanged["metadata"]["resourceVersion"] == config_map["metadata"]["resourceVersion"]
    secret = kubectl_json(sandbox, "get", "secret", "-n", namespace, "-l", "name=podinfo")
    assert secret is not None
    assert [OWNER_LABEL in labels(s) for s in secret["items"]] == [False]

    # Flux stopped as the refusal says: the next pass adopts.
    sandbox.run("kubectl", "-n", "flux-system", "scale", "deploy", "--all", "--replicas=0")
    code, report = reconcile_json(sandbox, repo, "clusters/staging")
    apps = by_name(report)
    assert code == 0, report
    assert all(app["ready"] for app in apps.values()), apps
    # The release: upgraded to its next revision, never reinstalled; its objects keep
    # their uid and lose helm-controller's labels; its storage is conveyor's now.
    assert revisions(sandbox, namespace) == [1, 2]
    upgraded = live(sandbox, "deployment", "podinfo", namespace)
    assert upgraded["metadata"]["uid"] == deployment["metadata"]["uid"]
    assert not set(HELM_LABELS) & set(labels(upgraded))
    secrets = kubectl_json(
        sandbox, "get", "secret", "-n", namespace, "-l", "owner=helm,name=podinfo,version=2"
    )
    assert secrets is not None and OWNER_LABEL in labels(secrets["items"][0])
    # Flux kept web's release in flux-system; helm reads it where it installs: moved there,
    # then upgraded.
    assert revisions(sandbox, namespace, web) == [1, 2]
    assert (
        live(sandbox, "deployment", web, namespace)["metadata"]["uid"]
        == (web_deployment["metadata"]["uid"])
    )
    left = kubectl_json(sandbox, "get", "secret", "-n", "flux-system", "-l", f"name={web}")
    assert left is not None and left["items"] == []
    # The ConfigMap: the same object, its fields conveyor's, Flux's labels gone.
    adopted = live(sandbox, "configmap", "settings", namespace)
    assert adopted["metadata"]["uid"] == config_map["metadata"]["uid"]
    assert "kustomize-controller" not in managers(adopted)
    assert "conveyor" in managers(adopted)
    assert not set(KUSTOMIZE_LABELS) & set(labels(adopted))
    assert OWNER_LABEL in labels(adopted)

    # A field removed in git is removed from the object (kustomize-controller owned it
    # too: without the takeover it would stay).
    repo.write(
        "apps/staging/settings.yaml",
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: "1"}\n',
    )
    repo.commit("settings without b")
    code, report = reconcile_json(sandbox, repo, "clusters/staging")
    assert code == 0, report
    pruned = live(sandbox, "configmap", "settings", namespace)
    assert pruned["data"] == {"a": "1"}
    assert pruned["metadata"]["uid"] == config_map["metadata"]["uid"]
