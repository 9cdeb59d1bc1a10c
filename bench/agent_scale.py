"""Benchmark: the agent at 10, 100 and 1000 apps, against the tools teams script today.

Apps are shaped like Flux's published benchmark: a Deployment, a ServiceAccount, a
Service and an Ingress each, as plain manifests and as HelmReleases. Measured in one
run on a dedicated sandbox ("bench-agent"):

- conveyor: commit → all Ready (agent start to first pass done), no-op resync time and
  its API write count, one changed app among N from webhook to applied, peak RSS;
- peers: `kubectl apply --server-side` of the same objects then `kubectl wait` for the
  Deployments (the floor), and a sequential `helm upgrade --install` loop.

Prints a table of figures and ratios; `--results` appends them to bench/RESULTS.md.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from conveyor.sandbox import Sandbox
from conveyor.source.git import run_git

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"bench"


def app_manifest(name: str, namespace: str, *, image_tag: str = "1", replicas: int = 1) -> str:
    return f"""apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: {namespace}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      serviceAccountName: {name}
      containers: [{{name: main, image: "registry.local/{name}:{image_tag}"}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  selector: {{app: {name}}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  rules:
    - host: {name}.example.test
      http:
        paths:
          - path: /
            pathType: Prefix
            backend: {{service: {{name: {name}, port: {{number: 80}}}}}}
"""


def chart_dir(root: Path) -> Path:
    """A chart with the same four objects, rendered per release."""
    chart = root / "bench-chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: bench\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("tag: '1'\n")
    template = app_manifest(
        "{{ .Release.Name }}", "{{ .Release.Namespace }}", image_tag="{{ .Values.tag }}"
    )
    (chart / "templates" / "app.yaml").write_text(template)
    return chart


def helmrelease(name: str, namespace: str, chart_git: str, *, tag: str = "1") -> str:
    return f"""apiVersion: helm.fluxcd.io/v1
kind: HelmRelease
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  releaseName: {name}
  targetNamespace: {namespace}
  chart: {{git: "{chart_git}", ref: master, path: bench-chart}}
  values: {{tag: "{tag}"}}
"""


class Bench:
    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.rows: list[dict[str, object]] = []

    def run(self, *args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), env=self.env, check=check, capture_output=True, text=True, **kw
        )  # type: ignore[call-overload]

    def git_repo(self, name: str) -> tuple[Path, Path]:
        bare, work = self.work / f"{name}.git", self.work / name
        run_git(["init", "--quiet", "--bare", "--initial-branch", "main", str(bare)])
        run_git(["init", "--quiet", "--initial-branch", "main", str(work)])
        return bare, work

    def commit(self, work: Path, bare: Path, message: str, *, branch: str = "main") -> None:
        run_git(["add", "--all"], cwd=work)
        run_git(
            ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", message], cwd=work
        )
        run_git(["push", "-q", str(bare), f"HEAD:{branch}"], cwd=work)

    def namespace(self, name: str) -> None:
        """A new, empty namespace: one a previous run left (it was stopped, or its
        deletion of thousands of objects is still going on) is deleted and waited out,
        or its deletion would take the new run's objects with it."""
        self.run("kubectl", "delete", "namespace", name, "--ignore-not-found", "--wait=false")
        deadline = time.monotonic() + 1800
        while self.run("kubectl", "get", "namespace", name, check=False).returncode == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"namespace {name} is still there after 30 minutes")
            time.sleep(2)
        self.run("kubectl", "create", "namespace", name)

    def cleanup(self, namespace: str, *, timeout: int = 300) -> None:
        self.run(
            "kubectl",
            "delete",
            "namespace",
            namespace,
            "--wait=true",
            f"--timeout={timeout}s",
            check=False,
        )

    # -- conveyor ---------------------------------------------------------------------

    def measure_agent(
        self,
        label: str,
        bare: Path,
        work: Path,
        path: str,
        n: int,
        change: Callable[[], tuple[str, str, str]],
    ) -> dict[str, object]:
        port = free_port()
        secret = self.work / "secret"
        secret.write_bytes(SECRET)
        log = self.work / f"agent-{label}.log"
        started = time.monotonic()
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyor",
                "agent",
                "--repo",
                str(bare),
                "--path",
                path,
                "--interval",
                "3600s",
                "--listen",
                f"127.0.0.1:{port}",
                "--webhook-secret-file",
                str(secret),
                "--timeout",
                "600",
                "--log-format",
                "json",
            ],
            env=self.env,
            stdout=log.open("w"),  # the agent logs on stdout
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait(lambda: passes(log) >= 1, timeout=1800, proc=agent, log=log)
            ready_s = time.monotonic() - started
            first = last_pass(log)
            hook(url)
            wait(lambda: passes(log) >= 2, timeout=600, proc=agent, log=log)
            noop = last_pass(log)
            namespace, name, expected = change()
            self.commit(work, bare, "change one app")
            t0 = time.monotonic()
            hook(url)
            wait(
                lambda: image_of(self, namespace, name) == expected,
                timeout=300,
                proc=agent,
                log=log,
                interval=0.02,
            )
            change_s = time.monotonic() - t0
            rss = peak_rss(agent.pid)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
        return {
            "label": label,
            "n": n,
            "ready_s": ready_s,
            "first_writes": first[1],
            "noop_s": noop[2],
            "noop_writes": noop[1],
            "change_s": change_s,
            "rss_mib": rss / 2**20,
        }

    # -- peers --------------------------------------------------------------------------

    def kubectl_floor(self, n: int, namespace: str) -> float:
        manifests = self.work / f"kubectl-{n}.yaml"
        manifests.write_text("---\n".join(app_manifest(f"k{i:04d}", namespace) for i in range(n)))
        self.namespace(namespace)
        t0 = time.monotonic()
        self.run("kubectl", "apply", "--server-side", "-f", str(manifests))
        self.run(
            "kubectl",
            "wait",
            "--for=condition=Available",
            "deployment",
            "--all",
            "-n",
            namespace,
            "--timeout=900s",
        )
        return time.monotonic() - t0

    def helm_loop(self, n: int, namespace: str, chart: Path) -> float:
        self.namespace(namespace)
        t0 = time.monotonic()
        for i in range(n):
            self.run(
                "helm",
                "upgrade",
                "--install",
                f"h{i:04d}",
                str(chart),
                "-n",
                namespace,
                "--wait",
                "--timeout",
                "300s",
            )
        return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hook(url: str) -> None:
    body = b'{"ref":"refs/heads/main"}'
    signature = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    httpx.post(
        f"{url}/hooks/git", content=body, headers={"X-Hub-Signature-256": signature}
    ).raise_for_status()


_PASS = re.compile(r"pass done: (\d+)/(\d+) Ready, (\d+) writes, ([\d.]+)s")


def passes(log: Path) -> int:
    return len(_PASS.findall(log.read_text()))


def last_pass(log: Path) -> tuple[int, int, float]:
    ready, _total, writes, seconds = _PASS.findall(log.read_text())[-1]
    return int(ready), int(writes), float(seconds)


def image_of(bench: Bench, namespace: str, name: str) -> str | None:
    out = bench.run(
        "kubectl",
        "get",
        "deployment",
        name,
        "-n",
        namespace,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
        check=False,
    )
    return out.stdout or None


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def wait(
    check: Callable[[], bool],
    *,
    timeout: float,
    proc: subprocess.Popen[bytes],
    log: Path,
    interval: float = 0.25,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited:\n{log.read_text()[-3000:]}")
        if check():
            return
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s:\n{log.read_text()[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--helm-sizes", default="10,100,1000")
    parser.add_argument("--results", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument(
        "--no-peers", action="store_true", help="conveyor only (while tuning; no ratios)"
    )
    args = parser.parse_args()
    if args.no_peers and args.results:
        parser.error("--results needs the peers: ratios are measured in the same run")
    sandbox = Sandbox("bench-agent")
    state = sandbox.up()
    env = {
        **os.environ,
        "KUBECONFIG": str(sandbox.kubeconfig),
        "PATH": f"{state.bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    bench = Bench(work, env)
    results: list[dict[str, object]] = []
    try:
        for n in [int(x) for x in args.sizes.split(",") if x]:
            bare, repo = bench.git_repo(f"plain{n}")
            ns = f"plain-{n}"
            bench.namespace(ns)
            for i in range(n):
                (repo / f"apps/a{i:04d}").mkdir(parents=True)
                (repo / f"apps/a{i:04d}/app.yaml").write_text(app_manifest(f"a{i:04d}", ns))
            bench.commit(repo, bare, "apps")

            def change_plain(repo: Path = repo, ns: str = ns) -> tuple[str, str, str]:
                (repo / "apps/a0000/app.yaml").write_text(app_manifest("a0000", ns, image_tag="2"))
                return ns, "a0000", "registry.local/a0000:2"

            row = bench.measure_agent(f"plain-{n}", bare, repo, "apps", n, change_plain)
            bench.cleanup(ns)
            if not args.no_peers:
                row["peer_s"] = bench.kubectl_floor(n, f"kubectl-{n}")
                row["peer"] = "kubectl apply --server-side + wait"
                bench.cleanup(f"kubectl-{n}")
            results.append(row)
            print_row(row)
        charts_bare, charts = bench.git_repo("charts")
        chart = chart_dir(charts)
        run_git(["add", "--all"], cwd=charts)
        run_git(
            ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "chart"], cwd=charts
        )
        run_git(["push", "-q", str(charts_bare), "HEAD:master"], cwd=charts)
        for n in [int(x) for x in args.helm_sizes.split(",") if x]:
            bare, repo = bench.git_repo(f"helm{n}")
            ns = f"helm-{n}"
            bench.namespace(ns)
            (repo / "releases").mkdir()
            for i in range(n):
                (repo / f"releases/r{i:04d}.yaml").write_text(
                    helmrelease(f"r{i:04d}", ns, f"file://{charts_bare}")
                )
            bench.commit(repo, bare, "releases")

            def change_helm(repo: Path = repo, ns: str = ns) -> tuple[str, str, str]:
                (repo / "releases/r0000.yaml").write_text(
                    helmrelease("r0000", ns, f"file://{charts_bare}", tag="2")
                )
                return ns, "r0000", "registry.local/r0000:2"

            row = bench.measure_agent(f"helm-{n}", bare, repo, "releases", n, change_helm)
            bench.cleanup(ns)
            if not args.no_peers:
                row["peer_s"] = bench.helm_loop(n, f"helmloop-{n}", chart)
                row["peer"] = "sequential helm upgrade --install --wait"
                bench.cleanup(f"helmloop-{n}")
            results.append(row)
            print_row(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        sandbox.down()
    if args.results:
        append_results(results)
    return 0


def print_row(row: dict[str, object]) -> None:
    peer = ""
    if "peer_s" in row:
        ratio = float(row["peer_s"]) / float(row["ready_s"])  # type: ignore[arg-type]
        peer = f" | {row['peer']} {row['peer_s']:.1f}s → conveyor is {ratio:.2f}x the peer's speed"
    print(
        f"{row['label']:>10}: all Ready {row['ready_s']:.1f}s ({row['first_writes']} writes) "
        f"| no-op {row['noop_s']:.2f}s, {row['noop_writes']} writes "
        f"| one change {row['change_s']:.2f}s | RSS {row['rss_mib']:.0f} MiB{peer}",
        flush=True,
    )


def append_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A dated section of bench/RESULTS.md: `title`, then one table (the file is made
    with its heading if missing)."""
    lines = [
        "",
        f"## {title} ({time.strftime('%Y-%m-%d')}, 2 cores, sandbox)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    results_file = ROOT / "bench" / "RESULTS.md"
    if not results_file.exists():
        results_file.write_text(
            "# Benchmark results\n\nFigures measured by the scripts in "
            "bench/, each against its peer in the same run.\n"
        )
    with results_file.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def append_results(results: list[dict[str, object]]) -> None:
    rows = []
    for r in results:
        ratio = float(r["peer_s"]) / float(r["ready_s"])  # type: ignore[arg-type]
        rows.append(
            [
                str(r["label"]),
                f"{r['ready_s']:.1f} s",
                str(r["first_writes"]),
                f"{r['noop_s']:.2f} s",
                str(r["noop_writes"]),
                f"{r['change_s']:.2f} s",
                f"{r['rss_mib']:.0f} MiB",
                str(r["peer"]),
                f"{r['peer_s']:.1f} s",
                f"{ratio:.2f}x",
            ]
        )
    columns = [
        "apps", "commit → all Ready", "API writes", "no-op resync", "no-op writes",
        "webhook → applied", "agent peak RSS", "peer", "peer time", "peer ÷ conveyor",
    ]  # fmt: skip
    append_table("Agent at scale", columns, rows)
    print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
