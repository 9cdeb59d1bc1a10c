"""Image references (`host[:port]/path[:tag][@digest]`) as registries and Docker read them.

One parser for every place an image appears (HelmRelease values, ImageRepository specs,
setter lines, the command line), so `ui`, `docker.io/library/ui` and
`registry-1.docker.io/library/ui` are the same repository everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from conveyor.errors import ConveyorError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = {DOCKER_HUB, "index.docker.io", DOCKER_HUB_API}
_PATH = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$")


class ImageReferenceError(ConveyorError, ValueError):
    """Not something a registry would accept as an image reference."""


@dataclass(frozen=True, order=True)
class ImageName:
    """A repository in a registry: `host` as reached over HTTP, `path` inside it."""

    host: str
    path: str

    def __str__(self) -> str:
        if self.host == DOCKER_HUB_API:
            return self.path.removeprefix("library/")
        return f"{self.host}/{self.path}"


@dataclass(frozen=True)
class ImageReference:
    name: ImageName
    tag: str | None = None
    digest: str | None = None


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def split_reference(text: str) -> tuple[str, str | None, str | None]:
    """`host:5000/app:1.2@sha256:..` → (`host:5000/app`, `1.2`, `sha256:..`), each part
    unchecked: for reading what a file holds. A `:` after the last `/` starts the tag
    (before it, it is a registry's port); `@` starts the digest."""
    name, at, digest = text.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest if at else None
    return name, None, digest if at else None


def parse_image(text: str) -> ImageReference:
    """Parse `[host[:port]/]path[:tag][@digest]`; Docker Hub names get `library/`."""
    raw = text.strip()
    if not raw or any(c.isspace() for c in raw):
        raise ImageReferenceError(f"{text!r} is not an image reference")
    raw, tag, digest = split_reference(raw)
    if digest is not None and not re.fullmatch(
        r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Fa-f0-9]{32,}", digest
    ):
        raise ImageReferenceError(f"{text!r}: invalid digest {digest!r}")
    if tag is not None and not _TAG.match(tag):
        raise ImageReferenceError(f"{text!r}: invalid tag {tag!r}")
    first, _, rest = raw.partition("/")
    if rest and _looks_like_host(first):
        host, path = first, rest
        if not _HOST.match(host):
            raise ImageReferenceError(f"{text!r}: invalid registry host {host!r}")
    else:
        host, path = DOCKER_HUB, raw
    if host.lower() in _DOCKER_HUB_ALIASES:
        host = DOCKER_HUB_API
        if "/" not in path:
            path = f"library/{path}"
    if not _PATH.match(path):
        raise ImageReferenceError(f"{text!r}: invalid repository path {path!r}")
    return ImageReference(ImageName(host, path), tag, digest)


def parse_image_name(text: str) -> ImageName:
    """A repository without tag or digest (what ImageRepository.spec.image holds)."""
    reference = parse_image(text)
    if reference.tag or reference.digest:
        raise ImageReferenceError(f"{text!r}: expected a repository without tag or digest")
    return reference.name


def is_loopback(host: str) -> bool:
    """`127.0.0.1:5000`, `[::1]:5000` and `localhost` are reached over plain http."""
    bare = host
    if bare.startswith("["):
        bare = bare[1 : bare.index("]")]
    elif bare.count(":") == 1:
        bare = bare.split(":", 1)[0]
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False
