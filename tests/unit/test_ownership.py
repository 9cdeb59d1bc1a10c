"""Environment identities: one spelling per repository, stable ids, conflicts named."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.cluster.apply import labelled
from conveyor.cluster.ownership import (
    ADOPT_ANNOTATION,
    OWNER_LABEL,
    SOURCE_ANNOTATION,
    EnvironmentIdentity,
    adoption_requested,
    foreign_owner,
    normalise_repository_url,
    owner_of,
)


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/acme/config.git",
        "https://GitHub.com/acme/config/",
        "git@github.com:acme/config.git",
        "ssh://git@github.com/acme/config",
        "https://user:token@github.com/acme/config.git",
    ],
)
def test_spellings_of_one_repository_normalise_alike(url: str) -> None:
    assert normalise_repository_url(url) == "github.com/acme/config"


def test_local_paths_and_file_urls_are_one_repository(tmp_path: Path) -> None:
    bare = tmp_path / "config.git"
    assert normalise_repository_url(str(bare)) == normalise_repository_url(f"file://{bare}")


def test_identity_differs_by_repository_branch_path_and_name() -> None:
    base = EnvironmentIdentity.of("https://h/a/config", branch="main", path="staging", name="s")
    others = [
        EnvironmentIdentity.of("https://h/b/config", branch="main", path="staging", name="s"),
        EnvironmentIdentity.of("https://h/a/config", branch="dev", path="staging", name="s"),
        EnvironmentIdentity.of("https://h/a/config", branch="main", path="prod", name="s"),
        EnvironmentIdentity.of("https://h/a/config", branch="main", path="staging", name="p"),
    ]
    assert len({base.id, *(o.id for o in others)}) == 5
    assert len(base.id) == 16
    same = EnvironmentIdentity.of("git@h:a/config.git", branch="main", path="./staging/", name="s")
    assert same.id == base.id


def test_source_parses_back_to_the_identity() -> None:
    identity = EnvironmentIdentity.of(
        "https://h:8443/a/config", branch="release/1.x", path="envs/prod", name="production"
    )
    assert EnvironmentIdentity.parse(identity.source) == identity
    assert EnvironmentIdentity.parse("not a source") is None


def test_labelled_objects_carry_the_identity_and_drop_the_adopt_request() -> None:
    identity = EnvironmentIdentity.of("/srv/config.git", branch="main", path="staging", name="s")
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "annotations": {ADOPT_ANNOTATION: "abc", "keep": "1"}},
    }
    out = labelled(obj, app="web", identity=identity, scope="s")
    assert out["metadata"]["labels"][OWNER_LABEL] == identity.id
    assert out["metadata"]["annotations"] == {"keep": "1", SOURCE_ANNOTATION: identity.source}
    assert ADOPT_ANNOTATION in obj["metadata"]["annotations"]  # the input is not changed


def test_foreign_owner_and_adoption() -> None:
    mine = EnvironmentIdentity.of("/a", branch="main", path="staging", name="staging")
    theirs = EnvironmentIdentity.of("/b", branch="main", path="staging", name="staging")
    live = labelled(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}},
        app="x",
        identity=theirs,
        scope="staging",
    )
    owner = foreign_owner(live, mine)
    assert owner is not None and owner.id == theirs.id and owner.source == theirs.source
    assert foreign_owner(live, theirs) is None
    assert foreign_owner({"metadata": {"name": "c"}}, mine) is None  # nobody's: claimable
    assert owner_of({"metadata": {"labels": ["not", "a", "map"]}}) is None

    in_git: dict[str, object] = {"metadata": {"annotations": {ADOPT_ANNOTATION: theirs.source}}}
    assert adoption_requested(in_git, owner, requested=None)
    assert adoption_requested({"metadata": {}}, owner, requested=theirs.id)
    assert not adoption_requested({"metadata": {}}, owner, requested=None)
    assert not adoption_requested({"metadata": {}}, owner, requested=mine.id)
