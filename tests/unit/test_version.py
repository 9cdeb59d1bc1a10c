"""`conveyor version`: each CI system's variables give the teams' versions and targets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conveyor.cli.main import app
from conveyor.config.publish_profile import Scheme
from conveyor.publish.version import Event, VersionError, detect_context, plan_build

SHA = "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39"
HEAD = "aaaabbbbccccddddeeeeffff0000111122223333"
runner = CliRunner()


def github(ref: str, event: str, **extra: str) -> dict[str, str]:
    return {
        "GITHUB_ACTIONS": "true",
        "GITHUB_REF": ref,
        "GITHUB_SHA": SHA,
        "GITHUB_EVENT_NAME": event,
        "GITHUB_REPOSITORY": "hms-dbmi-cellenics/ui",
        "GITHUB_SERVER_URL": "https://github.com",
        **extra,
    }


def test_github_push_to_master_is_staging_and_a_candidate() -> None:
    context = detect_context(github("refs/heads/master", "push"))
    build = plan_build(context, Scheme.ref_id, app="ui")
    assert build.version == f"refs-heads-master-{SHA}"
    assert build.environments == ("staging", "staging-candidates")
    assert context.commit_url == f"https://github.com/hms-dbmi-cellenics/ui/commit/{SHA}"
    assert context.repository == "ui"


def test_github_push_with_timestamp() -> None:
    context = detect_context(github("refs/heads/master", "push"))
    build = plan_build(context, Scheme.ref_id, app="ui", timestamp=1700000000)
    assert build.version == f"refs-heads-master-{SHA}-1700000000"


def test_github_pull_request_uses_the_head_commit_from_the_event(tmp_path: Path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 12, "head": {"sha": HEAD}}}))
    env = github("refs/pull/12/merge", "pull_request", GITHUB_EVENT_PATH=str(event))
    build = plan_build(detect_context(env), Scheme.ref_id, app="ui", timestamp=1700000000)
    assert build.version == f"refs-pull-12-merge-{HEAD}"  # no timestamp on a pull request
    assert build.environments == ("staging-candidates",)


def test_github_release_is_the_semver_tag_to_production() -> None:
    build = plan_build(
        detect_context(github("refs/tags/1.4.0", "release")), Scheme.ref_id, app="ui"
    )
    assert (build.version, build.environments) == ("1.4.0", ("production",))


def test_github_push_to_a_feature_branch_is_only_a_candidate() -> None:
    build = plan_build(
        detect_context(github("refs/heads/feature/new-plot", "push")), Scheme.ref_id, app="ui"
    )
    assert build.version == f"refs-heads-feature-new-plot-{SHA}"
    assert build.environments == ("staging-candidates",)


def test_codefresh_main_merge_and_release_follow_unileaf() -> None:
    merge = {
        "CF_BUILD_ID": "1",
        "CF_REVISION": SHA,
        "CF_SHORT_REVISION": SHA[:7],
        "CF_BRANCH": "main",
    }
    build = plan_build(detect_context(merge), Scheme.short_sha, app="unileaf")
    assert (build.version, build.environments) == (SHA[:7], ("dev",))
    release = {**merge, "CF_RELEASE_TAG": "v2.3.1"}
    build = plan_build(detect_context(release), Scheme.short_sha, app="unileaf")
    # The release's image tag: the git tag without its `v` (`image_tag`), the same
    # version that promote, gate check and approve use for `v2.3.1` or `2.3.1`.
    assert (build.version, build.environments) == ("2.3.1", ("staging",))
    assert detect_context(release).system == "codefresh"


def test_codefresh_short_revision_alone_is_enough() -> None:
    env = {"CF_SHORT_REVISION": SHA[:7], "CF_BRANCH": "main"}
    build = plan_build(detect_context(env), Scheme.short_sha, app="unileaf")
    assert build.version == SHA[:7]


def test_gitlab_push_tag_and_merge_request() -> None:
    base = {"GITLAB_CI": "true", "CI_COMMIT_SHA": SHA, "CI_PROJECT_NAME": "api"}
    push = detect_context({**base, "CI_COMMIT_REF_NAME": "main", "CI_PIPELINE_SOURCE": "push"})
    assert plan_build(push, Scheme.short_sha, app="api").environments == ("dev",)
    tag = detect_context({**base, "CI_COMMIT_TAG": "0.9.0", "CI_COMMIT_REF_NAME": "0.9.0"})
    assert plan_build(tag, Scheme.ref_id, app="api").version == "0.9.0"
    merge_request = detect_context(
        {**base, "CI_PIPELINE_SOURCE": "merge_request_event", "CI_MERGE_REQUEST_IID": "42"}
    )
    assert merge_request.event is Event.pull_request
    build = plan_build(merge_request, Scheme.ref_id, app="api")
    assert build.version == f"refs-merge-requests-42-head-{SHA}"
    assert plan_build(merge_request, Scheme.short_sha, app="api").environments == ()


def test_flags_override_and_imply_the_event() -> None:
    context = detect_context(github("refs/heads/master", "push"), ref="refs/tags/1.0.0")
    assert context.event is Event.release
    assert detect_context({}, ref="refs/pull/3/merge", sha=HEAD).event is Event.pull_request


def test_bad_contexts_are_refused() -> None:
    with pytest.raises(VersionError, match="pass --ref and --sha"):
        detect_context({})
    with pytest.raises(VersionError, match="not a hexadecimal"):
        detect_context({}, ref="refs/heads/main", sha="nope")
    with pytest.raises(VersionError, match="not a semver"):
        plan_build(detect_context({}, ref="refs/tags/latest", sha=SHA), Scheme.ref_id, app="ui")


def test_cli_writes_github_output_and_json(
    no_ci_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "github_output"
    output.write_text("earlier=1\n")
    env = {**github("refs/heads/master", "push"), "GITHUB_OUTPUT": str(output)}
    result = runner.invoke(
        app, ["version", "--app", "ui", "--github-output", "-o", "json"], env=env
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["version"] == f"refs-heads-master-{SHA}"
    assert data["file"] == "staging/ui.yaml"
    lines = output.read_text().splitlines()
    assert lines[:4] == [
        "earlier=1",
        f"version=refs-heads-master-{SHA}",
        "environment=staging",
        "file=staging/ui.yaml",
    ]
    assert "files=staging/ui.yaml staging-candidates/ui/refs-heads-master.yaml" in lines


def test_cli_text_names_version_environment_and_file(
    no_ci_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["version", "--app", "ui", "--ref", "refs/pull/7/merge", "--sha", HEAD]
    )
    assert result.exit_code == 0, result.output
    assert re.search(rf"version\s+refs-pull-7-merge-{HEAD}", result.stdout)
    assert "staging-candidates/ui/refs-pull-7-merge.yaml" in result.stdout


def test_cli_bad_input_is_one_line_and_exit_2(
    no_ci_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["version", "--app", "ui", "--ref", "refs/tags/nightly", "--sha", SHA]
    )
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "not a semver tag" in result.stderr
    result = runner.invoke(
        app, ["version", "--app", "../etc", "--ref", "refs/heads/main", "--sha", SHA]
    )
    assert result.exit_code == 2
    assert "not a plain name" in result.stderr


def test_github_output_that_cannot_be_written_is_one_line_not_a_traceback(
    no_ci_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {**github("refs/heads/master", "push"), "GITHUB_OUTPUT": str(tmp_path)}
    result = runner.invoke(app, ["version", "--app", "ui", "--github-output"], env=env)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"--github-output ($GITHUB_OUTPUT): cannot write {tmp_path}: Is a directory" in (
        result.stderr
    )
    assert result.stderr.count("\n") == 1
