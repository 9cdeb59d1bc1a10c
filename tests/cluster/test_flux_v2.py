"""Flux v2 repositories as they are, on the sandbox: Flux Kustomizations pointing at
overlays of one base, HelmReleases from an OCI HelmRepository on the sandbox's registry,
installed with the real helm, and a cluster that never sees a Flux object."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.source.git import run_git
from tests.cluster.gitops import (
    CHART,
    ConfigRepo,
    by_name,
    conveyor,
    flux_kustomization,
    kubectl_json,
    reconcile_json,
)
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


@pytest.fixture
def repo(tmp_path: Path) -> ConfigRepo:
    return ConfigRepo(tmp_path)


@pytest.fixture
def namespaces(sandbox: SandboxHandle) -> Iterator[dict[str, str]]:
    """A namespace per environment; the overlays create them (their Namespace object)."""
    suffix = uuid.uuid4().hex[:6]
    names = {env: f"f{suffix}-{env}" for env in ("staging", "production")}
    yield names
    for name in names.values():
        sandbox.run("kubectl", "delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def oci_charts(sandbox: SandboxHandle, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The example chart as an OCI artifact on the sandbox's registry."""
    folder = tmp_path_factory.mktemp("chart")
    sandbox.run("helm", "package", str(CHART), "--destination", str(folder))
    registry = f"oci://{sandbox.registry}/flux-charts"
    sandbox.run("helm", "push", str(folder / "service-0.1.0.tgz"), registry, "--plain-http")
    return registry


def example_repo(repo: ConfigRepo, registry: str, namespaces: dict[str, str]) -> None:
    """fluxcd/flux2-kustomize-helm-example's shape, with our chart: clusters/<env> holds
    Flux's installation and a Kustomization of apps/<env>, an overlay of apps/base."""
    for env, replicas in (("staging", 1), ("production", 2)):
        repo.write(f"clusters/{env}/apps.yaml", flux_kustomization("apps", f"./apps/{env}"))
        repo.write(
            f"clusters/{env}/flux-system/kustomization.yaml",
            "resources: [gotk-components.yaml, gotk-sync.yaml]\n",
        )
        repo.write(
            f"clusters/{env}/flux-system/gotk-components.yaml",
            """
            apiVersion: apiextensions.k8s.io/v1
            kind: CustomResourceDefinition
            metadata: {name: helmreleases.helm.toolkit.fluxcd.io}
            spec:
              group: helm.toolkit.fluxcd.io
              names: {kind: HelmRelease, plural: helmreleases}
              scope: Namespaced
              versions:
                - name: v2
                  served: true
                  storage: true
                  schema:
                    openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
            """,
        )
        repo.write(
            f"clusters/{env}/flux-system/gotk-sync.yaml",
            flux_kustomization("flux-system", f"./clusters/{env}"),
        )
        repo.write(
            f"apps/{env}/kustomization.yaml",
            f"""
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            namespace: {namespaces[env]}
            resources: [../base/podinfo]
            patches:
              - target: {{kind: HelmRelease, name: podinfo}}
                patch: |
                  - op: add
                    path: /spec/values/replicaCount
                    value: {replicas}
                  - op: add
                    path: /spec/values/image/tag
                    value: "{env}-1.0.0"
            """,
        )
    repo.write(
        "apps/base/podinfo/kustomization.yaml",
        "resources: [namespace.yaml, repository.yaml, release.yaml]\n",
    )
    repo.write(
        "apps/base/podinfo/namespace.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: podinfo}\n",
    )
    repo.write(
        "apps/base/podinfo/repository.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: HelmRepository
        metadata: {{name: podinfo, namespace: podinfo}}
        spec: {{type: oci, interval: 5m, url: "{registry}"}}
        """,
    )
    repo.write(
        "apps/base/podinfo/release.yaml",
        """
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {name: podinfo, namespace: podinfo}
        spec:
          interval: 50m
          chart:
            spec:
              chart: service
              version: 0.1.0
              sourceRef: {kind: HelmRepository, name: podinfo}
          values:
            image: {repository: registry.local/podinfo}
        """,
    )


def helm_values(sandbox: SandboxHandle, release: str, namespace: str) -> dict[str, Any]:
    result = sandbox.run("helm", "get", "values", release, "-n", namespace, "-o", "json")
    values: dict[str, Any] = json.loads(result.stdout)
    return values


def test_official_example_shape_installs_each_environment_with_helm(
    sandbox: SandboxHandle, repo: ConfigRepo, oci_charts: str, namespaces: dict[str, str]
) -> None:
    example_repo(repo, oci_charts, namespaces)
    repo.commit()
    for env, replicas in (("staging", 1), ("production", 2)):
        code, report = reconcile_json(sandbox, repo, f"clusters/{env}")
        assert code == 0, report
        apps = by_name(report)
        assert set(apps) == {"apps", "podinfo"}  # Flux's installation is not an app
        assert apps["podinfo"]["ready"] and apps["apps"]["ready"]
        namespace = namespaces[env]
        assert helm_values(sandbox, "podinfo", namespace) == {
            "image": {"repository": "registry.local/podinfo", "tag": f"{env}-1.0.0"},
            "replicaCount": replicas,
        }
        live = kubectl_json(sandbox, "get", "deployment", "podinfo", "-n", namespace)
        assert live is not None and live["spec"]["replicas"] == replicas
    # No Flux object reached the cluster: not its CRDs, not a HelmRelease.
    crds = kubectl_json(sandbox, "get", "crd")
    assert crds is not None
    assert not [c for c in crds["items"] if "fluxcd.io" in c["metadata"]["name"]]
    # A second pass with nothing new changes nothing.
    code, report = reconcile_json(sandbox, repo, "clusters/staging")
    assert code == 0, report
    history = json.loads(
        sandbox.run("helm", "history", "podinfo", "-n", namespaces["staging"], "-o", "json").stdout
    )
    assert len(history) == 1
    # `conveyor diff` against the cluster shows the chart's objects, not a HelmRelease.
    overlay = repo.work / "apps/staging/kustomization.yaml"
    overlay.write_text(overlay.read_text().replace("value: 1\n", "value: 5\n"))
    repo.commit("5 replicas")
    diff = conveyor(sandbox, "diff", "--repo", repo.url, "--path", "clusters/staging")
    assert diff.returncode == 1, diff.stdout + diff.stderr
    assert f"Deployment {namespaces['staging']}/podinfo" in diff.stdout
    assert "+  replicas: 5" in diff.stdout
    assert "HelmRelease" not in diff.stdout


def test_nested_kustomizations_with_depends_on_and_substitute_from(
    sandbox: SandboxHandle, repo: ConfigRepo, oci_charts: str, namespace: str
) -> None:
    sandbox.run(
        "kubectl",
        "create",
        "configmap",
        "cluster-vars",
        "-n",
        namespace,
        "--from-literal=replicas=3",
        "--from-literal=tier=gold",
    )
    env = "clusters/nested"
    repo.write(
        f"{env}/infrastructure.yaml",
        flux_kustomization("infrastructure", "./infrastructure"),
    )
    repo.write("infrastructure/kustomization.yaml", "resources: [sources.yaml, apps.yaml]\n")
    repo.write(
        "infrastructure/sources.yaml",
        flux_kustomization("sources", "./sources", targetNamespace=namespace),
    )
    repo.write(
        "infrastructure/apps.yaml",
        flux_kustomization(
            "web-apps",
            "./web",
            targetNamespace=namespace,
            dependsOn=[{"name": "sources"}],
            postBuild={
                "substitute": {"greeting": "hello"},
                "substituteFrom": [{"kind": "ConfigMap", "name": "cluster-vars"}],
            },
        ).replace("namespace: flux-system", f"namespace: {namespace}"),
    )
    repo.write(
        "sources/repository.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: HelmRepository
        metadata: {{name: charts}}
        spec: {{type: oci, url: "{oci_charts}"}}
        """,
    )
    repo.write(
        "sources/settings.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: b}\n",
    )
    repo.write(
        "web/release.yaml",
        """
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {name: web}
        spec:
          chart:
            spec:
              chart: service
              version: 0.1.0
              sourceRef: {kind: HelmRepository, name: charts}
          values:
            replicaCount: ${replicas}
            image: {repository: registry.local/web, tag: "${tier}-${greeting}-${missing:=x}"}
        """,
    )
    repo.commit()
    code, report = reconcile_json(sandbox, repo, env)
    assert code == 0, report
    apps = by_name(report)
    assert set(apps) == {"infrastructure", "sources", "web-apps", "web"}
    assert all(app["ready"] for app in apps.values()), apps
    values = helm_values(sandbox, "web", namespace)
    assert values["replicaCount"] == 3
    assert values["image"]["tag"] == "gold-hello-x"
    assert kubectl_json(sandbox, "get", "configmap", "settings", "-n", namespace) is not None


def test_broken_kustomizations_stall_only_their_app_with_file_and_line(
    sandbox: SandboxHandle, repo: ConfigRepo, namespace: str
) -> None:
    env = "clusters/broken"
    repo.write(
        "good/config.yaml",
        f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: good, namespace: {namespace}}}\n",
    )
    repo.write(f"{env}/good.yaml", flux_kustomization("good", "./good"))
    repo.write(f"{env}/nopath.yaml", flux_kustomization("nopath", "./not-there"))
    repo.write(
        f"{env}/unknown.yaml",
        flux_kustomization(
            "unknown", "./good", sourceRef={"kind": "GitRepository", "name": "other"}
        ),
    )
    repo.write(
        f"{env}/orphan.yaml", flux_kustomization("orphan", "./good", dependsOn=[{"name": "gone"}])
    )
    repo.write(f"{env}/a.yaml", flux_kustomization("a", "./good", dependsOn=[{"name": "b"}]))
    repo.write(f"{env}/b.yaml", flux_kustomization("b", "./good", dependsOn=[{"name": "a"}]))
    repo.commit()
    code, report = reconcile_json(sandbox, repo, env)
    assert code == 1
    apps = by_name(report)
    assert apps["good"]["ready"]
    messages = {name: apps[name]["message"] for name in ("nopath", "unknown", "a", "b")}
    assert all(apps[name]["reason"] == "RenderFailed" for name in messages)
    assert messages["nopath"].startswith(
        f"{env}/nopath.yaml:1: Kustomization nopath: spec.path './not-there' does not exist"
    )
    assert messages["unknown"].startswith(
        f"{env}/unknown.yaml:1: Kustomization unknown: sourceRef GitRepository flux-system/other"
    )
    assert messages["a"].startswith(f"{env}/a.yaml:1: dependsOn cycle: a → b → a")
    assert messages["b"].startswith(f"{env}/b.yaml:1: dependsOn cycle: b → a → b")
    assert apps["orphan"]["reason"] == "DependencyNotFound"
    assert apps["orphan"]["message"] == (
        f"{env}/orphan.yaml:1: depends on 'gone', which is not in this environment"
    )
    assert kubectl_json(sandbox, "get", "configmap", "good", "-n", namespace) is not None


def test_offline_diff_shows_kustomization_built_releases_as_chart_objects(
    sandbox: SandboxHandle, repo: ConfigRepo, oci_charts: str, namespaces: dict[str, str]
) -> None:
    example_repo(repo, oci_charts, namespaces)
    repo.commit("base")
    overlay = repo.work / "apps/staging/kustomization.yaml"
    overlay.write_text(overlay.read_text().replace("value: 1\n", "value: 4\n"))
    run_git(["checkout", "--quiet", "-b", "bigger"], cwd=repo.work)
    run_git(["add", "--all"], cwd=repo.work)
    run_git(
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "4"],
        cwd=repo.work,
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "conveyor",
            "diff",
            "--repo",
            str(repo.work),
            "--base",
            "main",
            "--head",
            "bigger",
            "--path",
            "clusters/staging",
        ],
        env=sandbox.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout
    assert f"update Deployment {namespaces['staging']}/podinfo" in text
    assert "-  replicas: 1\n+  replicas: 4\n" in text
    assert "HelmRelease" not in text  # rendered by helm, never shown as a Flux object


def config_map(name: str, namespace: str, value: str, *, immutable: bool = False) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace},
            "data": {"value": value},
            **({"immutable": True} if immutable else {}),
        }
    )


def test_prune_suspend_and_force_as_flux_means_them(
    sandbox: SandboxHandle, repo: ConfigRepo, namespace: str
) -> None:
    env = "clusters/fields"
    for name, spec in (
        ("keep", {"prune": False}),
        ("tidy", {"prune": True}),
        ("forced", {"force": True}),
        ("strict", {"force": False}),
    ):
        repo.write(f"{env}/{name}.yaml", flux_kustomization(name, f"./{name}", **spec))
        immutable = name in ("forced", "strict")
        repo.write(f"{name}/a.yaml", config_map(f"{name}-a", namespace, "1", immutable=immutable))
        repo.write(f"{name}/b.yaml", config_map(f"{name}-b", namespace, "1"))
    repo.write(f"{env}/held.yaml", flux_kustomization("held", "./held", suspend=True))
    repo.write("held/a.yaml", config_map("held-a", namespace, "1"))
    repo.commit("first")
    code, report = reconcile_json(sandbox, repo, env)
    apps = by_name(report)
    assert apps["held"]["reason"] == "Suspended"
    assert kubectl_json(sandbox, "get", "configmap", "held-a", "-n", namespace) is None
    assert all(apps[n]["ready"] for n in ("keep", "tidy", "forced", "strict")), report
    assert code == 1  # the suspended app is not Ready

    for name in ("keep", "tidy", "forced", "strict"):
        repo.remove(f"{name}/b.yaml")
        immutable = name in ("forced", "strict")
        repo.write(f"{name}/a.yaml", config_map(f"{name}-a", namespace, "2", immutable=immutable))
    repo.commit("second")
    code, report = reconcile_json(sandbox, repo, env)
    apps = by_name(report)

    def live(name: str) -> dict[str, Any] | None:
        return kubectl_json(sandbox, "get", "configmap", name, "-n", namespace)

    # prune: false leaves what left the build; prune: true deletes it.
    assert live("keep-b") is not None
    assert live("tidy-b") is None
    # force: true recreates an object whose immutable fields changed; without it the
    # apply fails and says why.
    forced = live("forced-a")
    assert forced is not None and forced["data"] == {"value": "2"}
    assert apps["forced"]["ready"]
    assert not apps["strict"]["ready"]
    assert "immutable" in apps["strict"]["message"]
    strict = live("strict-a")
    assert strict is not None and strict["data"] == {"value": "1"}


def test_depends_on_across_kinds(
    sandbox: SandboxHandle, repo: ConfigRepo, oci_charts: str, namespace: str
) -> None:
    """A HelmRelease waits for a Kustomization and a Kustomization for a HelmRelease
    (fluxcd/flux2#3364): one name space of apps, whatever made them."""
    env = "clusters/kinds"
    repo.write(f"{env}/infra.yaml", flux_kustomization("infra", "./infra-missing"))
    repo.write(
        f"{env}/api.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: HelmRepository
        metadata: {{name: charts, namespace: {namespace}}}
        spec: {{type: oci, url: "{oci_charts}"}}
        ---
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {{name: api, namespace: {namespace}}}
        spec:
          dependsOn: [{{name: infra}}]
          chart:
            spec:
              chart: service
              version: 0.1.0
              sourceRef: {{kind: HelmRepository, name: charts}}
          values: {{image: {{repository: registry.local/api}}}}
        """,
    )
    repo.write(
        f"{env}/late.yaml", flux_kustomization("late", "./late", dependsOn=[{"name": "api"}])
    )
    repo.write("late/config.yaml", config_map("late", namespace, "1"))
    repo.write("infra/config.yaml", config_map("infra", namespace, "1"))
    repo.commit("infra broken")
    code, report = reconcile_json(sandbox, repo, env)
    assert code == 1
    apps = by_name(report)
    assert apps["infra"]["reason"] == "RenderFailed"
    assert apps["api"]["reason"] == "DependencyNotReady"
    assert apps["late"]["reason"] == "DependencyNotReady"
    releases = json.loads(sandbox.run("helm", "list", "-n", namespace, "-o", "json").stdout)
    assert releases == []
    assert kubectl_json(sandbox, "get", "configmap", "late", "-n", namespace) is None

    repo.write(f"{env}/infra.yaml", flux_kustomization("infra", "./infra"))
    repo.commit("infra fixed")
    code, report = reconcile_json(sandbox, repo, env)
    assert code == 0, report
    assert all(app["ready"] for app in by_name(report).values())
    assert kubectl_json(sandbox, "get", "configmap", "late", "-n", namespace) is not None


def test_release_in_a_build_with_chart_ref_post_renderers_and_target_path(
    sandbox: SandboxHandle, repo: ConfigRepo, oci_charts: str, namespace: str
) -> None:
    env = "clusters/v2fields"
    repo.write(f"{env}/apps.yaml", flux_kustomization("apps", "./api", targetNamespace=namespace))
    repo.write(
        "api/chart.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1beta2
        kind: OCIRepository
        metadata: {{name: service-chart}}
        spec:
          url: {oci_charts}/service
          ref: {{tag: 0.1.0}}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {{name: api-tag}}
        data: {{tag: "2.0.0"}}
        """,
    )
    repo.write(
        "api/release.yaml",
        """
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata: {name: api}
        spec:
          chartRef: {kind: OCIRepository, name: service-chart}
          valuesFrom:
            - kind: ConfigMap
              name: api-tag
              valuesKey: tag
              targetPath: image.tag
          values:
            image: {repository: registry.local/api}
          postRenderers:
            - kustomize:
                patches:
                  - target: {kind: Deployment, name: api}
                    patch: |
                      - op: add
                        path: /metadata/labels/patched
                        value: by-flux-post-renderer
                images:
                  - name: registry.local/api
                    newName: registry.local/api-mirror
        """,
    )
    repo.commit()
    code, report = reconcile_json(sandbox, repo, env)
    assert code == 0, report
    assert set(by_name(report)) == {"apps", "api"}
    assert helm_values(sandbox, "api", namespace)["image"] == {
        "repository": "registry.local/api",
        "tag": "2.0.0",  # from the ConfigMap of the build, at its targetPath
    }
    live = kubectl_json(sandbox, "get", "deployment", "api", "-n", namespace)
    assert live is not None
    assert live["metadata"]["labels"]["patched"] == "by-flux-post-renderer"
    image = live["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.local/api-mirror:2.0.0"
    manifest = sandbox.run("helm", "get", "manifest", "api", "-n", namespace).stdout
    assert "by-flux-post-renderer" in manifest  # in the release itself, not patched after
