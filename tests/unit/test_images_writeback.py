"""Finding automations in files and writing tags back byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conveyor.images.automation import Automation, SiteForm, Watch, discover
from conveyor.images.reference import ImageName
from conveyor.images.writeback import (
    Change,
    MessageTemplateError,
    check_template,
    commit_message,
    write_changes,
)
from conveyor.images.yamltext import Scalar, load_documents, render_like, setter_comments
from tests.imagetools import FIXTURE_REGISTRY, FIXTURES

ECR = FIXTURE_REGISTRY
UI_OLD = "refs-heads-master-4f5c0a1-1700000000"
API_OLD = "refs-heads-master-0a1b2c3-1700000000"


def by_name(automations: list[Automation]) -> dict[str, Automation]:
    return {a.name: a for a in automations}


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


def test_discovers_the_cellenics_fixtures() -> None:
    found = discover(FIXTURES)
    assert found.problems == []
    automations = by_name(found.automations)
    assert sorted(automations) == [
        "HelmRelease ui-default/ui chart-image",
        "HelmRelease worker-default/worker python",
        "HelmRelease worker-default/worker r",
        "ImagePolicy flux-system:api",
        "ImagePolicy ui-production:ui",
    ]
    ui = automations["HelmRelease ui-default/ui chart-image"]
    assert ui.kind == "flux-v1"
    assert ui.watch.image == ImageName(ECR, "ui")
    assert ui.watch.policy.description == "glob:refs-heads-master-* (newest build)"
    assert ui.current == "refs-heads-master-4f5c0a1-1700000000"
    assert [(s.form, s.scalar.line) for s in ui.sites] == [(SiteForm.tag, 37)]
    python = automations["HelmRelease worker-default/worker python"]
    assert python.watch.policy.description == "semver ~1.4"
    assert python.sites[0].form is SiteForm.image
    api = automations["ImagePolicy flux-system:api"]
    assert api.kind == "flux-v2"
    assert [s.form for s in api.sites] == [SiteForm.name, SiteForm.tag, SiteForm.image]
    assert api.watch.policy.description.startswith("numerical asc of tags matching")
    assert [p.pattern for p in api.watch.exclude] == [r"^.*\.sig$"]


def chosen_for(root: Path, tags: dict[str, str]) -> dict[Watch, str]:
    automations = by_name(discover(root).automations)
    return {automations[name].watch: tag for name, tag in tags.items()}


def test_write_back_changes_only_the_values_byte_for_byte(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(FIXTURES, root)
    before = {p: p.read_bytes() for p in root.rglob("*.yaml")}
    changes = write_changes(
        root,
        ".",
        chosen_for(
            root,
            {
                "HelmRelease ui-default/ui chart-image": "refs-heads-master-9e8d7c6-1700000600",
                "HelmRelease worker-default/worker r": "1.5.0",
                "HelmRelease worker-default/worker python": "1.4.2",
                "ImagePolicy flux-system:api": "refs-heads-master-1234567-1700000900",
                "ImagePolicy ui-production:ui": "0.91.0",
            },
        ),
    )
    expected = {
        "staging/ui.yaml": [
            (
                b'tag: "refs-heads-master-4f5c0a1-1700000000"   #',
                b'tag: "refs-heads-master-9e8d7c6-1700000600"   #',
            )
        ],
        "production/worker.yaml": [
            (b"/worker-r:1.4.0\n", b"/worker-r:1.5.0\n"),
            (b"/worker-python:1.4.0' # pinned", b"/worker-python:1.4.2' # pinned"),
        ],
        "staging/api.yaml": [
            (
                b'tag: "refs-heads-master-0a1b2c3-1700000000" #',
                b'tag: "refs-heads-master-1234567-1700000900" #',
            ),
            (
                b"api:refs-heads-master-0a1b2c3-1700000000 #",
                b"api:refs-heads-master-1234567-1700000900 #",
            ),
        ],
        "production/ui.yaml": [(b"tag: 0.90.0 #", b"tag: 0.91.0 #")],
    }
    for path, original in before.items():
        relative = path.relative_to(root).as_posix()
        wanted = original
        for old, new in expected.get(relative, []):
            assert wanted.count(old) == 1
            wanted = wanted.replace(old, new)
        assert path.read_bytes() == wanted, relative
    assert sorted(c.line for c in changes) == sorted(
        [
            f"{ECR}/ui: {UI_OLD} -> refs-heads-master-9e8d7c6-1700000600",
            f"{ECR}/worker-r: 1.4.0 -> 1.5.0",
            f"{ECR}/worker-python: 1.4.0 -> 1.4.2",
            f"{ECR}/api: {API_OLD} -> refs-heads-master-1234567-1700000900",
            f"{ECR}/api: {API_OLD} -> refs-heads-master-1234567-1700000900",
            f"{ECR}/ui: 0.90.0 -> 0.91.0",
        ]
    )
    # A second pass with the same choices finds nothing to do.
    assert (
        write_changes(root, ".", chosen_for(root, {"ImagePolicy ui-production:ui": "0.91.0"})) == []
    )


def test_unchanged_tag_and_untouched_files(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(FIXTURES, root)
    docs = (root / "staging/docs.yaml").read_bytes()
    changes = write_changes(root, ".", chosen_for(root, {"ImagePolicy ui-production:ui": "0.90.0"}))
    assert changes == []
    assert (root / "staging/docs.yaml").read_bytes() == docs


def test_crlf_and_plain_values_that_would_change_type(tmp_path: Path) -> None:
    text = (
        "apiVersion: helm.fluxcd.io/v1\r\n"
        "kind: HelmRelease\r\n"
        "metadata:\r\n"
        "  name: api\r\n"
        "  annotations:\r\n"
        "    fluxcd.io/automated: 'true'\r\n"
        "    fluxcd.io/tag.chart-image: regex:^[0-9]+$\r\n"
        "spec:\r\n"
        "  values:\r\n"
        "    image:\r\n"
        "      repository: reg.example.com/api\r\n"
        "      tag: abc1234   # short sha\r\n"
    )
    path = write(tmp_path, "api.yaml", text)
    write_changes(
        tmp_path, ".", chosen_for(tmp_path, {"HelmRelease default/api chart-image": "1234567"})
    )
    assert path.read_bytes() == text.replace("abc1234 ", '"1234567" ').encode()
    write_changes(
        tmp_path, ".", chosen_for(tmp_path, {"HelmRelease default/api chart-image": "1.10"})
    )
    assert b'tag: "1.10"   # short sha\r\n' in path.read_bytes()


@pytest.mark.parametrize("bom", ["\ufeff", ""])
def test_byte_order_mark_and_non_ascii_text_survive(tmp_path: Path, bom: str) -> None:
    text = bom + (
        "# déploiement — ünïcode 😀\r\n"
        "apiVersion: helm.fluxcd.io/v1\r\nkind: HelmRelease\r\n"
        "metadata:\r\n  name: ü\r\n  annotations: {fluxcd.io/automated: 'true'}\r\n"
        "spec:\r\n  values:\r\n    note: 'çà 😀'\r\n"
        "    image: 'reg.example.com/app:1.0.0' # 😀\r\n"
    )
    path = write(tmp_path, "app.yaml", text)
    write_changes(
        tmp_path, ".", chosen_for(tmp_path, {"HelmRelease default/ü chart-image": "2.0.0"})
    )
    assert path.read_bytes() == text.replace("app:1.0.0", "app:2.0.0").encode()


@pytest.mark.parametrize(
    ("style", "value", "rendered"),
    [
        (None, "1.2.3", "1.2.3"),
        (None, "1.10", '"1.10"'),
        (None, "1234567", '"1234567"'),
        (None, "true", '"true"'),
        (None, "null", '"null"'),
        ("'", "it's", "'it''s'"),
        ('"', "a\\b", '"a\\\\b"'),
    ],
)
def test_render_like_keeps_style_and_type(style: str | None, value: str, rendered: str) -> None:
    assert render_like(Scalar(0, 0, 1, style, "x"), value) == rendered


FLUX_V1_SHAPES = """\
apiVersion: flux.weave.works/v1beta1
kind: HelmRelease
metadata:
  name: shapes
  namespace: apps
  annotations:
    flux.weave.works/automated: "true"
    flux.weave.works/tag.chart-image: semver:^1
    fluxcd.io/tag.plain: semver:^2
    filter.fluxcd.io/split: semver:^3
    filter.fluxcd.io/nested: semver:^4
    filter.fluxcd.io/outer: semver:^5
    repository.fluxcd.io/custom: deep.img
    tag.fluxcd.io/custom: deep.version
    registry.fluxcd.io/custom: deep.reg
spec:
  values:
    image: repo/top:1.0.0
    plain:
      image: quay.io/org/plain:2.0.0
    split:
      registry: reg.example.com:5000
      image: team/split
      tag: 3.0.0
    nested:
      image:
        registry: reg.example.com
        repository: team/nested
        tag: 4.0.0
    outer:
      image:
        repository: reg.example.com/team/outer
      tag: 5.0.0
    deep:
      reg: reg.example.com
      img: team/custom
      version: 6.0.0
    notanimage:
      port: 80
"""


def test_flux_v1_helm_release_shapes(tmp_path: Path) -> None:
    write(tmp_path, "shapes.yaml", FLUX_V1_SHAPES)
    found = by_name(discover(tmp_path).automations)
    seen = {
        name.split()[-1]: (
            str(a.watch.image),
            a.watch.policy.description,
            a.current,
            a.sites[0].form,
        )
        for name, a in found.items()
    }
    assert seen == {
        "chart-image": ("repo/top", "semver ^1", "1.0.0", SiteForm.image),
        "plain": ("quay.io/org/plain", "semver ^2", "2.0.0", SiteForm.image),
        "split": ("reg.example.com:5000/team/split", "semver ^3", "3.0.0", SiteForm.tag),
        "nested": ("reg.example.com/team/nested", "semver ^4", "4.0.0", SiteForm.tag),
        "outer": ("reg.example.com/team/outer", "semver ^5", "5.0.0", SiteForm.tag),
        "custom": ("reg.example.com/team/custom", "glob:* (newest build)", "6.0.0", SiteForm.tag),
    }
    assert found["HelmRelease apps/shapes chart-image"].watch.image == ImageName(
        "registry-1.docker.io", "repo/top"
    )


@pytest.mark.parametrize(
    "annotations",
    [
        '    fluxcd.io/automated: "false"\n',
        "    other: x\n",
    ],
)
def test_flux_v1_automation_off_means_untouched(tmp_path: Path, annotations: str) -> None:
    text = (
        "apiVersion: helm.fluxcd.io/v1\nkind: HelmRelease\nmetadata:\n  name: a\n"
        f"  annotations:\n{annotations}spec:\n  values:\n    image: repo/a:1.0.0\n"
    )
    write(tmp_path, "a.yaml", text)
    assert discover(tmp_path).automations == []


def test_flux_v1_workload_containers(tmp_path: Path) -> None:
    write(
        tmp_path,
        "deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  annotations:\n"
        "    fluxcd.io/automated: 'true'\n    fluxcd.io/tag.app: semver:~1.2\n"
        "spec:\n  template:\n    spec:\n      initContainers:\n      - name: migrate\n"
        "        image: ghcr.io/org/migrate:0.1.0\n      containers:\n      - name: app\n"
        "        image: ghcr.io/org/app:1.2.0\n",
    )
    found = by_name(discover(tmp_path).automations)
    assert sorted(found) == ["Deployment default/web app", "Deployment default/web migrate"]
    assert found["Deployment default/web app"].watch.policy.description == "semver ~1.2"


SETTERS = """\
apiVersion: image.toolkit.fluxcd.io/v1beta2
kind: ImageRepository
metadata: {name: app, namespace: flux-system}
spec:
  image: ghcr.io/org/app
  exclusionList: ["^dev-"]
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
  name: app
  annotations:
    note: 'text # {"$imagepolicy": "flux-system:app"}'
spec:
  template:
    spec:
      containers:
        - name: app
          image: "ghcr.io/org/app:1.0.0"  # {"$imagepolicy": "flux-system:app"}
        - name: sidecar
          image: ghcr.io/org/app:1.0.0 #{"$imagepolicy":"flux-system:app"}
      tags:
        - 1.0.0 # {"$imagepolicy": "flux-system:app:tag"}
      image: # {"$imagepolicy": "flux-system:app:tag"}
        nested: value
      other: x # {"$imagepolicy": "flux-system:missing:tag"}
      odd: y # {"$imagepolicy": "flux-system:app:digest"}
"""


def test_setter_comments(tmp_path: Path) -> None:
    documents = load_documents(SETTERS)
    setters = [(s.reference, s.scalar.value) for s in setter_comments(SETTERS, documents)]
    assert setters == [
        ("flux-system:app", "ghcr.io/org/app:1.0.0"),
        ("flux-system:app", "ghcr.io/org/app:1.0.0"),
        ("flux-system:app:tag", "1.0.0"),
        ("flux-system:missing:tag", "x"),
        ("flux-system:app:digest", "y"),
    ]
    write(tmp_path, "app.yaml", SETTERS)
    found = discover(tmp_path)
    [app] = found.automations
    assert [(s.form, s.scalar.line) for s in app.sites] == [
        (SiteForm.image, 26),
        (SiteForm.image, 28),
        (SiteForm.tag, 30),
    ]
    assert [p.pattern for p in app.watch.exclude] == ["^dev-"]
    assert [p.message for p in found.problems] == [
        "line 33: 'flux-system:missing:tag': no such ImagePolicy in the scan",
        "line 34: 'flux-system:app:digest': unknown setter",
    ]
    write_changes(tmp_path, ".", {app.watch: "1.1.0"})
    assert (tmp_path / "app.yaml").read_text() == SETTERS.replace("app:1.0.0", "app:1.1.0").replace(
        "- 1.0.0 #", "- 1.1.0 #"
    )


def test_symlinks_out_of_the_repository_are_ignored(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside, "app.yaml", SETTERS)
    root = tmp_path / "repo"
    root.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "app.yaml").symlink_to(outside / "app.yaml")
    assert discover(root).automations == []


def test_broken_yaml_is_reported_and_skipped(tmp_path: Path) -> None:
    write(tmp_path, "bad.yaml", "a: [unclosed\n")
    write(tmp_path, ".git/config.yaml", "ignored: {\n")
    found = discover(tmp_path)
    assert found.automations == []
    assert [(p.file, p.message.split(":")[0]) for p in found.problems] == [("bad.yaml", "skipped")]


def test_policy_without_repository_is_a_problem(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        "apiVersion: image.toolkit.fluxcd.io/v1beta2\nkind: ImagePolicy\n"
        "metadata: {name: p, namespace: ns}\nspec:\n  imageRepositoryRef: {name: nope}\n"
        "  policy: {semver: {range: '*'}}\n",
    )
    assert [p.message for p in discover(tmp_path).problems] == [
        "ImagePolicy ns:p: no ImageRepository ns/nope in the scan"
    ]


def test_commit_message() -> None:
    changes = [
        Change("a.yaml", "reg/ui", "1.0.0", "1.1.0", "x"),
        Change("a.yaml", "reg/ui", "1.0.0", "1.1.0", "x"),
        Change("b.yaml", "reg/api", None, "2.0.0", "y"),
    ]
    assert commit_message(changes) == (
        "Update images\n\nreg/api: (none) -> 2.0.0\nreg/ui: 1.0.0 -> 1.1.0\n"
    )
    assert commit_message(changes, "Auto-release {count} images\n\n{changes}\n\n{files}") == (
        "Auto-release 2 images\n\nreg/api: (none) -> 2.0.0\nreg/ui: 1.0.0 -> 1.1.0\n\n"
        "a.yaml\nb.yaml"
    )
    with pytest.raises(MessageTemplateError, match="fields"):
        check_template("release {image}")


def test_setters_outside_the_update_path_of_an_image_update_automation_stay(
    tmp_path: Path,
) -> None:
    policies = SETTERS.split("---\napiVersion: apps/v1")[0]
    deploy = 'image: ghcr.io/org/app:1.0.0 # {"$imagepolicy": "flux-system:app"}\n'
    write(tmp_path, "flux/policies.yaml", policies)
    write(tmp_path, "clusters/prod/app.yaml", deploy)
    write(tmp_path, "clusters/production/app.yaml", deploy)
    write(tmp_path, "clusters/staging/app.yaml", deploy)
    [app] = discover(tmp_path).automations
    assert sorted(s.file for s in app.sites) == [
        "clusters/prod/app.yaml",
        "clusters/production/app.yaml",
        "clusters/staging/app.yaml",
    ]
    write(
        tmp_path,
        "flux/automation.yaml",
        "apiVersion: image.toolkit.fluxcd.io/v1beta2\nkind: ImageUpdateAutomation\n"
        "metadata: {name: prod, namespace: flux-system}\n"
        "spec:\n  update: {path: ./clusters/prod/, strategy: Setters}\n",
    )
    [app] = discover(tmp_path).automations
    assert [s.file for s in app.sites] == ["clusters/prod/app.yaml"]
