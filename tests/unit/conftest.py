"""Fixtures for the CI-side tests: real bare git repositories and the example apps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conveyor.source.git import Author, Checkout, commit_and_push, run_git

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_APPS = ROOT / "examples" / "apps"
CI_PREFIXES = ("GITHUB_", "CF_", "CI_", "GITLAB_")


@pytest.fixture
def no_ci_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment without any CI system's variables (tests set the ones they mean)."""
    for key in list(os.environ):
        if key.startswith(CI_PREFIXES) or key == "GITHUB_ACTIONS":
            monkeypatch.delenv(key)
    return dict(os.environ)


@pytest.fixture
def config_remote(tmp_path: Path) -> Path:
    """A bare config repo on disk whose `master` holds a README."""
    bare = tmp_path / "releases.git"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "master", str(bare)])
    seed = Checkout.open(str(bare), tmp_path / "seed", branch="master")

    def readme(root: Path) -> None:
        (root / "README.md").write_text("Populated by CI; see below.\n")

    commit_and_push(seed, readme, message="init", author=Author())
    return bare


def copy_app(name: str, destination: Path) -> Path:
    target = destination / name
    shutil.copytree(EXAMPLE_APPS / name, target)
    return target


def remote_subjects(bare: Path, branch: str = "master") -> list[str]:
    return run_git(["--git-dir", str(bare), "log", "--format=%s", branch]).splitlines()


def remote_file(bare: Path, path: str, branch: str = "master") -> str:
    return run_git(["--git-dir", str(bare), "show", f"{branch}:{path}"])
