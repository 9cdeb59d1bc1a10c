"""Flux Kustomizations as apps, built with the real `kubectl kustomize`.

Repositories here follow Flux's own examples (`clusters/<env>` Kustomizations pointing at
`apps/<env>` overlays of `apps/base`). Charts are not fetched: these tests are about what
the builds hold; tests/cluster/test_flux_v2.py installs the charts on the sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.render.charts import ChartResolver
from conveyor.render.dependencies import resolve_dependencies
from conveyor.render.discover import FLUX_INSTALLATION_FOUND, AppSource, EnvironmentTree, discover
from conveyor.render.documents import RenderError
from conveyor.render.flux_kustomization import BuildContext, expand
from conveyor.render.helm import HelmCLI
from conveyor.render.kustomize import secret_generator_sources
from conveyor.render.render import RenderedApp, Renderer
from conveyor.render.sops import generator_format
from conveyor.render.substitute import substitute_text
from tests.cluster.gitops import chart_repo, flux_kustomization


def write(root: Path, path: str, text: str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(textwrap.dedent(text).lstrip())


def example_repo(root: Path) -> None:
    """The shape of fluxcd/flux2-kustomize-helm-example: one base, two overlays."""
    for env, replicas in (("staging", 2), ("production", 3)):
        write(root, f"clusters/{env}/apps.yaml", flux_kustomization("apps", f"./apps/{env}"))
        write(
            root,
            f"clusters/{env}/flux-system/kustomization.yaml",
            "resources: [gotk-components.yaml, gotk-sync.yaml]\n",
        )
        write(
            root,
            f"clusters/{env}/flux-system/gotk-components.yaml",
            """
            apiVersion: v1
            kind: Namespace
            metadata: {name: flux-system}
            """,
        )
        write(
            root,
            f"clusters/{env}/flux-system/gotk-sync.yaml",
            flux_kustomization("flux-system", f"./clusters/{env}"),
        )
        write(
            root,
            f"apps/{env}/kustomization.yaml",
            f"""
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            resources: [../base/podinfo]
            patches:
              - target: {{kind: HelmRelease, name: podinfo}}
                patch: |
                  - op: replace
                    path: /spec/values/replicaCount
                    value: {replicas}
            """,
        )
    write(
        root,
        "apps/base/podinfo/kustomization.yaml",
        "resources: [namespace.yaml, repository.yaml, release.yaml]\n",
    )
    write(
        root,
        "apps/base/podinfo/namespace.yaml",
        """
        apiVersion: v1
        kind: Namespace
        metadata: {name: podinfo}
        """,
    )
    write(
        root,
        "apps/base/podinfo/repository.yaml",
        """
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: HelmRepository
        metadata: {name: podinfo, namespace: podinfo}
        spec: {type: oci, interval: 5m, url: "oci://127.0.0.1:5000/charts"}
        """,
    )
    write(
        root,
        "apps/base/podinfo/release.yaml",
        """
        apiVersion: helm.toolkit.fluxcd.io/v2
        kind: HelmRelease
        metadata:
          name: podinfo
          namespace: podinfo
        spec:
          interval: 50m
          chart:
            spec:
              chart: service
              version: 0.1.0
              sourceRef: {kind: HelmRepository, name: podinfo}
          values:
            replicaCount: 1
        """,
    )


async def _no_values(_ref: object) -> str | None:
    return None


def expanded(
    root: Path, env: str, *, data: dict[str, dict[str, str]] | None = None
) -> EnvironmentTree:
    tree = discover(root, env)
    found = data or {}

    async def lookup(kind: str, namespace: str, name: str) -> dict[str, str] | None:
        return found.get(f"{kind}/{namespace}/{name}")

    context = BuildContext(
        repo_root=root,
        charts=ChartResolver(root / ".cache", HelmCLI(binary="false"), tree.sources),
        data_lookup=lookup if data is not None else None,
    )
    asyncio.run(expand(tree, context))
    return tree


def apps(tree: EnvironmentTree) -> dict[str, AppSource]:
    return {a.name: a for a in tree.apps}


def test_official_example_shape_builds_each_environment_from_one_base(tmp_path: Path) -> None:
    example_repo(tmp_path)
    for env, replicas in (("staging", 2), ("production", 3)):
        tree = expanded(tmp_path, f"clusters/{env}")
        found = apps(tree)
        assert set(found) == {"apps", "podinfo"}
        kustomization_app, release_app = found["apps"], found["podinfo"]
        assert kustomization_app.error is None and release_app.error is None
        assert kustomization_app.path == f"apps/{env}"
        # The build's plain objects are the Kustomization's app; no Flux object is.
        assert [(d.kind, d.name) for d in kustomization_app.documents] == [("Namespace", "podinfo")]
        assert kustomization_app.documents[0].where() == "apps/base/podinfo/namespace.yaml:1"
        # The HelmRelease is an app of its own, installed with helm after its Namespace.
        assert release_app.kind == "helm" and release_app.depends_on == ["apps"]
        assert release_app.helm_release is not None
        assert release_app.helm_release.where() == "apps/base/podinfo/release.yaml:1"
        assert release_app.helm_release.obj["spec"]["values"] == {"replicaCount": replicas}
        assert ("HelmRepository", "podinfo", "podinfo") in tree.sources
        # Flux's own installation is recognised and not applied, said once.
        assert tree.notices == [FLUX_INSTALLATION_FOUND]
        assert all(a.name != "flux-system" for a in tree.apps)


def test_plain_kustomization_folder_installs_its_helmreleases_with_helm(tmp_path: Path) -> None:
    example_repo(tmp_path)
    write(tmp_path, "env/site/kustomization.yaml", "resources: [../../apps/base/podinfo]\n")
    found = apps(expanded(tmp_path, "env"))
    assert set(found) == {"site", "podinfo"}
    assert [d.kind for d in found["site"].documents] == ["Namespace"]
    assert found["podinfo"].helm_release is not None
    assert found["podinfo"].depends_on == ["site"]


def overlay_objects(tmp_path: Path, **spec: Any) -> list[dict[str, Any]]:
    write(
        tmp_path,
        "apps/web/deploy.yaml",
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web, namespace: default}
        spec:
          replicas: 1
          selector: {matchLabels: {app: web}}
          template:
            metadata: {labels: {app: web}}
            spec:
              containers: [{name: main, image: registry.local/web:1.0.0}]
        """,
    )
    write(
        tmp_path,
        "apps/web/config.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: web-config, namespace: default}
        data: {mode: slow}
        """,
    )
    write(tmp_path, "env/web.yaml", flux_kustomization("web", "./apps/web", **spec))
    found = apps(expanded(tmp_path, "env"))
    app = found["web"]
    assert app.error is None, app.error
    return [d.obj for d in app.documents]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind)


def test_folder_without_kustomization_yaml_is_every_manifest_in_it(tmp_path: Path) -> None:
    objects = overlay_objects(tmp_path)
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "Deployment"]


def test_patches_and_images(tmp_path: Path) -> None:
    objects = overlay_objects(
        tmp_path,
        patches=[
            {
                "target": {"kind": "ConfigMap", "name": "web-config"},
                "patch": "- op: replace\n  path: /data/mode\n  value: fast\n",
            },
            {
                "patch": "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n"
                "spec: {replicas: 4}\n"
            },
        ],
        images=[{"name": "registry.local/web", "newTag": "2.0.0"}],
    )
    assert by_kind(objects, "ConfigMap")["data"] == {"mode": "fast"}
    deployment = by_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 4
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert containers[0]["image"] == "registry.local/web:2.0.0"


def test_target_namespace_prefix_suffix_and_common_metadata(tmp_path: Path) -> None:
    objects = overlay_objects(
        tmp_path,
        targetNamespace="shop",
        namePrefix="eu-",
        nameSuffix="-v2",
        commonMetadata={"labels": {"team": "shop"}, "annotations": {"owner": "shop@x"}},
    )
    deployment = by_kind(objects, "Deployment")
    assert deployment["metadata"]["name"] == "eu-web-v2"
    assert deployment["metadata"]["namespace"] == "shop"
    assert deployment["metadata"]["labels"] == {"team": "shop"}
    assert deployment["metadata"]["annotations"] == {"owner": "shop@x"}
    # Flux's commonMetadata never touches selectors (they are immutable).
    assert deployment["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    assert by_kind(objects, "ConfigMap")["metadata"]["name"] == "eu-web-config-v2"


def test_components_are_relative_to_the_path(tmp_path: Path) -> None:
    write(
        tmp_path,
        "apps/web/kustomization.yaml",
        "resources: [deploy.yaml, config.yaml]\n",
    )
    write(
        tmp_path,
        "components/fast/kustomization.yaml",
        """
        apiVersion: kustomize.config.k8s.io/v1alpha1
        kind: Component
        patches:
          - target: {kind: ConfigMap}
            patch: |
              - op: add
                path: /data/speed
                value: fast
        """,
    )
    objects = overlay_objects(tmp_path, components=["../../components/fast"])
    assert by_kind(objects, "ConfigMap")["data"] == {"mode": "slow", "speed": "fast"}


def test_post_build_substitutes_from_the_build_the_cluster_and_defaults(tmp_path: Path) -> None:
    write(
        tmp_path,
        "clusters/staging/vars.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: cluster-vars, namespace: flux-system}
        data: {domain: staging.example.com, replicas: "3"}
        """,
    )
    write(
        tmp_path,
        "apps/web/deploy.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: web, namespace: default}
        data:
          url: https://${domain}/${path:=home}
          token: ${token}
          region: ${region}
          script: echo $${HOME} ${missing:-none}
          greeting: ${greeting}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: raw
          namespace: default
          annotations: {kustomize.toolkit.fluxcd.io/substitute: disabled}
        data: {text: "${domain}"}
        """,
    )
    write(
        tmp_path,
        "clusters/staging/web.yaml",
        flux_kustomization(
            "web",
            "./apps/web",
            postBuild={
                "substitute": {"greeting": "hello", "domain": "wins.example.com"},
                "substituteFrom": [
                    {"kind": "ConfigMap", "name": "cluster-vars"},
                    {"kind": "Secret", "name": "cluster-secrets"},
                    {"kind": "ConfigMap", "name": "not-there", "optional": True},
                ],
            },
        ),
    )
    secret = {"token": "s3cr3t", "region": "eu-1"}
    tree = expanded(
        tmp_path, "clusters/staging", data={"Secret/flux-system/cluster-secrets": secret}
    )
    web = apps(tree)["web"]
    assert web.error is None, web.error
    data = {d.name: d.obj["data"] for d in web.documents}
    assert data["web"] == {
        "url": "https://wins.example.com/home",  # substitute wins over substituteFrom
        "token": "s3cr3t",
        "region": "eu-1",
        "script": "echo ${HOME} none",
        "greeting": "hello",
    }
    assert data["raw"] == {"text": "${domain}"}


def test_post_build_missing_source_stalls_the_app_and_offline_keeps_the_variable(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        "apps/web/config.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: web, namespace: default}
        data: {token: "${token}"}
        """,
    )
    spec = {"postBuild": {"substituteFrom": [{"kind": "Secret", "name": "cluster-secrets"}]}}
    write(tmp_path, "env/web.yaml", flux_kustomization("web", "./apps/web", **spec))
    online = apps(expanded(tmp_path, "env", data={}))["web"]
    assert online.error is not None
    assert str(online.error) == (
        "env/web.yaml:1: postBuild.substituteFrom Secret flux-system/cluster-secrets not found"
    )
    offline = apps(expanded(tmp_path, "env"))["web"]
    assert offline.error is None
    assert offline.documents[0].obj["data"] == {"token": "${token}"}
    assert offline.notes == [
        "postBuild.substituteFrom Secret flux-system/cluster-secrets is not available "
        "offline; its variables are kept"
    ]


def test_substitution_forms() -> None:
    variables = {"a": "1", "empty": ""}
    assert substitute_text("${a} ${b} $${a}", variables, keep_undefined=False) == "1  ${a}"
    assert substitute_text("${empty:=x} ${empty=x} ${b-y}", variables, keep_undefined=False) == (
        "x  y"
    )
    assert substitute_text("${b}", variables, keep_undefined=True) == "${b}"
    with pytest.raises(ValueError, match="unsupported substitution"):
        substitute_text("${a^^}", variables, keep_undefined=False)


def test_nested_kustomizations_are_followed_with_their_dependencies(tmp_path: Path) -> None:
    example_repo(tmp_path)
    write(
        tmp_path,
        "env/infra.yaml",
        flux_kustomization("infrastructure", "./infrastructure"),
    )
    write(
        tmp_path,
        "infrastructure/kustomization.yaml",
        "resources: [controllers.yaml, configs.yaml]\n",
    )
    write(
        tmp_path,
        "infrastructure/controllers.yaml",
        flux_kustomization("controllers", "./apps/base/podinfo"),
    )
    write(
        tmp_path,
        "infrastructure/configs.yaml",
        flux_kustomization(
            "configs",
            "./configs",
            dependsOn=[{"name": "controllers"}],
            healthChecks=[
                {
                    "apiVersion": "helm.toolkit.fluxcd.io/v2",
                    "kind": "HelmRelease",
                    "name": "podinfo",
                    "namespace": "podinfo",
                }
            ],
        ),
    )
    write(
        tmp_path,
        "configs/config.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: settings, namespace: default}
        """,
    )
    write(
        tmp_path,
        "env/apps.yaml",
        flux_kustomization("apps", "./configs", dependsOn=[{"name": "configs"}]),
    )
    found = apps(expanded(tmp_path, "env"))
    assert set(found) == {"infrastructure", "controllers", "configs", "podinfo", "apps"}
    assert all(a.error is None for a in found.values())
    assert found["controllers"].depends_on == ["infrastructure"]
    assert found["configs"].depends_on == ["infrastructure", "controllers"]
    assert found["podinfo"].depends_on == ["controllers"]
    assert found["apps"].depends_on == ["configs"]
    assert found["configs"].health_apps == ["podinfo"]


def rendered_apps(tree: EnvironmentTree) -> dict[str, RenderedApp | RenderError]:
    renderer = Renderer(
        tree.apps[0].path and Path("/"),
        charts=ChartResolver(Path("/nonexistent"), HelmCLI(binary="false"), tree.sources),
        values_lookup=_no_values,
    )
    result: dict[str, RenderedApp | RenderError] = {}
    for app in tree.apps:
        if app.kind == "helm":
            continue  # no chart here: dependencies are what these tests look at
        try:
            result[app.name] = asyncio.run(renderer.render(app))
        except RenderError as error:
            result[app.name] = error
    return result


def test_depends_on_a_kustomization_waits_for_what_it_health_checks(tmp_path: Path) -> None:
    write(tmp_path, "configs/config.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    write(
        tmp_path,
        "env/a.yaml",
        flux_kustomization(
            "infra", "./configs", healthChecks=[{"kind": "HelmRelease", "name": "ingress"}]
        ),
    )
    write(
        tmp_path,
        "env/b.yaml",
        flux_kustomization("apps", "./configs", dependsOn=[{"name": "infra"}]),
    )
    rendered = rendered_apps(expanded(tmp_path, "env"))
    resolve_dependencies(rendered)
    apps_app = rendered["apps"]
    assert isinstance(apps_app, RenderedApp)
    assert apps_app.depends_on == ["infra", "ingress"]


def test_depends_on_cycle_stalls_each_app_of_it_naming_its_file(tmp_path: Path) -> None:
    write(tmp_path, "configs/config.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    write(tmp_path, "env/a.yaml", flux_kustomization("a", "./configs", dependsOn=[{"name": "b"}]))
    write(tmp_path, "env/b.yaml", flux_kustomization("b", "./configs", dependsOn=[{"name": "a"}]))
    write(tmp_path, "env/c.yaml", flux_kustomization("c", "./configs", dependsOn=[{"name": "a"}]))
    rendered = rendered_apps(expanded(tmp_path, "env"))
    resolve_dependencies(rendered)
    assert str(rendered["a"]) == (
        "env/a.yaml:1: dependsOn cycle: a → b → a; none of these apps is applied"
    )
    assert str(rendered["b"]).startswith("env/b.yaml:1: dependsOn cycle: b → a → b")
    assert isinstance(rendered["c"], RenderedApp)  # waits on a, which is not in a cycle of its own


def test_broken_kustomizations_each_stall_only_their_app(tmp_path: Path) -> None:
    write(tmp_path, "configs/config.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    write(tmp_path, "env/good.yaml", flux_kustomization("good", "./configs"))
    write(tmp_path, "env/nopath.yaml", flux_kustomization("nopath", None))
    write(tmp_path, "env/gone.yaml", flux_kustomization("gone", "./nowhere"))
    write(
        tmp_path,
        "env/unknown.yaml",
        flux_kustomization(
            "unknown", "./configs", sourceRef={"kind": "GitRepository", "name": "other"}
        ),
    )
    write(
        tmp_path,
        "env/oci.yaml",
        "# an OCI source of manifests\n"
        + flux_kustomization("oci", "./", sourceRef={"kind": "OCIRepository", "name": "manifests"}),
    )
    write(
        tmp_path,
        "env/sources.yaml",
        """
        apiVersion: source.toolkit.fluxcd.io/v1beta2
        kind: OCIRepository
        metadata: {name: manifests, namespace: flux-system}
        spec: {url: "oci://127.0.0.1:5000/manifests", ref: {tag: latest}}
        """,
    )
    write(tmp_path, "env/self.yaml", flux_kustomization("self", "./loop"))
    write(tmp_path, "loop/self.yaml", flux_kustomization("self", "./loop"))
    found = apps(expanded(tmp_path, "env"))
    errors = {name: str(app.error) if app.error else None for name, app in found.items()}
    assert errors["good"] is None
    assert (
        errors["nopath"]
        == "env/nopath.yaml:1: Kustomization nopath: spec.path is required (the folder to build)"
    )
    assert errors["gone"] == (
        "env/gone.yaml:1: Kustomization gone: spec.path './nowhere' does not exist in the "
        "repository"
    )
    assert errors["unknown"] == (
        "env/unknown.yaml:1: Kustomization unknown: sourceRef GitRepository flux-system/other "
        "is not defined"
    )
    assert errors["oci"] == (
        "env/sources.yaml:1: OCIRepository manifests: only GitRepository sources can be built "
        "(conveyor fetches charts from OCI, not manifests)"
    )
    assert errors["self"] == (
        "env/self.yaml:1: Kustomization self builds itself: flux-system/self → flux-system/self"
    )


def test_a_kustomization_from_another_git_repository_is_fetched(tmp_path: Path) -> None:
    url = chart_repo(tmp_path / "remote")  # a repository holding service/ (a chart)
    write(
        tmp_path,
        "repo/env/source.yaml",
        f"""
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: GitRepository
        metadata: {{name: shared, namespace: flux-system}}
        spec: {{url: "{url}", ref: {{branch: master}}}}
        """,
    )
    write(
        tmp_path,
        "repo/env/shared.yaml",
        flux_kustomization(
            "shared", "./service/templates", sourceRef={"kind": "GitRepository", "name": "shared"}
        ),
    )
    tree = discover(tmp_path / "repo", "env")
    context = BuildContext(
        repo_root=tmp_path / "repo",
        charts=ChartResolver(tmp_path / "cache", HelmCLI(binary="false"), tree.sources),
        data_lookup=None,
    )
    asyncio.run(expand(tree, context))
    shared = apps(tree)["shared"]
    # The chart's templates are not manifests kustomize can read: the error names them.
    assert shared.error is not None
    message = str(shared.error)
    assert message.startswith(f"env/shared.yaml:1: Kustomization shared: {url}@")
    assert "kustomize build failed" in message


def test_secret_values_from_post_build_never_appear_in_an_error(tmp_path: Path) -> None:
    write(
        tmp_path,
        "apps/web/config.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: web, namespace: default}
        data: {token: ${token}}
        """,
    )
    spec = {"postBuild": {"substituteFrom": [{"kind": "Secret", "name": "s"}]}}
    write(tmp_path, "env/web.yaml", flux_kustomization("web", "./apps/web", **spec))
    value = "a: [broken"
    found = apps(expanded(tmp_path, "env", data={"Secret/flux-system/s": {"token": value}}))
    assert found["web"].error is not None
    assert value not in str(found["web"].error)
    assert base64.b64encode(value.encode()).decode() not in str(found["web"].error)


def test_wait_health_checks_and_timeout_decide_what_makes_the_app_ready(tmp_path: Path) -> None:
    from conveyor.cluster.objects import ObjectRef
    from conveyor.reconcile.actions.verify import watched

    overlay_objects(tmp_path)  # apps/web: a Deployment and a ConfigMap
    checks = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "namespace": "default"}
    ]
    write(
        tmp_path,
        "env/web.yaml",
        flux_kustomization("web", "./apps/web", timeout="2m", healthChecks=checks),
    )
    write(tmp_path, "env/all.yaml", flux_kustomization("all", "./apps/web", wait=True))
    write(tmp_path, "env/none.yaml", flux_kustomization("none", "./apps/web"))
    tree = expanded(tmp_path, "env")
    rendered = rendered_apps(tree)
    desired = []
    for doc in apps(tree)["web"].documents:
        desired.append((ObjectRef.of(doc.obj), doc.obj))
    by_app = {
        name: watched(app, desired)
        for name, app in rendered.items()
        if isinstance(app, RenderedApp)
    }
    assert [ref.kind for ref, _ in by_app["web"]] == ["Deployment"]  # only its health check
    assert len(by_app["all"]) == 2  # wait: true waits for everything
    assert by_app["none"] == []  # Flux's default: Ready once applied
    assert apps(tree)["web"].options.timeout_seconds == 120.0
    assert apps(tree)["all"].options.timeout_seconds is None


def test_post_renderers_patch_a_charts_manifests_in_order(tmp_path: Path) -> None:
    from conveyor.config.helmrelease import parse_helmrelease
    from conveyor.render.postrender import post_render, write_stages

    spec = parse_helmrelease(
        {
            "apiVersion": "helm.toolkit.fluxcd.io/v2",
            "kind": "HelmRelease",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "chart": {
                    "spec": {"chart": "c", "sourceRef": {"kind": "HelmRepository", "name": "r"}}
                },
                "postRenderers": [
                    {"kustomize": {"images": [{"name": "web", "newTag": "2"}]}},
                    {
                        "kustomize": {
                            "patches": [
                                {
                                    "target": {"kind": "ConfigMap"},
                                    "patch": "- op: add\n  path: /data/b\n  value: '2'\n",
                                }
                            ]
                        }
                    },
                ],
            },
        }
    )
    assert len(spec.post_renderers) == 2
    write_stages(tmp_path / "stages", spec.post_renderers)
    manifests = (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: '1'}\n---\n"
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
        "spec: {containers: [{name: m, image: web:1}]}\n"
    )
    out = list(yaml.safe_load_all(asyncio.run(post_render(tmp_path / "stages", manifests))))
    by = {o["kind"]: o for o in out}
    assert by["ConfigMap"]["data"] == {"a": "1", "b": "2"}
    assert by["Pod"]["spec"]["containers"][0]["image"] == "web:2"


def test_flux_sync_of_the_folder_itself_is_part_of_the_installation(tmp_path: Path) -> None:
    example_repo(tmp_path)
    write(
        tmp_path,
        "clusters/staging/sync.yaml",
        flux_kustomization("flux-system", "./clusters/staging"),
    )
    tree = expanded(tmp_path, "clusters/staging")
    assert set(apps(tree)) == {"apps", "podinfo"}
    assert tree.notices == [FLUX_INSTALLATION_FOUND]


def test_another_clusters_kustomization_is_refused_and_impersonation_noted(tmp_path: Path) -> None:
    write(tmp_path, "configs/c.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    remote = {"secretRef": {"name": "prod-kubeconfig"}}
    write(tmp_path, "env/remote.yaml", flux_kustomization("remote", "./configs", kubeConfig=remote))
    write(
        tmp_path,
        "env/tenant.yaml",
        flux_kustomization("tenant", "./configs", serviceAccountName="team-a"),
    )
    found = apps(expanded(tmp_path, "env"))
    assert str(found["remote"].error) == (
        "env/remote.yaml:1: Kustomization remote: spec.kubeConfig (another cluster) is not "
        "supported"
    )
    assert found["remote"].documents == []
    assert found["tenant"].error is None
    assert found["tenant"].notes == [
        "spec.serviceAccountName 'team-a' is not impersonated; conveyor applies with its own "
        "identity"
    ]


def test_secret_generator_sources_follow_resources_and_components_inside_the_root(
    tmp_path: Path,
) -> None:
    """What kustomize-controller decrypts before a build: the secretGenerator files of
    the kustomization and of every folder its resources and components name, never one
    outside the source (kustomize would refuse to read it anyway)."""
    write(tmp_path, "outside.env", "A=1\n")
    root = tmp_path / "repo"
    write(
        root,
        "apps/web/kustomization.yaml",
        """
        resources: [../base, deploy.yaml, https://example.com/remote]
        components: [../extra]
        secretGenerator:
          - name: web
            files: [values.yaml=secret.yaml, token]
            envs: [web.env, ../../../outside.env]
        """,
    )
    for name in ("secret.yaml", "token", "web.env", "deploy.yaml"):
        write(root, f"apps/web/{name}", "x\n")
    write(root, "apps/base/kustomization.yaml", "secretGenerator: [{name: b, env: base.env}]\n")
    write(root, "apps/base/base.env", "B=2\n")
    write(root, "apps/extra/kustomization.yaml", "secretGenerator: [{name: c, files: [c.ini]}]\n")
    write(root, "apps/extra/c.ini", "[c]\n")
    found = secret_generator_sources(root / "apps" / "web", root=root)
    shown = {(str(s.path.relative_to(root.resolve())), s.key, s.env) for s in found}
    assert shown == {
        ("apps/web/secret.yaml", "values.yaml", False),
        ("apps/web/token", "token", False),
        ("apps/web/web.env", "web.env", True),
        ("apps/base/base.env", "base.env", True),
        ("apps/extra/c.ini", "c.ini", False),
    }
    assert [generator_format(k, env=e) for _, k, e in sorted(shown)] == [
        "dotenv",
        "ini",
        "yaml",  # by the entry's key, not the file's name
        "binary",
        "dotenv",
    ]
