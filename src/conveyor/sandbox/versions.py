"""Pinned versions of everything the sandbox builds, and the Go toolchain check.

Versions live in one place so that the binary cache key, the ldflags and the
`conveyor sandbox` output can never disagree.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

from conveyor.errors import ConveyorError

MIN_GO = (1, 26)

# Bump when the way binaries are built changes (wrapper code, flags), so that caches
# built by an older recipe are not reused.
RECIPE = 1
# The same for the secrets tools (sops, age), which are cached apart from Kubernetes: a
# new sops must never make every machine rebuild kube (a quarter of an hour).
TOOLS_RECIPE = 1
# And for the peers' tools that benchmarks run (kustomize for flux-local), cached apart
# again: conveyor itself never runs them.
PEER_TOOLS_RECIPE = 1


class GoToolchainError(ConveyorError, RuntimeError):
    """Go is missing or too old to build the sandbox."""


@dataclass(frozen=True)
class Versions:
    kubernetes: str = "v1.36.3"
    etcd: str = "v3.6.16"
    kwok: str = "v0.8.0"
    registry: str = "v3.1.2"
    helm: str = "v3.21.4"

    @property
    def kube_minor(self) -> tuple[str, str]:
        """("1", "36") for v1.36.3: what Kubernetes and Helm ldflags call major/minor."""
        major, minor, _ = self.kubernetes.lstrip("v").split(".", 2)
        return major, minor

    def cache_key(self, go_version: str) -> str:
        """Directory name for the binaries: readable, and unique per recipe and toolchain."""
        fields = {**asdict(self), "go": go_version, "recipe": RECIPE}
        digest = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:10]
        return f"k8s-{self.kubernetes}-{digest}"


VERSIONS = Versions()


@dataclass(frozen=True)
class ToolVersions:
    """The tools users and tests encrypt with, beside the cluster: sops and age."""

    sops: str = "v3.13.3"
    age: str = "v1.3.2"

    def cache_key(self, go_version: str) -> str:
        return f"tools-sops-{self.sops}-{_digest(self, go_version, TOOLS_RECIPE)}"


TOOL_VERSIONS = ToolVersions()


@dataclass(frozen=True)
class PeerToolVersions:
    """What the peers measured by benchmarks need besides helm: flux-local runs a
    standalone `kustomize` (conveyor runs `kubectl kustomize`) and `flux build`."""

    kustomize: str = "v5.8.2"  # v5.8.3 requires Go 1.27
    flux: str = "v2.9.5"

    def cache_key(self, go_version: str) -> str:
        return f"peers-kustomize-{self.kustomize}-{_digest(self, go_version, PEER_TOOLS_RECIPE)}"


PEER_TOOL_VERSIONS = PeerToolVersions()


def _digest(versions: ToolVersions | PeerToolVersions, go_version: str, recipe: int) -> str:
    fields = {**asdict(versions), "go": go_version, "recipe": recipe}
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:10]


def parse_go_version(text: str) -> tuple[int, int, int]:
    """Parse `go1.26.8`, `go1.26` or `go1.27rc1` into a comparable tuple."""
    match = re.search(r"go(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise GoToolchainError(f"cannot read a Go version from {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def find_go() -> tuple[str, str]:
    """Return (path to go, version string) or explain what to install."""
    go = shutil.which("go")
    if go is None:
        raise GoToolchainError(
            "Go is not installed: the sandbox builds Kubernetes from source and needs "
            f"Go >= {MIN_GO[0]}.{MIN_GO[1]} on PATH (https://go.dev/doc/install, or your "
            "distribution's golang package)"
        )
    result = subprocess.run(
        [go, "env", "GOVERSION"],
        capture_output=True,
        text=True,
        check=False,
        env=_go_env_for_probe(),
    )
    version = result.stdout.strip()
    if result.returncode != 0 or not version:
        raise GoToolchainError(f"`{go} env GOVERSION` failed: {result.stderr.strip()}")
    if parse_go_version(version)[:2] < MIN_GO:
        raise GoToolchainError(
            f"{go} is {version}; the sandbox needs Go >= {MIN_GO[0]}.{MIN_GO[1]} "
            "(Kubernetes v1.36 requires it). Install a newer Go and put it first on PATH."
        )
    return go, version


def _go_env_for_probe() -> dict[str, str]:
    # GOTOOLCHAIN=local: report the Go that is installed, never download another one.
    return {**os.environ, "GOTOOLCHAIN": "local"}
