"""The publish profile an app gets without `.conveyor/publish.yaml`: Cellenics' own rules.

Cellenics' CI filled every app's `.flux.yaml` the same way (namespace `<app>-<sandbox>`,
the image filter per environment, the chart ref at the commit, `clusterEnv`, the IAM role
`<app>-role-<env>`), so an app of that shape publishes with no profile at all. The AWS
account and region, which no template can know, come from the CI's `AWS_ACCOUNT_ID` and
`AWS_REGION`; without them those two fields stay to fill, and publish names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conveyor.config.publish_profile import EnvironmentProfile, PublishProfile, Scheme

SANDBOX_PLACEHOLDER = "STAGING_SANDBOX_ID"
# Replicas per environment when the template leaves replicaCount to CI.
REPLICAS = {"production": 2, "staging": 1, "staging-candidates": 1}


# What `publish` says it filled from, in messages, when there is no profile file.
SOURCE = (
    "the built-in Cellenics profile (no .conveyor/publish.yaml; AWS_ACCOUNT_ID and "
    "AWS_REGION fill image.repository and serviceAccount.iamRole)"
)
# The template's name in Cellenics' repositories: `.flux.yaml`, or the seed's `.flux.ci`.
TEMPLATES = (".flux.yaml", ".flux.ci")


def cellenics_profile(env: Mapping[str, str], *, template: str = ".flux.yaml") -> PublishProfile:
    """The built-in profile for a Cellenics-shaped template (see the module docstring)."""
    account, region = env.get("AWS_ACCOUNT_ID"), env.get("AWS_REGION")

    def environment(name: str, *, sandbox: str, tag_filter: str, cluster_env: str) -> Any:
        values: dict[str, Any] = {"clusterEnv": cluster_env, "sandboxId": sandbox}
        if account and region:
            values["image.repository"] = f"{account}.dkr.ecr.{region}.amazonaws.com/{{app}}"
        if account:
            role = f"arn:aws:iam::{account}:role/{{app}}-role-{cluster_env}"
            values["serviceAccount.iamRole"] = role
        return EnvironmentProfile.model_validate(
            {
                "namespace": f"{{app}}-{sandbox}",
                "replicas": REPLICAS[name],
                "filter": tag_filter,
                "chart-ref": "{sha}",
                "values": values,
                "set": {
                    "Namespace:metadata.labels.sandboxId": sandbox,
                    "HelmRelease:metadata.labels.sandboxId": sandbox,
                },
            }
        )

    candidate = f"{{{SANDBOX_PLACEHOLDER}}}"
    return PublishProfile(
        template=template,
        scheme=Scheme.ref_id,
        placeholders=[SANDBOX_PLACEHOLDER],
        environments={
            "production": environment(
                "production",
                sandbox="default",
                tag_filter="semver:>=0.0.0",
                cluster_env="production",
            ),
            "staging": environment(
                "staging",
                sandbox="default",
                tag_filter="glob:refs-heads-master-*",
                cluster_env="staging",
            ),
            "staging-candidates": environment(
                "staging-candidates",
                sandbox=candidate,
                tag_filter="glob:{ref_id}-*",
                cluster_env="staging",
            ),
        },
    )
