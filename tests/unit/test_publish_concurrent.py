"""Twenty pipelines publish into one config repo over `git daemon` at once: all land once."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conveyor.sandbox.ports import free_ports
from conveyor.source.git import run_git
from tests.unit.conftest import ROOT, copy_app, remote_file, remote_subjects

PIPELINES = 20


@pytest.fixture
def daemon_url(config_remote: Path) -> Iterator[str]:
    """The bare config repo served read-write by `git daemon` on loopback."""
    port = free_ports(["git"])["git"]
    process = subprocess.Popen(
        [
            "git",
            "daemon",
            "--export-all",
            "--enable=receive-pack",
            "--reuseaddr",
            "--informative-errors",
            "--listen=127.0.0.1",
            f"--port={port}",
            f"--base-path={config_remote.parent}",
            str(config_remote.parent),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("git daemon did not start") from None
            time.sleep(0.05)
    yield f"git://127.0.0.1:{port}/{config_remote.name}"
    process.terminate()
    process.wait(timeout=10)


def test_twenty_concurrent_publishes_all_land_exactly_once(
    daemon_url: str, config_remote: Path, tmp_path: Path, no_ci_env: dict[str, str]
) -> None:
    apps = {name: copy_app(name, tmp_path / "apps") for name in ("ui", "api", "worker")}
    env = {**no_ci_env, "PYTHONPATH": str(ROOT / "src")}
    started = time.monotonic()
    processes = []
    for i in range(PIPELINES):
        app = ("ui", "api", "worker")[i % 3]
        sha = f"{i:02d}" * 20
        processes.append(
            subprocess.Popen(
                [
                    sys.executable, "-m", "conveyor", "publish",
                    "--repo", daemon_url, "--ref", f"refs/heads/feature-{i}", "--sha", sha,
                    "-o", "json",
                ],
                cwd=apps[app], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )  # fmt: skip
    outcomes = [(p.wait(timeout=600), *p.communicate()) for p in processes]
    elapsed = time.monotonic() - started
    assert [code for code, _, _ in outcomes] == [0] * PIPELINES, [e for _, _, e in outcomes]
    results = [yaml.safe_load(out) for _, out, _ in outcomes]
    retries = [r["retries"] for r in results]
    print(
        f"\n{PIPELINES} concurrent publishes: {elapsed:.1f}s, {sum(retries)} lost push races "
        f"retried (at most {max(retries)} for one pipeline)"
    )

    subjects = remote_subjects(config_remote)
    assert subjects[-1] == "init"
    assert sorted(subjects[:-1]) == sorted(
        f"Update from {f'{i:02d}' * 20}" for i in range(PIPELINES)
    )
    assert len({r["commit"] for r in results}) == PIPELINES
    tree = run_git(["--git-dir", str(config_remote), "ls-tree", "-r", "--name-only", "master"])
    expected = {
        f"staging-candidates/{('ui', 'api', 'worker')[i % 3]}/refs-heads-feature-{i}.yaml"
        for i in range(PIPELINES)
    }
    assert set(tree.split()) == expected | {"README.md"}
    for i in range(PIPELINES):
        app = ("ui", "api", "worker")[i % 3]
        text = remote_file(config_remote, f"staging-candidates/{app}/refs-heads-feature-{i}.yaml")
        assert f"refs-heads-feature-{i}-{f'{i:02d}' * 20}" in text
