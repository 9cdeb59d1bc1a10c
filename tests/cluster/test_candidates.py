"""cal-itp's candidate branches, end to end on a bare repository and the sandbox: a push
renders candidates/<branch> on releases/prod, the pull request into releases/test shows
the test environment's diff, merging it deploys through that environment's agent, and
prune removes the candidate once its branch is deleted. The branch is `feat/x`, the
name their own glue could not handle."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from conveyor.promote.candidates import diff_candidate, prune_candidates, render_candidate
from conveyor.render.helm import HelmCLI
from conveyor.source.git import Author, run_git
from tests.cluster.gitops import ConfigRepo, deployment, wait_for
from tests.cluster.test_agent import AgentProcess, agents  # noqa: F401 (the fixture)
from tests.conftest import SandboxHandle

pytestmark = pytest.mark.cluster


def calitp_repo(root: Path, namespace: str, env_name: str) -> ConfigRepo:
    """cal-itp's shape: channel files, a folder per channel's environment, and files that
    are not deployed; conveyor.yaml puts the environments on releases/test and /prod."""
    repo = ConfigRepo(root)
    repo.write(
        "conveyor.yaml",
        f"""
        environments:
          - name: {env_name}
            path: apps/test
            branch: releases/test
          - name: {env_name}-prod
            path: apps/prod
            branch: releases/prod
        """,
    )
    for name in ("test", "prod"):
        repo.write(
            f"channels/{name}.yaml",
            f"""
            calitp:
              channel: {name}
              releases:
                - name: web
                  driver: kustomize
                  kustomize_dir: apps/{name}
            """,
        )
    repo.write("apps/test/web.yaml", deployment("web", namespace, image="web:1"))
    repo.write("apps/prod/web.yaml", deployment("web", namespace + "-prod", image="web:1"))
    repo.write("README.md", "the team's notes\n")
    repo.write("src/app.py", "print('not deployable')\n")
    repo.commit("initial")
    return repo


CANDIDATE_TREE = [
    "apps/prod/web.yaml",
    "apps/test/web.yaml",
    "channels/prod.yaml",
    "channels/test.yaml",
    "conveyor.yaml",
]


def push_branch(repo: ConfigRepo, name: str, change: dict[str, str]) -> str:
    """Commit `change` (path → text) on a new branch `name` off the current one, push it."""
    run_git(["checkout", "--quiet", "-b", name], cwd=repo.work)
    repo.branch = name
    for path, text in change.items():
        repo.write(path, text)
    return repo.commit(f"change on {name}")


def image(sandbox: SandboxHandle, namespace: str) -> str | None:
    found = sandbox.run(
        "kubectl", "get", "deployment", "web", "-n", namespace, "-o", "json", check=False
    )
    if found.returncode != 0:
        return None
    containers = json.loads(found.stdout)["spec"]["template"]["spec"]["containers"]
    return str(containers[0]["image"])


def git_bare(repo: ConfigRepo, *args: str) -> str:
    return run_git(["--git-dir", repo.url, *args])


def test_candidate_branches_render_diff_deploy_and_prune(
    sandbox: SandboxHandle,
    namespace: str,
    tmp_path: Path,
    agents: list[AgentProcess],  # noqa: F811
) -> None:
    env_name = f"cand-{uuid.uuid4().hex[:6]}"
    repo = calitp_repo(tmp_path, namespace, env_name)
    author = Author("ci", "ci@localhost")
    # main's candidate has no releases/prod to sit on yet (a root commit); it becomes both.
    first = render_candidate(repo.url, "main", workdir=tmp_path / "w1", author=author)
    assert first.parent is None
    assert git_bare(repo, "ls-tree", "-r", "--name-only", first.commit).split() == CANDIDATE_TREE
    for release in ("releases/prod", "releases/test"):
        git_bare(repo, "branch", release, "candidates/main")
    source = push_branch(
        repo, "feat/x", {"apps/test/web.yaml": deployment("web", namespace, image="web:2")}
    )
    rendered = render_candidate(repo.url, "feat/x", workdir=tmp_path / "w2", author=author)
    assert (rendered.branch, rendered.source_commit) == ("candidates/feat/x", source)
    assert rendered.parent == first.commit
    listed = git_bare(repo, "ls-tree", "-r", "--name-only", "candidates/feat/x")
    assert listed.split() == CANDIDATE_TREE

    # The pull request from candidates/feat/x to releases/test: the test environment's diff.
    started = time.monotonic()
    diff = asyncio.run(
        diff_candidate(
            repo.url, "feat/x", "test", workdir=tmp_path / "w3", helm=HelmCLI(), author=author
        )
    )
    print(f"candidate diff: {time.monotonic() - started:.1f}s")
    assert diff.environment == env_name and diff.base == first.commit
    assert [(p.app, [str(c.ref) for c in p.changes]) for p in diff.plans] == [
        ("test", [f"Deployment {namespace}/web"])
    ]
    assert "-      - image: registry.local/web:1\n+      - image: registry.local/web:2\n" in (
        diff.markdown
    )

    # Merging it deploys: the agent of the environment on releases/test applies the merge.
    agent = AgentProcess(
        sandbox, repo, "apps/test", tmp_path, "--branch", "releases/test", "--interval", "1s"
    )
    agents.append(agent)
    wait_for(lambda: image(sandbox, namespace) == "registry.local/web:1", timeout=90)
    merger = tmp_path / "merger"
    run_git(["clone", "--quiet", "--branch", "releases/test", repo.url, str(merger)])
    run_git(["fetch", "--quiet", "origin", "candidates/feat/x"], cwd=merger)
    run_git(
        ["-c", "user.name=t", "-c", "user.email=t@t", "merge", "--quiet", "--no-ff", "FETCH_HEAD"],
        cwd=merger,
    )
    run_git(["push", "--quiet", "origin", "HEAD:releases/test"], cwd=merger)
    merged = time.monotonic()
    wait_for(
        lambda: image(sandbox, namespace) == "registry.local/web:2",
        timeout=60,
        what=f"the merge deployed; log {agent.log}",
    )
    print(f"merge to deployed: {time.monotonic() - merged:.1f}s")
    assert image(sandbox, namespace + "-prod") is None  # prod's folder is not this channel's

    # feat/x is deleted: prune removes its candidate, never main's nor a promotion's.
    git_bare(repo, "branch", "candidates/prod-all-1.0", "releases/prod")
    git_bare(repo, "branch", "-D", "feat/x")
    pruned = prune_candidates(repo.url, workdir=tmp_path / "w4")
    assert pruned.deleted == ["candidates/feat/x"]
    assert pruned.kept == [
        "candidates/prod-all-1.0: not rendered from a branch (a promotion's, kept)"
    ]
    heads = git_bare(repo, "branch", "--list", "candidates/*").split()
    assert heads == ["candidates/main", "candidates/prod-all-1.0"]
