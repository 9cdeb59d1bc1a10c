"""The README's command lines that need a cluster, run as written on the sandbox.

Like tests/unit/test_readme.py (which checks every line's command and flags, and runs
the offline ones), with these placeholders filled by a config repo made here:

    URL    the bare config repository (a path, as the other cluster tests pass it)
    NAME   an environment of its conveyor.yaml, named uniquely (the sandbox is shared)
    DIR    that environment's folder
    APP    web, the environment's one app

`[...]` parts are left out and `(a | b)` takes the `--env NAME` side, so that one
environment identity owns the objects.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import yaml

from tests.cluster.gitops import ConfigRepo, conveyor, deployment
from tests.conftest import SandboxHandle
from tests.unit.test_readme import readme_commands

pytestmark = pytest.mark.cluster
# README line → the exit code the README promises (reconcile: "exit 0 = all Ready";
# diff: "exit 0 none, 1 changes, 2 error", and there is none right after a reconcile).
RUNS_ON_CLUSTER = {
    "conveyor reconcile --repo URL (--path DIR | --env NAME) [--app A]": 0,
    "conveyor get apps [-o json|yaml]": 0,
    # the environment names no cluster: the sandbox, $KUBECONFIG's
    "conveyor get apps --all-environments --repo URL [-o json]": 0,
    "conveyor get shards --env NAME [-o json]": 0,  # it runs unsharded: no shards
    "conveyor diff --repo URL (--path DIR | --env NAME) [--format markdown]": 0,
    "conveyor suspend APP --env NAME": 0,
    "conveyor resume APP --env NAME": 0,
}


def as_run(line: str, filled: dict[str, str]) -> list[str]:
    line = re.sub(r"\s*\[[^\]]*\]", "", line)
    line = re.sub(r"\(([^|)]*)\|([^)]*)\)", lambda m: m.group(2).strip(), line)
    return [filled.get(word, word) for word in line.split()[1:]]


def test_the_readme_command_lines_for_a_cluster_run_as_written(
    sandbox: SandboxHandle, namespace: str, tmp_path: Path
) -> None:
    commands = readme_commands()
    assert [line for line in RUNS_ON_CLUSTER if line not in commands] == []
    name = f"readme-{uuid.uuid4().hex[:6]}"
    folder = f"envs/{name}"
    repo = ConfigRepo(tmp_path)
    project = {"environments": [{"name": name, "path": folder}]}
    repo.write("conveyor.yaml", yaml.safe_dump(project))
    repo.write(f"{folder}/web/deploy.yaml", deployment("web", namespace, image="web:1.0.0"))
    repo.commit("an environment")
    filled = {"URL": repo.url, "NAME": name, "DIR": folder, "APP": "web"}
    for line in (c for c in commands if c in RUNS_ON_CLUSTER):
        result = conveyor(sandbox, *as_run(line, filled))
        assert result.returncode == RUNS_ON_CLUSTER[line], f"{line}\n{result.stdout}{result.stderr}"
        if line.startswith("conveyor get apps"):  # the table folds names at 80 columns
            assert "web" in result.stdout and "Ready" in result.stdout
        if line.startswith("conveyor get shards"):
            assert f"{name} runs unsharded" in result.stdout, result.stdout
