"""Tag policies: which of a repository's tags is the one to run.

Two dialects meet here. Flux v1 annotations carry a filter (`glob:`, `semver:`,
`regex:`/`regexp:`); semver picks the highest version, glob and regex the most recently
built image, as fluxd did: by the `created` time in its config, then by a timestamp in
the tag, and when neither tells the newest apart, by nothing: the scan keeps the tag the
files hold and warns (fluxd, and conveyor before, took the smallest tag, an arbitrary
choice when images carry no `created` or reproducible builds share one). Flux v2 ImagePolicy objects
pick by `semver` range, `alphabetical` or `numerical` order, after `filterTags` (a regex
`pattern` whose `extract` template, `$ts`-style, yields the value to order by).

Tags that do not parse under a policy are skipped, never coerced; patterns use Go regexp
syntax as Flux does (`(?P<name>...)` and `(?<name>...)` groups, unanchored search).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Protocol

from conveyor.errors import ConveyorError
from conveyor.images.semver import SemverRange, SemverRangeError, Version

_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_TEMPLATE_REFERENCE = re.compile(r"\$(?:\$|\{(\w+)\}|(\w+))")


class PolicyError(ConveyorError, ValueError):
    """A policy that cannot be used as written (bad range, bad regex, unknown kind)."""


class Order(StrEnum):
    asc = "asc"
    desc = "desc"


class TagPolicy(Protocol):
    """Chooses one tag. `select` gets build times only if `needs_build_times`; when its
    order cannot tell the best tags apart it chooses none, and `ties` names them."""

    @property
    def description(self) -> str: ...

    @property
    def needs_build_times(self) -> bool: ...

    def matching(self, tags: Iterable[str]) -> list[str]:
        """The tags this policy would consider, in the order given."""
        ...

    def select(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> str | None: ...

    def ties(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> list[str]:
        """The tags that tie for best when `select` chooses none for that reason."""
        ...


class _TotalOrder:
    """Policies whose order always decides (equal values fall back to the tag string)."""

    def ties(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> list[str]:
        return []


def go_regex(pattern: str, *, context: str) -> re.Pattern[str]:
    """Compile a Go (RE2) regular expression with Python's engine."""
    translated = re.sub(r"\(\?<(?![=!])", "(?P<", pattern).replace(r"\z", r"\Z")
    try:
        return re.compile(translated)
    except re.error as error:
        raise PolicyError(f"{context}: invalid regular expression {pattern!r}: {error}") from None


def expand_template(template: str, match: re.Match[str]) -> str:
    """Go's `Regexp.ExpandString`: `$name`, `${name}`, `$1`; unknown names expand to ''."""

    def group(found: re.Match[str]) -> str:
        if found.group(0) == "$$":
            return "$"
        name = found.group(1) or found.group(2)
        try:
            value = match.group(int(name) if name.isdigit() else name)
        except IndexError:
            return ""
        return value or ""

    return _TEMPLATE_REFERENCE.sub(group, template)


@dataclass(frozen=True)
class TagFilter:
    """Flux v2 `filterTags`: keep tags matching `pattern`; order by `extract` of them."""

    pattern: re.Pattern[str] | None = None
    extract: str = ""

    def value(self, tag: str) -> str | None:
        """The value the policy orders by, or None when the tag is filtered out."""
        if self.pattern is None:
            return tag
        match = self.pattern.search(tag)
        if match is None:
            return None
        return expand_template(self.extract, match) if self.extract else tag

    def describe(self) -> str:
        if self.pattern is None:
            return ""
        extract = f" extract {self.extract}" if self.extract else ""
        return f" of tags matching {self.pattern.pattern}{extract}"


def _values(tags: Iterable[str], tag_filter: TagFilter) -> Iterable[tuple[str, str]]:
    for tag in tags:
        value = tag_filter.value(tag)
        if value is not None:
            yield tag, value


@dataclass(frozen=True)
class SemverPolicy(_TotalOrder):
    """Highest version within a range (Flux v1 `semver:`, Flux v2 `policy.semver`)."""

    range: SemverRange
    tag_filter: TagFilter = TagFilter()
    needs_build_times = False

    @property
    def description(self) -> str:
        return f"semver {self.range}{self.tag_filter.describe()}"

    def _versions(self, tags: Iterable[str]) -> Iterable[tuple[Version, str]]:
        for tag, value in _values(tags, self.tag_filter):
            version = Version.parse(value)
            if version is not None and self.range.allows(version):
                yield version, tag

    def matching(self, tags: Iterable[str]) -> list[str]:
        return [tag for _, tag in self._versions(tags)]

    def select(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> str | None:
        # Equal versions (`v1.2.0` and `1.2.0`, or different build metadata): the larger
        # tag string wins, so the choice never depends on the registry's listing order.
        best = max(self._versions(tags), default=None)
        return best[1] if best else None


@dataclass(frozen=True)
class AlphabeticalPolicy(_TotalOrder):
    """Flux v2 `policy.alphabetical`: `asc` picks the last tag in order, `desc` the first."""

    order: Order = Order.asc
    tag_filter: TagFilter = TagFilter()
    needs_build_times = False

    @property
    def description(self) -> str:
        return f"alphabetical {self.order}{self.tag_filter.describe()}"

    def matching(self, tags: Iterable[str]) -> list[str]:
        return [tag for tag, _ in _values(tags, self.tag_filter)]

    def select(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> str | None:
        ranked = [(value, tag) for tag, value in _values(tags, self.tag_filter)]
        if not ranked:
            return None
        return (max(ranked) if self.order is Order.asc else min(ranked))[1]


@dataclass(frozen=True)
class NumericalPolicy(_TotalOrder):
    """Flux v2 `policy.numerical`: values read as decimal numbers (timestamps, build
    numbers); `asc` picks the highest, `desc` the lowest. Non-numbers are skipped."""

    order: Order = Order.asc
    tag_filter: TagFilter = TagFilter()
    needs_build_times = False

    @property
    def description(self) -> str:
        return f"numerical {self.order}{self.tag_filter.describe()}"

    def _numbers(self, tags: Iterable[str]) -> Iterable[tuple[Decimal, str]]:
        for tag, value in _values(tags, self.tag_filter):
            if _NUMBER.match(value):
                try:
                    yield Decimal(value), tag
                except InvalidOperation:
                    continue

    def matching(self, tags: Iterable[str]) -> list[str]:
        return [tag for _, tag in self._numbers(tags)]

    def select(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> str | None:
        ranked = list(self._numbers(tags))
        if not ranked:
            return None
        return (max(ranked) if self.order is Order.asc else min(ranked))[1]


def _glob(pattern: str) -> re.Pattern[str]:
    """go-glob as fluxd used it: `*` matches any run of characters, nothing else is special."""
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$", re.S)


# A timestamp inside a tag: a run of 8 to 14 digits standing alone between separators
# (`-`, `_`, `.`, `+` or the ends), the last such run of the tag.
_TAG_DIGITS = re.compile(r"(?<![A-Za-z0-9])([0-9]{8,14})(?![A-Za-z0-9])")
_COMPACT_TIMES = {8: "%Y%m%d", 12: "%Y%m%d%H%M", 14: "%Y%m%d%H%M%S"}


def tag_time(tag: str) -> datetime | None:
    """The time a tag says it was built, or None: Unix seconds (10 digits, as Cellenics'
    `refs-heads-master-<sha>-<unix time>`), Unix milliseconds (13 digits), or a compact
    UTC date `YYYYMMDD[HHMM[SS]]` (8, 12, 14 digits) from 2000 on."""
    found = _TAG_DIGITS.findall(tag)
    if not found:
        return None
    digits = found[-1]
    if len(digits) in (10, 13):
        seconds = int(digits) / (1000 if len(digits) == 13 else 1)
        return datetime.fromtimestamp(seconds, tz=UTC)
    layout = _COMPACT_TIMES.get(len(digits))
    if layout is None:
        return None
    try:
        parsed = datetime.strptime(digits, layout).replace(tzinfo=UTC)
    except ValueError:
        return None
    return parsed if parsed.year >= 2000 else None


@dataclass(frozen=True)
class NewestBuildPolicy:
    """Flux v1 `glob:`/`regex:` filters: of the matching tags, the most recently built.

    The order, and nothing else: the newest `created` time in the image config (tags
    without one count as older than any with one); among tags that share it, the newest
    timestamp in the tag (`tag_time`). When that leaves more than one tag, because one of
    them has no timestamp or two have the same, the policy chooses none (`ties`)."""

    matcher: re.Pattern[str]
    text: str
    needs_build_times = True

    @property
    def description(self) -> str:
        return f"{self.text} (newest build)"

    def matching(self, tags: Iterable[str]) -> list[str]:
        return [tag for tag in tags if self.matcher.search(tag)]

    def newest(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> list[str]:
        """The matching tags the order puts first: one when it decides."""
        times = built or {}
        candidates = self.matching(tags)
        newest_built = max((t for t in map(times.get, candidates) if t is not None), default=None)
        tier = [tag for tag in candidates if times.get(tag) == newest_built]
        if len(tier) < 2:
            return tier
        stamps = {tag: tag_time(tag) for tag in tier}
        known = [stamp for stamp in stamps.values() if stamp is not None]
        if len(known) < len(tier):
            return tier  # a tag without a timestamp cannot be ordered against the others
        return [tag for tag in tier if stamps[tag] == max(known)]

    def select(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> str | None:
        first = self.newest(tags, built=built)
        return first[0] if len(first) == 1 else None

    def ties(
        self, tags: Iterable[str], *, built: Mapping[str, datetime | None] | None = None
    ) -> list[str]:
        first = self.newest(tags, built=built)
        return sorted(first) if len(first) > 1 else []


def _semver_range(text: str, *, context: str) -> SemverRange:
    try:
        return SemverRange.parse(text)
    except SemverRangeError as error:
        raise PolicyError(f"{context}: invalid semver range: {error}") from None


def flux_v1_filter(text: str, *, context: str = "filter") -> TagPolicy:
    """`glob:PATTERN` (the default without a prefix), `semver:RANGE`, `regex:RE`/`regexp:RE`."""
    if text.startswith("semver:"):
        return SemverPolicy(_semver_range(text.removeprefix("semver:"), context=context))
    for prefix in ("regexp:", "regex:"):
        if text.startswith(prefix):
            pattern = text.removeprefix(prefix)
            return NewestBuildPolicy(go_regex(pattern, context=context), f"regex:{pattern}")
    pattern = text.removeprefix("glob:")
    return NewestBuildPolicy(_glob(pattern), f"glob:{pattern}")


def _order(raw: Any, *, context: str) -> Order:
    try:
        return Order(raw or "asc")
    except ValueError:
        raise PolicyError(f"{context}: order must be asc or desc, not {raw!r}") from None


def image_policy(spec: Mapping[str, Any], *, context: str) -> TagPolicy:
    """The policy of a Flux v2 ImagePolicy's `spec` (`filterTags` and `policy`)."""
    filter_spec = spec.get("filterTags") or {}
    if not isinstance(filter_spec, Mapping):
        raise PolicyError(f"{context}: filterTags must be a mapping")
    pattern = filter_spec.get("pattern")
    tag_filter = TagFilter(
        go_regex(str(pattern), context=context) if pattern else None,
        str(filter_spec.get("extract") or ""),
    )
    choice = spec.get("policy")
    if not isinstance(choice, Mapping) or len(choice) != 1:
        raise PolicyError(f"{context}: policy must name one of semver, alphabetical, numerical")
    kind, settings = next(iter(choice.items()))
    settings = settings if isinstance(settings, Mapping) else {}
    if kind == "semver":
        if not settings.get("range"):
            raise PolicyError(f"{context}: policy.semver.range is required")
        return SemverPolicy(_semver_range(str(settings["range"]), context=context), tag_filter)
    if kind == "alphabetical":
        return AlphabeticalPolicy(_order(settings.get("order"), context=context), tag_filter)
    if kind == "numerical":
        return NumericalPolicy(_order(settings.get("order"), context=context), tag_filter)
    raise PolicyError(f"{context}: unknown policy {kind!r} (semver, alphabetical, numerical)")
