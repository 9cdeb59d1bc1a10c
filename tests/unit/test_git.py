"""Commit-and-push against real git repositories (bare repos on disk)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conveyor.source.git import (
    Author,
    Checkout,
    GitError,
    RetryPolicy,
    commit_and_push,
    mask_url,
    run_git,
)


@pytest.fixture
def remote(tmp_path: Path) -> str:
    bare = tmp_path / "remote.git"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "main", str(bare)])
    return str(bare)


def write(name: str, text: str):  # type: ignore[no-untyped-def]
    def change(root: Path) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)

    return change


def log(remote: str) -> list[str]:
    out = run_git(["--git-dir", remote, "log", "--format=%s", "main"])
    return out.splitlines()


def test_first_commit_into_empty_repo_then_no_empty_commit(remote: str, tmp_path: Path) -> None:
    checkout = Checkout.open(remote, tmp_path / "wc")
    sha = commit_and_push(
        checkout, write("staging/ui.yaml", "a: 1\n"), message="add ui", author=Author()
    )
    assert sha is not None
    again = commit_and_push(
        checkout, write("staging/ui.yaml", "a: 1\n"), message="same", author=Author()
    )
    assert again is None
    assert log(remote) == ["add ui"]


def test_concurrent_pushes_all_land_exactly_once(remote: str, tmp_path: Path) -> None:
    seed = Checkout.open(remote, tmp_path / "seed")
    commit_and_push(seed, write("README.md", "config\n"), message="init", author=Author())
    errors: list[BaseException] = []

    def publish(i: int) -> None:
        try:
            checkout = Checkout.open(remote, tmp_path / f"wc{i}")
            commit_and_push(
                checkout,
                write(f"staging/app{i}.yaml", f"v: {i}\n"),
                message=f"publish {i}",
                author=Author(),
                retry=RetryPolicy(attempts=30, base_delay=0.05, max_delay=0.5),
            )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    subjects = log(remote)
    assert sorted(subjects) == sorted([f"publish {i}" for i in range(8)] + ["init"])
    final = Checkout.open(remote, tmp_path / "final")
    assert sorted(p.name for p in (final.path / "staging").iterdir()) == [
        f"app{i}.yaml" for i in range(8)
    ]


def test_unreachable_remote_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GitError, match="does-not-exist"):
        Checkout.open(str(tmp_path / "does-not-exist.git"), tmp_path / "wc")


def test_passwords_in_urls_are_masked() -> None:
    assert mask_url("fetch https://ci:s3cret@example.com/x.git") == (
        "fetch https://ci:***@example.com/x.git"
    )
    assert "s3cret" not in str(GitError(["git", "clone", "https://u:s3cret@h/r"], 128, "nope"))


def test_review_branch_is_replaced_and_message_describes_the_change(
    remote: str, tmp_path: Path
) -> None:
    seed = Checkout.open(remote, tmp_path / "seed")
    commit_and_push(seed, write("a.yaml", "v: 1\n"), message="init", author=Author())
    checkout = Checkout.open(remote, tmp_path / "wc")
    done: list[str] = []

    def change(root: Path) -> None:
        (root / "a.yaml").write_text("v: 2\n")
        done.append("v: 1 -> 2")

    first = commit_and_push(
        checkout, change, message=lambda: "; ".join(done), author=Author(), push_branch="review"
    )
    assert log(remote) == ["init"]
    assert run_git(["--git-dir", remote, "log", "--format=%s", "review"]).splitlines() == [
        "v: 1 -> 2",
        "init",
    ]
    # Same proposal again: the branch keeps its commit.
    again = commit_and_push(
        checkout, change, message="other", author=Author(), push_branch="review"
    )
    assert again == first
    # The base moved: the proposal is rebuilt on top of it, still one commit.
    commit_and_push(seed, write("b.yaml", "x: 1\n"), message="base moved", author=Author())
    commit_and_push(checkout, change, message="rebuilt", author=Author(), push_branch="review")
    assert run_git(["--git-dir", remote, "log", "--format=%s", "review"]).splitlines() == [
        "rebuilt",
        "base moved",
        "init",
    ]
