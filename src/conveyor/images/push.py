"""Push minimal images (a config blob, no layers) over the OCI distribution API.

What a CI pipeline does after a build, reduced to what conveyor looks at: a tag and its
build time. The demo uses it to give image automation something to find, and the tests
and benchmarks to fill the sandbox registry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Mapping, Sequence

import httpx

from conveyor.errors import ConveyorError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class PushError(ConveyorError, RuntimeError):
    pass


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_manifest(created: str | None) -> tuple[bytes, bytes]:
    """A minimal OCI image: a config blob (with its build time, or without the optional
    `created` field, as some builders leave it out) and a manifest."""
    fields: dict[str, object] = {"architecture": "amd64", "os": "linux"}
    if created is not None:
        fields["created"] = created
    config = json.dumps(
        fields | {"rootfs": {"type": "layers", "diff_ids": []}, "config": {}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _digest(config),
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()
    return config, manifest


def _check(response: httpx.Response, expected: int) -> None:
    if response.status_code != expected:
        raise PushError(
            f"{response.request.method} {response.request.url.path}: HTTP "
            f"{response.status_code} {response.text[:200]}"
        )


async def push_async(
    client: httpx.AsyncClient,
    repository: str,
    tags: Sequence[str],
    *,
    created: str | None = "2024-01-01T00:00:00Z",
    concurrency: int = 16,
) -> None:
    """Upload one config blob and tag one manifest with every tag (PUT per tag)."""
    config, manifest = image_manifest(created)
    start = await client.post(f"/v2/{repository}/blobs/uploads/")
    _check(start, 202)
    location = start.headers["location"]
    location += ("&" if "?" in location else "?") + f"digest={_digest(config)}"
    done = await client.put(
        location, content=config, headers={"Content-Type": "application/octet-stream"}
    )
    _check(done, 201)
    limit = asyncio.Semaphore(concurrency)

    async def tag(name: str) -> None:
        async with limit:
            answer = await client.put(
                f"/v2/{repository}/manifests/{name}",
                content=manifest,
                headers={"Content-Type": OCI_MANIFEST},
            )
            _check(answer, 201)

    await asyncio.gather(*(tag(t) for t in tags))


def push(
    registry: str,
    repository: str,
    tags: Sequence[str],
    *,
    created: str | None = "2024-01-01T00:00:00Z",
    headers: Mapping[str, str] | None = None,
) -> None:
    """Push over plain HTTP (loopback registries such as the sandbox's)."""

    async def run() -> None:
        async with httpx.AsyncClient(
            base_url=f"http://{registry}", timeout=30, headers=headers
        ) as client:
            await push_async(client, repository, tags, created=created)

    asyncio.run(run())
