"""Gates of an environment in conveyor.yaml: what must hold before a version goes there.

Unileaf checked by hand that the job queue was empty before deploying production; teams
ask for an approval, a soak time in staging, or a healthy staging. Each gate is declared
under its environment with a `type`; closed gates are polled every `interval` for up to
`timeout` (default: checked once), and nothing is written or applied until all are open.

    gates:
      - type: queue-empty
        queues: [sqs_studioml_gorunner_cpu_production_0]
        regions: [us-west-2, us-east-2]
        timeout: 30m
      - type: approval
      - type: soak
        duration: 24h
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from conveyor.config.helmrelease import parse_duration
from conveyor.config.validation import shown


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float | None):
        raise ValueError(f"expected a duration like 24h, got {shown(value, reveal=True)}")
    try:
        return parse_duration(value, default=0.0)
    except ValueError as error:  # HelmReleaseError, or a number float() refuses
        raise ValueError(f"expected a duration like 24h: {error}") from None


Duration = Annotated[float, BeforeValidator(_seconds)]


class _Gate(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(None, description="Shown in messages; default: the type.")
    timeout: Duration = Field(0.0, ge=0, description="How long a closed gate is waited for.")
    interval: Duration = Field(10.0, gt=0, description="How often a closed gate is checked.")

    @property
    def label(self) -> str:
        return self.name or str(getattr(self, "type", "gate"))


class QueueEmptyGate(_Gate):
    """SQS queues with no message waiting, in flight or delayed."""

    type: Literal["queue-empty"]
    queues: list[str] = Field(min_length=1, description="Queue names or URLs.")
    regions: list[str] = Field(
        default_factory=list, description="Regions to look in; default: the AWS default region."
    )
    endpoint_url: str | None = Field(
        None,
        alias="endpoint-url",
        description="Default: $CONVEYOR_SQS_ENDPOINT, then $AWS_ENDPOINT_URL_SQS, then AWS.",
    )


class HttpGate(_Gate):
    """A GET that must answer `status`, and JSON fields (dotted paths) with given values."""

    type: Literal["http"]
    url: str
    status: int = 200
    json_fields: dict[str, Any] = Field(default_factory=dict, alias="json")
    headers: dict[str, str] = Field(default_factory=dict)


class ApprovalGate(_Gate):
    """Approvals recorded with `conveyor approve`, kept in git under approvals/<env>/."""

    type: Literal["approval"]
    count: int = Field(1, ge=1, description="Distinct approvers needed.")
    approvers: list[str] = Field(
        default_factory=list, description="Who may approve; default: anyone."
    )


class SoakGate(_Gate):
    """The version has been Ready in the previous environment for at least `duration`."""

    type: Literal["soak"]
    duration: Duration = Field(gt=0)
    environment: str | None = Field(None, description="Default: the previous environment.")


class HealthyGate(_Gate):
    """Every app of the previous environment is Ready."""

    type: Literal["healthy"]
    environment: str | None = Field(None, description="Default: the previous environment.")


Gate = Annotated[
    QueueEmptyGate | HttpGate | ApprovalGate | SoakGate | HealthyGate,
    Field(discriminator="type"),
]
