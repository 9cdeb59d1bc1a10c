"""CI identities from the apps' own declarations: `.ci.yaml` files → one CloudFormation stack.

Cellenics ran `cellenics rotate-ci` by hand to turn every app's `.ci.yaml` into CI users
and keys. Here each repository gets an IAM role that its GitHub Actions workflows assume
through OIDC (no long-lived keys to rotate), with the declared policies inline; all roles
live in one stack, so a change is a stack update that CloudFormation can roll back.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.exceptions import ClientError

from conveyor.config.ci_policies import FILE_NAMES, CiFile, CiPolicy
from conveyor.config.userfile import UserFileError, load_document, load_yaml, read_text, validate
from conveyor.errors import ConveyorError
from conveyor.source.git import GitError, mask_url, shallow_clone

OIDC_HOST = "token.actions.githubusercontent.com"
OIDC_PROVIDER_ID = "GitHubActionsOidcProvider"
# GitHub's published certificate thumbprints; IAM trusts GitHub's OIDC through its own
# root CAs now, but older partitions still check these.
OIDC_THUMBPRINTS = [
    "6938fd4d98bab03faadb97b34396831e3780aea1",
    "1c58a3a8518e8759bf075b76b750d4f2df264fcd",
]
_GITHUB_URL = re.compile(r"github\.com[:/]([^/]+)/([^/]+?)(?:\.git)?/?$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://|^[^/\s]+@[^/\s]+:")


class CiPrivilegesError(ConveyorError, ValueError):
    """A repository cannot be read, or its `.ci.yaml` is malformed; the message names it."""


class TemplateFormat(StrEnum):
    yaml = "yaml"
    json = "json"


@dataclass(frozen=True)
class CiRepository:
    """One app repository's declared CI privileges."""

    source: str
    owner: str
    name: str
    policies: tuple[CiPolicy, ...]


def _read_declaration(root: Path, source: str) -> tuple[CiPolicy, ...]:
    for file_name in FILE_NAMES:
        path = root / file_name
        if not path.is_file():
            continue
        where = f"{mask_url(source)}: {file_name}"
        try:
            document = load_document(read_text(path, file=where), file=where)
            if document is None or not document.data:
                return ()
            ci_file = validate(CiFile, document.data, file=where, node=document.node)
        except UserFileError as error:
            raise CiPrivilegesError(str(error)) from None
        return tuple(ci_file.ci_policies or ())
    return ()


def load_repositories(sources: Iterable[str], *, owner: str | None) -> list[CiRepository]:
    """Read each source (a local checkout or a clone URL); `owner` is the GitHub owner
    for sources whose URL does not name it."""
    repositories = []
    with tempfile.TemporaryDirectory(prefix="conveyor-ci-") as scratch:
        for index, source in enumerate(sources):
            github = _GITHUB_URL.search(source)
            if _URL.match(source):
                try:
                    root = shallow_clone(source, Path(scratch) / str(index))
                except GitError as error:
                    raise CiPrivilegesError(f"cannot clone {mask_url(source)}: {error}") from None
                name = source.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
            else:
                root = Path(source)
                if not root.is_dir():
                    raise CiPrivilegesError(f"{source}: not a directory")
                name = root.resolve().name
            repo_owner = github.group(1) if github else owner
            if not repo_owner:
                raise CiPrivilegesError(
                    f"{mask_url(source)}: cannot tell its GitHub owner; pass --github-owner"
                )
            policies = _read_declaration(root, source)
            repositories.append(CiRepository(source, repo_owner, name, policies))
    return repositories


def _logical_id(name: str) -> str:
    words = re.split(r"[^A-Za-z0-9]+", name)
    return "CiRole" + "".join(w[:1].upper() + w[1:] for w in words if w)


def render_template(
    repositories: Iterable[CiRepository],
    *,
    role_prefix: str,
    create_oidc_provider: bool = False,
    exclude: Iterable[str] = (),
) -> dict[str, Any]:
    """One CloudFormation template: an IAM role per repository that declares privileges,
    except the `exclude`d ones (`name` or `owner/name`: archived repositories, say).
    The roles trust GitHub's OIDC provider, which an AWS account has once: the stack
    creates it with `create_oidc_provider`, and otherwise expects it to exist."""
    resources: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    excluded = set(exclude)
    provider: Any = {
        "Fn::Sub": f"arn:${{AWS::Partition}}:iam::${{AWS::AccountId}}:oidc-provider/{OIDC_HOST}"
    }
    if create_oidc_provider:
        resources[OIDC_PROVIDER_ID] = {
            "Type": "AWS::IAM::OIDCProvider",
            "Properties": {
                "Url": f"https://{OIDC_HOST}",
                "ClientIdList": ["sts.amazonaws.com"],
                "ThumbprintList": OIDC_THUMBPRINTS,
            },
        }
        provider = {"Ref": OIDC_PROVIDER_ID}  # its ARN, and the roles wait for it
    for repo in repositories:
        if not repo.policies or {repo.name, f"{repo.owner}/{repo.name}"} & excluded:
            continue
        logical_id = _logical_id(repo.name)
        if logical_id in resources:
            raise CiPrivilegesError(f"two repositories map to the same role {logical_id}")
        role_name = f"{role_prefix}{repo.name}"
        if len(role_name) > 64:
            raise CiPrivilegesError(f"role name {role_name!r} is longer than IAM's 64")
        resources[logical_id] = {
            "Type": "AWS::IAM::Role",
            "Properties": {
                "RoleName": role_name,
                "Description": f"CI of {repo.owner}/{repo.name}, from its .ci.yaml",
                "AssumeRolePolicyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Federated": provider},
                            "Action": "sts:AssumeRoleWithWebIdentity",
                            "Condition": {
                                "StringEquals": {f"{OIDC_HOST}:aud": "sts.amazonaws.com"},
                                "StringLike": {
                                    f"{OIDC_HOST}:sub": f"repo:{repo.owner}/{repo.name}:*"
                                },
                            },
                        }
                    ],
                },
                "Policies": [p.as_cloudformation() for p in repo.policies],
            },
        }
        outputs[f"{logical_id}Arn"] = {
            "Description": f"Role for the CI of {repo.owner}/{repo.name}",
            "Value": {"Fn::GetAtt": [logical_id, "Arn"]},
        }
    if not outputs:
        raise CiPrivilegesError("no repository declares CI privileges (.ci.yaml ci-policies)")
    trust = (
        "creates GitHub's OIDC provider"
        if create_oidc_provider
        else f"needs GitHub's OIDC provider ({OIDC_HOST}) in the account"
    )
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "CI roles rendered by conveyor ci-privileges from each app's .ci.yaml; "
        f"{trust}",
        "Resources": resources,
        "Outputs": outputs,
    }


def dump_template(template: dict[str, Any], fmt: TemplateFormat) -> str:
    if fmt is TemplateFormat.json:
        return json.dumps(template, indent=2) + "\n"
    return yaml.safe_dump(template, sort_keys=False, width=100)


class DeployResult(StrEnum):
    created = "created"
    updated = "updated"
    unchanged = "unchanged"


def deploy(
    body: str,
    *,
    stack_name: str,
    region: str | None = None,
    endpoint_url: str | None = None,
) -> DeployResult:
    """Create the stack or update it, waiting for the outcome. An update with nothing to
    change is `unchanged`, not an error (CloudFormation reports it as one)."""
    client = boto3.client("cloudformation", region_name=region, endpoint_url=endpoint_url)
    arguments = {
        "StackName": stack_name,
        "TemplateBody": body,
        "Capabilities": ["CAPABILITY_NAMED_IAM"],
    }
    waiter_config = {"Delay": 5, "MaxAttempts": 360}  # up to 30 minutes, as CloudFormation
    try:
        existing = client.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as error:
        if "does not exist" not in str(error):
            raise
        existing = []
    if not existing:
        client.create_stack(**arguments)
        client.get_waiter("stack_create_complete").wait(
            StackName=stack_name, WaiterConfig=waiter_config
        )
        return DeployResult.created
    current = client.get_template(StackName=stack_name)["TemplateBody"]
    if _same(current, body):
        return DeployResult.unchanged
    try:
        client.update_stack(**arguments)
    except ClientError as error:
        if "No updates are to be performed" in str(error):
            return DeployResult.unchanged
        raise
    client.get_waiter("stack_update_complete").wait(
        StackName=stack_name, WaiterConfig=waiter_config
    )
    return DeployResult.updated


def _same(current: Any, body: str) -> bool:
    """Whether the deployed template equals ours (boto3 hands JSON bodies back parsed)."""
    try:
        deployed = load_yaml(current, file="stack") if isinstance(current, str) else current
    except UserFileError:
        return False  # not ours (a hand-edited stack with `!Ref` tags): let the update tell
    return bool(deployed == load_yaml(body, file="rendered template"))
