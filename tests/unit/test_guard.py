"""`conveyor guard` on a real repository: who may change which files, commit by commit."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from conveyor.cli.main import app
from conveyor.publish.guard import path_matches
from conveyor.source.git import run_git

runner = CliRunner()
POLICY = """\
guard:
  protected: ["**"]
  allow: ["**/*.md"]
  identities: [cellenics-ci, "*@ci.example.com"]
  readme: https://github.com/hms-dbmi-cellenics/releases#readme
"""


class Repo:
    def __init__(self, path: Path) -> None:
        self.path = path
        run_git(["init", "--quiet", "--initial-branch", "master", str(path)])

    def commit(
        self, files: dict[str, str | None], *, who: str = "Alice", email: str = "alice@example.com"
    ) -> str:
        for name, text in files.items():
            target = self.path / name
            if text is None:
                run_git(["rm", "--quiet", name], cwd=self.path)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            run_git(["add", name], cwd=self.path)
        run_git(
            [
                "-c",
                f"user.name={who}",
                "-c",
                f"user.email={email}",
                "commit",
                "--quiet",
                "-m",
                "change",
            ],
            cwd=self.path,
        )
        return run_git(["rev-parse", "HEAD"], cwd=self.path).strip()

    def branch(self, name: str, start: str = "master") -> None:
        run_git(["checkout", "--quiet", "-b", name, start], cwd=self.path)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    repo = Repo(tmp_path / "releases")
    repo.commit(
        {"conveyor.yaml": POLICY, "README.md": "docs\n", "production/ui.yaml": "a: 1\n"},
        who="cellenics-ci",
    )
    repo.branch("pr")
    return repo


def guard(repo: Repo, *args: str) -> Result:
    return runner.invoke(
        app, ["guard", "--repo", str(repo.path), "--base", "master", "--head", "pr", *args]
    )


def test_protected_file_changed_by_a_person_fails_naming_it(repo: Repo) -> None:
    sha = repo.commit({"production/ui.yaml": "a: 2\n"})
    result = guard(repo)
    assert result.exit_code == 1, result.output
    assert (
        f"production/ui.yaml: protected by '**'; changed by Alice <alice@example.com> ({sha[:7]}), "
        "who may not change it" in result.stdout
    )


def test_readme_change_passes(repo: Repo) -> None:
    repo.commit({"README.md": "better docs\n", "docs/flux.md": "how flux works\n"})
    result = guard(repo)
    assert result.exit_code == 0, result.output
    assert "allowed" in result.stdout


def test_a_later_push_adding_a_protected_file_is_caught(repo: Repo) -> None:
    repo.commit({"README.md": "typo fix\n"})
    assert guard(repo).exit_code == 0
    repo.commit({"staging/api.yaml": "sneaky: true\n"})
    result = guard(repo)
    assert result.exit_code == 1
    assert "staging/api.yaml" in result.stdout
    assert "README.md" not in result.stdout.split("\n", 1)[1]


def test_added_then_removed_file_is_still_caught(repo: Repo) -> None:
    repo.commit({"production/api.yaml": "x: 1\n"})
    repo.commit({"production/api.yaml": None})
    result = guard(repo)
    assert result.exit_code == 1
    assert "production/api.yaml" in result.stdout


def test_allowed_identities_pass(repo: Repo) -> None:
    repo.commit({"production/ui.yaml": "a: 3\n"}, who="bot", email="publisher@ci.example.com")
    assert guard(repo).exit_code == 0
    repo.commit({"production/ui.yaml": "a: 4\n"})
    assert guard(repo, "--actor", "cellenics-ci").exit_code == 0
    assert guard(repo, "--actor", "alice").exit_code == 1


def test_a_pull_request_cannot_loosen_the_policy_that_judges_it(repo: Repo) -> None:
    repo.commit({"conveyor.yaml": POLICY.replace("identities: [", "identities: ['*', ")})
    repo.commit({"production/ui.yaml": "a: 5\n"})
    result = guard(repo)
    assert result.exit_code == 1
    assert "conveyor.yaml" in result.stdout
    assert "production/ui.yaml" in result.stdout


def test_markdown_comment_points_to_the_readme(repo: Repo) -> None:
    repo.commit({"production/ui.yaml": "a: 6\n"})
    result = guard(repo, "--format", "markdown")
    assert result.exit_code == 1
    assert "[README](https://github.com/hms-dbmi-cellenics/releases#readme)" in result.stdout
    assert "| `production/ui.yaml` | `**` | Alice <alice@example.com>" in result.stdout


def test_unknown_revision_is_exit_2(repo: Repo) -> None:
    result = runner.invoke(
        app, ["guard", "--repo", str(repo.path), "--base", "master", "--head", "no-such-branch"]
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "unknown revision" in result.stderr


def test_malformed_policy_is_exit_2(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "r")
    repo.commit({"conveyor.yaml": "guard:\n  protected: 7\n"})
    repo.branch("pr")
    repo.commit({"x.yaml": "1\n"})
    result = guard(repo)
    assert result.exit_code == 2
    assert "master:conveyor.yaml:2: guard.protected: expected a list, got 7" in result.stderr


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("**/*.md", "README.md", True),
        ("**/*.md", "docs/a/b.md", True),
        ("**/*.md", "docs/a/b.yaml", False),
        ("production/**", "production/ui.yaml", True),
        ("production/**", "staging/ui.yaml", False),
        ("*.yaml", "production/ui.yaml", False),
        ("staging-candidates/*/*.yaml", "staging-candidates/ui/refs-pull-1.yaml", True),
    ],
)
def test_globs(pattern: str, path: str, expected: bool) -> None:
    assert path_matches(pattern, path) is expected
