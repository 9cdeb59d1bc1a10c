"""Does every image of a version exist? Asked before a deploy, and before a build re-run.

Unileaf builds all images of a version first and deploys only when all exist; their tags
are immutable, so a partial build blocks a re-run. `check_tags` answers both questions
(which are missing, which already exist) with one concurrent round of manifest HEADs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.images.credentials import CredentialSource
from conveyor.images.reference import ImageName, ImageReferenceError, parse_image
from conveyor.images.registry import RegistryClient, RegistryError, RegistrySettings


@dataclass(frozen=True)
class TagCheck:
    image: str
    tag: str
    present: bool | None  # None when the registry could not be asked
    error: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"image": self.image, "tag": self.tag, "present": self.present, "error": self.error}


def image_names(texts: Sequence[str]) -> list[ImageName]:
    """`host/repo` names; a tag or digest is refused (the version says which tag)."""
    names = []
    for text in texts:
        reference = parse_image(text)
        if reference.tag or reference.digest:
            raise ImageReferenceError(f"{text!r}: give the image without a tag (use --version)")
        names.append(reference.name)
    return names


async def _check(registry: RegistryClient, name: ImageName, tag: str) -> TagCheck:
    try:
        return TagCheck(str(name), tag, await registry.has_manifest(name, tag))
    except RegistryError as error:
        return TagCheck(str(name), tag, None, str(error))


async def check_tags_async(
    names: Sequence[ImageName],
    tag: str,
    *,
    settings: RegistrySettings | None = None,
    credentials: CredentialSource | None = None,
) -> list[TagCheck]:
    async with RegistryClient(credentials=credentials, settings=settings) as registry:
        return list(await asyncio.gather(*(_check(registry, n, tag) for n in names)))


def check_tags(
    names: Sequence[ImageName],
    tag: str,
    *,
    settings: RegistrySettings | None = None,
    credentials: CredentialSource | None = None,
) -> list[TagCheck]:
    """Whether `tag` exists for each image, in the order given."""
    return asyncio.run(check_tags_async(names, tag, settings=settings, credentials=credentials))
