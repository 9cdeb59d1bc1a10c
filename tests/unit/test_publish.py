"""`conveyor publish` end to end into a real bare config repo, as Cellenics' CI does."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from conveyor.cli.main import app
from conveyor.source.git import run_git
from tests.unit.conftest import copy_app, remote_file, remote_subjects

SHA = "3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a39"
HEAD = "aaaabbbbccccddddeeeeffff0000111122223333"
runner = CliRunner()


def github(ref: str, event: str, event_path: Path | None = None) -> dict[str, str]:
    env = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_REF": ref,
        "GITHUB_SHA": SHA,
        "GITHUB_EVENT_NAME": event,
        "GITHUB_REPOSITORY": "hms-dbmi-cellenics/ui",
        "GITHUB_SERVER_URL": "https://github.com",
    }
    if event_path is not None:
        env["GITHUB_EVENT_PATH"] = str(event_path)
    return env


@pytest.fixture
def ui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ci_env: dict[str, str]) -> Path:
    directory = copy_app("ui", tmp_path / "apps")
    monkeypatch.chdir(directory)
    return directory


def publish(remote: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, ["publish", "--repo", str(remote), *args], env=env)


def documents(text: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(text)}


def test_push_to_master_publishes_staging_and_candidate_in_one_commit(
    ui: Path, config_remote: Path
) -> None:
    result = publish(config_remote, env=github("refs/heads/master", "push"))
    assert result.exit_code == 0, result.output
    assert "published ui" in result.stdout
    assert remote_subjects(config_remote) == [
        f"Update from https://github.com/hms-dbmi-cellenics/ui/commit/{SHA}",
        "init",
    ]
    staging = documents(remote_file(config_remote, "staging/ui.yaml"))
    release = staging["HelmRelease"]
    assert staging["Namespace"]["metadata"]["name"] == "ui-default"
    assert release["metadata"]["namespace"] == "ui-default"
    assert release["metadata"]["annotations"] == {
        "fluxcd.io/automated": "true",
        "filter.fluxcd.io/chart-image": "glob:refs-heads-master-*",
    }
    assert release["spec"]["chart"]["ref"] == SHA
    assert release["spec"]["values"]["image"]["tag"] == f"refs-heads-master-{SHA}"
    assert release["spec"]["values"]["replicaCount"] == 2
    assert release["spec"]["values"]["serviceAccount"]["iamRole"].endswith(":role/ui-role-staging")
    candidate = remote_file(config_remote, "staging-candidates/ui/refs-heads-master.yaml")
    assert documents(candidate)["HelmRelease"]["metadata"]["namespace"] == "ui-STAGING_SANDBOX_ID"
    assert candidate.endswith("# filled in by CI. do not modify.\n")


def test_pull_request_publishes_only_a_candidate(
    ui: Path, config_remote: Path, tmp_path: Path
) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"head": {"sha": HEAD}}}))
    result = publish(
        config_remote, "-o", "json", env=github("refs/pull/12/merge", "pull_request", event)
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == {
        "staging-candidates": "staging-candidates/ui/refs-pull-12-merge.yaml"
    }
    files = run_git(["--git-dir", str(config_remote), "ls-tree", "-r", "--name-only", "master"])
    assert files.split() == ["README.md", "staging-candidates/ui/refs-pull-12-merge.yaml"]
    docs = documents(remote_file(config_remote, "staging-candidates/ui/refs-pull-12-merge.yaml"))
    release = docs["HelmRelease"]
    assert docs["Namespace"]["metadata"]["labels"]["sandboxId"] == "STAGING_SANDBOX_ID"
    assert release["spec"]["values"]["image"]["tag"] == f"refs-pull-12-merge-{HEAD}"
    assert release["spec"]["values"]["replicaCount"] == 1
    annotations = release["metadata"]["annotations"]
    assert annotations["filter.fluxcd.io/chart-image"] == "glob:refs-pull-12-merge-*"


def test_release_publishes_production_then_an_unchanged_rerun_commits_nothing(
    ui: Path, config_remote: Path
) -> None:
    env = github("refs/tags/1.4.0", "release")
    assert publish(config_remote, env=env).exit_code == 0
    release = documents(remote_file(config_remote, "production/ui.yaml"))["HelmRelease"]
    assert release["spec"]["values"]["image"]["tag"] == "1.4.0"
    assert release["spec"]["values"]["replicaCount"] == 4
    assert release["metadata"]["namespace"] == "ui-default"
    assert release["metadata"]["annotations"]["filter.fluxcd.io/chart-image"] == "semver:>=0.0.0"
    again = publish(config_remote, env=env)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == "no changes"
    assert len(remote_subjects(config_remote)) == 2


def test_flux_v2_app_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ci_env: dict[str, str], config_remote: Path
) -> None:
    monkeypatch.chdir(copy_app("api", tmp_path / "apps"))
    result = publish(
        config_remote,
        "--ref", "refs/tags/2.0.0", "--sha", SHA,
        "--set", "HelmRelease:spec.values.replicaCount=6",
        "--message", "release {app} {version}",
        "--author-name", "cellenics-ci", "--author-email", "ci@example.com",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = remote_file(config_remote, "production/api.yaml")
    assert re.search(r'\n      tag: 2\.0\.0 +# \{"\$imagepolicy": "api-default:api:tag"\}\n', text)
    docs = documents(text)
    assert docs["HelmRelease"]["spec"]["values"]["replicaCount"] == 6
    assert docs["ImagePolicy"]["spec"]["policy"] == {"semver": {"range": ">=0.0.0"}}
    assert docs["ImageUpdateAutomation"]["spec"]["update"]["path"] == "./production"
    assert docs["GitRepository"]["spec"]["ref"] == {"commit": SHA}
    log = run_git(["--git-dir", str(config_remote), "log", "-1", "--format=%s|%an|%ae", "master"])
    assert log.strip() == "release api 2.0.0|cellenics-ci|ci@example.com"


def test_build_without_environment_publishes_nothing(ui: Path, config_remote: Path) -> None:
    result = publish(
        config_remote, "--scheme", "short-sha", "--ref", "refs/pull/3/merge", "--sha", SHA
    )
    assert result.exit_code == 0, result.output
    assert "nothing to publish" in result.stderr
    assert remote_subjects(config_remote) == ["init"]


def test_dry_run_prints_and_pushes_nothing(ui: Path, config_remote: Path) -> None:
    result = publish(config_remote, "--dry-run", "--ref", "refs/tags/1.0.0", "--sha", SHA)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# production/ui.yaml\n# The ui's release template")
    assert remote_subjects(config_remote) == ["init"]


def _break_profile(ui: Path, old: str, new: str) -> None:
    profile = ui / ".conveyor" / "publish.yaml"
    profile.write_text(profile.read_text().replace(old, new, 1))


@pytest.mark.parametrize(
    ("prepare", "args", "message"),
    [
        # (Without --profile and without the default file, the built-in profile is used.)
        (lambda ui: None, ["--profile", "missing.yaml"], "publish profile not found"),
        (lambda ui: (ui / ".flux.yaml").write_text("kind: [\n"), [], "invalid YAML"),
        (lambda ui: None, ["-e", "qa"], "no environment 'qa' (known: production, staging"),
        (
            lambda ui: _break_profile(ui, "      clusterEnv: production\n", ""),
            [],
            "FILLED_IN_BY_CI left for production in HelmRelease/ui spec.values.clusterEnv",
        ),
        (
            lambda ui: _break_profile(
                ui, "    replicas: 4\n", "    path: ../../etc/{app}.yaml\n    replicas: 4\n"
            ),
            [],
            "must stay inside the repository",
        ),
        (lambda ui: None, ["--app", ".."], "not a plain name"),
        (lambda ui: None, ["-e", "../production"], "no environment '../production'"),
        (lambda ui: None, ["--set", "HelmRelease:spec..x=1"], "bad field path"),
        (
            lambda ui: _break_profile(ui, "{app}-role-production", "{app}-role-{env}"),
            [],
            "unknown variable {env}",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    ui: Path, config_remote: Path, prepare: Any, args: list[str], message: str
) -> None:
    prepare(ui)
    result = publish(config_remote, "--ref", "refs/tags/1.0.0", "--sha", SHA, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert remote_subjects(config_remote) == ["init"]


def test_unreachable_config_repo_is_exit_1(ui: Path, tmp_path: Path) -> None:
    result = publish(tmp_path / "missing.git", "--ref", "refs/tags/1.0.0", "--sha", SHA)
    assert result.exit_code == 1
    assert "missing.git" in result.stderr


def test_a_branch_the_config_repo_lacks_is_refused_unless_asked_for(
    ui: Path, config_remote: Path
) -> None:
    env = github("refs/heads/master", "push")
    refused = publish(config_remote, "--branch", "nosuch", env=env)
    assert refused.exit_code == 2
    assert "branch 'nosuch' does not exist in" in refused.stderr
    assert "--create-branch" in refused.stderr
    branches = ["--git-dir", str(config_remote), "branch", "--list", "nosuch"]
    assert run_git(branches).strip() == ""
    created = publish(config_remote, "--branch", "nosuch", "--create-branch", env=env)
    assert created.exit_code == 0, created.output
    assert run_git(branches).strip() == "nosuch"


def test_an_unknown_placeholder_is_warned_about_and_the_rest_publishes(
    ui: Path, config_remote: Path
) -> None:
    template = ui / ".flux.yaml"
    template.write_text(template.read_text().replace("port: 3000", "port: ${PORT}"))
    result = publish(config_remote, env=github("refs/heads/master", "push"))
    assert result.exit_code == 0, result.output
    warning = (
        ".flux.yaml: HelmRelease/ui spec.values.service.port: ${PORT} looks like a "
        "placeholder, but nothing fills it"
    )
    assert " ".join(result.stderr.split()).count(warning) == 1, result.stderr


def test_a_cellenics_shaped_app_publishes_with_no_profile(ui: Path, config_remote: Path) -> None:
    shutil.rmtree(ui / ".conveyor")
    env = {**github("refs/heads/master", "push"), "AWS_ACCOUNT_ID": "123456789012"}
    env["AWS_REGION"] = "eu-west-1"
    result = publish(config_remote, env=env)
    assert result.exit_code == 0, result.output
    assert "publishing with the built-in Cellenics profile" in " ".join(result.stderr.split())
    staging = documents(remote_file(config_remote, "staging/ui.yaml"))
    release = staging["HelmRelease"]
    assert staging["Namespace"]["metadata"] == {
        "name": "ui-default",
        "labels": {"sandboxId": "default"},
    }
    assert release["metadata"]["annotations"]["filter.fluxcd.io/chart-image"] == (
        "glob:refs-heads-master-*"
    )
    assert release["spec"]["chart"]["ref"] == SHA
    values = release["spec"]["values"]
    assert values["image"] == {
        "repository": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/ui",
        "tag": f"refs-heads-master-{SHA}",
    }
    assert values["serviceAccount"]["iamRole"] == "arn:aws:iam::123456789012:role/ui-role-staging"
    assert (values["clusterEnv"], values["replicaCount"], values["sandboxId"]) == (
        "staging",
        1,
        "default",
    )
    candidate = documents(
        remote_file(config_remote, "staging-candidates/ui/refs-heads-master.yaml")
    )
    assert candidate["Namespace"]["metadata"]["name"] == "ui-STAGING_SANDBOX_ID"


def test_without_a_profile_the_fields_only_the_account_knows_are_named(
    ui: Path, config_remote: Path
) -> None:
    shutil.rmtree(ui / ".conveyor")
    result = publish(config_remote, env=github("refs/heads/master", "push"))
    assert result.exit_code == 2
    said = " ".join(result.stderr.split())
    assert "HelmRelease/ui spec.values.image.repository" in said
    assert "AWS_ACCOUNT_ID and AWS_REGION fill image.repository" in said
    assert remote_subjects(config_remote) == ["init"]
