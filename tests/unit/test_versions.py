"""What identifies a release in a file, and copying it without touching anything else."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conveyor.promote.versions import (
    AppVersion,
    VersionError,
    apply_changes,
    check_version,
    plan_copy,
    plan_set,
    read_app_version,
    split_image,
)
from conveyor.render.discover import discover

FLUX_V1 = """\
---
apiVersion: v1
kind: Namespace
metadata:
  name: ui-{env}
---
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: ui
  namespace: ui-{env}
  annotations:
    fluxcd.io/automated: "true"
    filter.fluxcd.io/chart-image: {filter}
spec:
  releaseName: ui
  chart:
    git: git@github.com:hms-dbmi-cellenics/ui
    path: chart-infra
    ref: {ref}
  values:
    replicaCount: {replicas}
    serviceAccount:
      iamRole: arn:aws:iam::000:role/ui-role-{env}
    image:
      repository: registry.local/ui
      tag: "{tag}" # filled in by CI. do not modify.
    proxy:
        image: registry.local:5000/proxy:{proxy}
"""

FLUX_V2 = """\
apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata:
  name: api-chart
  namespace: flux-system
spec:
  interval: 1m
  url: https://github.com/hms-dbmi-cellenics/api
  ref:
    tag: {chart}
---
apiVersion: helm.toolkit.fluxcd.io/v2
kind: HelmRelease
metadata:
  name: api
  namespace: api-{env}
spec:
  chart:
    spec:
      chart: chart-infra
      sourceRef:
        kind: GitRepository
        name: api-chart
        namespace: flux-system
  values:
    replicaCount: {replicas}
    image:
      tag: {tag} # {{"$imagepolicy": "api-{env}:api:tag"}}
"""


def write(root: Path, path: str, text: str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(textwrap.dedent(text))


def version_of(root: Path, env: str, app: str) -> AppVersion:
    apps = {a.name: a for a in discover(root, env).apps}
    return read_app_version(root, apps[app])


def test_flux_v1_fields_and_copy_keeps_the_environment_settings(tmp_path: Path) -> None:
    write(
        tmp_path,
        "staging/ui.yaml",
        FLUX_V1.format(
            env="staging",
            filter="glob:refs-heads-master-*",
            ref="a1b2c3",
            replicas=1,
            tag="refs-heads-master-77aa",
            proxy="2.0",
        ),
    )
    production = FLUX_V1.format(
        env="production",
        filter="semver:>=0.0.0",
        ref="f0f0f0",
        replicas=3,
        tag="1.0.0",
        proxy="1.9",
    )
    write(tmp_path, "production/ui.yaml", production)
    source = version_of(tmp_path, "staging", "ui")
    assert [(f.field, f.role, f.value) for f in source.fields] == [
        ("spec.values.image.tag", "image", "refs-heads-master-77aa"),
        ("spec.values.proxy.image", "image", "2.0"),
        ("spec.chart.ref", "chart-ref", "a1b2c3"),
    ]
    assert source.version == "refs-heads-master-77aa"
    target = version_of(tmp_path, "production", "ui")
    changes = plan_copy(source, target)
    assert [(c.field.field, c.field.value, c.new) for c in changes] == [
        ("spec.values.image.tag", "1.0.0", "refs-heads-master-77aa"),
        ("spec.values.proxy.image", "1.9", "2.0"),
        ("spec.chart.ref", "f0f0f0", "a1b2c3"),
    ]
    assert apply_changes(tmp_path, changes) == ["production/ui.yaml"]
    # Only the three values changed; quoting, the CI comment and every production
    # setting (namespace, replicas, role, image filter) are exactly as they were.
    expected = (
        production.replace('"1.0.0"', '"refs-heads-master-77aa"')
        .replace("proxy:1.9", "proxy:2.0")
        .replace("ref: f0f0f0", "ref: a1b2c3")
    )
    written = (tmp_path / "production/ui.yaml").read_text()
    assert written.replace("    proxy:\n      image", "    proxy:\n        image") == expected
    assert plan_copy(source, version_of(tmp_path, "production", "ui")) == []


def test_flux_v2_setter_and_chart_source_in_the_same_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        "staging/api.yaml",
        FLUX_V2.format(env="staging", chart="v0.91.0", replicas=1, tag="0.91.0"),
    )
    write(
        tmp_path,
        "production/api.yaml",
        FLUX_V2.format(env="production", chart="v0.90.0", replicas=4, tag="0.90.0"),
    )
    source = version_of(tmp_path, "staging", "api")
    assert {(f.label, f.field, f.value) for f in source.fields} == {
        ("GitRepository/api-chart", "spec.ref.tag", "v0.91.0"),
        ("HelmRelease/api", "spec.values.image.tag", "0.91.0"),
    }
    apply_changes(tmp_path, plan_copy(source, version_of(tmp_path, "production", "api")))
    text = (tmp_path / "production/api.yaml").read_text()
    assert 'tag: 0.91.0 # {"$imagepolicy": "api-production:api:tag"}' in text
    assert "tag: v0.91.0" in text and "replicaCount: 4" in text and "api-production" in text


def test_workloads_kustomize_images_and_names_that_differ_per_environment(tmp_path: Path) -> None:
    deployment = """\
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: {name}
        spec:
          replicas: {replicas}
          template:
            spec:
              initContainers:
                - name: migrate
                  image: registry.local/unileaf/migrate:{tag}
              containers:
                - name: app
                  image: 'registry.local/unileaf/app-{env}:{tag}'  # per-env build
                - name: logs
                  image: fluent/fluent-bit:2.1
        ---
        apiVersion: batch/v1
        kind: CronJob
        metadata:
          name: cleanup
        spec:
          schedule: "0 * * * *"
          jobTemplate:
            spec:
              template:
                spec:
                  containers:
                    - name: cleanup
                      image: registry.local/unileaf/cleanup:{tag}
        """
    write(
        tmp_path,
        "dev/unileaf/app.yaml",
        deployment.format(name="unileaf-dev", replicas=1, env="dev", tag="3f2a1bc"),
    )
    write(
        tmp_path,
        "staging/unileaf/app.yaml",
        deployment.format(name="unileaf-staging", replicas=2, env="staging", tag="v1.4.0"),
    )
    write(
        tmp_path,
        "staging/archiver/kustomization.yaml",
        """\
        resources: [../../base/archiver]
        images:
          - name: archiver
            newName: ghcr.io/cal-itp/archiver
            newTag: "2024.1.1"
        """,
    )
    source = version_of(tmp_path, "dev", "unileaf")
    assert source.version == "3f2a1bc"
    assert [f.field for f in source.fields if f.role == "image"] == [
        "spec.template.spec.initContainers[migrate].image",
        "spec.template.spec.containers[app].image",
        "spec.template.spec.containers[logs].image",
        "spec.jobTemplate.spec.template.spec.containers[cleanup].image",
    ]
    target = version_of(tmp_path, "staging", "unileaf")
    # Deployment names differ per environment: matched by kind, the repository kept.
    changes = plan_copy(source, target)
    assert {c.new for c in changes} == {"3f2a1bc"}
    apply_changes(tmp_path, changes)
    text = (tmp_path / "staging/unileaf/app.yaml").read_text()
    assert "image: 'registry.local/unileaf/app-staging:3f2a1bc'  # per-env build" in text
    assert "name: unileaf-staging" in text and "replicas: 2" in text
    # --version sets the images that carry the app's version, not the pinned sidecar.
    changes = plan_set(version_of(tmp_path, "staging", "unileaf"), "v1.4.1")
    assert len(changes) == 3
    apply_changes(tmp_path, changes)
    text = (tmp_path / "staging/unileaf/app.yaml").read_text()
    assert text.count(":v1.4.1") == 3 and "fluent-bit:2.1" in text
    archiver = version_of(tmp_path, "staging", "archiver")
    assert [(f.field, f.value) for f in archiver.fields] == [
        ("images[archiver].newTag", "2024.1.1")
    ]
    apply_changes(tmp_path, plan_set(archiver, "2024.2.0"))
    assert 'newTag: "2024.2.0"' in (tmp_path / "staging/archiver/kustomization.yaml").read_text()


def test_image_references_and_version_checks() -> None:
    assert split_image("127.0.0.1:5000/app:1.2") == ("127.0.0.1:5000/app", "1.2")
    assert split_image("127.0.0.1:5000/app") == ("127.0.0.1:5000/app", "")
    assert split_image("app:1.2@sha256:ab12") == ("app", "1.2@sha256:ab12")
    assert split_image("app@sha256:ab12") == ("app", "@sha256:ab12")
    assert (
        check_version("refs-heads-master-1a2b3c-1700000000")
        == "refs-heads-master-1a2b3c-1700000000"
    )
    for bad in ("", "a b", "../etc", "v1/2", "x" * 129):
        with pytest.raises(VersionError):
            check_version(bad)


def test_a_file_that_is_not_yaml_is_named(tmp_path: Path) -> None:
    write(
        tmp_path,
        "staging/web/deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
    )
    apps = {a.name: a for a in discover(tmp_path, "staging").apps}
    (tmp_path / "staging/web/deploy.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(VersionError, match=r"staging/web/deploy\.yaml"):
        read_app_version(tmp_path, apps["web"])
