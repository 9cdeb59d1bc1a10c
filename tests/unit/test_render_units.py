"""Discovery of apps in the seeds' layouts, HelmRelease models, values, documents."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from conveyor.cluster.client import UnknownKindError
from conveyor.config.helmrelease import (
    ChartFromGit,
    ChartFromRepository,
    HelmReleaseError,
    SourceRef,
    parse_duration,
    parse_helmrelease,
)
from conveyor.render.charts import ChartResolver
from conveyor.render.discover import discover, scope_name
from conveyor.render.documents import Document, RenderError, load_documents
from conveyor.render.helm import HelmCLI, _warnings, parse_manifest
from conveyor.render.render import Renderer, merge_values, set_path

V1 = """
apiVersion: v1
kind: Namespace
metadata:
  name: ui-default
---
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: ui
  namespace: ui-default
  annotations:
    fluxcd.io/automated: "true"
    filter.fluxcd.io/chart-image: glob:refs-heads-master-*
spec:
  releaseName: ui
  chart:
    git: git@github.com:hms-dbmi-cellenics/ui
    path: chart-infra/
    ref: master
  values:
    replicaCount: 2
  valuesFrom:
    - configMapKeyRef:
        name: account-config
        namespace: flux
        key: account-config.yaml
"""


def write(root: Path, path: str, text: str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(textwrap.dedent(text).lstrip())


def test_cellenics_layout_one_app_per_helmrelease_with_its_namespace(tmp_path: Path) -> None:
    write(tmp_path, "staging/ui.yaml", V1)
    write(tmp_path, "staging/api.yaml", V1.replace("ui", "api"))
    write(tmp_path, "production/ui.yaml", V1)
    write(tmp_path, "README.md", "# docs\n")
    tree = discover(tmp_path, "staging")
    assert sorted(a.name for a in tree.apps) == ["api", "ui"]
    ui = next(a for a in tree.apps if a.name == "ui")
    assert ui.kind == "helm" and ui.path == "staging/ui.yaml"
    assert [d.kind for d in ui.documents] == ["Namespace"]
    assert ui.helm_release is not None and ui.helm_release.line == 6


def test_deployment_config_layout_cluster_namespace_folders(tmp_path: Path) -> None:
    write(tmp_path, "deployment-config/dev/payments/api-dev.yaml", V1.replace("ui", "api"))
    write(
        tmp_path,
        "deployment-config/dev/payments/web/deploy.yaml",
        """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        """,
    )
    tree = discover(tmp_path, "deployment-config/dev")
    assert {(a.name, a.kind) for a in tree.apps} == {("api", "helm"), ("payments-web", "manifests")}


def test_releases_env_layout_and_flux_objects_are_kept_aside(tmp_path: Path) -> None:
    write(
        tmp_path,
        "releases/staging/sources.yaml",
        """
        apiVersion: source.toolkit.fluxcd.io/v1
        kind: GitRepository
        metadata: {name: charts, namespace: flux-system}
        spec: {url: https://example.test/charts.git, ref: {branch: main}}
        ---
        apiVersion: image.toolkit.fluxcd.io/v1beta2
        kind: ImageUpdateAutomation
        metadata: {name: auto, namespace: flux-system}
        spec: {update: {strategy: Setters, path: ./releases}}
        """,
    )
    write(
        tmp_path,
        "releases/staging/config.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: c}
        """,
    )
    tree = discover(tmp_path, "releases/staging")
    assert [a.name for a in tree.apps] == ["staging"]
    assert ("GitRepository", "flux-system", "charts") in tree.sources
    assert [d.kind for d in tree.flux_config] == ["ImageUpdateAutomation"]


def test_broken_helmrelease_file_is_its_own_app_in_error(tmp_path: Path) -> None:
    write(tmp_path, "staging/ui.yaml", V1 + "  bad: [\n")
    write(tmp_path, "staging/api.yaml", V1.replace("ui", "api"))
    tree = discover(tmp_path, "staging")
    broken = next(a for a in tree.apps if a.name == "ui")
    assert broken.error is not None
    assert broken.error.file == "staging/ui.yaml"
    assert next(a for a in tree.apps if a.name == "api").error is None


def test_duplicate_app_names_are_an_error_naming_both_files(tmp_path: Path) -> None:
    write(tmp_path, "staging/a.yaml", V1)
    write(tmp_path, "staging/b.yaml", V1.replace("name: ui-default", "name: other"))
    tree = discover(tmp_path, "staging")
    errors = [a for a in tree.apps if a.error]
    assert len(errors) == 1 and "also used by staging/a.yaml" in str(errors[0].error)


def test_missing_environment_folder(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="does not exist"):
        discover(tmp_path, "nowhere")


def test_document_errors_name_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "x.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n- 1\n")
    with pytest.raises(RenderError) as caught:
        load_documents(tmp_path / "x.yaml", relative_to=tmp_path)
    assert (caught.value.file, caught.value.line) == ("x.yaml", 6)
    write(tmp_path, "y.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n")
    with pytest.raises(RenderError, match=r"y.yaml:1: object is missing metadata.name"):
        load_documents(tmp_path / "y.yaml", relative_to=tmp_path)


def test_flux_v1_defaults_and_fields() -> None:
    docs = [d for d in __import__("yaml").safe_load_all(V1) if d]
    spec = parse_helmrelease(docs[1])
    assert spec.flux_v1 and spec.automated
    assert spec.release_name == "ui" and spec.target_namespace == "ui-default"
    assert spec.chart == ChartFromGit(
        url="git@github.com:hms-dbmi-cellenics/ui", ref="master", path="chart-infra/"
    )
    assert spec.values_from[0].namespace == "flux"
    assert spec.values_from[0].key == "account-config.yaml"
    del docs[1]["spec"]["releaseName"]
    assert parse_helmrelease(docs[1]).release_name == "ui-default-ui"  # Flux v1 default


def test_flux_v1_chart_from_repository() -> None:
    spec = parse_helmrelease(
        {
            "apiVersion": "helm.fluxcd.io/v1",
            "kind": "HelmRelease",
            "metadata": {"name": "db", "namespace": "data"},
            "spec": {
                "chart": {
                    "repository": "https://charts.example.test",
                    "name": "postgres",
                    "version": "1.2.3",
                }
            },
        }
    )
    assert spec.chart == ChartFromRepository("https://charts.example.test", "postgres", "1.2.3")


def test_flux_v2_fields_remediation_and_drift() -> None:
    spec = parse_helmrelease(
        {
            "apiVersion": "helm.toolkit.fluxcd.io/v2",
            "kind": "HelmRelease",
            "metadata": {"name": "api", "namespace": "apps"},
            "spec": {
                "targetNamespace": "prod",
                "timeout": "2m30s",
                "suspend": True,
                "dependsOn": [{"name": "db"}],
                "chart": {
                    "spec": {
                        "chart": "./charts/api",
                        "sourceRef": {
                            "kind": "GitRepository",
                            "name": "repo",
                            "namespace": "flux-system",
                        },
                    }
                },
                "upgrade": {"remediation": {"retries": 3, "strategy": "uninstall"}},
                "driftDetection": {"mode": "warn"},
                "valuesFrom": [
                    {
                        "kind": "Secret",
                        "name": "s",
                        "valuesKey": "v.yaml",
                        "targetPath": "db.password",
                    }
                ],
            },
        }
    )
    assert spec.release_name == "prod-api" and spec.target_namespace == "prod"
    # helm-controller keeps the release in the HelmRelease's namespace, or the one named.
    assert spec.flux_storage_namespace == "apps"
    stored = parse_helmrelease(
        {
            "apiVersion": "helm.toolkit.fluxcd.io/v2",
            "kind": "HelmRelease",
            "metadata": {"name": "api", "namespace": "apps"},
            "spec": {
                "targetNamespace": "prod",
                "storageNamespace": "prod",
                "chart": {
                    "spec": {"chart": "api", "sourceRef": {"kind": "HelmRepository", "name": "r"}}
                },
            },
        }
    )
    assert stored.flux_storage_namespace == "prod" == stored.target_namespace
    assert spec.timeout_seconds == 150 and spec.suspend and spec.depends_on == ["db"]
    assert spec.upgrade_retries == 3 and not spec.rollback_on_failure
    assert spec.drift == "warn"
    assert spec.chart == SourceRef("GitRepository", "repo", "flux-system", "./charts/api", None)
    assert spec.values_from[0].target_path == "db.password"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"chart": {}}, "spec.chart.spec or spec.chartRef is required"),
        ({"chart": {"spec": {"chart": "x"}}}, r"^spec\.chart\.spec\.sourceRef is required$"),
        (
            {
                "chartRef": {"kind": "OCIRepository", "name": "o"},
                "valuesFrom": [{"kind": "Bucket", "name": "b"}],
            },
            r"^spec\.valuesFrom\[0\]\.kind: expected 'ConfigMap' or 'Secret', got 'Bucket'$",
        ),
    ],
)
def test_flux_v2_errors_name_the_field(bad: dict[str, object], message: str) -> None:
    with pytest.raises(HelmReleaseError, match=message):
        parse_helmrelease(
            {
                "apiVersion": "helm.toolkit.fluxcd.io/v2",
                "kind": "HelmRelease",
                "metadata": {"name": "x"},
                "spec": bad,
            }
        )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("90s", 90), ("300ms", 0.3), (None, 7), (45, 45)],
)
def test_durations(text: str | int | None, seconds: float) -> None:
    assert parse_duration(text, default=7) == pytest.approx(seconds)


def test_duration_errors() -> None:
    for bad in ("5", "m", "5x"):
        with pytest.raises(HelmReleaseError):
            parse_duration(bad, default=0)


def test_values_merge_like_helm() -> None:
    base = {"image": {"repository": "a", "tag": "1"}, "list": [1, 2]}
    merged = merge_values(base, {"image": {"tag": "2"}, "list": [3]})
    assert merged == {"image": {"repository": "a", "tag": "2"}, "list": [3]}
    assert base["image"]["tag"] == "1"  # inputs untouched
    assert set_path({}, "db.password", "x") == {"db": {"password": "x"}}


def test_helm_manifest_objects_and_warnings_are_read() -> None:
    manifest = (
        "---\n# Source: bench/templates/app.yaml\napiVersion: v1\nkind: ServiceAccount\n"
        "metadata: {name: a}\n---\n# Source: empty.yaml\n---\nnot: an object\n"
    )
    assert parse_manifest(manifest) == [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "a"}}
    ]
    stderr = (
        'I1122 01:41:51.272528 21256 warnings.go:107] "Warning: unknown field \\"spec.replcas\\""\n'
        'Release "bad" has been upgraded.\n'
    )
    assert _warnings(stderr) == ['unknown field "spec.replcas"']
    assert _warnings("Release upgraded\n") == []


def test_chart_ref_to_a_helm_chart_resolves_through_its_source(tmp_path: Path) -> None:
    def source(kind: str, name: str, spec: dict[str, object]) -> Document:
        obj = {"kind": kind, "metadata": {"name": name, "namespace": "apps"}, "spec": spec}
        return Document(obj=obj, file="sources.yaml", line=1)

    sources = {
        ("HelmRepository", "apps", "internal"): source(
            "HelmRepository", "internal", {"url": "https://charts.example", "interval": "10m"}
        ),
        ("HelmChart", "apps", "svc"): source(
            "HelmChart",
            "svc",
            {
                "chart": "service",
                "version": "1.x",
                "sourceRef": {"kind": "HelmRepository", "name": "internal"},
            },
        ),
        ("HelmChart", "apps", "broken"): source("HelmChart", "broken", {"chart": "service"}),
    }
    resolver = ChartResolver(tmp_path, HelmCLI(), sources)
    chart = resolver._from_source(SourceRef(kind="HelmChart", name="svc", namespace="apps"))
    assert chart == ChartFromRepository(
        url="https://charts.example", name="service", version="1.x", refresh_seconds=600.0
    )
    with pytest.raises(
        RenderError, match=r"^sources\.yaml:1: HelmChart broken: spec\.sourceRef is required$"
    ):
        resolver._from_source(SourceRef(kind="HelmChart", name="broken", namespace="apps"))


def test_app_names_cut_to_a_dns_label_never_end_with_a_dash() -> None:
    from conveyor.render.discover import app_name

    name = app_name("--post-renderer=/tmp/pytest-of-root/pytest-182/test-agent-applies-x")
    assert len(name) <= 63 and not name.endswith("-") and not name.startswith("-")
    assert app_name("---") == "root"


def test_one_scope_rule_for_every_spelling_of_a_path() -> None:
    # The agent names a folder by its normalized path, a single pass by the path as
    # typed: both must land on the same statuses.
    assert scope_name(path=".") == scope_name(path="./") == "root"
    assert {scope_name(path=p) for p in ("envs/dev", "./envs/dev/", "envs//dev")} == {"envs-dev"}
    assert scope_name(environment="Staging", path="envs/staging") == "staging"


async def _no_values(_reference: object) -> str | None:
    return None


def test_an_unknown_kind_is_named_by_the_file_and_line_of_its_object(tmp_path: Path) -> None:
    write(
        tmp_path,
        "staging/web/objects.yaml",
        """
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: web}
        ---
        apiVersion: example.com/v1
        kind: Widget
        metadata: {name: gadget}
        """,
    )
    [app] = discover(tmp_path, "staging").apps
    renderer = Renderer(
        tmp_path,
        charts=ChartResolver(tmp_path / "cache", HelmCLI(binary="false"), {}),
        values_lookup=_no_values,
    )
    rendered = asyncio.run(renderer.render(app))
    located = rendered.located(UnknownKindError("example.com/v1", "Widget"))
    assert str(located) == (
        "staging/web/objects.yaml:5: the cluster does not serve kind Widget in example.com/v1"
    )
    other = UnknownKindError("example.com/v2", "Widget")
    assert rendered.located(other) is other  # no object of it: nothing to name
