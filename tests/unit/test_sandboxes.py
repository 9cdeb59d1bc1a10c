"""Staging sandboxes on real git repositories (no cluster): the file `stage` commits, its
refusals, concurrent stages, hooks, unstage, expiry and auto mode's commits, and how
discovery names a sandbox's apps beside the shared ones."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conveyor.cli.main import app as cli
from conveyor.config.project import ConfigError, Sandboxes, parse_project
from conveyor.promote.pipeline import Workspace
from conveyor.render.discover import discover
from conveyor.sandboxes.candidates import SandboxError, check_id, default_id, parse_choices
from conveyor.sandboxes.hooks import HookFailed
from conveyor.sandboxes.housekeeping import plan_actions, run_housekeeping
from conveyor.sandboxes.stage import (
    StageRequest,
    StageResult,
    extend,
    list_sandboxes,
    now,
    stage,
    unstage,
)
from conveyor.source.git import UnsafeGitArgument, remote_commit, run_git
from tests.cellenics import CellenicsRepo, cellenics_repo


@pytest.fixture
def repo(tmp_path: Path) -> CellenicsRepo:
    return cellenics_repo(tmp_path / "repos")


def head(repo: CellenicsRepo) -> str:
    return run_git(["rev-parse", "master"], cwd=repo.config.bare).strip()


def workspace(repo: CellenicsRepo, tmp_path: Path) -> Workspace:
    """A fresh working copy for one operation, as each command has."""
    folder = tmp_path / f"ws-{len(list(tmp_path.glob('ws-*')))}"
    return Workspace(repo.url, folder)


def run_stage(
    repo: CellenicsRepo,
    tmp_path: Path,
    *specs: str,
    sandbox_id: str | None = None,
    ttl: str | None = None,
) -> StageResult:
    request = StageRequest(specs=list(specs), user="alice", sandbox_id=sandbox_id, ttl=ttl)
    return stage(workspace(repo, tmp_path), request)


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def releases(text: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents(text) if d["kind"] == "HelmRelease"}


def test_stage_commits_one_file_with_pins_chart_refs_and_images(
    repo: CellenicsRepo, tmp_path: Path
) -> None:
    result = run_stage(repo, tmp_path, "api/42", "ui/my-branch", sandbox_id="pr42", ttl="1h")
    assert result.file == "staging/pr42.yaml"
    log = run_git(["log", "--format=%s", "-1", "master"], cwd=repo.config.bare).strip()
    assert log == (
        "Stage sandbox pr42: ui refs-heads-my-branch, api refs-pull-42-merge, "
        "worker refs-heads-master (pinned: worker)"
    )
    text = run_git(["show", "master:staging/pr42.yaml"], cwd=repo.config.bare)
    objects = documents(text)
    assert all(o["metadata"]["labels"]["conveyor.dev/sandbox"] == "pr42" for o in objects)
    namespaces = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    assert namespaces == ["ui-pr42", "api-pr42", "worker-pr42"]
    found = releases(text)
    # ui follows its branch (Flux v1 chart.ref), api its pull request (v2 GitRepository)
    assert found["ui"]["spec"]["chart"]["ref"] == "my-branch"
    assert found["ui"]["metadata"]["annotations"]["fluxcd.io/automated"] == "true"
    assert found["ui"]["spec"]["values"]["image"]["tag"] == "my-branch-1"
    assert found["ui"]["spec"]["values"]["rdsSandboxId"] == "default"
    repositories = {o["metadata"]["name"]: o for o in objects if o["kind"] == "GitRepository"}
    assert repositories["api"]["spec"]["ref"] == {"name": "refs/pull/42/merge"}
    assert found["api"]["spec"]["values"]["image"]["tag"] == "pr-42-1"
    # worker, on the default branch, is pinned: chart at the SHA, automation off
    assert repositories["worker"]["spec"]["ref"] == {"commit": repo.shas["refs/heads/master"]}
    assert found["worker"]["metadata"]["annotations"]["conveyor.dev/pinned"] == "true"
    assert '{"$imagepolicy": "worker-pr42:worker:tag"}' in text  # the setter comment kept
    _, (sandbox,) = list_sandboxes(workspace(repo, tmp_path))
    assert sandbox.id == "pr42" and sandbox.staged_by == "alice"
    assert sandbox.expires_at is not None
    assert {a.app: (a.pinned, a.chart_ref) for a in sandbox.apps} == {
        "ui": (False, "my-branch"),
        "api": (False, "refs/pull/42/merge"),
        "worker": (True, repo.shas["refs/heads/master"]),
    }


def test_pins_follow_the_options_and_rds(repo: CellenicsRepo, tmp_path: Path) -> None:
    dry = stage(
        workspace(repo, tmp_path),
        StageRequest(
            specs=["api/42", "ui/my-branch"],
            user="alice",
            sandbox_id="pins",
            pin=["api", "ui"],
            no_pin=["worker"],
            with_rds=True,
        ),
        dry_run=True,
    )
    found = releases(dry.text)
    assert found["ui"]["spec"]["chart"]["ref"] == repo.shas["refs/heads/my-branch"]
    assert found["ui"]["metadata"]["annotations"]["fluxcd.io/automated"] == "false"
    assert found["ui"]["spec"]["values"]["rdsSandboxId"] == "pins"
    repositories = {
        o["metadata"]["name"]: o for o in documents(dry.text) if o["kind"] == "GitRepository"
    }
    assert repositories["api"]["spec"]["ref"] == {"commit": repo.shas["refs/pull/42/merge"]}
    assert repositories["worker"]["spec"]["ref"] == {"branch": "master"}
    assert dry.commit is None
    assert not (repo.config.work / "staging" / "pins.yaml").exists()


@pytest.mark.parametrize(
    ("specs", "sandbox_id", "message"),
    [
        (["api/42"], "Bad_ID", "must be lower-case letters"),
        (["api/42"], "a" * 27, "27 characters long; at most 26"),
        (["api/42"], "-x", "must be lower-case letters"),
        (["api/42"], "api", "is taken"),  # staging/api.yaml, the shared api
        (["api/42"], "default", "shared environment's namespaces"),
        (
            ["api/43", "ui/nope"],
            "x1",
            "no candidate staging-candidates/api/refs-pull-43-merge.yaml",
        ),
        (["db/1"], None, "unknown app 'db'"),
        (["ui/bad..ref"], None, "not a valid ref name"),
    ],
)
def test_refusals_write_nothing(
    repo: CellenicsRepo, tmp_path: Path, specs: list[str], sandbox_id: str | None, message: str
) -> None:
    before = head(repo)
    with pytest.raises(
        SandboxError, match=message.replace("(", r"\(").replace(".", r"\.")
    ) as caught:
        run_stage(repo, tmp_path, *specs, sandbox_id=sandbox_id)
    if specs[0] == "api/43":  # every missing candidate is named, with its file
        assert "ui: no candidate staging-candidates/ui/refs-heads-nope.yaml" in str(caught.value)
    assert head(repo) == before


def test_a_duplicate_id_is_refused(repo: CellenicsRepo, tmp_path: Path) -> None:
    run_stage(repo, tmp_path, "api/42", sandbox_id="twice")
    before = head(repo)
    with pytest.raises(SandboxError, match="sandbox ID 'twice' is taken"):
        run_stage(repo, tmp_path, "ui/my-branch", sandbox_id="twice")
    assert head(repo) == before


def test_two_stages_at_once_both_land_with_distinct_ids(
    repo: CellenicsRepo, tmp_path: Path
) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def one(index: int) -> None:
        try:
            barrier.wait()
            staged = stage(
                Workspace(repo.url, tmp_path / f"race-{index}"),
                StageRequest(specs=["api/42"], user="alice"),
            )
            results.append(staged.sandbox_id)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(results) == ["alice-api42", "alice-api42-2"]
    files = run_git(["ls-tree", "--name-only", "master", "staging/"], cwd=repo.config.bare)
    assert "staging/alice-api42.yaml" in files and "staging/alice-api42-2.yaml" in files


def test_hooks_get_the_id_and_a_failing_one_stops_everything(
    repo: CellenicsRepo, tmp_path: Path
) -> None:
    marker = tmp_path / "created"
    repo.config.write(
        "conveyor.yaml",
        (repo.config.work / "conveyor.yaml").read_text()
        + f"  hooks:\n    create:\n      - [sh, -c, 'echo $SANDBOX_ID > {marker}']\n"
        + "      - [sh, -c, 'echo no database for $SANDBOX_ID; exit 3']\n",
    )
    repo.config.commit("hooks")
    before = head(repo)
    with pytest.raises(
        HookFailed, match=r"failed \(3\); nothing was committed:\nno database for hk"
    ):
        run_stage(repo, tmp_path, "api/42", sandbox_id="hk")
    assert marker.read_text().strip() == "hk"
    assert head(repo) == before


def test_unstage_and_extend_are_one_commit_each(repo: CellenicsRepo, tmp_path: Path) -> None:
    run_stage(repo, tmp_path, "api/42", sandbox_id="gone", ttl="1h")
    expires = extend(workspace(repo, tmp_path), "gone", "48h")
    assert expires is not None and expires > (now() + timedelta(hours=47)).isoformat()
    assert 'conveyor.dev/expires-at: "' + expires in run_git(
        ["show", "master:staging/gone.yaml"], cwd=repo.config.bare
    )
    with pytest.raises(SandboxError, match="no sandbox nope in staging"):
        unstage(workspace(repo, tmp_path), ["nope"])
    result = unstage(workspace(repo, tmp_path), ["gone"])
    assert result.commit == head(repo)
    files = run_git(["ls-tree", "--name-only", "master", "staging/"], cwd=repo.config.bare)
    assert "staging/gone.yaml" not in files and "staging/api.yaml" in files


def test_the_agent_expires_and_runs_auto_mode_through_commits(
    repo: CellenicsRepo, tmp_path: Path
) -> None:
    config = Sandboxes.model_validate({"apps": ["ui", "api", "worker"], "auto": True})
    run_stage(repo, tmp_path, "ui/my-branch", sandbox_id="old", ttl="1s")

    def housekeeping() -> list[str]:
        checkout = tmp_path / "agent"
        if checkout.exists():
            run_git(["pull", "--quiet"], cwd=checkout)
        else:
            run_git(["clone", "--quiet", repo.url, str(checkout)])
        return run_housekeeping(
            repo.url,
            tmp_path / "agent-ws",
            env="staging",
            env_path="staging",
            checkout_root=checkout,
            config=config,
        )

    later = now() + timedelta(seconds=5)
    repo.pull()
    actions = plan_actions(repo.config.work, "staging", config, at=later)
    assert [(a.kind, a.sandbox_id) for a in actions] == [("expire", "old"), ("stage", "pr-42-api")]
    time.sleep(1.2)
    assert len(housekeeping()) == 2
    subjects = run_git(["log", "--format=%s", "-2", "master"], cwd=repo.config.bare).splitlines()
    assert subjects[1].startswith("Unstage sandbox old (expired at ")
    assert subjects[0].startswith(
        "Stage sandbox pr-42-api: ui refs-heads-master, api refs-pull-42-merge"
    )
    assert housekeeping() == []  # nothing more to do
    repo.pull()
    repo.candidate("api", "refs/pull/42/merge", tag="pr-42-2")
    repo.config.commit("api PR 42 pushed again")
    assert len(housekeeping()) == 1
    assert run_git(["log", "--format=%s", "-1", "master"], cwd=repo.config.bare).startswith(
        "Restage sandbox pr-42-api"
    )
    text = run_git(["show", "master:staging/pr-42-api.yaml"], cwd=repo.config.bare)
    assert releases(text)["api"]["spec"]["values"]["image"]["tag"] == "pr-42-2"
    repo.pull()
    repo.config.remove("staging-candidates/api/refs-pull-42-merge.yaml")
    repo.config.commit("PR 42 closed")
    assert len(housekeeping()) == 1
    assert run_git(["log", "--format=%s", "-1", "master"], cwd=repo.config.bare).strip() == (
        "Unstage sandbox pr-42-api (its candidate was removed)"
    )


def test_discovery_names_sandbox_apps_with_their_namespace(
    repo: CellenicsRepo, tmp_path: Path
) -> None:
    before = {a.name for a in discover(repo.config.work, "staging").apps}
    assert before == {"api"}
    run_stage(repo, tmp_path, "api/42", sandbox_id="s1")
    repo.pull()
    apps = {a.name: a for a in discover(repo.config.work, "staging").apps}
    # The shared api keeps its name (and its ConveyorApp): no prune and reinstall.
    assert set(apps) == {"api", "ui-s1", "api-s1", "worker-s1"}
    assert all(a.error is None for a in apps.values())
    assert apps["api"].path == "staging/api.yaml"
    # each app of the sandbox's file owns its own namespace
    for app in ("ui", "api", "worker"):
        kinds = [(d.kind, d.name) for d in apps[f"{app}-s1"].documents]
        assert ("Namespace", f"{app}-s1") in kinds
        assert all(name == f"{app}-s1" for kind, name in kinds if kind == "Namespace")


def test_two_shared_releases_of_one_name_are_both_apps(tmp_path: Path) -> None:
    env = tmp_path / "staging"
    for team in ("a", "b"):
        (env / team).mkdir(parents=True)
        (env / team / "api.yaml").write_text(
            "apiVersion: helm.toolkit.fluxcd.io/v2\nkind: HelmRelease\n"
            f"metadata: {{name: api, namespace: team-{team}}}\n"
            "spec:\n  chart:\n    spec:\n      chart: service\n"
            "      sourceRef: {kind: HelmRepository, name: charts}\n"
        )
    apps = discover(tmp_path, "staging").apps
    # the first keeps the name it always had; the other is named with its namespace
    assert [(a.name, a.error) for a in apps] == [("api", None), ("api-team-b", None)]


def test_ids_and_choices() -> None:
    config = Sandboxes()
    choices = parse_choices(["api/42", "ui/feat/x"], config)
    assert [(c.app, c.ref) for c in choices] == [
        ("ui", "refs/heads/feat/x"),
        ("api", "refs/pull/42/merge"),
        ("worker", "refs/heads/master"),
        ("pipeline", "refs/heads/master"),
    ]
    assert choices[0].candidate(config) == "staging-candidates/ui/refs-heads-feat-x.yaml"
    made = default_id("alice", choices, taken=())
    assert made == "alice-ui-feat-x-api42"
    long = default_id(
        "alice", parse_choices(["ui/a-very-long-branch-name-indeed"], config), taken=()
    )
    assert len(long) <= 26 and long.startswith("alice-")
    assert check_id(made) == made
    with pytest.raises(SandboxError, match="already taken from"):
        parse_choices(["api/1", "api/2"], config)


def test_the_cli_refuses_with_one_clear_message_and_writes_nothing(
    repo: CellenicsRepo, tmp_path: Path
) -> None:
    run_stage(repo, tmp_path, "api/42", sandbox_id="taken")
    before = head(repo)
    cases = {
        ("ui/my-branch", "--id", "Not_OK"): "must be lower-case letters",
        ("ui/my-branch", "--id", "x" * 27): "27 characters long; at most 26",
        ("ui/my-branch", "--id", "taken"): "sandbox ID 'taken' is taken",
        (
            "api/999",
            "--id",
            "fine",
        ): "api: no candidate staging-candidates/api/refs-pull-999-merge.yaml",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(cli, ["stage", *args, "--repo", repo.url], terminal_width=250)
        assert result.exit_code == 2, result.output
        assert message in result.stderr, result.stderr
    assert head(repo) == before
    listed = CliRunner().invoke(cli, ["stage", "list", "--repo", repo.url, "-o", "json"])
    assert [s["id"] for s in json.loads(listed.stdout)] == ["taken"]


def test_an_upgrade_renames_no_app_of_an_existing_installation(tmp_path: Path) -> None:
    """Where names were unique (every installation: duplicates were refused), each app
    keeps the name its ConveyorApp `<scope>.<name>` was stored under."""
    fixtures = Path(__file__).parent.parent / "fixtures" / "images"
    names = {
        env: [a.name for a in discover(fixtures, env).apps] for env in ("production", "staging")
    }
    assert names == {"production": ["ui", "worker"], "staging": ["api", "docs", "ui"]}
    # The first of two releases named alike keeps the name it had when the second was
    # refused; the second now runs too, under its own.
    env = tmp_path / "staging"
    env.mkdir()
    for file, namespace in (("a.yaml", "api-default"), ("b.yaml", "team-b")):
        (env / file).write_text(
            "apiVersion: helm.fluxcd.io/v1\nkind: HelmRelease\n"
            f"metadata: {{name: api, namespace: {namespace}}}\n"
            "spec: {releaseName: api, chart: {git: 'https://example.test/c.git', path: c}}\n"
        )
    assert [a.name for a in discover(tmp_path, "staging").apps] == ["api", "api-team-b"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("  ttl: 3 days\n", "conveyor.yaml:2: sandboxes.ttl: invalid duration '3 days'"),
        ("  namespace: shared\n", "conveyor.yaml:2: sandboxes.namespace: the namespace template"),
        ("  hooks:\n    create: [[]]\n", "conveyor.yaml:3: sandboxes.hooks.create: a hook is"),
        ("  candidates: ../elsewhere\n", "must stay inside the repository"),
    ],
)
def test_a_bad_sandboxes_section_names_file_line_and_field(section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_project(f"sandboxes:\n{section}", source="conveyor.yaml")


def test_remote_commit_is_the_commit_a_branch_tag_or_ref_names(tmp_path: Path) -> None:
    work = tmp_path / "charts"
    run_git(["init", "--quiet", "--initial-branch", "master", str(work)])

    def commit(message: str) -> str:
        run_git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty",
                 "-m", message], cwd=work)  # fmt: skip
        return run_git(["rev-parse", "HEAD"], cwd=work).strip()

    first = commit("first")
    run_git(["-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "v1", "-m", "v1"], cwd=work)
    run_git(["branch", "feature/x"], cwd=work)
    second = commit("second")
    run_git(["branch", "x"], cwd=work)
    url = work.as_uri()
    found = {ref: remote_commit(url, ref) for ref in ("master", "x", "feature/x", "v1", "nope")}
    # `x` is the branch x, not feature/x (which ls-remote's pattern matches as well)
    assert found == {"master": second, "x": second, "feature/x": first, "v1": first, "nope": None}
    with pytest.raises(UnsafeGitArgument):
        remote_commit(url, "--upload-pack=touch /tmp/owned")
