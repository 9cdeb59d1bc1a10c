"""In-cluster credentials and several kubeconfig files, against the real sandbox.

A real ServiceAccount token (`kubectl create token`) in a token file stands for the one
the kubelet mounts in a Pod; the test rotates it as the kubelet does, by rewriting the
file. `$KUBECONFIG=a:b` is checked end to end: conveyor's client and the real helm both
find a context that only the second file holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from conveyor.cluster import kubeconfig
from conveyor.cluster.client import KubeClient
from tests.cluster.gitops import (
    ConfigRepo,
    by_name,
    chart_repo,
    deployment,
    flux_v1_release,
    reconcile_json,
    wait_for,
)
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster
REVIEW = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}


def service_account(
    sandbox: SandboxHandle, namespace: str, name: str, *, cluster_role: str = "view"
) -> str:
    """A ServiceAccount bound to `cluster_role` in `namespace`; returns a fresh token."""
    sandbox.run("kubectl", "create", "serviceaccount", name, "-n", namespace)
    sandbox.run(
        "kubectl", "create", "rolebinding", name, "-n", namespace,
        f"--clusterrole={cluster_role}", f"--serviceaccount={namespace}:{name}",
        check=False,  # kept from a previous incarnation of the account
    )  # fmt: skip
    return sandbox.run("kubectl", "create", "token", name, "-n", namespace).stdout.strip()


def pod_files(sandbox: SandboxHandle, directory: Path, *, token: str, namespace: str) -> Path:
    """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_file = kubeconfig.load(sandbox.kubeconfig).ca_file
    assert ca_file is not None
    shutil.copy(ca_file, directory / "ca.crt")
    (directory / "token").write_text(token)
    (directory / "namespace").write_text(namespace)
    return directory


def apiserver(sandbox: SandboxHandle) -> tuple[str, str]:
    """KUBERNETES_SERVICE_HOST and _PORT for the sandbox's apiserver."""
    parts = urlsplit(kubeconfig.load(sandbox.kubeconfig).server)
    return str(parts.hostname), str(parts.port)


def test_service_account_token_is_read_again_when_it_rotates(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, port = apiserver(sandbox)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    first = service_account(sandbox, namespace, "agent")
    account = pod_files(sandbox, tmp_path / "serviceaccount", token=first, namespace=namespace)
    credentials = kubeconfig.in_cluster(account_dir=account)
    assert credentials.namespace == namespace and credentials.token is None

    async def scenario() -> None:
        async with KubeClient(credentials) as kube:
            review = await kube.request(
                "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", json_body=REVIEW
            )
            assert review["status"]["userInfo"]["username"] == (
                f"system:serviceaccount:{namespace}:agent"
            )
            assert await kube.list("v1", "ConfigMap", namespace=namespace) is not None

            # The account is replaced: its old token is refused from now on, as a token past
            # its expiry is. The kubelet writes the new token into the same file.
            sandbox.run("kubectl", "delete", "serviceaccount", "agent", "-n", namespace)
            second = service_account(sandbox, namespace, "agent")
            (account / "token").write_text(second)

            def refused() -> bool:
                response = httpx.get(
                    f"{credentials.server}/api/v1/namespaces/{namespace}/configmaps",
                    headers={"Authorization": f"Bearer {first}"},
                    verify=credentials.ssl_context(),
                )
                return response.status_code == 401

            wait_for(refused, timeout=60, what="the old token to be refused")
            # Within the minute, so only the 401 makes the client read the file again.
            listed = await kube.list("v1", "ConfigMap", namespace=namespace)
            assert any(item["metadata"]["name"] == "kube-root-ca.crt" for item in listed)

    asyncio.run(scenario())


def test_kubeconfig_listing_two_files_reaches_the_second_files_context(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    """A staging kubeconfig first (its current-context unreachable), the sandbox's second:
    the context of the second file works for conveyor's client and for helm alike."""
    sandbox_config = yaml.safe_load(sandbox.kubeconfig.read_text())
    context = sandbox_config["current-context"]
    staging = tmp_path / "staging-kubeconfig"
    staging.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "staging", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "staging", "user": {"token": "unused"}}],
                "contexts": [
                    {"name": "staging", "context": {"cluster": "staging", "user": "staging"}}
                ],
                "current-context": "staging",
            }
        )
    )
    repo = ConfigRepo(tmp_path)
    charts = chart_repo(tmp_path)
    path = f"envs/{namespace}"
    repo.write(f"{path}/web/deploy.yaml", deployment("web", namespace))
    repo.write(f"{path}/ui.yaml", flux_v1_release("ui", namespace, charts, tag="1.0.0"))
    repo.commit("two apps, one of them helm")
    joined = SandboxHandle(
        sandbox.sandbox,
        {**sandbox.env, "KUBECONFIG": f"{staging}{os.pathsep}{sandbox.kubeconfig}"},
        sandbox.registry,
    )

    code, report = reconcile_json(joined, repo, path, "--context", context)
    assert code == 0, report
    apps = by_name(report)
    assert apps["web"]["ready"] and apps["ui"]["ready"], report
    assert apps["ui"]["helmRevision"] == 1
    releases = json.loads(sandbox.run("helm", "list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("ui", "deployed")]
