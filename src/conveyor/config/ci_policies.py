"""`.ci.yaml` in an app repo: the cloud privileges its CI pipeline needs.

Cellenics keeps one per app (`ci-policies: [{PolicyName, PolicyDocument}]`) and turns
all of them into the CI identities by hand. The documents are IAM policies; they are
checked here so that a typo fails at render time, not halfway through a deployment.
Fields IAM knows beyond the checked ones (Sid, Condition, …) are kept as written.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FILE_NAMES = (".ci.yaml", ".ci.yml")


class IamStatement(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    effect: Literal["Allow", "Deny"] = Field(alias="Effect")
    action: str | list[str] | None = Field(None, alias="Action")
    not_action: str | list[str] | None = Field(None, alias="NotAction")
    resource: str | list[str] | None = Field(None, alias="Resource")
    not_resource: str | list[str] | None = Field(None, alias="NotResource")

    @model_validator(mode="after")
    def _action_and_resource(self) -> IamStatement:
        if (self.action is None) == (self.not_action is None):
            raise ValueError("needs exactly one of Action and NotAction")
        if (self.resource is None) == (self.not_resource is None):
            raise ValueError("needs exactly one of Resource and NotResource")
        for value in (self.action, self.not_action, self.resource, self.not_resource):
            if value in ([], ""):
                raise ValueError("Action and Resource must not be empty")
        return self


class IamPolicyDocument(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    version: Literal["2012-10-17", "2008-10-17"] = Field(alias="Version")
    statement: list[IamStatement] = Field(alias="Statement", min_length=1)


class CiPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(alias="PolicyName", pattern=r"^[\w+=,.@-]{1,128}$")
    document: IamPolicyDocument = Field(alias="PolicyDocument")

    def as_cloudformation(self) -> dict[str, Any]:
        """`{PolicyName, PolicyDocument}` as written, for an AWS::IAM::Role's Policies."""
        return self.model_dump(by_alias=True, exclude_none=True)


class CiFile(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    ci_policies: list[CiPolicy] | None = Field(None, alias="ci-policies")
