"""Offline pull-request diff: `conveyor diff --base/--head` against `flux-local diff hr`.

flux-local is the one other tool that shows, without a cluster, what a change to a Flux
v2 repository does to its HelmReleases' rendered charts. Both are run in the same run
on the same generated repository, in the shape of Flux's own examples
(fluxcd/flux2-kustomize-helm-example): `clusters/staging` holds Flux's installation and
a Kustomization of `apps/staging`, an overlay that patches 50 HelmReleases of
`apps/base`. Their chart comes from a HelmRepository served on loopback (both tools
resolve it without the internet: helm pulls it). The base commit and the head commit
differ in the values of a few releases; both tools must name the same changed releases.

flux-local is installed from PyPI into a venv of its own under
~/.cache/conveyor/bench/flux-local (never into conveyor's lock); it runs the standalone
`kustomize`, built once from the Go module proxy (`sandbox.build.ensure_peer_tools`),
and helm from the sandbox's binaries. No cluster is started.

    .venv/bin/python bench/flux_local.py [--releases 50] [--changed 5] [--rounds 5]

Prints each tool's median time and the ratio. Not a test: nothing here asserts, but a
disagreement about the changed releases is reported and exits 1.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from conveyor.paths import cache_root  # noqa: E402
from conveyor.sandbox.build import ensure_binaries, ensure_peer_tools  # noqa: E402
from conveyor.sandbox.versions import VERSIONS  # noqa: E402
from conveyor.source.git import run_git  # noqa: E402

FLUX_LOCAL_VERSION = "7.5.0"
CHART = ROOT / "examples" / "charts" / "service"
ENV = "staging"


def flux_local_venv(*, say: bool = True) -> Path:
    """The venv holding flux-local, created with pip on first use."""
    venv = cache_root() / "bench" / "flux-local"
    binary = venv / "bin" / "flux-local"
    marker = venv / f".flux-local-{FLUX_LOCAL_VERSION}"
    if not marker.exists():
        if say:
            print(f"installing flux-local {FLUX_LOCAL_VERSION} into {venv} (first run only)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", f"flux-local=={FLUX_LOCAL_VERSION}"],
            check=True,
        )
        marker.write_text("")
    return binary


def release_name(index: int) -> str:
    return f"app-{index:02d}"


def write(root: Path, path: str, content: object) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        target.write_text(content)
    else:
        target.write_text(yaml.safe_dump_all(content if isinstance(content, list) else [content]))


def flux_kustomization(name: str, path: str) -> dict[str, object]:
    return {
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
        "kind": "Kustomization",
        "metadata": {"name": name, "namespace": "flux-system"},
        "spec": {
            "interval": "10m",
            "path": path,
            "prune": True,
            "sourceRef": {"kind": "GitRepository", "name": "flux-system"},
        },
    }


def overlay(releases: int, replicas: dict[int, int]) -> dict[str, object]:
    """apps/staging: every base release, each patched with its staging values."""
    patches = []
    for index in range(releases):
        values = {"replicaCount": replicas.get(index, 1), "image": {"tag": f"{ENV}-1.0.{index}"}}
        patches.append(
            {
                "target": {"kind": "HelmRelease", "name": release_name(index)},
                "patch": yaml.safe_dump(
                    {
                        "apiVersion": "helm.toolkit.fluxcd.io/v2",
                        "kind": "HelmRelease",
                        "metadata": {"name": release_name(index)},
                        "spec": {"values": values},
                    }
                ),
            }
        )
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../base/sources", *(f"../base/{release_name(i)}" for i in range(releases))],
        "patches": patches,
    }


def generate(root: Path, *, releases: int, repo_url: str, charts_url: str) -> None:
    """The base revision of the repository."""
    write(root, "clusters/staging/apps.yaml", flux_kustomization("apps", "./apps/staging"))
    write(
        root,
        "clusters/staging/flux-system/kustomization.yaml",
        "resources: [gotk-components.yaml, gotk-sync.yaml]\n",
    )
    # Flux's installation, trimmed to one CRD: both tools recognise it and leave it out.
    write(
        root,
        "clusters/staging/flux-system/gotk-components.yaml",
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "flux-system"},
        },
    )
    write(
        root,
        "clusters/staging/flux-system/gotk-sync.yaml",
        [
            {
                "apiVersion": "source.toolkit.fluxcd.io/v1",
                "kind": "GitRepository",
                "metadata": {"name": "flux-system", "namespace": "flux-system"},
                "spec": {"interval": "1m", "ref": {"branch": "main"}, "url": repo_url},
            },
            flux_kustomization("flux-system", "./clusters/staging"),
        ],
    )
    write(root, "apps/base/sources/kustomization.yaml", "resources: [repository.yaml]\n")
    write(
        root,
        "apps/base/sources/repository.yaml",
        {
            "apiVersion": "source.toolkit.fluxcd.io/v1",
            "kind": "HelmRepository",
            "metadata": {"name": "charts", "namespace": "flux-system"},
            "spec": {"interval": "5m", "url": charts_url},
        },
    )
    for index in range(releases):
        name = release_name(index)
        write(root, f"apps/base/{name}/kustomization.yaml", "resources: [release.yaml]\n")
        write(
            root,
            f"apps/base/{name}/release.yaml",
            {
                "apiVersion": "helm.toolkit.fluxcd.io/v2",
                "kind": "HelmRelease",
                "metadata": {"name": name, "namespace": "apps"},
                "spec": {
                    "interval": "10m",
                    "releaseName": name,
                    "chart": {
                        "spec": {
                            "chart": "service",
                            "version": "0.1.0",
                            "sourceRef": {
                                "kind": "HelmRepository",
                                "name": "charts",
                                "namespace": "flux-system",
                            },
                        }
                    },
                    "values": {"image": {"repository": f"registry.local/{name}"}},
                },
            },
        )
    write(root, "apps/staging/kustomization.yaml", yaml.safe_dump(overlay(releases, {})))


def commit(work: Path, message: str) -> str:
    run_git(["add", "--all"], cwd=work)
    run_git(
        ["-c", "user.name=bench", "-c", "user.email=bench@local", "commit", "-q", "-m", message],
        cwd=work,
    )
    return run_git(["rev-parse", "HEAD"], cwd=work).strip()


@contextmanager
def chart_repository(folder: Path, helm: str) -> Iterator[str]:
    """A Helm HTTP repository on loopback holding the example chart."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [helm, "package", str(CHART), "--destination", str(folder)], check=True, capture_output=True
    )
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    subprocess.run([helm, "repo", "index", str(folder), "--url", url], check=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def timed(
    argv: list[str], *, cwd: Path, env: dict[str, str], ok: tuple[int, ...]
) -> tuple[float, float, str]:
    """Wall time, CPU time (user + system of the command and every process it waited
    for: helm, kustomize, git) and standard output of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if result.returncode not in ok:
        raise SystemExit(
            f"{argv[0]} exited {result.returncode}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return elapsed, cpu, result.stdout


def conveyor_changed(text: str) -> set[str]:
    """The releases whose Deployment `conveyor diff` shows changed."""
    return set(re.findall(r"update Deployment apps/(app-\d+)", text))


def flux_local_changed(text: str) -> set[str]:
    """The releases whose Deployment `flux-local diff hr` shows changed."""
    return set(re.findall(r"^[-+]{3} .*Deployment: apps/(app-\d+)", text, flags=re.MULTILINE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--releases", type=int, default=50)
    parser.add_argument("--changed", type=int, default=5, help="releases whose values change")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--outputs", type=Path, help="write each tool's last diff here")
    args = parser.parse_args()

    flux_local = flux_local_venv()
    peer_bin = ensure_peer_tools(progress=print)
    sandbox_bin = ensure_binaries(VERSIONS, progress=print)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(peer_bin), str(sandbox_bin), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(ROOT / "src"),
    }
    step = args.releases // args.changed
    changed = {(i * step + 3) % args.releases for i in range(args.changed)}
    expected = {release_name(i) for i in changed}

    with tempfile.TemporaryDirectory(prefix="bench-flux-local-") as scratch:
        top = Path(scratch)
        work = top / "repo"
        work.mkdir()
        run_git(["init", "-q", "-b", "main"], cwd=work)
        with chart_repository(top / "charts", str(sandbox_bin / "helm")) as charts_url:
            generate(work, releases=args.releases, repo_url=f"file://{work}", charts_url=charts_url)
            base = commit(work, "base")
            run_git(["checkout", "-q", "-b", "head"], cwd=work)
            write(
                work,
                "apps/staging/kustomization.yaml",
                yaml.safe_dump(overlay(args.releases, {i: 3 for i in changed})),
            )
            commit(work, "head: more replicas for some releases")
            conveyor_argv = [
                sys.executable,
                "-m",
                "conveyor",
                "diff",
                "--repo",
                str(work),
                "--base",
                base,
                "--head",
                "head",
                "--path",
                f"clusters/{ENV}",
            ]
            # flux-local diffs the checkout (head) against a worktree of --branch-orig.
            flux_local_argv = [
                str(flux_local),
                "diff",
                "hr",
                "--all-namespaces",
                "--path",
                f"clusters/{ENV}",
                "--branch-orig",
                "main",
            ]
            times: dict[str, list[float]] = {"conveyor": [], "flux-local": []}
            cpu: dict[str, list[float]] = {"conveyor": [], "flux-local": []}
            outputs: dict[str, str] = {}
            for round_number in range(args.rounds):
                # Alternate who goes first, so neither always runs on a warmer machine.
                order = ["conveyor", "flux-local"][:: 1 if round_number % 2 == 0 else -1]
                for tool in order:
                    if tool == "conveyor":
                        elapsed, used, out = timed(conveyor_argv, cwd=work, env=env, ok=(0, 1))
                    else:
                        elapsed, used, out = timed(flux_local_argv, cwd=work, env=env, ok=(0,))
                    times[tool].append(elapsed)
                    cpu[tool].append(used)
                    outputs[tool] = out
                print(
                    f"round {round_number + 1}: "
                    + ", ".join(
                        f"{tool} {times[tool][-1]:.2f} s ({cpu[tool][-1]:.2f} s CPU)"
                        for tool in times
                    ),
                    flush=True,
                )

    if args.outputs is not None:
        args.outputs.mkdir(parents=True, exist_ok=True)
        for tool, out in outputs.items():
            (args.outputs / f"{tool}.diff").write_text(out)
    found = {
        "conveyor": conveyor_changed(outputs["conveyor"]),
        "flux-local": flux_local_changed(outputs["flux-local"]),
    }
    print(f"\n{args.releases} HelmReleases, {args.changed} changed, {args.rounds} rounds")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f} (2 CPUs)")
    names = {"conveyor": "conveyor diff --base/--head", "flux-local": "flux-local diff hr"}
    for tool, name in names.items():
        print(
            f"  {name:28} median {statistics.median(times[tool]):6.2f} s wall, "
            f"{statistics.median(cpu[tool]):6.2f} s CPU"
        )
    for what, figures in (("wall", times), ("CPU", cpu)):
        ratio = statistics.median(figures["flux-local"]) / statistics.median(figures["conveyor"])
        print(f"  flux-local / conveyor ({what}): {ratio:.2f}x")
    agree = found["conveyor"] == found["flux-local"] == expected
    print(
        "  changed releases: "
        + (
            "both show " + ", ".join(sorted(expected))
            if agree
            else f"DISAGREE {found} (expected {sorted(expected)})"
        )
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
