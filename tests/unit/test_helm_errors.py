"""A failed helm command said in one line: its cause, and where its value is written."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conveyor.config.helmrelease import parse_helmrelease
from conveyor.render.charts import ResolvedChart
from conveyor.render.documents import load_documents
from conveyor.render.helm import LOGGED_OUTPUT, HelmCause, HelmCLI, HelmError, helm_cause
from conveyor.render.render import HelmPlan
from conveyor.render.values_origin import values_origin

LIVE = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "api", "namespace": "prod", "annotations": {"a": "x" * 300}},
    "spec": {"replicas": "two"},
}
# What helm 3.21 prints when the API server refuses its patch: the object quoted whole.
PATCH_REFUSED = (
    'Error: UPGRADE FAILED: cannot patch "api" with kind Deployment:  "" is invalid: patch: '
    f"Invalid value: {json.dumps(json.dumps(LIVE))}: json: cannot unmarshal string into Go "
    "struct field DeploymentSpec.spec.replicas of type int32\n"
)


@pytest.mark.parametrize(
    ("stderr", "text", "field"),
    [
        (
            PATCH_REFUSED,
            "Deployment api: spec.replicas: cannot unmarshal string into int32",
            "spec.replicas",
        ),
        (
            'Error: 1 error occurred:\n\t* Deployment in version "v1" cannot be handled as a '
            "Deployment: json: cannot unmarshal string into Go struct field "
            "DeploymentSpec.spec.replicas of type int32\n\n",
            "Deployment: spec.replicas: cannot unmarshal string into int32",
            "spec.replicas",
        ),
        (
            'Error: UPGRADE FAILED: cannot patch "api" with kind Deployment: Deployment.apps "api"'
            " is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0\n",
            "Deployment api: spec.replicas: Invalid value: -1: must be greater than or equal to 0",
            "spec.replicas",
        ),
        (
            'Error: INSTALLATION FAILED: failed to create resource: Deployment.apps "api" is '
            "invalid: spec.template.spec.containers[0].image: Required value\n",
            "Deployment api: spec.template.spec.containers[0].image: Required value",
            "spec.template.spec.containers[0].image",
        ),
        (
            'I1201 10:26:54.000000 1 warnings.go:107] "Warning: unknown field \\"spec.x\\""\n'
            "Error: UPGRADE FAILED: another operation (install/upgrade/rollback) is in progress\n",
            "another operation (install/upgrade/rollback) is in progress",
            None,
        ),
        ("Error: release: not found\n", "release: not found", None),
        ("something went wrong\nbadly\n", "something went wrong; badly", None),
        ("", "(no output)", None),
    ],
)
def test_the_cause_is_one_short_line(stderr: str, text: str, field: str | None) -> None:
    cause = helm_cause(stderr)
    assert (cause.text, cause.field) == (text, field)


def test_a_template_error_keeps_its_file_and_line_and_names_the_values_key() -> None:
    stderr = (
        "Error: UPGRADE FAILED: template: service/templates/service.yaml:1:14: executing "
        '"service/templates/service.yaml" at <.Values.service.enabled>: nil pointer evaluating '
        "interface {}.enabled\n"
    )
    cause = helm_cause(stderr)
    assert cause.text.startswith("template: service/templates/service.yaml:1:14: executing")
    assert cause.values_key == "service.enabled"


def test_a_cause_is_capped_and_long_quotes_are_cut() -> None:
    cause = helm_cause("Error: " + "no; " * 400 + '"' + "q" * 300 + '"')
    assert len(cause.text) == 500 and cause.text.endswith("...")
    assert "q" * 200 not in helm_cause('Error: bad "' + "q" * 300 + '" value').text


def fake_helm(tmp_path: Path, stderr: str) -> HelmCLI:
    (tmp_path / "stderr").write_text(stderr)
    script = tmp_path / "helm"
    script.write_text(f"#!/bin/sh\ncat {tmp_path / 'stderr'} >&2\nexit 1\n")
    script.chmod(0o755)
    return HelmCLI(binary=str(script))


def test_the_full_output_goes_to_the_log_capped_and_without_secrets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "data": {"password": "aHVudGVyMg==" * 30}}
    stderr = (
        'Error: UPGRADE FAILED: cannot patch "db" with kind Secret:  "" is invalid: patch: '
        f"Invalid value: {json.dumps(json.dumps(secret))}: json: cannot unmarshal number into "
        "Go struct field Secret.data of type []uint8\n" + "padding\n" * 3000
    )
    caplog.set_level(logging.INFO, logger="conveyor.render.helm")
    with pytest.raises(HelmError) as raised:
        asyncio.run(fake_helm(tmp_path, stderr).run("upgrade", positional=["db"], writes=True))
    assert raised.value.message == "Secret db: data: cannot unmarshal number into []uint8"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.startswith('helm upgrade db failed: Error: UPGRADE FAILED: cannot patch "db"')
    assert "(a Secret, not shown)" in logged
    assert "aHVudGVyMg" not in logged
    assert len(logged) < LOGGED_OUTPUT + 200 and "more characters)" in logged
    caplog.clear()
    with pytest.raises(HelmError):  # a read that fails ("not found") is no news
        asyncio.run(fake_helm(tmp_path, "Error: release: not found\n").run("status"))
    assert caplog.records == []


HELMRELEASE = """\
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: api
  namespace: prod
spec:
  releaseName: api
  chart: {git: "file:///srv/charts.git", path: service, ref: master}
  values:
    replicaCount: "two"
    workers: "two"
    image:
      repository: registry.local/api
      tag: "1.0.0"
    env:
      - {name: MODE, value: fast}
      - {name: SPEED, value: fast}
"""


class TemplateOnly(HelmCLI):
    """helm whose `template` prints a given manifest (the real one runs on the sandbox)."""

    def __init__(self, manifest: str) -> None:
        super().__init__(binary="helm-never-runs")
        self.manifest = manifest

    async def template(self, *args: Any, **kwargs: Any) -> str:
        return self.manifest


def origin(tmp_path: Path, cause: HelmCause, manifest: str) -> str | None:
    (tmp_path / "production").mkdir(exist_ok=True)
    (tmp_path / "production" / "api.yaml").write_text(HELMRELEASE)
    [release] = load_documents(tmp_path / "production" / "api.yaml", relative_to=tmp_path)
    chart = ResolvedChart(path=tmp_path, digest="0", origin="test")
    plan = HelmPlan(spec=parse_helmrelease(release.obj), chart=chart, values={})
    return asyncio.run(values_origin(plan, release, cause, helm=TemplateOnly(manifest)))


def deployment(spec: str) -> str:
    return "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api}\nspec:\n" + (
        textwrap.indent(textwrap.dedent(spec), "  ")
    )


def test_a_refused_value_is_found_in_the_values_block(tmp_path: Path) -> None:
    # Two keys hold "two": the one named like the field is meant.
    cause = HelmCause("...", kind="Deployment", name="api", field="spec.replicas")
    manifest = deployment("replicas: two\n")
    assert origin(tmp_path, cause, manifest) == "replicaCount in production/api.yaml:10"
    containers = """
        template:
          spec:
            containers:
              - name: api
                env: [{name: MODE, value: fast}, {name: SPEED, value: fast}]
                image: registry.local/api:1.0.0
                ports: [{containerPort: 1.0.0}]
    """
    # Go's decoder leaves list indices out of the path; two keys hold it, none alike.
    ports = HelmCause("...", kind="Deployment", field="spec.template.spec.containers.ports.port")
    assert origin(tmp_path, ports, deployment(containers)) is None
    port = HelmCause(
        "...", kind="Deployment", field="spec.template.spec.containers.ports.containerPort"
    )
    assert origin(tmp_path, port, deployment(containers)) == "image.tag in production/api.yaml:14"
    value = HelmCause("...", kind="Deployment", field="spec.template.spec.containers[0].env[1]")
    assert origin(tmp_path, value, deployment(containers)) is None  # a map, not a value


def test_a_value_not_in_the_file_or_another_object_names_nothing(tmp_path: Path) -> None:
    default = HelmCause("...", kind="Deployment", name="api", field="spec.paused")
    assert origin(tmp_path, default, deployment("paused: maybe\n")) is None
    other = HelmCause("...", kind="Deployment", name="worker", field="spec.replicas")
    assert origin(tmp_path, other, deployment("replicas: two\n")) is None


def test_a_template_error_names_the_deepest_key_the_file_has(tmp_path: Path) -> None:
    tag = HelmCause("template: ...", values_key="image.tag")
    assert origin(tmp_path, tag, "") == "image.tag in production/api.yaml:14"
    digest = HelmCause("template: ...", values_key="image.digest.sha")
    assert origin(tmp_path, digest, "") == "image in production/api.yaml:12"
    assert origin(tmp_path, HelmCause("template: ...", values_key="ingress.host"), "") is None
