"""Fuzzing every reader of a config repo's files: a bad file is a RenderError, nothing else.

Valid files (the seeds below, the image fixtures and the cal-itp example manifests) are
parsed, mutated (a field's value replaced by a value of another type — lists, nested
mappings, huge integers, NUL bytes, dates, null — a field dropped, a kind renamed, an
apiVersion swapped), written back as YAML into one app's place in a config tree, and the
tree goes through `discover()` and `Renderer.render()` with real git for the charts. The
property, per example: every app renders or fails with a RenderError that names its file;
the two good apps (web, billing) render exactly as before; no other exception, within a
time and memory bound; and what consumes a render (fingerprint, JSON for the API server,
Secret masking, object identity, helm's values file) takes its output.

The unit run keeps the example count small; `CONVEYOR_FUZZ_PROFILE=fuzz` runs thousands
(add `--hypothesis-show-statistics` to see what the examples found).
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import os
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from conveyor.cluster.diff import mask_secrets
from conveyor.cluster.objects import ObjectRef, apply_order, drift_paths
from conveyor.render.documents import RenderError
from conveyor.render.render import RenderedApp, fingerprint
from tests.unit.configtree import ROOT, ConfigTree, chart_repository, config_tree, render_all

# One example may take this long and allocate this much (Python allocations, traced).
SECONDS_PER_EXAMPLE = 15.0
PEAK_BYTES = 64 * 1024 * 1024

# The same switches as the other fuzz suite (`make fuzz`): CONVEYOR_FUZZ_PROFILE=fuzz runs
# CONVEYOR_FUZZ_EXAMPLES (1500) new examples per test; the unit run a few, the same each
# time. No explain phase: its line tracing makes a slow case look like a hang.
PROFILE = os.environ.get("CONVEYOR_FUZZ_PROFILE", "unit")
EXAMPLES = int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "20" if PROFILE == "unit" else "1500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=PROFILE == "unit",
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A whole test: a second per example is several times what one takes.
FUZZ_TIMEOUT = pytest.mark.timeout(60 + EXAMPLES)

V1_GIT = """\
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: worker
  namespace: worker
  annotations: {fluxcd.io/automated: "true", filter.fluxcd.io/chart-image: semver:>=0.0.0}
spec:
  releaseName: worker
  targetNamespace: worker
  timeout: 600
  chart: {git: "{charts_url}", ref: main, path: charts/service}
  values: {image: {repository: registry.local/worker, tag: "1.0.0"}, replicaCount: 2}
  valuesFrom:
    - configMapKeyRef: {name: account-config, namespace: flux, key: account.yaml}
    - secretKeyRef: {name: worker-secrets, optional: true}
  rollback: {enable: true}
"""

V1_REPOSITORY = """\
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata: {name: worker, namespace: worker}
spec:
  chart: {repository: "http://127.0.0.1:9/charts", name: service, version: 1.2.3}
"""

V2_GIT = """\
apiVersion: v1
kind: Namespace
metadata: {name: worker}
---
apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata: {name: worker-charts, namespace: worker}
spec:
  interval: 5m0s
  url: "{charts_url}"
  ref: {branch: main}
---
apiVersion: helm.toolkit.fluxcd.io/v2
kind: HelmRelease
metadata: {name: worker, namespace: worker, labels: {team: data}}
spec:
  interval: 5m
  timeout: 1h30m
  releaseName: worker
  targetNamespace: worker
  suspend: false
  dependsOn: [{name: api, namespace: api}]
  chart:
    spec:
      chart: charts/service
      version: "*"
      sourceRef: {kind: GitRepository, name: worker-charts}
  install: {remediation: {retries: 3}}
  upgrade: {remediation: {retries: 2, strategy: rollback}}
  driftDetection: {mode: warn}
  valuesFrom:
    - {kind: ConfigMap, name: account-config, valuesKey: account.yaml}
    - {kind: Secret, name: db, valuesKey: password, targetPath: db.password, optional: true}
  values: {image: {repository: registry.local/worker, tag: "1.0.0"}}
"""

V2_REPOSITORIES = """\
apiVersion: source.toolkit.fluxcd.io/v1
kind: HelmRepository
metadata: {name: internal, namespace: worker}
spec: {url: "http://127.0.0.1:9/charts", interval: 10m}
---
apiVersion: source.toolkit.fluxcd.io/v1beta2
kind: OCIRepository
metadata: {name: oci, namespace: worker}
spec: {url: "oci://127.0.0.1:9/charts/service", ref: {tag: 1.2.3}, interval: 1h}
---
apiVersion: source.toolkit.fluxcd.io/v1
kind: HelmChart
metadata: {name: svc, namespace: worker}
spec:
  chart: service
  version: 1.x
  sourceRef: {kind: HelmRepository, name: internal}
---
apiVersion: helm.toolkit.fluxcd.io/v2beta2
kind: HelmRelease
metadata: {name: worker, namespace: worker}
spec:
  chart:
    spec:
      chart: service
      sourceRef: {kind: HelmRepository, name: internal}
---
apiVersion: helm.toolkit.fluxcd.io/v2
kind: HelmRelease
metadata: {name: jobs, namespace: worker}
spec:
  chartRef: {kind: OCIRepository, name: oci}
---
apiVersion: helm.toolkit.fluxcd.io/v2beta1
kind: HelmRelease
metadata: {name: cron, namespace: worker}
spec:
  chartRef: {kind: HelmChart, name: svc}
"""

MANIFESTS = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: queue-settings
  namespace: queue
  labels: {app: queue}
  annotations: {conveyor.dev/drift: disabled, note: "kept"}
data: {size: "10", mode: fifo}
binaryData: {blob: aGVsbG8=}
---
apiVersion: v1
kind: Secret
metadata: {name: queue-token, namespace: queue}
type: Opaque
data: {token: c2VjcmV0}
stringData: {password: hunter2}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: queue, namespace: queue}
spec:
  replicas: 2
  selector: {matchLabels: {app: queue}}
  template:
    metadata: {labels: {app: queue}}
    spec:
      containers:
        - name: queue
          image: registry.local/queue:1.0.0
          ports: [{containerPort: 8080}]
          env: [{name: MODE, value: fifo}]
"""

# Values of other types than the field had: what hand-written and generated YAML holds.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**31), max_value=2**31),
    st.integers(min_value=2**63, max_value=2**300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.text(alphabet=st.sampled_from("ab-/.:%\x00\x1b\n \t"), max_size=8),
    st.dates(min_value=datetime.date(1, 1, 1)),
    st.datetimes(),
    st.sampled_from(
        [
            "5m",
            "1h30m",
            "0.5s",
            "-5m",
            "5",
            "--upload-pack=touch /tmp/x",
            "-",
            "",
            "oci://",
            "ConfigMap",
            "Secret",
            "GitRepository",
            "HelmRepository",
            "OCIRepository",
            "HelmChart",
            "Bucket",
            "rollback",
            "uninstall",
            "enabled",
            "warn",
            "main\x00",
            "..",
            "a/b",
        ]
    ),
)
KEYS = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.booleans(), st.none())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=3)),
    max_leaves=8,
)
KINDS = [
    "ConfigMap",
    "Secret",
    "Deployment",
    "Namespace",
    "HelmRelease",
    "GitRepository",
    "HelmRepository",
    "OCIRepository",
    "HelmChart",
    "Kustomization",
]
API_VERSIONS = [
    "v1",
    "apps/v1",
    "helm.fluxcd.io/v1",
    "helm.toolkit.fluxcd.io/v2",
    "helm.toolkit.fluxcd.io/v2beta1",
    "helm.toolkit.fluxcd.io/v2beta2",
    "source.toolkit.fluxcd.io/v1",
    "source.toolkit.fluxcd.io/v1beta2",
]


def _fixture(relative: str) -> str:
    text = (ROOT / relative).read_text()
    # Every chart source of the fixtures points at the local chart repository (or at a
    # closed loopback port): fuzzing never reaches a network.
    for remote in (
        "git@github.com:hms-dbmi-cellenics/ui",
        "git@github.com:hms-dbmi-cellenics/worker",
        "https://github.com/hms-dbmi-cellenics/api",
    ):
        text = text.replace(remote, "{charts_url}")
    return text


RELEASE_SEEDS = {
    "v1-git": V1_GIT,
    "v1-repository": V1_REPOSITORY,
    "v1-fixture": _fixture("tests/fixtures/images/production/ui.yaml"),
    "v2-git": V2_GIT,
    "v2-fixture": _fixture("tests/fixtures/images/staging/api.yaml"),
}
SOURCE_SEEDS = {"v2-git": V2_GIT, "v2-repositories": V2_REPOSITORIES}
CALITP = "examples/calitp/kubernetes/apps/manifests/archiver"
MANIFEST_SEEDS = {
    "manifests": MANIFESTS,
    "calitp-deployment": _fixture(f"{CALITP}/deployment.yaml"),
    "calitp-configmap": _fixture(f"{CALITP}/configmap.yaml"),
}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place below `node` a mutation can reach: mapping keys and list indices."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


def _mutate(documents: list[Any], data: st.DataObject) -> list[str]:
    """Apply 1-3 mutations to `documents` in place; what was done, for the report."""
    done = []
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        places = list(_paths(documents))
        if not places:
            break
        place = data.draw(st.sampled_from(places), label="place")
        parent = documents
        for step in place[:-1]:
            parent = parent[step]
        key = place[-1]
        operation = data.draw(
            st.sampled_from(["replace", "replace", "replace", "drop", "kind", "apiVersion"]),
            label="operation",
        )
        document = documents[place[0]]
        if operation == "drop":
            del parent[key]
        elif operation in ("kind", "apiVersion") and isinstance(document, dict):
            choices = KINDS if operation == "kind" else API_VERSIONS
            document[operation] = data.draw(st.sampled_from(choices), label=operation)
        else:
            parent[key] = data.draw(VALUES, label="value")
        done.append(f"{operation} {'.'.join(map(str, place[1:]))}")
    return done


@pytest.fixture(scope="module")
def charts_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return chart_repository(tmp_path_factory.mktemp("charts"))


@pytest.fixture(scope="module")
def baseline(charts_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The good apps' fingerprints, rendered once without any fuzzed file."""
    directory = tmp_path_factory.mktemp("baseline")
    results = asyncio.run(render_all(config_tree(directory / "repo", charts_url), directory))
    fingerprints = {n: r.fingerprint for n, r in results.items() if isinstance(r, RenderedApp)}
    assert sorted(fingerprints) == ["billing", "web"]
    return fingerprints


def _consume(rendered: RenderedApp) -> None:
    """What the plan and apply steps do with a render: none of it may raise."""
    for obj in rendered.objects:
        ObjectRef.of(obj)
        apply_order(obj)
        json.dumps(obj)
        drift_paths(obj, copy.deepcopy(obj))
        mask_secrets(obj, copy.deepcopy(obj))
    fingerprint({"objects": rendered.objects})
    if rendered.helm is not None:
        json.dumps(rendered.helm.values)


def _check(
    text: str, where: str, seed: str, done: list[str], charts_url: str, baseline: dict[str, str]
) -> None:
    with tempfile.TemporaryDirectory(prefix="conveyor-fuzz-") as scratch:
        tree: ConfigTree = config_tree(Path(scratch) / "repo", charts_url)
        tree.write(where, text)
        tracemalloc.start()
        started = time.monotonic()
        try:
            results = asyncio.run(
                asyncio.wait_for(render_all(tree, Path(scratch) / "cache"), SECONDS_PER_EXAMPLE)
            )
            for result in results.values():
                if isinstance(result, RenderedApp):
                    _consume(result)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - started
    assert elapsed < SECONDS_PER_EXAMPLE, f"{seed} {done}: {elapsed:.1f}s"
    assert peak < PEAK_BYTES, f"{seed} {done}: {peak} bytes"
    for name, fingerprint_before in baseline.items():
        result = results[name]
        assert isinstance(result, RenderedApp), f"{seed} {done} stopped {name}: {result}"
        assert result.fingerprint == fingerprint_before, f"{seed} {done} changed {name}"
    for name, result in results.items():
        if name in baseline:
            continue
        if isinstance(result, RenderError):
            assert result.file and str(result), f"{seed} {done}: an error without a file"
            event(f"{seed}: RenderError: {_problem(result.detail)}")
        else:
            event(f"{seed}: rendered")


def _problem(detail: str) -> str:
    """The kind of problem a message tells, without the field and the value: what the
    examples found, counted by --hypothesis-show-statistics."""
    if ": expected " in detail:
        detail = "expected " + detail.split(": expected ", 1)[1]
    return detail.split(", got ")[0].split(" (")[0][:70]


def _fuzz(
    seeds: dict[str, str],
    where: str,
    data: st.DataObject,
    charts_url: str,
    baseline: dict[str, str],
) -> None:
    seed = data.draw(st.sampled_from(sorted(seeds)), label="seed")
    text = seeds[seed].replace("{charts_url}", charts_url)
    documents = [d for d in yaml.safe_load_all(text) if d]
    done = _mutate(documents, data)
    text = yaml.safe_dump_all(documents, sort_keys=False)
    _check(text, where, seed, done, charts_url, baseline)


@FUZZ_TIMEOUT
@FUZZ
@given(data=st.data())
def test_fuzzed_manifests_fail_only_their_app(
    data: st.DataObject, charts_url: str, baseline: dict[str, str]
) -> None:
    _fuzz(MANIFEST_SEEDS, "queue/fuzzed.yaml", data, charts_url, baseline)


@FUZZ_TIMEOUT
@FUZZ
@given(data=st.data())
def test_fuzzed_helmreleases_fail_only_their_app(
    data: st.DataObject, charts_url: str, baseline: dict[str, str]
) -> None:
    _fuzz(RELEASE_SEEDS, "worker.yaml", data, charts_url, baseline)


@FUZZ_TIMEOUT
@FUZZ
@given(data=st.data())
def test_fuzzed_flux_sources_fail_only_their_apps(
    data: st.DataObject, charts_url: str, baseline: dict[str, str]
) -> None:
    _fuzz(SOURCE_SEEDS, "worker/sources.yaml", data, charts_url, baseline)
