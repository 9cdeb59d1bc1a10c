"""Version pinning, the generated wrapper module, and build/toolchain errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conveyor.sandbox import build
from conveyor.sandbox.versions import (
    GoToolchainError,
    PeerToolVersions,
    ToolVersions,
    Versions,
    find_go,
    parse_go_version,
)

KK_GO_MOD = """\
module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/kubectl => ./staging/src/k8s.io/kubectl
)
"""


def test_staging_replaces_map_to_published_v0_versions() -> None:
    assert build.staging_replaces(KK_GO_MOD, "v1.36.3") == [
        "k8s.io/api => k8s.io/api v0.36.3",
        "k8s.io/client-go => k8s.io/client-go v0.36.3",
        "k8s.io/kubectl => k8s.io/kubectl v0.36.3",
    ]


def test_wrapper_go_mod_copies_godebug_and_go_directive() -> None:
    text = build.kube_wrapper_go_mod(Versions(kubernetes="v1.36.3"), KK_GO_MOD)
    assert "go 1.26.0\n" in text
    assert "godebug default=go1.26\n" in text
    assert "require k8s.io/kubernetes v1.36.3" in text
    assert "\tk8s.io/kubectl => k8s.io/kubectl v0.36.3" in text


def test_wrapper_go_mod_without_staging_block_is_a_build_error() -> None:
    with pytest.raises(build.BuildError, match="generate replace lines"):
        build.kube_wrapper_go_mod(Versions(), "module k8s.io/kubernetes\n\ngo 1.26.0\n")


def test_kube_ldflags_set_version_in_both_packages() -> None:
    flags = build.kube_ldflags(Versions(kubernetes="v1.36.3"))
    for package in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        assert f"-X {package}.gitVersion=v1.36.3" in flags
        assert f"-X {package}.gitMajor=1" in flags
        assert f"-X {package}.gitMinor=36" in flags


def test_helm_ldflags_carry_the_kubernetes_version() -> None:
    flags = build.helm_ldflags(Versions(kubernetes="v1.36.3", helm="v3.21.4"))
    assert "-X helm.sh/helm/v3/internal/version.version=v3.21.4" in flags
    assert "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=36" in flags
    assert "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1" in flags


def test_cache_key_changes_with_any_version_or_toolchain() -> None:
    base = Versions()
    key = base.cache_key("go1.26.8")
    assert key.startswith("k8s-v1.36.3-")
    assert key == Versions().cache_key("go1.26.8")
    assert key != Versions(helm="v3.21.3").cache_key("go1.26.8")
    assert key != base.cache_key("go1.26.9")


def test_kubernetes_cache_key_is_the_one_built_before_sops_and_age_existed() -> None:
    # A changed key rebuilds Kubernetes on every machine: the tools never take part in it.
    assert Versions().cache_key("go1.26.8") == "k8s-v1.36.3-92f4dc4cf1"


def test_tools_have_a_cache_key_of_their_own() -> None:
    key = ToolVersions().cache_key("go1.26.8")
    assert key.startswith("tools-sops-v3.13.3-")
    assert key != Versions().cache_key("go1.26.8")
    assert key != ToolVersions(age="v1.3.1").cache_key("go1.26.8")
    assert key != ToolVersions().cache_key("go1.26.9")


def test_the_peers_tools_have_a_cache_key_apart_from_sops_and_kubernetes() -> None:
    """kustomize and flux (for flux-local) never rebuild sops, age or Kubernetes."""
    key = PeerToolVersions().cache_key("go1.26.8")
    assert key.startswith("peers-kustomize-v5.8.2-")
    assert key not in (ToolVersions().cache_key("go1.26.8"), Versions().cache_key("go1.26.8"))
    assert key != PeerToolVersions(flux="v2.6.4").cache_key("go1.26.8")
    assert ToolVersions().cache_key("go1.26.8").startswith("tools-sops-v3.13.3-")


@pytest.mark.parametrize(
    ("package", "command"),
    [
        ("sigs.k8s.io/kustomize/kustomize/v5", "kustomize"),
        ("helm.sh/helm/v3/cmd/helm", "helm"),
        ("filippo.io/age/cmd/age-keygen", "age-keygen"),
    ],
)
def test_the_binary_go_install_names_after_a_package(package: str, command: str) -> None:
    assert build.command_name(package) == command


def test_tools_are_built_once_into_their_own_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `.complete` marker and every binary make a cache hit: no go command runs."""
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path))
    _go, go_version = find_go()
    bin_dir = tmp_path / "sandbox" / ToolVersions().cache_key(go_version) / "bin"
    bin_dir.mkdir(parents=True)
    for name in build.TOOLS:
        (bin_dir / name).write_text("")
    assert not build.binaries_ready(bin_dir, build.TOOLS)  # no marker: not complete yet
    (bin_dir / ".complete").write_text("{}")
    said: list[str] = []
    assert build.ensure_tools(progress=said.append) == bin_dir
    assert said == []
    assert not (tmp_path / "sandbox" / "build.lock").exists()  # Kubernetes' lock untouched


@pytest.mark.parametrize(
    ("text", "expected"),
    [("go1.26.8", (1, 26, 8)), ("go1.26", (1, 26, 0)), ("go version go1.27rc1 linux", (1, 27, 0))],
)
def test_parse_go_version(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_go_version(text) == expected


def _fake_go(directory: Path, version: str) -> None:
    script = directory / "go"
    script.write_text(f"#!/bin/sh\necho {version}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_old_go_is_refused_with_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_go(tmp_path, "go1.22.5")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GoToolchainError, match=r"go1\.22\.5; the sandbox needs Go >= 1\.26"):
        find_go()


def test_missing_go_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GoToolchainError, match="Go is not installed"):
        find_go()


def test_recent_go_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_go(tmp_path, "go1.26.1")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin:/bin")
    assert find_go() == (str(tmp_path / "go"), "go1.26.1")


def test_failing_build_step_is_named_with_its_output(tmp_path: Path) -> None:
    builder = build.GoBuilder(go="go", go_version="go1.26.8", log_dir=tmp_path / "logs")
    with pytest.raises(build.BuildError) as caught:
        builder.run(
            "kube: go build",
            ["sh", "-c", "echo compiling; echo 'undefined: x' >&2; exit 1"],
            cwd=tmp_path,
        )
    assert caught.value.step == "kube: go build"
    assert "undefined: x" in caught.value.output
    assert caught.value.log is not None and caught.value.log.exists()
    assert "kube: go build" in str(caught.value)


def test_go_environment_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOFLAGS", "-buildvcs=false -mod=vendor")
    env = build.GoBuilder(go="go", go_version="go1.26.8", log_dir=Path("/tmp")).env()
    assert env["GOTOOLCHAIN"] == "local"
    assert env["CGO_ENABLED"] == "0"
    assert env["GOFLAGS"] == "-buildvcs=false -mod=mod"
