"""Ask the registries, once per repository and all at once, what each policy picks now.

A repository watched by several policies is listed once. Build times are read only for
policies that order by them (Flux v1 `glob:`/`regex:`), and only for matching tags. A
registry that fails marks the automations that depend on it; the others still resolve.
A policy whose order cannot tell the newest tags apart chooses none: the files keep their
tag and the row warns, naming the policy and the file. A pinned automation is resolved
(to show what unpinning would bring) but never chosen for writing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from conveyor.images.automation import Automation, Discovery, Problem, Watch, discover
from conveyor.images.credentials import CredentialSource
from conveyor.images.reference import ImageName
from conveyor.images.registry import RegistryClient, RegistryError, RegistrySettings


@dataclass(frozen=True)
class Outcome:
    """What the registry said for one watch: the chosen tag, or why there is none."""

    latest: str | None = None
    tags: int = 0
    matching: int = 0
    error: str | None = None
    tied: tuple[str, ...] = ()  # the newest tags the policy could not tell apart


class Status(StrEnum):
    current = "current"  # the files already hold the chosen tag
    update = "update"  # a newer tag is chosen
    no_match = "no-match"  # no tag satisfies the policy; files are left alone
    undecided = "undecided"  # the newest tags tie; files keep their tag (a warning)
    pinned = "pinned"  # a person holds the tag (rollback); files are left alone
    error = "error"  # the registry could not be asked


@dataclass(frozen=True)
class Row:
    automation: Automation
    outcome: Outcome

    @property
    def status(self) -> Status:
        if self.automation.pin is not None:
            return Status.pinned
        if self.outcome.error:
            return Status.error
        if self.outcome.tied:
            return Status.undecided
        if self.outcome.latest is None:
            return Status.no_match
        if self.automation.current == self.outcome.latest:
            return Status.current
        return Status.update

    @property
    def warning(self) -> str | None:
        """Why the files keep their tag though the registry answered, naming the policy
        and the file; None when the order decided."""
        tied = self.outcome.tied
        if not tied or self.automation.pin is not None:
            return None
        automation = self.automation
        listed = ", ".join(tied[:5]) + (f" and {len(tied) - 5} more" if len(tied) > 5 else "")
        return (
            f"{automation.file}: {automation.name}: policy {automation.watch.policy.description}"
            f" cannot tell the newest of {len(tied)} tags apart ({listed}): same build time and"
            f" no timestamp in the tag to order by; keeping {automation.current or '(none)'}"
        )

    def to_dict(self) -> dict[str, object]:
        automation = self.automation
        return {
            "kind": automation.kind,
            "name": automation.name,
            "file": automation.file,
            "image": str(automation.watch.image),
            "policy": automation.watch.policy.description,
            "current": automation.current,
            "latest": self.outcome.latest,
            "status": self.status.value,
            "tags": self.outcome.tags,
            "matching": self.outcome.matching,
            "sites": [f"{s.file}:{s.scalar.line}" for s in automation.sites],
            "error": self.outcome.error,
            "warning": self.warning,
            "tied": list(self.outcome.tied),
            "pin": automation.pin.to_dict() if automation.pin else None,
        }


@dataclass
class ScanResult:
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    requests: int = 0

    @property
    def chosen(self) -> dict[Watch, str]:
        """The tag to write for each watch that resolved (pinned automations are
        skipped when writing, see `write_changes`)."""
        return {r.automation.watch: r.outcome.latest for r in self.rows if r.outcome.latest}

    @property
    def failed(self) -> bool:
        return any(r.status is Status.error for r in self.rows)

    @property
    def warnings(self) -> list[str]:
        return [w for w in (r.warning for r in self.rows) if w]


async def resolve(watches: Iterable[Watch], registry: RegistryClient) -> dict[Watch, Outcome]:
    """Each watch's outcome; every repository is listed once, concurrently."""
    unique = list(dict.fromkeys(watches))
    listings: dict[ImageName, asyncio.Task[list[str]]] = {}
    for watch in unique:
        if watch.image not in listings:
            listings[watch.image] = asyncio.ensure_future(registry.list_tags(watch.image))

    async def one(watch: Watch) -> Outcome:
        try:
            tags = watch.candidates(await listings[watch.image])
            matching = watch.policy.matching(tags)
            built = None
            if watch.policy.needs_build_times:
                times = await asyncio.gather(
                    *(registry.built_at(watch.image, tag) for tag in matching)
                )
                built = dict(zip(matching, times, strict=True))
            latest = watch.policy.select(matching, built=built)
            tied = tuple(watch.policy.ties(matching, built=built)) if latest is None else ()
        except RegistryError as error:
            return Outcome(error=str(error))
        return Outcome(latest, len(tags), len(matching), tied=tied)

    outcomes = await asyncio.gather(*(one(watch) for watch in unique))
    return dict(zip(unique, outcomes, strict=True))


def registry_settings(discovery: Discovery, settings: RegistrySettings) -> RegistrySettings:
    """`settings` plus the hosts that ImageRepository objects mark `insecure: true`."""
    insecure = {a.watch.image.host for a in discovery.automations if a.watch.insecure}
    if not insecure - settings.insecure:
        return settings
    return replace(settings, insecure=settings.insecure | insecure)


async def scan_async(
    discovery: Discovery,
    *,
    settings: RegistrySettings | None = None,
    credentials: CredentialSource | None = None,
) -> ScanResult:
    effective = registry_settings(discovery, settings or RegistrySettings())
    async with RegistryClient(credentials=credentials, settings=effective) as registry:
        outcomes = await resolve((a.watch for a in discovery.automations), registry)
        requests = registry.requests
    rows = [Row(a, outcomes[a.watch]) for a in discovery.automations]
    return ScanResult(rows, list(discovery.problems), requests)


def scan(
    root: Path,
    folder: str = ".",
    *,
    settings: RegistrySettings | None = None,
    credentials: CredentialSource | None = None,
) -> ScanResult:
    """What every automation under `folder` of the checkout at `root` would pick now."""
    return asyncio.run(
        scan_async(discover(root, folder), settings=settings, credentials=credentials)
    )
