"""Helm's own release storage, read (and, for one repair, written) without running `helm`.

`release_history` reads the `sh.helm.release.v1.<name>.v<N>` Secrets for the dashboard.
`unlock_pending_release` unlocks a release left `pending-*` by a crash, as `helm` itself
cannot: Helm refuses to upgrade a release whose last revision is pending ("another
operation is in progress"). When conveyor holds the environment's lease, no other
operation can be running, so the pending revision is marked failed in Helm's own storage
(the release Secret) and the next upgrade proceeds normally. `release_ownership` says
who a release belongs to: a conveyor environment (its label on the Secret), or Flux's
helm-controller (its labels on the objects of the stored manifest).
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import dataclass
from typing import Any

from conveyor.cluster.client import ApiError, KubeClient
from conveyor.cluster.flux import FluxObject, release_origin
from conveyor.cluster.ownership import OWNER_LABEL, EnvironmentIdentity

_MAGIC_GZIP = b"\x1f\x8b\x08"


def decode_release(data: str) -> dict[str, Any]:
    raw = base64.b64decode(base64.b64decode(data))
    if raw.startswith(_MAGIC_GZIP):
        raw = gzip.decompress(raw)
    result: dict[str, Any] = json.loads(raw)
    return result


def encode_release(release: dict[str, Any]) -> str:
    packed = base64.b64encode(gzip.compress(json.dumps(release).encode()))
    return base64.b64encode(packed).decode()


async def unlock_pending_release(kube: KubeClient, *, release: str, namespace: str) -> int | None:
    """Mark the latest revision failed if it is pending. Returns its number, or None."""
    latest = await _latest_revision(kube, release=release, namespace=namespace)
    if latest is None:
        return None
    status = latest["metadata"]["labels"].get("status", "")
    if not status.startswith("pending-"):
        return None
    body = decode_release(latest["data"]["release"])
    body.setdefault("info", {})["status"] = "failed"
    body["info"]["description"] = f"marked failed by conveyor: interrupted while {status}"
    latest["data"]["release"] = encode_release(body)
    latest["metadata"]["labels"]["status"] = "failed"
    await kube.request(
        "PUT",
        f"/api/v1/namespaces/{namespace}/secrets/{latest['metadata']['name']}",
        json_body=latest,
    )
    return int(latest["metadata"]["labels"]["version"])


async def _latest_revision(kube: KubeClient, *, release: str, namespace: str) -> Any:
    secrets = await kube.list(
        "v1", "Secret", namespace=namespace, label_selector=f"owner=helm,name={release}"
    )
    if not secrets:
        return None
    return max(secrets, key=lambda s: int(s["metadata"]["labels"].get("version", "0")))


@dataclass(frozen=True)
class ReleaseOwnership:
    """Whether a release exists, the namespace of its storage, the environment id its
    latest revision carries, and the HelmRelease whose labels its objects carry if
    helm-controller installed it."""

    exists: bool
    namespace: str
    owner: str | None
    flux: FluxObject | None = None


async def release_ownership(kube: KubeClient, *, release: str, namespace: str) -> ReleaseOwnership:
    latest = await _latest_revision(kube, release=release, namespace=namespace)
    if latest is None:
        return ReleaseOwnership(exists=False, namespace=namespace, owner=None)
    manifest = str(decode_release(latest["data"]["release"]).get("manifest") or "")
    return ReleaseOwnership(
        exists=True,
        namespace=namespace,
        owner=latest["metadata"]["labels"].get(OWNER_LABEL),
        flux=release_origin(manifest),
    )


async def claim_release(
    kube: KubeClient, *, release: str, namespace: str, identity: EnvironmentIdentity
) -> None:
    """Stamp the environment's identity on the latest revision of a release that has
    none (installed before identities), as `helm upgrade --labels` would: only labels
    change, the release itself is untouched."""
    latest = await _latest_revision(kube, release=release, namespace=namespace)
    if latest is None:
        return
    await kube.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}/secrets/{latest['metadata']['name']}",
        json_body={"metadata": {"labels": identity.labels()}},
        content_type="application/merge-patch+json",
    )


async def move_release(kube: KubeClient, *, release: str, source: str, target: str) -> int:
    """Move every stored revision of a release from namespace `source` to `target`, as
    they are (Helm reads a release from the namespace it is run in; helm-controller may
    have kept it elsewhere, in its `storageNamespace`). Each revision is created in
    `target` before its original is deleted (with its uid as a precondition), so an
    interrupted move loses nothing and the next one finishes it. Returns how many moved."""
    secrets = await kube.list(
        "v1", "Secret", namespace=source, label_selector=f"owner=helm,name={release}"
    )
    for secret in secrets:
        metadata = secret["metadata"]
        copy = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": metadata["name"],
                "namespace": target,
                "labels": metadata["labels"],
            },
            "type": secret.get("type", "helm.sh/release.v1"),
            "data": secret["data"],
        }
        try:
            await kube.request("POST", f"/api/v1/namespaces/{target}/secrets", json_body=copy)
        except ApiError as error:
            if not error.conflict:  # already there: an earlier move got that far
                raise
        await kube.delete("v1", "Secret", metadata["name"], namespace=source, uid=metadata["uid"])
    return len(secrets)


@dataclass(frozen=True)
class ReleaseRevision:
    """One revision of a Helm release, as `helm history` shows it, plus its manifest."""

    revision: int
    status: str
    description: str
    updated: str
    chart: str
    app_version: str
    manifest: str


async def release_history(
    kube: KubeClient, *, release: str, namespace: str
) -> list[ReleaseRevision]:
    """Every stored revision of the release, oldest first (values are left out: they can
    hold secrets)."""
    secrets = await kube.list(
        "v1", "Secret", namespace=namespace, label_selector=f"owner=helm,name={release}"
    )
    history = []
    for secret in secrets:
        body = decode_release(secret["data"]["release"])
        info = body.get("info") or {}
        metadata = (body.get("chart") or {}).get("metadata") or {}
        history.append(
            ReleaseRevision(
                revision=int(body.get("version") or 0),
                status=str(info.get("status", "")),
                description=str(info.get("description", "")),
                updated=str(info.get("last_deployed", "")),
                chart=f"{metadata.get('name', '')}-{metadata.get('version', '')}",
                app_version=str(metadata.get("appVersion") or ""),
                manifest=str(body.get("manifest") or ""),
            )
        )
    return sorted(history, key=lambda r: r.revision)
