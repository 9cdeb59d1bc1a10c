"""The two kustomizes conveyor runs build the same objects: `kubectl kustomize` (where
kubectl is installed) and the standalone `kustomize build` that conveyor's image ships
instead of kubectl (sandbox/build.py `ensure_kustomize`, from the same Kubernetes
module). Both are the sandbox's real builds; no cluster is needed, only its binaries.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from conveyor.render.documents import RenderError
from conveyor.render.kustomize import (
    KUBECTL_KUSTOMIZE,
    KUSTOMIZE_BUILD,
    find_kustomize,
    kustomize_build,
)
from conveyor.sandbox.build import ensure_binaries, ensure_kustomize
from conveyor.sandbox.versions import VERSIONS

pytestmark = pytest.mark.cluster


def write(root: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text).lstrip())


# A base and an overlay with what kustomize changes the most: generators (hashed
# names), patches of both kinds, images, replicas, labels, a component, a prefix.
OVERLAY = {
    "base/kustomization.yaml": """
        resources: [deploy.yaml, service.yaml]
        configMapGenerator:
        - name: settings
          literals: [LEVEL=info, REGION=eu]
        labels:
        - pairs: {app: web}
          includeSelectors: true
    """,
    "base/deploy.yaml": """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web}
        spec:
          replicas: 1
          template:
            spec:
              containers:
              - name: web
                image: registry.example/web:1.0.0
                envFrom: [{configMapRef: {name: settings}}]
    """,
    "base/service.yaml": """
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec: {ports: [{port: 80}]}
    """,
    "component/kustomization.yaml": """
        apiVersion: kustomize.config.k8s.io/v1alpha1
        kind: Component
        secretGenerator:
        - name: token
          literals: [TOKEN=not-a-secret]
    """,
    "overlay/kustomization.yaml": """
        namespace: staging
        namePrefix: staging-
        resources: [../base]
        components: [../component]
        images:
        - name: registry.example/web
          newTag: 1.2.3
        replicas:
        - name: web
          count: 3
        patches:
        - patch: |-
            apiVersion: apps/v1
            kind: Deployment
            metadata: {name: web}
            spec: {template: {metadata: {annotations: {team: payments}}}}
        - target: {kind: Service, name: web}
          patch: |-
            - op: add
              path: /spec/type
              value: ClusterIP
    """,
}


@pytest.fixture(scope="module")
def kustomizes() -> tuple[Path, Path]:
    """The sandbox's kubectl and the standalone kustomize built beside it."""
    return ensure_binaries(VERSIONS) / "kubectl", ensure_kustomize(VERSIONS)


def build(directory: Path, command: tuple[str, ...]) -> list[dict[str, object]]:
    return asyncio.run(kustomize_build(directory, shown_as="overlay", hide=[], command=command))


def test_standalone_kustomize_is_the_kustomize_of_kubectl(kustomizes: tuple[Path, Path]) -> None:
    kubectl, kustomize = kustomizes
    client = json.loads(
        subprocess.run(
            [str(kubectl), "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    standalone = subprocess.run(
        [str(kustomize), "version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert client["kustomizeVersion"] == standalone


def test_both_build_the_same_objects_and_fail_alike(
    kustomizes: tuple[Path, Path], tmp_path: Path
) -> None:
    kubectl, kustomize = kustomizes
    write(tmp_path, OVERLAY)
    with_kubectl = build(tmp_path / "overlay", (str(kubectl), *KUBECTL_KUSTOMIZE[1:]))
    standalone = build(tmp_path / "overlay", (str(kustomize), *KUSTOMIZE_BUILD[1:]))
    assert standalone == with_kubectl
    names = sorted(str(o["metadata"]["name"]) for o in standalone)  # type: ignore[index]
    assert names[0].startswith("staging-settings-") and names[1].startswith("staging-token-")
    assert names[2:] == ["staging-web", "staging-web"]
    # A base that is not there: both fail, and say why in the same words.
    write(tmp_path, {"broken/kustomization.yaml": "resources: [../missing]\n"})
    errors = []
    for command in ((str(kubectl), "kustomize"), (str(kustomize), "build")):
        with pytest.raises(RenderError) as failed:
            build(tmp_path / "broken", command)
        errors.append(failed.value.detail)
    assert errors[0] == errors[1]
    assert errors[0].startswith("kustomize build failed: accumulating resources")
    assert "missing" in errors[0]


def test_the_render_path_finds_either(
    kustomizes: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kubectl's kustomize where kubectl is on PATH, else the standalone one (the
    image), else a render error naming the folder."""
    kubectl, kustomize = kustomizes
    write(tmp_path, OVERLAY)
    git = subprocess.run(["which", "git"], capture_output=True, text=True, check=True)
    only = {name: tmp_path / f"only-{name}" for name in ("kubectl", "kustomize", "git")}
    for name, binary in (("kubectl", kubectl), ("kustomize", kustomize)):
        only[name].mkdir()
        (only[name] / name).symlink_to(binary)
    only["git"].mkdir()
    (only["git"] / "git").symlink_to(git.stdout.strip())
    expected = build(tmp_path / "overlay", (str(kubectl), "kustomize"))

    def default_build() -> list[dict[str, object]]:
        return asyncio.run(kustomize_build(tmp_path / "overlay", shown_as="overlay", hide=[]))

    both = os.pathsep.join(str(only[n]) for n in ("kustomize", "kubectl", "git"))
    monkeypatch.setenv("PATH", both)
    assert find_kustomize() == KUBECTL_KUSTOMIZE
    monkeypatch.setenv("PATH", os.pathsep.join([str(only["kustomize"]), str(only["git"])]))
    assert find_kustomize() == KUSTOMIZE_BUILD
    assert default_build() == expected
    monkeypatch.setenv("PATH", str(only["git"]))
    assert find_kustomize() is None
    with pytest.raises(RenderError) as failed:
        default_build()
    assert str(failed.value).startswith("overlay")
    assert "neither kubectl nor kustomize is on PATH" in str(failed.value)
