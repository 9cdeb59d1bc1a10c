"""conveyor's chart agrees with the code it deploys, and bootstrap's files with discovery.

The chart itself is linted, rendered and dry-run on the sandbox (tests/cluster/
test_bootstrap.py); here, what needs no cluster: the CRD is the agent's own, the versions
and image match what `make image` builds, the wheel ships the chart, and the files
bootstrap commits are one HelmRelease app to conveyor's discovery.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

import pytest
import yaml

from conveyor import __version__
from conveyor.config.helmrelease import parse_helmrelease
from conveyor.install.bootstrap import (
    BootstrapRequest,
    _write_self,
    chart_values,
    release_document,
    ssh_url,
)
from conveyor.install.chart import CHART_DIR, CRD_FILE, crd_text
from conveyor.reconcile.status import crd_manifest
from conveyor.reconcile.target import ResolvedTarget
from conveyor.render.discover import discover
from conveyor.source.git import Checkout
from tests.unit.conftest import ROOT


def test_the_charts_crd_is_the_one_the_agent_installs() -> None:
    """Regenerate with `python -m conveyor.install.chart` when this fails."""
    assert CRD_FILE.read_text() == crd_text()
    assert yaml.safe_load(CRD_FILE.read_text()) == crd_manifest()


def test_charts_conveyor_is_the_chart_the_package_ships() -> None:
    assert (ROOT / "charts" / "conveyor").resolve() == CHART_DIR
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["conveyor"]
    package = CHART_DIR.parent.parent
    files = [p.relative_to(package).as_posix() for p in CHART_DIR.rglob("*") if p.is_file()]
    assert len(files) >= 12
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in package_data)]
    assert unshipped == []


def test_the_chart_follows_conveyors_version_and_make_images_name() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == __version__
    build = ast.parse((ROOT / "image" / "build.py").read_text())
    image = next(
        node.value.value
        for node in build.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "IMAGE" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    )
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["image"]["repository"] == image
    assert values["agent"]["replicas"] == 2


def resolved(tmp_path: Path, path: str) -> ResolvedTarget:
    checkout = Checkout(path=tmp_path, url="https://git.example.com/config.git", branch="main")
    return ResolvedTarget(
        checkout=checkout, revision="0" * 40, env_path=path, scope=path, context=None,
        kubeconfig=None,
    )  # fmt: skip


def test_bootstraps_files_are_one_helm_app_and_its_chart_is_no_manifest(tmp_path: Path) -> None:
    request = BootstrapRequest(
        repo="https://git.example.com/config.git",
        env="production",
        namespaces=("web", "api", "web"),
        image="127.0.0.1:5000/conveyor:0.1.0-abc",
    )
    values = chart_values(request, resolved(tmp_path, "production"), folder_is_env=True)
    assert values["git"] == {
        "url": "https://git.example.com/config.git",
        "branch": "main",
        "path": "production",
    }
    assert values["rbac"] == {"mode": "namespaced", "namespaces": ["api", "web"]}
    assert values["image"] == {"repository": "127.0.0.1:5000/conveyor", "tag": "0.1.0-abc"}
    document = release_document(request, "production/conveyor-system/.chart", values)
    root = tmp_path / "repo"
    (root / "production" / "web").mkdir(parents=True)
    (root / "production" / "web" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web, namespace: web}\n"
    )
    _write_self(root, "production", document)
    tree = discover(root, "production")
    assert tree.errors == []
    apps = {app.name: app for app in tree.apps}
    assert sorted(apps) == ["conveyor", "web"]  # nothing from the chart's templates
    release = apps["conveyor"].helm_release
    assert release is not None
    spec = parse_helmrelease(release.obj)
    assert (spec.release_name, spec.target_namespace) == ("conveyor", "conveyor-system")
    assert spec.drift == "warn"  # conveyor never reverts changes to itself
    assert spec.values == values
    # Written again, the same bytes: a second bootstrap finds nothing to commit.
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    _write_self(root, "production", document)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("url", "over_ssh"),
    [
        ("git@github.com:org/config.git", True),
        ("ssh://git@git.example.com:2222/config.git", True),
        ("https://github.com/org/config.git", False),
        ("file:///srv/git/config.git", False),
        ("/srv/git/config.git", False),
    ],
)
def test_a_deploy_key_is_asked_for_only_over_ssh(url: str, over_ssh: bool) -> None:
    assert ssh_url(url) is over_ssh
