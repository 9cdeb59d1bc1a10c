"""Issue #10's reproducers: one bad file fails only its app, with file, line and field.

Each case writes one file into a config tree whose other apps render (with real git);
`discover()` and `Renderer.render()` must turn the file into a RenderError naming where
and what, and the other apps must render exactly as they do without it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conveyor.config.helmrelease import HelmReleaseError, parse_duration, parse_helmrelease
from conveyor.config.validation import json_compatible
from conveyor.render.documents import RenderError
from conveyor.render.render import RenderedApp
from tests.unit.configtree import chart_repository, config_tree, render_all

V1 = """\
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: worker
  namespace: worker
spec:
  releaseName: worker
  chart:
    git: {charts_url}
    ref: main
    path: charts/service
"""

V2 = """\
apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata:
  name: worker-charts
  namespace: worker
spec:
  url: {charts_url}
  ref: {branch: main}
---
apiVersion: helm.toolkit.fluxcd.io/v2
kind: HelmRelease
metadata:
  name: worker
  namespace: worker
spec:
  chart:
    spec:
      chart: charts/service
      sourceRef: {kind: GitRepository, name: worker-charts}
"""


def manifest(body: str) -> str:
    return "# settings of the queue\napiVersion: v1\n" + body


REPRODUCERS = {
    "annotations-list": (
        "queue/settings.yaml",
        manifest("kind: ConfigMap\nmetadata: {name: q, annotations: [x]}\n"),
        "queue",
        "production/queue/settings.yaml:2: metadata.annotations: expected a mapping, got a list",
    ),
    "data-int-key": (
        "queue/settings.yaml",
        manifest("kind: ConfigMap\nmetadata: {name: q}\ndata: {1: x, b: y}\n"),
        "queue",
        "production/queue/settings.yaml:2: data: keys must be strings, got 1",
    ),
    "secret-data-list": (
        "queue/secret.yaml",
        manifest("kind: Secret\nmetadata: {name: q}\ndata: [x]\n"),
        "queue",
        "production/queue/secret.yaml:2: data: expected a mapping, got a list",
    ),
    "secret-data-date": (
        "queue/secret.yaml",
        manifest("kind: Secret\nmetadata: {name: q}\ndata: 2024-01-01\n"),
        "queue",
        "production/queue/secret.yaml:2: data: expected a mapping, got a date",
    ),
    "spec-oops": (
        "worker.yaml",
        V1.split("spec:")[0] + "spec: oops\n",
        "worker",
        "production/worker.yaml:1: spec: expected a mapping, got 'oops'",
    ),
    "v1-values-from-list-of-strings": (
        "worker.yaml",
        V1 + "  valuesFrom: [x]\n",
        "worker",
        "production/worker.yaml:1: spec.valuesFrom[0]: expected a mapping, got 'x'",
    ),
    "v1-timeout-duration": (
        "worker.yaml",
        V1 + "  timeout: 5m\n",
        "worker",
        "production/worker.yaml:1: spec.timeout: expected seconds, got '5m'",
    ),
    "v2-depends-on-names": (
        "worker.yaml",
        V2 + "  dependsOn: [api]\n",
        "worker",
        "production/worker.yaml:10: spec.dependsOn[0]: expected a mapping, got 'api'",
    ),
    "v2-remediation-retries-list": (
        "worker.yaml",
        V2 + "  upgrade: {remediation: {retries: [1]}}\n",
        "worker",
        "production/worker.yaml:10: spec.upgrade.remediation.retries: "
        "expected an integer, got a list",
    ),
    "git-repository-ref-list": (
        "worker.yaml",
        V2.replace("ref: {branch: main}", "ref: [master]"),
        "worker",
        "production/worker.yaml:1: GitRepository worker-charts: spec.ref: "
        "expected a mapping, got a list",
    ),
    "source-namespace-list": (
        "worker.yaml",
        V2.replace("name: worker-charts\n  namespace: worker", "name: c\n  namespace: [x]"),
        "worker",
        "production/worker.yaml:1: metadata.namespace: expected a string, got a list",
    ),
    "chart-ref-nul": (
        "worker.yaml",
        V1.replace("ref: main", 'ref: "ma\\0in"'),
        "worker",
        "production/worker.yaml:1: spec.chart.ref: expected text without control "
        "characters, got 'ma\\x00in'",
    ),
}


@pytest.fixture(scope="module")
def charts_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return chart_repository(tmp_path_factory.mktemp("charts"))


def rendered_fine(results: dict[str, RenderedApp | RenderError]) -> dict[str, str]:
    """The good apps' fingerprints: what must not change when another app breaks."""
    return {
        name: result.fingerprint
        for name, result in results.items()
        if name in ("web", "billing") and isinstance(result, RenderedApp)
    }


@pytest.mark.parametrize("case", sorted(REPRODUCERS))
def test_reproducer_fails_only_its_app_naming_file_line_and_field(
    case: str, charts_url: str, tmp_path: Path
) -> None:
    relative, text, app, message = REPRODUCERS[case]
    tree = config_tree(tmp_path / "repo", charts_url)
    before = rendered_fine(asyncio.run(render_all(tree, tmp_path / "cache")))
    assert sorted(before) == ["billing", "web"]

    tree.write(relative, text)
    results = asyncio.run(render_all(tree, tmp_path / "cache"))
    failed = {name: r for name, r in results.items() if isinstance(r, RenderError)}
    assert list(failed) == [app]
    assert str(failed[app]) == message
    assert rendered_fine(results) == before


def test_a_file_with_a_broken_release_keeps_its_good_release(
    charts_url: str, tmp_path: Path
) -> None:
    tree = config_tree(tmp_path / "repo", charts_url)
    second = V1.replace("worker", "jobs")
    tree.write("worker.yaml", V1 + "  timeout: 5m\n---\n" + second)
    results = asyncio.run(render_all(tree, tmp_path / "cache"))
    assert isinstance(results["worker"], RenderError)
    assert isinstance(results["jobs"], RenderedApp)
    assert results["jobs"].helm is not None
    assert results["jobs"].helm.chart.digest.startswith("git:")


def test_secret_values_never_appear_in_the_error(charts_url: str, tmp_path: Path) -> None:
    tree = config_tree(tmp_path / "repo", charts_url)
    tree.write(
        "queue/secret.yaml",
        manifest("kind: Secret\nmetadata: {name: q}\nstringData: {password: 8675309}\n"),
    )
    error = asyncio.run(render_all(tree, tmp_path / "cache"))["queue"]
    assert str(error) == (
        "production/queue/secret.yaml:2: stringData.password: expected a string, got an integer"
    )


def test_objects_are_read_as_kubernetes_reads_yaml(charts_url: str, tmp_path: Path) -> None:
    """Numbers and dates that YAML reads as such are strings to the API server."""
    tree = config_tree(tmp_path / "repo", charts_url)
    tree.write(
        "queue/deploy.yaml",
        """\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: q, labels: {app: q}}
        spec:
          template:
            spec:
              nodeSelector: {8080: "yes"}
              containers: [{name: q, image: q, env: [{name: SINCE, value: 2024-01-01}]}]
        """,
    )
    queue = asyncio.run(render_all(tree, tmp_path / "cache"))["queue"]
    assert isinstance(queue, RenderedApp)
    pod = queue.objects[0]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"8080": "yes"}
    assert pod["containers"][0]["env"][0]["value"] == "2024-01-01"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"a": {"when": __import__("datetime").datetime(2024, 1, 1, 10)}}, "quote the timestamp"),
        ({"n": 2**70}, "an integer that fits in 64 bits"),
        ({"x": float("nan")}, "a finite number"),
        ({"b": b"\x00"}, "a JSON value"),
        ({1: "a", "1": "b"}, "unique keys"),
    ],
)
def test_values_json_cannot_carry_are_refused(value: object, message: str) -> None:
    with pytest.raises(Exception, match=message):
        json_compatible(value)


def test_deep_nesting_is_refused_before_it_costs_a_stack() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(5000):
        node["x"] = {}
        node = node["x"]  # type: ignore[assignment]
    with pytest.raises(Exception, match="at most 200 levels of nesting"):
        json_compatible(deep)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"timeout": True}, "spec.timeout: expected seconds, got true"),
        ({"timeout": 2**80}, "spec.timeout: expected seconds, got 1208925819614629174706176"),
        ({"valuesFrom": [{"configMapKeyRef": {"name": 3}}]}, "configMapKeyRef.name"),
        ({"chart": {"git": "--upload-pack=x", "path": "c"}}, "spec.chart.git: expected a value"),
        ({"rollback": {"enable": "yes"}}, "spec.rollback.enable: expected true or false"),
    ],
)
def test_flux_v1_fields_are_typed(spec: dict[str, object], field: str) -> None:
    release = {
        "apiVersion": "helm.fluxcd.io/v1",
        "kind": "HelmRelease",
        "metadata": {"name": "w"},
        "spec": {"chart": {"repository": "https://charts.example", "name": "c"}, **spec},
    }
    with pytest.raises(HelmReleaseError, match=field.replace("[", r"\[")):
        parse_helmrelease(release)


def test_flux_accepted_forms_are_accepted() -> None:
    v1 = parse_helmrelease(
        {
            "apiVersion": "helm.fluxcd.io/v1",
            "kind": "HelmRelease",
            "metadata": {"name": "w", "namespace": "n"},
            "spec": {
                "timeout": 600,
                "chart": {"git": "git@github.com:org/repo", "path": "chart"},
                "valuesFrom": [
                    {"configMapKeyRef": {"name": "c"}},
                    {"secretKeyRef": {"name": "s", "key": "k", "optional": True}},
                    {"externalSourceRef": {"url": "https://example.test/values.yaml"}},
                    {"chartFileRef": {"path": "values-prod.yaml"}},
                ],
            },
        }
    )
    assert v1.timeout_seconds == 600
    assert v1.unread_values_from == [
        "spec.valuesFrom[2].externalSourceRef",
        "spec.valuesFrom[3].chartFileRef",
    ]
    assert [(r.kind, r.name, r.key) for r in v1.values_from] == [
        ("ConfigMap", "c", "values.yaml"),
        ("Secret", "s", "k"),
    ]
    v2 = parse_helmrelease(
        {
            "apiVersion": "helm.toolkit.fluxcd.io/v2beta2",
            "kind": "HelmRelease",
            "metadata": {"name": "w", "namespace": "n"},
            "spec": {
                "timeout": "1h30m",
                "chartRef": {"kind": "OCIRepository", "name": "o"},
                "dependsOn": [{"name": "db", "namespace": "data"}, {"name": "cache"}],
                "install": {"remediation": {"retries": -1}},
                "values": {"ports": {80: "http"}, "since": __import__("datetime").date(2024, 1, 1)},
                "valuesFrom": [
                    {
                        "kind": "Secret",
                        "name": "s",
                        "valuesKey": "v",
                        "targetPath": "a.b",
                        "optional": True,
                    }
                ],
            },
        }
    )
    assert v2.timeout_seconds == 5400 and v2.depends_on == ["db", "cache"]
    assert v2.install_retries == -1
    assert v2.values == {"ports": {"80": "http"}, "since": "2024-01-01"}


@pytest.mark.parametrize("bad", ["1..5m", "5m-", "-5m", "1e3s", "5", "99999999999h"])
def test_bad_durations_are_errors(bad: str) -> None:
    with pytest.raises(HelmReleaseError):
        parse_duration(bad, default=0)
