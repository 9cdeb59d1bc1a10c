"""Pins against image automation: the two annotation forms, automation honouring them
(scan shows, write-back skips), and pinning/unpinning an app's files in place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conveyor.images.automation import discover
from conveyor.images.pins import PINNED, Pin, pin_annotations, pin_keys, read_pin
from conveyor.images.scan import Outcome, Row, Status
from conveyor.images.writeback import write_changes
from conveyor.promote.pinning import app_pin, pin_app, unpin_app
from conveyor.render import discover as render_discover
from tests.imagetools import FIXTURES

PIN = Pin("alice", "1.4.3 breaks uploads", "2026-12-01T10:00:00Z")


def test_annotation_forms() -> None:
    v1 = pin_annotations({"fluxcd.io/automated": "true"}, PIN)
    assert v1 == {
        "fluxcd.io/locked": "true",
        "fluxcd.io/locked_msg": "1.4.3 breaks uploads",
        "fluxcd.io/locked_user": "alice",
    }
    weave = pin_annotations({"flux.weave.works/automated": "true"}, PIN)
    assert sorted(weave) == [
        "flux.weave.works/locked",
        "flux.weave.works/locked_msg",
        "flux.weave.works/locked_user",
    ]
    plain = pin_annotations({"other": "x"}, PIN)
    assert plain == {
        "conveyor.dev/pinned": "true",
        "conveyor.dev/pinned-by": "alice",
        "conveyor.dev/pinned-reason": "1.4.3 breaks uploads",
        "conveyor.dev/pinned-at": "2026-12-01T10:00:00Z",
    }
    assert read_pin(plain) == PIN
    assert read_pin(v1) == Pin("alice", "1.4.3 breaks uploads", annotation="fluxcd.io/locked")
    assert read_pin({"fluxcd.io/locked": True}) == Pin(annotation="fluxcd.io/locked")
    assert read_pin({PINNED: "false"}) is None and read_pin(None) is None
    assert PIN.describe() == (
        "pinned by alice at 2026-12-01T10:00:00Z: 1.4.3 breaks uploads (conveyor.dev/pinned)"
    )
    assert pin_keys({**v1, **plain, "fluxcd.io/automated": "true"}) == [*plain, *v1]


def write(root: Path, name: str, text: str) -> None:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


V1_LOCKED = """\
apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata:
  name: a
  annotations:
    fluxcd.io/automated: "true"
    fluxcd.io/locked: "true"
    fluxcd.io/locked_user: bob
spec:
  values:
    image: repo/a:1.0.0
"""

SETTERS = """\
apiVersion: image.toolkit.fluxcd.io/v1beta2
kind: ImageRepository
metadata: {name: app, namespace: flux-system}
spec: {image: ghcr.io/org/app}
---
apiVersion: image.toolkit.fluxcd.io/v1beta2
kind: ImagePolicy
metadata: {name: app, namespace: flux-system}
spec:
  imageRepositoryRef: {name: app}
  policy: {semver: {range: ">=1.0.0"}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: staging
spec:
  template:
    spec:
      containers:
        - name: app
          image: ghcr.io/org/app:1.0.0 # {"$imagepolicy": "flux-system:app"}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: production
  annotations:
    conveyor.dev/pinned: "true"
    conveyor.dev/pinned-by: alice
spec:
  template:
    spec:
      containers:
        - name: app
          image: ghcr.io/org/app:0.9.0 # {"$imagepolicy": "flux-system:app"}
"""


def test_a_flux_v1_lock_is_scanned_as_pinned_and_never_written(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", V1_LOCKED)
    [locked] = discover(tmp_path).automations
    assert locked.pin == Pin("bob", None, annotation="fluxcd.io/locked")
    row = Row(locked, Outcome("2.0.0", 2, 2))
    assert row.status is Status.pinned
    assert row.to_dict()["pin"] == {
        "by": "bob",
        "reason": None,
        "at": None,
        "annotation": "fluxcd.io/locked",
    }
    assert write_changes(tmp_path, ".", {locked.watch: "2.0.0"}) == []
    assert (tmp_path / "a.yaml").read_text() == V1_LOCKED


def test_a_pinned_document_keeps_its_setters_and_the_others_follow(tmp_path: Path) -> None:
    write(tmp_path, "app.yaml", SETTERS)
    found = discover(tmp_path)
    assert found.problems == []
    free, held = found.automations
    assert (free.name, free.pin, [s.scalar.line for s in free.sites]) == (
        "ImagePolicy flux-system:app",
        None,
        [22],
    )
    assert held.name == free.name and held.watch == free.watch
    assert held.pin == Pin("alice", None) and [s.scalar.line for s in held.sites] == [36]
    assert held.current == "0.9.0"
    changes = write_changes(tmp_path, ".", {free.watch: "1.1.0"})
    assert [(c.old, c.new) for c in changes] == [("1.0.0", "1.1.0")]
    assert (tmp_path / "app.yaml").read_text() == SETTERS.replace("app:1.0.0", "app:1.1.0")


def test_all_sites_pinned_leaves_only_the_pinned_row(tmp_path: Path) -> None:
    write(
        tmp_path,
        "app.yaml",
        SETTERS.replace(
            "name: staging\n", 'name: staging\n  annotations: {conveyor.dev/pinned: "true"}\n'
        ),
    )
    automations = discover(tmp_path).automations
    assert [a.pin is not None for a in automations] == [True, True]


def test_an_undecided_row_warns_naming_the_policy_and_the_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", V1_LOCKED.replace('    fluxcd.io/locked: "true"\n', ""))
    [automation] = discover(tmp_path).automations
    row = Row(automation, Outcome(None, 3, 2, tied=("main-b", "main-a")))
    assert row.status is Status.undecided
    assert row.warning == (
        "a.yaml: HelmRelease default/a chart-image: policy glob:* (newest build) cannot tell "
        "the newest of 2 tags apart (main-b, main-a): same build time and no timestamp in "
        "the tag to order by; keeping 1.0.0"
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    root = tmp_path / "config"
    shutil.copytree(FIXTURES, root)
    return root


@pytest.mark.parametrize(
    ("folder", "app", "annotation"),
    [
        ("staging", "ui", "fluxcd.io/locked"),  # Flux v1 HelmRelease
        ("staging", "api", "conveyor.dev/pinned"),  # Flux v2 setters
        ("production", "ui", "conveyor.dev/pinned"),
    ],
)
def test_pin_and_unpin_an_app_in_place(
    config: Path, folder: str, app: str, annotation: str
) -> None:
    [source] = [a for a in render_discover.discover(config, folder).apps if a.name == app]
    original = (config / source.path).read_text()
    assert app_pin(config, source) is None
    assert pin_app(config, source, PIN) == [source.path]
    pinned = (config / source.path).read_text()
    assert app_pin(config, source) == (
        PIN if annotation == PINNED else Pin(PIN.by, PIN.reason, annotation=annotation)
    )
    # Only annotation lines were added; everything else is as it was.
    added = [line for line in pinned.splitlines() if line not in original.splitlines()]
    assert all(
        ("conveyor.dev/pinned" in a or "fluxcd.io/locked" in a or a.strip() == "annotations:")
        for a in added
    ), added
    assert len(pinned.splitlines()) == len(original.splitlines()) + len(added)
    # Image automation sees the pin on exactly this app's automation.
    held = [a for a in discover(config).automations if a.pin is not None]
    assert {s.file for a in held for s in a.sites} == {source.path}
    assert unpin_app(config, source) == [source.path]
    assert (config / source.path).read_text() == original
    assert unpin_app(config, source) == []


def test_a_kustomization_without_metadata_gets_one(tmp_path: Path) -> None:
    text = (
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [deploy.yaml]\nimages:\n  - name: web\n    newTag: 1.2.0\n"
    )
    write(tmp_path, "env/web/kustomization.yaml", text)
    write(
        tmp_path,
        "env/web/deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
    )
    [source] = render_discover.discover(tmp_path, "env").apps
    assert pin_app(tmp_path, source, PIN) == ["env/web/kustomization.yaml"]
    pinned = (tmp_path / "env/web/kustomization.yaml").read_text()
    assert pinned.startswith(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nmetadata:\n"
        '  annotations:\n    conveyor.dev/pinned: "true"\n'
    )
    assert app_pin(tmp_path, source) == PIN
    unpin_app(tmp_path, source)
    assert "conveyor.dev" not in (tmp_path / "env/web/kustomization.yaml").read_text()
