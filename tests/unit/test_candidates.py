"""`conveyor candidates` on local bare repositories (real git, the offline renderer):
what a candidate holds, refusals, the pull request's diff and a conflict, prune. The
deploy on merge is tests/cluster/test_candidates.py."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner, Result

from conveyor.cli.main import app
from conveyor.promote.candidates import deployable_paths
from conveyor.source.git import run_git
from tests.cluster.gitops import ConfigRepo, deployment
from tests.cluster.test_candidates import CANDIDATE_TREE, calitp_repo, git_bare, push_branch


def candidates(repo: ConfigRepo, *args: str) -> Result:
    return CliRunner().invoke(app, ["candidates", *args, "--repo", repo.url])


def released(repo: ConfigRepo) -> None:
    """main's candidate rendered and merged into both channels, as on their first day."""
    assert candidates(repo, "render", "--branch", "main").exit_code == 0
    for release in ("releases/prod", "releases/test"):
        git_bare(repo, "branch", release, "candidates/main")


def test_a_candidate_holds_only_the_deployable_paths_on_releases_prod(tmp_path: Path) -> None:
    repo = calitp_repo(tmp_path, "web-test", "test")
    released(repo)
    prod = git_bare(repo, "rev-parse", "releases/prod").strip()
    source = push_branch(
        repo,
        "feat/x",
        {"apps/test/web.yaml": deployment("web", "web-test", image="web:2"), "README.md": "x\n"},
    )
    result = candidates(repo, "render", "--branch", "feat/x", "-o", "json")
    assert result.exit_code == 0, result.output
    rendered = json.loads(result.output)
    assert rendered["branch"] == "candidates/feat/x" and rendered["changed"] is True
    assert (rendered["sourceCommit"], rendered["parent"]) == (source, prod)
    assert rendered["paths"] == ["apps/prod", "apps/test", "channels", "conveyor.yaml"]
    assert git_bare(repo, "ls-tree", "-r", "--name-only", "candidates/feat/x").split() == (
        CANDIDATE_TREE
    )
    assert git_bare(repo, "rev-parse", "candidates/feat/x^@").split() == [prod]
    message = git_bare(repo, "log", "-1", "--format=%B", "candidates/feat/x")
    assert message.startswith("Release candidate: feat/x\n")
    assert "Conveyor-Candidate-Of: feat/x" in message and f"Source-Commit: {source}" in message
    again = candidates(repo, "render", "--branch", "feat/x")  # CI ran twice for one push
    assert again.exit_code == 0 and again.output.startswith("unchanged: candidates/feat/x")
    assert git_bare(repo, "rev-parse", "candidates/feat/x").strip() == rendered["commit"]
    only = candidates(repo, "render", "--branch", "feat/x", "--paths", "apps/test", "-o", "json")
    assert only.exit_code == 0 and json.loads(only.output)["changed"] is True
    assert git_bare(repo, "ls-tree", "-r", "--name-only", "candidates/feat/x").split() == [
        "apps/test/web.yaml"
    ]


def test_bad_requests_are_refused_with_one_line_and_nothing_pushed(tmp_path: Path) -> None:
    repo = calitp_repo(tmp_path, "web-test", "test")
    before = git_bare(repo, "for-each-ref")
    for args, cause in [
        (["--branch", "releases/prod"], "is a candidate or release branch"),
        (["--branch", "--upload-pack=touch"], "must not start with '-'"),
        (["--branch", "feat x"], "contains a character git refuses in a ref"),
        (["--branch", "gone"], "branch 'gone' does not exist in"),
        (["--branch", "main", "--paths", "../etc"], "must stay inside the repository"),
        (["--branch", "main", "--paths", "apps/staging"], "apps/staging does not exist in main"),
        (["--branch", "main", "--base-channel", "-x"], "channel '-x' must not start with '-'"),
    ]:
        result = candidates(repo, "render", *args)
        assert result.exit_code == 2, (args, result.output)
        assert cause in result.output and len(result.output.strip().splitlines()) == 1, (
            args,
            result.output,
        )
    assert git_bare(repo, "for-each-ref") == before


def test_the_pull_request_diff_is_the_channel_environment_after_the_merge(
    tmp_path: Path,
) -> None:
    repo = calitp_repo(tmp_path, "web-test", "test")
    released(repo)
    push_branch(
        repo, "feat/x", {"apps/test/web.yaml": deployment("web", "web-test", image="web:2")}
    )
    assert candidates(repo, "render", "--branch", "feat/x").exit_code == 0
    comment = tmp_path / "comment.md"
    result = candidates(
        repo, "diff", "--branch", "feat/x", "--channel", "test", "--outfile", str(comment)
    )
    assert result.exit_code == 1, result.output  # changes
    text = comment.read_text()
    assert text.startswith(
        "## conveyor diff: candidates/feat/x into releases/test (environment test, apps/test/)\n"
    )
    assert "update Deployment web-test/web" in text and "web-test-prod" not in text
    assert "-      - image: registry.local/web:1\n+      - image: registry.local/web:2\n" in text
    unchanged = candidates(repo, "diff", "--branch", "main", "--channel", "prod")
    assert unchanged.exit_code == 0 and "No changes." in unchanged.output
    unknown = candidates(repo, "diff", "--branch", "feat/x", "--channel", "staging")
    assert unknown.exit_code == 2
    assert "candidates/feat/x has no channel 'staging' (channels: prod, test)" in unknown.output

    # Someone changed the same line on releases/test: the merge needs a person.
    work = tmp_path / "hotfix"
    run_git(["clone", "--quiet", "--branch", "releases/test", repo.url, str(work)])
    (work / "apps/test/web.yaml").write_text(deployment("web", "web-test", image="web:3"))
    run_git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "web 3"], cwd=work)
    run_git(["push", "--quiet", "origin", "HEAD:releases/test"], cwd=work)
    conflict = candidates(repo, "diff", "--branch", "feat/x", "--channel", "test")
    assert conflict.exit_code == 1
    assert "conflict in apps/test/web.yaml" in conflict.output


def test_prune_removes_the_candidates_of_deleted_branches_only(tmp_path: Path) -> None:
    repo = calitp_repo(tmp_path, "web-test", "test")
    released(repo)
    push_branch(repo, "feat/x", {"README.md": "x\n"})
    push_branch(repo, "feat/y", {"README.md": "y\n"})
    for branch in ("feat/x", "feat/y"):
        assert candidates(repo, "render", "--branch", branch).exit_code == 0
    git_bare(repo, "branch", "candidates/prod-all-1.0", "releases/prod")  # promote's
    git_bare(repo, "branch", "-D", "feat/x")
    dry = candidates(repo, "prune", "--dry-run")
    assert dry.exit_code == 0 and "would delete candidates/feat/x" in dry.output
    assert "candidates/feat/x" in git_bare(repo, "branch", "--list", "candidates/*")
    result = candidates(repo, "prune", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "deleted": ["candidates/feat/x"],
        "kept": ["candidates/prod-all-1.0: not rendered from a branch (a promotion's, kept)"],
    }
    assert git_bare(repo, "branch", "--list", "candidates/*").split() == [
        "candidates/feat/y",
        "candidates/main",
        "candidates/prod-all-1.0",
    ]
    assert candidates(repo, "prune").output.strip().endswith("no candidate branch to prune")


def test_default_paths_leave_out_what_is_inside_another(tmp_path: Path) -> None:
    (tmp_path / "conveyor.yaml").write_text(
        "environments:\n  - {name: all, path: ., branch: releases/all}\n"
    )
    (tmp_path / "src").mkdir()
    assert deployable_paths(tmp_path) == ["."]
    (tmp_path / "conveyor.yaml").write_text(
        "environments:\n  - {name: a, path: apps, branch: releases/a}\n"
        "  - {name: b, path: apps/b, branch: releases/b}\n"
        "  - {name: c, path: elsewhere, branch: main}\n"
    )
    (tmp_path / "apps/b").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    assert deployable_paths(tmp_path) == ["apps", "conveyor.yaml"]
