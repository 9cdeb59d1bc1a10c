"""Shared fixtures: the real sandbox (session-scoped), a namespace per test, a kube client.

Tests marked `cluster` run against `conveyor sandbox` named "test". A sandbox that was
already running is reused and left running; one this session started is taken down at
the end, so CI leaves no process behind.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.cluster import kubeconfig
from conveyor.cluster.client import KubeClient
from conveyor.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_NAME = os.environ.get("CONVEYOR_TEST_SANDBOX", "test")
# The second cluster of the tests of many clusters (one per environment).
SECOND_SANDBOX_NAME = os.environ.get("CONVEYOR_TEST_SANDBOX2", f"{SANDBOX_NAME}2")


@dataclass
class SandboxHandle:
    sandbox: Sandbox
    env: dict[str, str]
    registry: str

    @property
    def kubeconfig(self) -> Path:
        return self.sandbox.kubeconfig

    def run(
        self, *args: str, check: bool = True, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl/helm/... with the sandbox's environment."""
        return subprocess.run(
            list(args), env=self.env, check=check, capture_output=True, text=True, **kwargs
        )

    def client(self) -> KubeClient:
        return KubeClient(kubeconfig.load(self.kubeconfig))


def start_sandbox(name: str) -> SandboxHandle:
    """Bring sandbox `name` up (or find it up), with an environment that points at it."""
    box = Sandbox(name, progress=lambda m: print(f"[sandbox {name}] {m}", flush=True))
    state = box.up()
    env = dict(os.environ)
    env["KUBECONFIG"] = str(box.kubeconfig)
    env["PATH"] = os.pathsep.join([*state.path, env.get("PATH", "")])
    env["CONVEYOR_REGISTRY"] = box.registry()
    env["HELM_CACHE_HOME"] = str(box.layout.root / "helm-cache")
    env["HELM_CONFIG_HOME"] = str(box.layout.root / "helm-config")
    env["HELM_DATA_HOME"] = str(box.layout.root / "helm-data")
    return SandboxHandle(box, env, box.registry())


@pytest.fixture(scope="session")
def sandbox() -> Iterator[SandboxHandle]:
    was_running = Sandbox(SANDBOX_NAME).status().ready
    handle = start_sandbox(SANDBOX_NAME)
    yield handle
    if not was_running and not os.environ.get("CONVEYOR_KEEP_SANDBOX"):
        handle.sandbox.down()


@pytest.fixture(scope="session")
def second_sandbox() -> Iterator[SandboxHandle]:
    """Another cluster beside `sandbox`, for environments that each run in their own."""
    was_running = Sandbox(SECOND_SANDBOX_NAME).status().ready
    handle = start_sandbox(SECOND_SANDBOX_NAME)
    yield handle
    if not was_running and not os.environ.get("CONVEYOR_KEEP_SANDBOX"):
        handle.sandbox.down()


@pytest.fixture
def namespace(sandbox: SandboxHandle) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    sandbox.run("kubectl", "create", "namespace", name)
    yield name
    sandbox.run("kubectl", "delete", "namespace", name, "--wait=false", check=False)
