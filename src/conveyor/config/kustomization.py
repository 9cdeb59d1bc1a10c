"""Flux Kustomizations (`kustomize.toolkit.fluxcd.io/v1`, also v1beta2) as the teams on
Flux v2 write them, typed.

conveyor turns each one into an app: the kustomize build of `spec.path`, with the
Kustomization's own fields applied the way kustomize-controller applies them. This
module only reads the fields; render/flux_kustomization.py does the build. The values
of `images`, `patches` and `components` reach a generated kustomization.yaml, never a
command line; the source's name and kind decide what is fetched.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from conveyor.config.helmrelease import Duration, Image, Patch
from conveyor.config.manifest import ObjectMeta
from conveyor.config.validation import FileModel, ObjectName, Text, describe
from conveyor.errors import ConveyorError

KUSTOMIZE_GROUP = "kustomize.toolkit.fluxcd.io"
# The Kustomization Flux's bootstrap writes: it syncs the cluster folder itself.
FLUX_SYSTEM = "flux-system"


class KustomizationError(ConveyorError, ValueError):
    """A Flux Kustomization lacks what conveyor needs; the message names the field."""


def is_flux_kustomization(obj: dict[str, Any]) -> bool:
    api_version = str(obj.get("apiVersion", ""))
    return obj.get("kind") == "Kustomization" and api_version.split("/")[0] == KUSTOMIZE_GROUP


class KustomizationSourceRef(FileModel):
    kind: Literal["GitRepository", "OCIRepository", "Bucket"]
    name: ObjectName
    namespace: ObjectName | None = None


class Dependency(FileModel):
    name: ObjectName
    namespace: ObjectName | None = None


class CommonMetadata(FileModel):
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class SubstituteReference(FileModel):
    kind: Literal["ConfigMap", "Secret"]
    name: ObjectName
    optional: bool = False


class PostBuild(FileModel):
    substitute: dict[str, str] | None = None
    substitute_from: list[SubstituteReference] | None = None


class DecryptionSecretRef(FileModel):
    name: ObjectName


class Decryption(FileModel):
    provider: Literal["sops"]
    secret_ref: DecryptionSecretRef | None = None


class HealthCheck(FileModel):
    api_version: Text | None = None
    kind: Text
    name: ObjectName
    namespace: ObjectName | None = None


class KustomizationSpec(FileModel):
    path: Text | None = None
    source_ref: KustomizationSourceRef
    depends_on: list[Dependency] | None = None
    prune: bool = False  # Go's zero value: the CRD requires the field
    wait: bool = False
    timeout: Duration | None = None
    interval: Duration | None = None
    health_checks: list[HealthCheck] | None = None
    suspend: bool = False
    force: bool = False
    target_namespace: ObjectName | None = None
    name_prefix: Text | None = None
    name_suffix: Text | None = None
    common_metadata: CommonMetadata | None = None
    components: list[Text] | None = None
    patches: list[Patch] | None = None
    # v1beta2's older forms of `patches`, still found in repositories.
    patches_strategic_merge: list[dict[str, Any]] | None = None
    images: list[Image] | None = None
    post_build: PostBuild | None = None
    decryption: Decryption | None = None
    # Read only to refuse or note them: conveyor applies to its own cluster, as itself.
    kube_config: dict[str, Any] | None = None
    service_account_name: Text | None = None


class FluxKustomization(FileModel):
    metadata: ObjectMeta
    spec: KustomizationSpec

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or FLUX_SYSTEM


def parse_kustomization(obj: dict[str, Any]) -> FluxKustomization:
    """The Kustomization `obj` describes. KustomizationError names the first wrong field."""
    try:
        return FluxKustomization.model_validate(obj)
    except ValidationError as error:
        raise KustomizationError(describe(error)) from None
