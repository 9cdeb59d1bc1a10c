"""conveyor's image, built as `make image` builds it and run, not only built.

The image is pulled back from the sandbox registry it was pushed to and run with rootful
podman on the host network, against the sandbox's apiserver: `--version`, `agent --help`,
one real `reconcile`, and the agent itself until its first pass, then SIGTERM. What the
kubelet would give a Pod is given by hand: the service account's token, CA and namespace mounted at
/var/run/secrets/kubernetes.io/serviceaccount, and KUBERNETES_SERVICE_HOST/_PORT. kwok's
node runs no containers, so this is the Pod, simulated on the host.

podman runs the image with runc and cgroupfs, and rlimits below the host's: in this VM
crun cannot set up the hybrid cgroup hierarchy, and no runtime may raise an rlimit
(CAP_SYS_RESOURCE is not in the bounding set), only lower it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor import __version__
from conveyor.sandbox.versions import TOOL_VERSIONS
from tests.cluster.gitops import (
    ConfigRepo,
    by_name,
    chart_repo,
    deployment,
    flux_v1_release,
)
from tests.cluster.test_in_cluster import apiserver, pod_files, service_account
from tests.conftest import ROOT, SANDBOX_NAME, SandboxHandle

pytestmark = pytest.mark.cluster
IMAGE_USER = 65532  # image/install.sh
ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
PODMAN_RUN = [
    "podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "run", "--rm",
    "--network", "host", "--ulimit", "nofile=16384:16384", "--ulimit", "nproc=4096:4096",
]  # fmt: skip


# Every ELF file of the image's programs and libraries, with each library that ldd does
# not find: one line per file and library.
LIBRARIES_NOT_FOUND = (
    "find /usr/bin /usr/sbin /usr/lib /opt/conveyor -type f "
    "\\( -perm -u+x -o -name '*.so*' \\) | while read -r file; do "
    'ldd "$file" 2>/dev/null | grep "not found" | sed "s|^|$file: |"; done'
)


@dataclass(frozen=True)
class BuiltImage:
    local: str
    pushed: str


@pytest.fixture(scope="module")
def image(sandbox: SandboxHandle) -> BuiltImage:
    """`make image`'s build (cached under ~/.cache/conveyor/image), then a pull of what
    it pushed, so the image that runs is the registry's."""
    lines = build_script("--push", SANDBOX_NAME)
    pushed = lines["pushed"]
    subprocess.run(
        ["podman", "pull", "--quiet", "--tls-verify=false", pushed],
        capture_output=True,
        check=True,
    )
    return BuiltImage(local=lines["image"], pushed=pushed)


def build_script(*args: str) -> dict[str, str]:
    """Run image/build.py; its `key: value` lines (image, pushed, base) as a dict."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "image" / "build.py"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    print(result.stdout, result.stderr)  # build timings and size, in the test's output
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def podman_run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN_RUN, *args], capture_output=True, text=True, check=check, timeout=600
    )


def test_image_runs_conveyor_and_its_tools_as_non_root(
    image: BuiltImage, sandbox: SandboxHandle
) -> None:
    assert __version__ in podman_run(image.pushed, "--version").stdout
    agent_help = podman_run(image.pushed, "agent", "--help").stdout
    assert "--log-format" in agent_help and "--repo" in agent_help
    assert podman_run("--entrypoint", "id", image.pushed, "-u").stdout.strip() == str(IMAGE_USER)
    # The image's helm is the sandbox's own build, and its kustomize the one of the
    # sandbox's kubectl (the image has no kubectl: render/kustomize.py runs either).
    in_image = podman_run("--entrypoint", "helm", image.pushed, "version", "--short").stdout
    assert in_image == sandbox.run("helm", "version", "--short").stdout
    kustomize = podman_run("--entrypoint", "kustomize", image.pushed, "version").stdout
    kubectl = json.loads(sandbox.run("kubectl", "version", "--client", "-o", "json").stdout)
    assert kustomize.strip() == kubectl["kustomizeVersion"]
    assert podman_run("--entrypoint", "kubectl", image.pushed, check=False).returncode != 0
    assert "git version" in podman_run("--entrypoint", "git", image.pushed, "--version").stdout
    # sops decrypts SOPS-encrypted manifests at render (Flux's decryption).
    sops = podman_run("--entrypoint", "sops", image.pushed, "--version")
    assert TOOL_VERSIONS.sops.lstrip("v") in sops.stdout
    # ssh, for git with a deploy key; it prints its version on stderr.
    assert "OpenSSH" in podman_run("--entrypoint", "ssh", image.pushed, "-V").stderr
    # botocore keeps the models of the AWS APIs conveyor calls (image/install.sh trim).
    clients = (
        "import boto3; print(len([boto3.client(s, region_name='eu-west-1') "
        "for s in ('sqs', 'cloudformation', 'sts')]))"
    )
    python = ("--entrypoint", "/opt/conveyor/bin/python")
    assert podman_run(*python, image.pushed, "-c", clients).stdout.strip() == "3"
    # cryptography is the sandbox extra, not in the image.
    missing = podman_run(*python, image.pushed, "-c", "import cryptography", check=False)
    assert "No module named 'cryptography'" in missing.stderr
    # The standard library comes from its zip (image/slim.sh); tracebacks formatted by
    # the traceback module (logging's) show its sources.
    failing_json = (
        "import json, traceback\ntry: json.loads('{')\nexcept ValueError: traceback.print_exc()"
    )
    traceback = podman_run(*python, image.pushed, "-c", failing_json, check=False).stderr
    assert 'File "/usr/lib/python311.zip/json/decoder.py"' in traceback
    assert "obj, end = self.scan_once(s, idx)" in traceback
    # What slim.sh purged left no program or library without a library it links.
    unresolved = podman_run(
        "--entrypoint", "sh", image.pushed, "-c", LIBRARIES_NOT_FOUND
    ).stdout  # fmt: skip
    assert unresolved == ""


@pytest.fixture
def cluster_admin(sandbox: SandboxHandle, namespace: str) -> Iterator[str]:
    """A ServiceAccount allowed everything, as the chart's cluster-wide mode will be; the
    chart's least-privilege RBAC is its own issue. Yields the account's token."""
    token = service_account(sandbox, namespace, "conveyor")
    binding = f"conveyor-image-{uuid.uuid4().hex[:6]}"
    sandbox.run(
        "kubectl", "create", "clusterrolebinding", binding, "--clusterrole=cluster-admin",
        f"--serviceaccount={namespace}:conveyor",
    )  # fmt: skip
    yield token
    sandbox.run("kubectl", "delete", "clusterrolebinding", binding, check=False)


@dataclass(frozen=True)
class Pod:
    """What the kubelet would hand the container, as podman arguments, and the config
    repository it reads (a kustomization app and a Helm chart from git)."""

    args: tuple[str, ...]
    repo: ConfigRepo
    path: str
    revision: str
    token: str


@pytest.fixture
def pod(sandbox: SandboxHandle, namespace: str, cluster_admin: str, tmp_path: Path) -> Pod:
    work = tmp_path / "work"
    repo = ConfigRepo(work)
    charts = chart_repo(work)
    path = f"envs/{namespace}"
    repo.write(f"{path}/web/deploy.yaml", deployment("web", namespace, replicas=2))
    # A kustomization folder, so the image's kustomize builds it.
    repo.write(f"{path}/web/kustomization.yaml", "resources: [deploy.yaml]\n")
    repo.write(f"{path}/ui.yaml", flux_v1_release("ui", namespace, charts, tag="1.0.0"))
    revision = repo.commit("two apps, one of them helm")
    # The repositories stand for a git server: owned by the image's user, as git
    # refuses to read a repository another user owns.
    subprocess.run(["chown", "-R", f"{IMAGE_USER}:{IMAGE_USER}", str(work)], check=True)
    account = pod_files(sandbox, tmp_path / "account", token=cluster_admin, namespace=namespace)
    host, port = apiserver(sandbox)
    args = (
        "--env", f"KUBERNETES_SERVICE_HOST={host}",
        "--env", f"KUBERNETES_SERVICE_PORT={port}",
        "--volume", f"{account}:{ACCOUNT_DIR}:ro",
        "--volume", f"{work}:{work}:ro",
    )  # fmt: skip
    return Pod(args, repo, path, revision, cluster_admin)


def test_image_reconciles_with_only_its_service_account(
    image: BuiltImage, sandbox: SandboxHandle, namespace: str, pod: Pod
) -> None:
    """One real `conveyor reconcile` from the image, with in-cluster credentials only
    (no kubeconfig anywhere in the container)."""
    result = podman_run(
        *pod.args, image.pushed,
        "reconcile", "--repo", pod.repo.url, "--path", pod.path, "-o", "json",
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    apps = by_name(json.loads(result.stdout))
    assert apps["web"]["ready"] and apps["ui"]["ready"], result.stdout
    assert apps["web"]["revision"] == pod.revision
    assert apps["ui"]["helmRevision"] == 1
    releases = json.loads(sandbox.run("helm", "list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("ui", "deployed")]
    live = json.loads(
        sandbox.run("kubectl", "get", "deployment", "web", "-n", namespace, "-o", "json").stdout
    )
    assert live["spec"]["replicas"] == 2


def test_image_agent_logs_json_on_stdout_and_stops_on_sigterm(image: BuiltImage, pod: Pod) -> None:
    """The agent as a Pod runs it: no --log-format given, so JSON (in-cluster default),
    every stdout line one object, the token never in it; `podman stop` sends SIGTERM."""
    name = f"conveyor-agent-{uuid.uuid4().hex[:8]}"
    agent = subprocess.Popen(
        [
            *PODMAN_RUN, "--name", name, *pod.args, image.pushed,
            "agent", "--repo", pod.repo.url, "--path", pod.path, "--interval", "1h",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert agent.stdout is not None
        for line in agent.stdout:
            lines.append(line)
            if json.loads(line)["message"].startswith("pass done"):
                break
    finally:
        subprocess.run(["podman", "stop", "--time", "20", name], capture_output=True, check=False)
        _, stderr = agent.communicate(timeout=60)
    passes = [json.loads(line) for line in lines if '"pass done' in line]
    assert passes and passes[0]["message"].startswith("pass done: 2/2 Ready"), [*lines, stderr]
    assert all(pod.token not in line for line in lines)
    assert agent.returncode == 0, stderr[-2000:]


PACKAGES = (
    "import importlib.metadata as m, json; "
    "print(json.dumps(sorted(f'{d.name}=={d.version}' for d in m.distributions())))"
)


def test_containerfile_builds_the_same_image_with_podman(image: BuiltImage, tmp_path: Path) -> None:
    """The path for teams with Docker or Podman: `podman build` of the Containerfile on
    a Debian base that has apt. docker.io is out of reach here, so an mmdebstrap minbase
    stands in for debian:bookworm-slim (BASE build argument); the packages then come
    from apt inside the build, as they would elsewhere."""
    base = build_script("--slim-base")["base"]
    context = tmp_path / "context"
    build_script("--context", str(context))
    # One tag, replaced by each run: removing the image would remove its cached layers.
    reference = "localhost/conveyor-containerfile:test"
    subprocess.run(
        [
            "podman", "build", "--quiet", "--isolation=chroot", f"--build-arg=BASE={base}",
            "--tag", reference, str(context),
        ],
        capture_output=True, check=True, timeout=900,
    )  # fmt: skip
    assert __version__ in podman_run(reference, "--version").stdout
    python = ("--entrypoint", "/opt/conveyor/bin/python")
    containerfile_packages = json.loads(podman_run(*python, reference, "-c", PACKAGES).stdout)
    make_image_packages = json.loads(podman_run(*python, image.pushed, "-c", PACKAGES).stdout)
    assert containerfile_packages == make_image_packages  # one lock, one set
    assert "conveyor==" + __version__ in containerfile_packages
    assert len(containerfile_packages) > 30
    helm = ("--entrypoint", "helm")
    assert podman_run(*helm, reference, "version").stdout == (
        podman_run(*helm, image.pushed, "version").stdout
    )
    assert podman_run("--entrypoint", "id", reference, "-u").stdout.strip() == str(IMAGE_USER)
