"""`conveyor ci-privileges`: app repos' .ci.yaml → one stack of CI roles, on moto's server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner

from conveyor.cli.main import app
from conveyor.sandbox.ports import free_ports
from conveyor.source.git import Author, Checkout, commit_and_push, run_git
from tests.unit.conftest import EXAMPLE_APPS

runner = CliRunner()
APPS = [str(EXAMPLE_APPS / name) for name in ("ui", "api", "worker")]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto in server mode on loopback; the endpoint URL. Credentials are moto's dummies."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    port = free_ports(["moto"])["moto"]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_render_yaml_has_one_role_per_repository_and_skips_empty(tmp_path: Path) -> None:
    empty = tmp_path / "docs-site"
    empty.mkdir()
    (empty / ".ci.yaml").write_text("ci-policies: []\n")
    result = runner.invoke(
        app, ["ci-privileges", "render", *APPS, str(empty), "--github-owner", "hms-dbmi-cellenics"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "docs-site" in result.stderr
    template = yaml.safe_load(result.stdout)
    assert list(template["Resources"]) == ["CiRoleUi", "CiRoleApi", "CiRoleWorker"]
    api = template["Resources"]["CiRoleApi"]["Properties"]
    assert api["RoleName"] == "ci-api"
    assert [p["PolicyName"] for p in api["Policies"]] == ["can-push-to-ecr", "can-read-api-config"]
    statement = api["AssumeRolePolicyDocument"]["Statement"][0]
    assert statement["Condition"]["StringLike"] == {
        "token.actions.githubusercontent.com:sub": "repo:hms-dbmi-cellenics/api:*"
    }
    # Fields beyond the checked ones are kept as the app wrote them.
    assert api["Policies"][1]["PolicyDocument"]["Statement"][0]["Condition"] == {
        "StringEquals": {"aws:RequestedRegion": "eu-west-1"}
    }


def test_render_json_from_a_clone_url(tmp_path: Path) -> None:
    bare = tmp_path / "ui.git"
    run_git(["init", "--quiet", "--bare", "--initial-branch", "main", str(bare)])
    checkout = Checkout.open(str(bare), tmp_path / "wc")

    def declare(root: Path) -> None:
        (root / ".ci.yml").write_text((EXAMPLE_APPS / "worker" / ".ci.yml").read_text())

    commit_and_push(checkout, declare, message="ci", author=Author())
    result = runner.invoke(
        app,
        ["ci-privileges", "render", f"file://{bare}", "--github-owner", "org", "--format", "json"],
    )
    assert result.exit_code == 0, result.output
    template = json.loads(result.stdout)
    assert template["Resources"]["CiRoleUi"]["Properties"]["Policies"][0]["PolicyName"] == (
        "can-push-to-ecr"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ci-policies:\n  - PolicyName: x\n",
            ".ci.yaml:2: ci-policies[0].PolicyDocument is required",
        ),
        (
            "ci-policies:\n  - PolicyName: x\n    PolicyDocument:\n      Version: '2012-10-17'\n"
            "      Statement: []\n",
            "Statement",
        ),
        (
            "ci-policies:\n  - PolicyName: x\n    PolicyDocument:\n      Version: '2012-10-17'\n"
            "      Statement:\n        - {Effect: Maybe, Action: 's3:*', Resource: '*'}\n",
            "Effect",
        ),
        (
            "ci-policies:\n  - PolicyName: x\n    PolicyDocument:\n      Version: '2012-10-17'\n"
            "      Statement:\n        - {Effect: Allow, Resource: '*'}\n",
            "exactly one of Action and NotAction",
        ),
        ("ci-policies: [\n", "invalid YAML"),
    ],
)
def test_invalid_declarations_are_one_line_exit_2(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / ".ci.yaml").write_text(text)
    result = runner.invoke(app, ["ci-privileges", "render", str(tmp_path), "--github-owner", "o"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert ".ci.yaml" in result.stderr


def test_owner_is_required_when_the_source_does_not_name_it() -> None:
    result = runner.invoke(app, ["ci-privileges", "render", APPS[0]])
    assert result.exit_code == 2
    assert "--github-owner" in result.stderr


def test_apply_creates_updates_then_is_unchanged(aws: str, tmp_path: Path) -> None:
    ui = tmp_path / "ui"
    ui.mkdir()
    (ui / ".ci.yaml").write_text((EXAMPLE_APPS / "ui" / ".ci.yaml").read_text())
    args = ["ci-privileges", "apply", str(ui), APPS[1], "--github-owner", "hms-dbmi-cellenics"]
    args += ["--stack-name", "ci-roles", "--endpoint-url", aws]

    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == "stack ci-roles: created"
    iam = boto3.client("iam", endpoint_url=aws)
    assert iam.list_role_policies(RoleName="ci-ui")["PolicyNames"] == ["can-push-to-ecr"]

    declaration = yaml.safe_load((ui / ".ci.yaml").read_text())
    declaration["ci-policies"].append(
        {
            "PolicyName": "can-read-results",
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::r/*"}
                ],
            },
        }
    )
    (ui / ".ci.yaml").write_text(yaml.safe_dump(declaration))
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert second.stdout.strip() == "stack ci-roles: updated"
    cloudformation = boto3.client("cloudformation", endpoint_url=aws)
    body = yaml.safe_load(cloudformation.get_template(StackName="ci-roles")["TemplateBody"])
    policies = body["Resources"]["CiRoleUi"]["Properties"]["Policies"]
    assert [p["PolicyName"] for p in policies] == ["can-push-to-ecr", "can-read-results"]
    # (moto keeps a role's inline policies on a stack update, so the template is checked.)

    third = runner.invoke(app, args)
    assert third.exit_code == 0, third.output
    assert third.stdout.strip() == "stack ci-roles: unchanged"
    stack = cloudformation.describe_stacks(StackName="ci-roles")["Stacks"][0]
    assert stack["StackStatus"] == "UPDATE_COMPLETE"
    assert {o["OutputKey"] for o in stack["Outputs"]} == {"CiRoleUiArn", "CiRoleApiArn"}
