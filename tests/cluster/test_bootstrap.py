"""conveyor's chart and `conveyor bootstrap` / `uninstall`, on the real sandbox.

kwok's node runs no containers: it marks the chart's Pods Running and Ready, which is why
bootstrap also waits for the environment's Lease, which only a running agent takes. The
test plays the kubelet for one of the two Pods (`PodOnHost`): it runs that Pod's
container command (`conveyor agent` with the Deployment's own arguments) as a process on
this host, with what the kubelet would give it and nothing else:

- a ServiceAccount token of the Pod's account, bound to that Pod (`kubectl create token
  --bound-object-kind Pod`), its CA and namespace at
  /var/run/secrets/kubernetes.io/serviceaccount, seen only by that process (a private
  mount namespace binds a directory of the test over /run);
- KUBERNETES_SERVICE_HOST/_PORT pointing at the sandbox's apiserver, and no kubeconfig;
- the Pod's name as hostname (a private UTS namespace), which names the agent's Lease
  identity as in a Pod;
- the container's env; `--listen` moved to a free port of the host (the host network
  stands in for the Pod's);
- when the Pod is deleted, the process gets SIGTERM, as the kubelet sends it.

What is not simulated: the image (the process runs this checkout's conveyor with the
sandbox's helm; test_image.py runs the image itself), the kubelet's probes and the Pod's
network namespace.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.install.chart import CHART_DIR
from conveyor.source.git import run_git
from tests.cluster.gitops import ConfigRepo, conveyor, deployment, kubectl_json, wait_for
from tests.cluster.test_in_cluster import apiserver, pod_files
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster
SYSTEM = "conveyor-system"
ACCOUNT = "system:serviceaccount:conveyor-system:conveyor"


def chart_values(**overrides: Any) -> dict[str, Any]:
    return {"git": {"url": "https://git.example.com/config.git", "path": "production"}, **overrides}


def helm_template(sandbox: SandboxHandle, values: dict[str, Any], tmp_path: Path) -> str:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    return sandbox.run(
        "helm", "template", "conveyor", str(CHART_DIR), "--namespace", SYSTEM,
        "--values", str(values_file), "--include-crds",
    ).stdout  # fmt: skip


def test_chart_lints_clean_and_renders_what_the_apiserver_accepts(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    """Both RBAC modes, every optional part on, through a server-side dry run (the
    ServiceMonitor aside: the sandbox has no Prometheus operator, so no such kind)."""
    every_part = chart_values(
        rbac={"mode": "namespaced", "namespaces": [namespace]},
        dashboard={"enabled": True, "tokenSecretName": "tokens"},
        networkPolicy={"enabled": True},
        agent={"webhookSecretName": "webhook"},
        git={"url": "ssh://git@git.example.com/config.git", "env": "production",
             "secretName": "conveyor-git"},
    )  # fmt: skip
    for values in (chart_values(), every_part):
        values_file = tmp_path / "lint.yaml"
        values_file.write_text(yaml.safe_dump(values))
        lint = sandbox.run(
            "helm", "lint", "--strict", str(CHART_DIR), "--namespace", SYSTEM,
            "--values", str(values_file),
        )  # fmt: skip
        assert "0 chart(s) failed" in lint.stdout, lint.stdout
        rendered = helm_template(sandbox, values, tmp_path)
        (tmp_path / "rendered.yaml").write_text(rendered)
        sandbox.run("kubectl", "create", "namespace", SYSTEM, check=False)
        dry_run = sandbox.run(
            "kubectl", "apply", "--dry-run=server", "-f", str(tmp_path / "rendered.yaml"),
            check=False,
        )  # fmt: skip
        assert dry_run.returncode == 0, dry_run.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered) if d]
    assert kinds.count("Deployment") == 2 and "PodDisruptionBudget" in kinds
    assert "NetworkPolicy" in kinds and "CustomResourceDefinition" in kinds
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    with_monitor = helm_template(
        sandbox, chart_values(metrics={"serviceMonitor": {"enabled": True}}), tmp_path
    )
    assert "kind: ServiceMonitor" in with_monitor
    refused = sandbox.run(
        "helm", "template", "conveyor", str(CHART_DIR), "--namespace", SYSTEM,
        "--set", "git.url=x", "--set", "git.path=p", "--set", "rbac.mode=namespaced",
        check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "rbac.namespaces: namespaced mode needs the namespaces" in refused.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PodOnHost:
    """One of the chart's Pods, its container run as a host process (module docstring)."""

    name: str
    process: subprocess.Popen[str]
    log: Path
    port: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def container_command(pod: dict[str, Any], port: int) -> tuple[list[str], dict[str, str]]:
    container = pod["spec"]["containers"][0]
    args = [
        f"--listen=0.0.0.0:{port}" if arg.startswith("--listen=") else arg
        for arg in container["args"]
    ]
    env = {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}
    return args, env


@pytest.fixture
def run_pod(sandbox: SandboxHandle, tmp_path: Path) -> Iterator[Any]:
    started: list[PodOnHost] = []

    def start(pod: dict[str, Any]) -> PodOnHost:
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        account = pod["spec"]["serviceAccountName"]
        token = sandbox.run(
            "kubectl", "create", "token", account, "-n", SYSTEM,
            "--bound-object-kind", "Pod", "--bound-object-name", name, "--bound-object-uid", uid,
        ).stdout.strip()  # fmt: skip
        run_dir = tmp_path / f"run-{name}"
        pod_files(
            sandbox,
            run_dir / "secrets" / "kubernetes.io" / "serviceaccount",
            token=token,
            namespace=SYSTEM,
        )
        port = free_port()
        args, container_env = container_command(pod, port)
        host, api_port = apiserver(sandbox)
        env = {k: v for k, v in sandbox.env.items() if k != "KUBECONFIG"}
        env.update(container_env)
        env.update(KUBERNETES_SERVICE_HOST=host, KUBERNETES_SERVICE_PORT=api_port)
        log = tmp_path / f"{name}.log"
        process = subprocess.Popen(
            [
                "unshare", "--mount", "--uts", "--propagation", "private", "--",
                "sh", "-c", 'mount --bind "$0" /run && hostname "$1" && shift && exec "$@"',
                str(run_dir), name,
                sys.executable, "-m", "conveyor", *args,
            ],
            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        running = PodOnHost(name, process, log, port)
        started.append(running)

        def kubelet() -> None:  # SIGTERM once the Pod is deleted
            while process.poll() is None:
                if kubectl_json(sandbox, "get", "pod", name, "-n", SYSTEM) is None:
                    process.send_signal(signal.SIGTERM)
                    return
                time.sleep(1.0)

        threading.Thread(target=kubelet, daemon=True).start()
        return running

    yield start
    for pod in started:
        if pod.process.poll() is None:
            pod.process.send_signal(signal.SIGTERM)
            try:
                pod.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pod.process.kill()
        print(f"--- {pod.name}\n{pod.output()}")


def agent_pods(sandbox: SandboxHandle) -> list[dict[str, Any]]:
    listed = kubectl_json(
        sandbox, "get", "pods", "-n", SYSTEM, "-l", "app.kubernetes.io/component=agent"
    )
    items = (listed or {}).get("items", [])
    pods = [p for p in items if not p["metadata"].get("deletionTimestamp")]
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def can_i(sandbox: SandboxHandle, *args: str) -> bool:
    result = sandbox.run("kubectl", "auth", "can-i", *args, f"--as={ACCOUNT}", check=False)
    return result.stdout.strip() == "yes"


def helm_revisions(sandbox: SandboxHandle) -> list[int]:
    history = sandbox.run("helm", "history", "conveyor", "-n", SYSTEM, "-o", "json", check=False)
    return [r["revision"] for r in json.loads(history.stdout)] if history.returncode == 0 else []


def commits(repo: ConfigRepo) -> list[str]:
    return run_git(["--git-dir", str(repo.bare), "log", "--format=%H", "main"]).split()


@pytest.fixture
def no_conveyor_release(sandbox: SandboxHandle) -> Iterator[None]:
    """conveyor-system holds one release of the chart per cluster: none before, none after."""
    conveyor(sandbox, "uninstall", "--timeout", "30")
    yield
    conveyor(sandbox, "uninstall", "--timeout", "30")


def test_bootstrap_namespaced_agent_reconciles_rerun_is_a_no_op_uninstall_keeps_apps(
    sandbox: SandboxHandle,
    namespace: str,
    tmp_path: Path,
    run_pod: Any,
    no_conveyor_release: None,
) -> None:
    name = f"boot-{namespace[2:]}"
    repo = ConfigRepo(tmp_path)
    repo.write(f"{name}/web/deploy.yaml", deployment("web", namespace))
    repo.commit("an environment with one app")
    args = (
        "bootstrap", "--repo", repo.url, "--env", name, "--namespace", namespace,
        "--timeout", "180", "-o", "json",
    )  # fmt: skip
    started = time.monotonic()
    first = subprocess.Popen(
        [sys.executable, "-m", "conveyor", *args],
        env=sandbox.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # The chart is installed; kwok runs its Pods; the test runs the first one's agent.
    pods = wait_for(lambda: len(agent_pods(sandbox)) == 2 and agent_pods(sandbox), timeout=120,
                    what="the chart's two agent Pods")  # fmt: skip
    pod = run_pod(pods[0])
    stdout, stderr = first.communicate(timeout=240)
    bootstrap_seconds = time.monotonic() - started
    assert first.returncode == 0, f"{stderr}\n{pod.output()}"
    result = json.loads(stdout)
    print(f"bootstrap: {bootstrap_seconds:.1f}s; steps: {result['seconds']}")
    assert result["holder"].startswith(pod.name), result  # identity: hostname-pid-random
    assert result["installed_revision"] == 1 and result["secret"] is None

    # conveyor's own release is in git, committed once, with the trailer.
    log = run_git(["--git-dir", str(repo.bare), "log", "-1", "--format=%B", "main"])
    assert "Conveyor-Change: bootstrap" in log
    release = yaml.safe_load(
        run_git(["--git-dir", str(repo.bare), "show", f"main:{name}/conveyor-system/release.yaml"])
    )
    assert release["spec"]["chart"]["path"] == f"{name}/conveyor-system/.chart"
    assert release["spec"]["values"]["rbac"] == {"mode": "namespaced", "namespaces": [namespace]}

    # The agent, with its ServiceAccount's token only, reconciled the environment: the
    # app in the namespace it may use, and conveyor's own release from git.
    def reconciled() -> bool:
        statuses = kubectl_json(sandbox, "get", "conveyorapps", "-n", SYSTEM)
        ready = {
            item["spec"]["app"]
            for item in (statuses or {}).get("items", [])
            if item["spec"].get("scope") == name and item["status"].get("state") == "Ready"
        }
        return {"web", "conveyor"} <= ready

    wait_for(reconciled, timeout=120, what=f"web and conveyor Ready\n{pod.output()}")
    web = kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace)
    assert web is not None and web["metadata"]["labels"]["conveyor.dev/owner"]
    assert helm_revisions(sandbox) == [1, 2]  # the agent's first pass took the release over

    # What namespaced mode forbids, as the agent's ServiceAccount.
    assert can_i(sandbox, "create", "deployments", "-n", namespace)
    assert can_i(sandbox, "update", "leases", "-n", SYSTEM)
    assert not can_i(sandbox, "create", "deployments", "-n", "default")
    assert not can_i(sandbox, "list", "secrets", "--all-namespaces")
    assert not can_i(sandbox, "create", "namespaces")
    assert not can_i(sandbox, "create", "clusterroles")
    assert not can_i(sandbox, "delete", "customresourcedefinitions")

    # Running it again changes nothing: no commit, no helm revision.
    before = commits(repo)
    started = time.monotonic()
    again = conveyor(sandbox, *args, timeout=240)
    rerun_seconds = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    rerun = json.loads(again.stdout)
    print(f"bootstrap again: {rerun_seconds:.1f}s")
    assert rerun["commit"] is None and rerun["installed_revision"] is None, rerun
    assert commits(repo) == before
    assert helm_revisions(sandbox) == [1, 2]

    # Uninstall: conveyor goes (the simulated Pod gets its SIGTERM), the app stays.
    started = time.monotonic()
    removed = conveyor(sandbox, "uninstall", "--timeout", "60")
    print(f"uninstall: {time.monotonic() - started:.1f}s")
    assert removed.returncode == 0, removed.stderr
    assert f"conveyor-{name}" in removed.stdout
    assert pod.process.wait(timeout=60) == 0, pod.output()
    assert helm_revisions(sandbox) == []
    assert kubectl_json(sandbox, "get", "deployment", "conveyor", "-n", SYSTEM) is None
    assert kubectl_json(sandbox, "get", "lease", f"conveyor-{name}", "-n", SYSTEM) is None
    web_after = kubectl_json(sandbox, "get", "deployment", "web", "-n", namespace)
    assert web_after is not None and web_after["metadata"]["uid"] == web["metadata"]["uid"]
    kept = kubectl_json(sandbox, "get", "conveyorapp", f"{name}.web", "-n", SYSTEM)
    assert kept is not None  # statuses stay for a later bootstrap (no --purge)


def test_bootstrap_without_a_deploy_key_for_an_ssh_repo_says_how_to_make_one(
    sandbox: SandboxHandle,
) -> None:
    result = conveyor(sandbox, "bootstrap", "--repo", "git@git.example.com:team/config.git",
                      "--env", "production")  # fmt: skip
    assert result.returncode == 2
    assert "ssh-keygen -t ed25519" in result.stderr and "--ssh-key" in result.stderr
