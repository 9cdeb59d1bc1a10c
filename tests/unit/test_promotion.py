"""`conveyor promote`, `approve`, `gate check`, `rollback --no-apply`, `notes` and `hotfix`
on real git repositories (no cluster: plain Deployments render without one)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from conveyor.cli.main import app
from conveyor.source.git import run_git
from tests.queues import Sqs, sqs_fixture  # noqa: F401 -- the fixture

runner = CliRunner()


def deployment(name: str, namespace: str, *, tag: str, replicas: int) -> str:
    return textwrap.dedent(
        f"""\
        # {name} in {namespace}: replicas and namespace belong to this environment.
        apiVersion: apps/v1
        kind: Deployment
        metadata:
          name: {name}
          namespace: {namespace}
        spec:
          replicas: {replicas}
          selector:
            matchLabels: {{app: {name}}}
          template:
            metadata:
              labels: {{app: {name}}}
            spec:
              containers:
                - name: main
                  image: "registry.local/{name}:{tag}"  # the release
        """
    )


class Repo:
    """A bare config repo and a clone that commits to any of its branches."""

    def __init__(self, root: Path, branch: str = "main") -> None:
        self.bare = root / "config.git"
        self.work = root / "work"
        self.default = branch
        run_git(["init", "--quiet", "--bare", "--initial-branch", branch, str(self.bare)])
        run_git(["init", "--quiet", "--initial-branch", branch, str(self.work)])
        run_git(["remote", "add", "origin", str(self.bare)], cwd=self.work)

    @property
    def url(self) -> str:
        return str(self.bare)

    def commit(
        self, files: dict[str, str], *, branch: str | None = None, message: str = "c"
    ) -> str:
        branch = branch or self.default
        if run_git(["branch", "--list", branch], cwd=self.work).strip() or not self.head(branch):
            run_git(["checkout", "--quiet", "-B", branch], cwd=self.work)
        for path, text in files.items():
            target = self.work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        run_git(["add", "--all"], cwd=self.work)
        run_git(
            ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", message],
            cwd=self.work,
        )
        run_git(["push", "--quiet", "origin", f"HEAD:{branch}"], cwd=self.work)
        return self.head(branch)

    def head(self, branch: str | None = None) -> str:
        ref = f"refs/heads/{branch or self.default}"
        return run_git(
            ["--git-dir", str(self.bare), "rev-parse", "--verify", "--quiet", ref], check=False
        ).strip()

    def show(self, path: str, branch: str | None = None) -> str:
        return run_git(["--git-dir", str(self.bare), "show", f"{branch or self.default}:{path}"])

    def subjects(self, branch: str | None = None) -> list[str]:
        return run_git(
            ["--git-dir", str(self.bare), "log", "--format=%s", branch or self.default]
        ).splitlines()


def conveyor_yaml(production_gates: list[dict[str, Any]] | None = None) -> str:
    return yaml.safe_dump(
        {
            "environments": [
                {"name": "staging", "path": "staging"},
                {"name": "production", "path": "production", "gates": production_gates or []},
            ]
        }
    )


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    repo = Repo(tmp_path)
    repo.commit(
        {
            "conveyor.yaml": conveyor_yaml(),
            "staging/web/deploy.yaml": deployment("web", "web-staging", tag="1.2.0", replicas=1),
            "staging/worker/deploy.yaml": deployment("worker", "jobs", tag="0.9.0", replicas=1),
            "production/web/deploy.yaml": deployment("web", "web-prod", tag="1.1.0", replicas=3),
        }
    )
    return repo


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_promotion_copies_the_version_and_keeps_the_target_settings(repo: Repo) -> None:
    before = repo.head()
    result = invoke(
        "promote", "--repo", repo.url, "--from", "staging", "--to", "production", "-o", "json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(a["app"], a["from"], a["to"]) for a in report["apps"]] == [("web", "1.1.0", "1.2.0")]
    assert report["skipped"] == ["worker"]  # production has no worker: its files are its own
    assert report["branch"] == "main" and report["commit"] == repo.head()
    assert repo.subjects()[:2] == ["Promote web 1.2.0 from staging to production", "c"]
    assert run_git(["--git-dir", repo.url, "rev-parse", f"{repo.head()}~1"]).strip() == before
    expected = deployment("web", "web-prod", tag="1.2.0", replicas=3)
    assert repo.show("production/web/deploy.yaml") == expected
    again = invoke("promote", "--repo", repo.url, "--from", "staging", "--to", "production")
    assert again.exit_code == 0 and "nothing to promote" in again.stdout
    assert repo.subjects()[0] == "Promote web 1.2.0 from staging to production"
    assert len(repo.subjects()) == 2


def test_branch_per_tier_promotes_from_development_to_master(tmp_path: Path) -> None:
    repo = Repo(tmp_path, branch="master")
    project = {
        "environments": [
            {"name": "dev", "path": "deployment-config/dev", "branch": "development"},
            {"name": "staging", "path": "deployment-config/staging", "branch": "master"},
            {"name": "production", "path": "deployment-config/production", "branch": "master"},
        ]
    }
    repo.commit(
        {
            "conveyor.yaml": yaml.safe_dump(project),
            "deployment-config/staging/web/web-staging.yaml": deployment(
                "web", "web-staging", tag="development-41", replicas=2
            ),
        }
    )
    repo.commit(
        {
            "deployment-config/dev/web/web-dev.yaml": deployment(
                "web", "web-dev", tag="development-57", replicas=1
            )
        },
        branch="development",
    )
    development = repo.head("development")
    result = invoke("promote", "--repo", repo.url, "--from", "dev", "--to", "staging", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["branch"] == "master"
    staged = repo.show("deployment-config/staging/web/web-staging.yaml", "master")
    assert staged == deployment("web", "web-staging", tag="development-57", replicas=2)
    assert repo.head("development") == development


def test_branch_mode_writes_a_candidate_branch_and_its_diff(repo: Repo, tmp_path: Path) -> None:
    main = repo.head()
    diff = tmp_path / "diff.md"
    args = ["promote", "--repo", repo.url, "--from", "staging", "--to", "production"]
    result = invoke(*args, "--mode", "branch", "--outfile", str(diff))
    assert result.exit_code == 0, result.output
    assert repo.head() == main  # the target branch is untouched until the review merges
    branch = "candidates/production-all-1.2.0"
    assert "registry.local/web:1.2.0" in repo.show("production/web/deploy.yaml", branch)
    text = diff.read_text()
    assert text.startswith(
        "## conveyor diff: Promote web 1.2.0 from staging to production "
        "(candidates/production-all-1.2.0 against main)\n"
    )
    assert "### web\n\nupdate Deployment web-prod/web\n\n```diff\n" in text
    assert (
        "-      - image: registry.local/web:1.1.0\n+      - image: registry.local/web:1.2.0\n"
        in text
    )
    assert "replicas" not in text.split("```diff")[1]
    named = invoke(*args, "--mode", "branch", "--candidate", "web-hotfix", "--app", "web")
    assert named.exit_code == 0, named.output
    assert repo.head("candidates/web-hotfix")


def test_an_exact_version_to_any_environment(repo: Repo) -> None:
    result = invoke(
        "promote", "--repo", repo.url, "--to", "staging", "--app", "web", "--version", "1.3.0-rc.1"
    )
    assert result.exit_code == 0, result.output
    assert repo.subjects()[0] == "Deploy web 1.3.0-rc.1 to staging"
    assert '"registry.local/web:1.3.0-rc.1"  # the release' in repo.show("staging/web/deploy.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--from", "staging", "--to", "prod"],
            "unknown environment 'prod' (known: staging, production)",
        ),
        (
            ["--from", "staging", "--to", "production", "--app", "api"],
            "production has no app 'api'",
        ),
        (
            ["--to", "production", "--version", "1.2 beta"],
            "version '1.2 beta' is not a valid image tag",
        ),
        (["--from", "staging", "--to", "staging"], "--from and --to name the same environment"),
        (["--to", "production"], "give --from ENV (copy its versions) or --version V"),
        (["--from", "staging", "--to", "production", "--gate-timeout", "soon"], "invalid duration"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    repo: Repo, args: list[str], message: str
) -> None:
    before = repo.head()
    result = invoke("promote", "--repo", repo.url, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert repo.head() == before


def test_a_closed_queue_gate_writes_nothing(repo: Repo, sqs: Sqs) -> None:
    gate = {
        "type": "queue-empty",
        "queues": ["jobs"],
        "regions": ["us-west-2"],
        "endpoint-url": sqs.endpoint,
        "timeout": "1h",
    }
    repo.commit({"conveyor.yaml": conveyor_yaml([gate])})
    sqs.create("jobs", "us-west-2")
    sqs.send("us-west-2", "jobs", 2)
    before = repo.head()
    result = invoke(
        "promote",
        "--repo",
        repo.url,
        "--from",
        "staging",
        "--to",
        "production",
        "--gate-timeout",
        "1s",
    )
    assert result.exit_code == 1, result.output
    assert (
        "production: gate queue-empty closed: queue jobs in us-west-2 has 2 messages "
        "(2 waiting, 0 in flight, 0 delayed); nothing was written"
    ) in " ".join(result.stderr.split())
    assert repo.head() == before


def test_approvals_open_the_approval_gate(repo: Repo) -> None:
    repo.commit({"conveyor.yaml": conveyor_yaml([{"type": "approval"}])})
    promote = ["promote", "--repo", repo.url, "--from", "staging", "--to", "production"]
    closed = invoke(*promote)
    assert closed.exit_code == 1
    assert "1.2.0 needs 1 approval(s) for production" in " ".join(closed.stderr.split())
    check = [
        "gate",
        "check",
        "--repo",
        repo.url,
        "--env",
        "production",
        "--version",
        "1.2.0",
        "-o",
        "json",
    ]
    report = invoke(*check)
    assert report.exit_code == 1 and json.loads(report.stdout)["gates"][0]["state"] == "closed"
    approved = invoke(
        "approve", "--repo", repo.url, "--env", "production", "--version", "1.2.0", "--by", "alice"
    )
    assert approved.exit_code == 0, approved.output
    assert repo.subjects()[0] == "Approve 1.2.0 for production (by alice)"
    assert (
        yaml.safe_load(repo.show("approvals/production/1.2.0.yaml"))["approvals"][0]["by"]
        == "alice"
    )
    report = invoke(*check)
    assert report.exit_code == 0
    assert json.loads(report.stdout)["gates"] == [
        {
            "gate": "approval",
            "type": "approval",
            "state": "open",
            "message": "1.2.0 approved by alice",
        }
    ]
    assert invoke(*promote).exit_code == 0
    assert "registry.local/web:1.2.0" in repo.show("production/web/deploy.yaml")


def test_rollback_restores_the_previous_version_and_keeps_later_settings(repo: Repo) -> None:
    path = "production/web/deploy.yaml"
    repo.commit({path: deployment("web", "web-prod", tag="1.2.0", replicas=3)}, message="1.2.0")
    repo.commit({path: deployment("web", "web-prod", tag="1.2.0", replicas=5)}, message="scale")
    repo.commit({path: deployment("web", "web-prod", tag="1.3.0", replicas=5)}, message="1.3.0")
    rollback = ["rollback", "--repo", repo.url, "--env", "production", "--app", "web", "--no-apply"]
    result = invoke(*rollback, "-o", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["from"], report["to"]) == ("1.3.0", "1.2.0")
    assert repo.subjects()[0].startswith("Roll back web in production to 1.2.0 (was 1.3.0; as of ")
    assert without_pin(repo.show(path)) == deployment("web", "web-prod", tag="1.2.0", replicas=5)
    assert report["pin"]["reason"] == "rolled back from 1.3.0 to 1.2.0"
    older = invoke(*rollback, "--to", "1.1.0", "--reason", "1.2.0 leaks memory")
    assert older.exit_code == 0, older.output
    assert without_pin(repo.show(path)) == deployment("web", "web-prod", tag="1.1.0", replicas=5)
    assert 'conveyor.dev/pinned-reason: "1.2.0 leaks memory"' in repo.show(path)
    never = invoke(*rollback, "--to", "0.1.0")
    assert never.exit_code == 2
    assert "web never ran 0.1.0 in production" in never.stderr


PIN_LINES = re.compile(r"^  annotations:\n(    conveyor\.dev/pinned[-a-z]*: .*\n)+", re.M)


def without_pin(text: str) -> str:
    """The file without the annotations block a rollback's pin added."""
    return PIN_LINES.sub("", text)


def test_rollback_pins_until_unpin_or_a_promotion_lifts_it(repo: Repo) -> None:
    path = "production/web/deploy.yaml"
    repo.commit({path: deployment("web", "web-prod", tag="1.2.0", replicas=3)}, message="1.2.0")
    rollback = invoke(
        "rollback",
        "--repo",
        repo.url,
        "--env",
        "production",
        "--app",
        "web",
        "--no-apply",
        "--author-name",
        "alice",
    )
    assert rollback.exit_code == 0, rollback.output
    assert "pinned by alice at " in rollback.stdout
    shown = repo.show(path)
    assert 'conveyor.dev/pinned: "true"' in shown and 'conveyor.dev/pinned-by: "alice"' in shown
    assert re.search(r'conveyor.dev/pinned-at: "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"', shown)

    unpin = ["unpin", "web", "--repo", repo.url, "--env", "production", "--author-name", "bob"]
    lifted = invoke(*unpin, "-o", "json")
    assert lifted.exit_code == 0, lifted.output
    report = json.loads(lifted.stdout)
    assert (report["pin"]["by"], report["files"]) == ("alice", [path])
    assert repo.show(path) == deployment("web", "web-prod", tag="1.1.0", replicas=3)
    body = run_git(["--git-dir", repo.url, "log", "-1", "--format=%s%n%b%an", "main"])
    assert body.splitlines() == [
        "Unpin web in production (pinned by alice): image automation follows it again",
        "Conveyor-Change: unpin",
        "bob",
    ]
    heads = repo.head()
    again = invoke(*unpin)
    assert again.exit_code == 0 and "web in production is not pinned" in again.stdout
    assert repo.head() == heads  # no empty commit

    # A promotion into production lifts a pin, unless --keep-pin. (`--to` the version
    # it runs pins it where it is.)
    rollback = ["rollback", "--repo", repo.url, "--env", "production", "--app", "web"]
    pinned = invoke(*rollback, "--no-apply", "--to", "1.1.0")
    assert pinned.exit_code == 0, pinned.output
    assert "conveyor.dev/pinned" in repo.show(path)
    promote = ["promote", "--repo", repo.url, "--from", "staging", "--to", "production"]
    kept = invoke(*promote, "--keep-pin")
    assert kept.exit_code == 0, kept.output
    assert "kept (--keep-pin)" in kept.stdout
    assert without_pin(repo.show(path)) == deployment("web", "web-prod", tag="1.2.0", replicas=3)
    assert "conveyor.dev/pinned" in repo.show(path)
    assert invoke(*rollback, "--no-apply").exit_code == 0  # back to 1.1.0, pinned again
    promoted = invoke(*promote, "-o", "json")
    assert promoted.exit_code == 0, promoted.output
    [web] = json.loads(promoted.stdout)["apps"]
    assert (web["pin"]["by"], web["unpinned"]) == ("conveyor", True)
    assert repo.show(path) == deployment("web", "web-prod", tag="1.2.0", replicas=3)
    message = run_git(["--git-dir", repo.url, "log", "-1", "--format=%B", "main"])
    assert "Lifts the pin on web (pinned by conveyor at " in message
    assert message.rstrip().endswith("Conveyor-Change: promotion")


def test_unpin_bad_input_is_one_line(repo: Repo) -> None:
    result = invoke("unpin", "nosuch", "--repo", repo.url, "--env", "production")
    assert result.exit_code == 2
    assert "production has no app 'nosuch' (has: web)" in result.stderr


def app_repo(root: Path) -> Path:
    repo = root / "unileaf"
    run_git(["init", "--quiet", "--initial-branch", "main", str(repo)])

    def commit(message: str, file: str = "app.py") -> None:
        (repo / file).write_text(
            (repo / file).read_text() + message + "\n" if (repo / file).exists() else message + "\n"
        )
        run_git(["add", "--all"], cwd=repo)
        run_git(
            ["-c", "user.name=Dev", "-c", "user.email=d@x", "commit", "--quiet", "-m", message],
            cwd=repo,
        )

    commit("first release")
    run_git(["tag", "v1.0.0"], cwd=repo)
    run_git(["checkout", "--quiet", "-b", "alice/retries"], cwd=repo)
    commit("retry failed jobs", "jobs.py")
    commit("test retries", "jobs.py")
    run_git(["checkout", "--quiet", "main"], cwd=repo)
    run_git(
        [
            "-c",
            "user.name=GitHub",
            "-c",
            "user.email=g@x",
            "merge",
            "--no-ff",
            "--quiet",
            "-m",
            "Merge pull request #12 from alice/retries\n\nRetry failed jobs",
            "alice/retries",
        ],
        cwd=repo,
    )
    commit("Show queue depth (#13)", "ui.py")
    commit("fix typo in README", "README.md")
    run_git(["tag", "v1.1.0"], cwd=repo)
    commit("unreleased work")
    return repo


def test_notes_list_pull_requests_and_direct_commits(tmp_path: Path) -> None:
    repo = app_repo(tmp_path)
    result = invoke("notes", "--repo", str(repo), "--from", "v1.0.0", "--to", "v1.1.0")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:7] == [
        "## Changes from v1.0.0 to v1.1.0",
        "",
        "### Pull requests",
        "",
        "- #12 Retry failed jobs (alice/retries)",
        "- #13 Show queue depth",
        "",
    ]
    assert lines[7:10] == ["### Commits", "", lines[9]]
    assert lines[9].endswith(" fix typo in README (Dev)")
    assert lines[-1].startswith("2 pull requests, 1 other commits (")
    empty = invoke("notes", "--repo", str(repo), "--from", "v1.1.0", "--to", "v1.1.0")
    assert "No changes between v1.1.0 and v1.1.0." in empty.stdout
    bad = invoke("notes", "--repo", str(repo), "--from", "v0.9", "--to", "v1.1.0")
    assert bad.exit_code == 2 and "unknown revision" in bad.stderr


def test_hotfix_branch_from_the_release_tag(tmp_path: Path) -> None:
    repo = app_repo(tmp_path)
    origin = tmp_path / "origin.git"
    run_git(["init", "--quiet", "--bare", str(origin)])
    run_git(["remote", "add", "origin", str(origin)], cwd=repo)
    result = invoke("hotfix", "start", "--repo", str(repo), "--from-tag", "v1.1.0", "--push")
    assert result.exit_code == 0, result.output
    tag = run_git(["rev-parse", "v1.1.0^{commit}"], cwd=repo).strip()
    assert run_git(["rev-parse", "hotfix/v1.1.0"], cwd=repo).strip() == tag
    assert run_git(["--git-dir", str(origin), "rev-parse", "hotfix/v1.1.0"]).strip() == tag
    assert run_git(["branch", "--show-current"], cwd=repo).strip() == "main"  # left alone
    assert "--version v1.1.1" in " ".join(result.stdout.split())
    again = invoke("hotfix", "start", "--repo", str(repo), "--from-tag", "v1.1.0")
    assert again.exit_code == 2 and "branch hotfix/v1.1.0 exists already" in again.stderr
    missing = invoke("hotfix", "start", "--repo", str(repo), "--from-tag", "v9.9.9")
    assert missing.exit_code == 2 and "no tag 'v9.9.9'" in missing.stderr
