"""Semantic versions and ranges, compatible with the Masterminds syntax Flux uses.

Versions are `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]` with an optional `v` prefix. All
three numbers are required: Masterminds would coerce `1234567` (a short git SHA made of
digits) into `1234567.0.0` and roll a cluster onto a CI build; here it is not a version.

Range syntax (one range is `||`-separated alternatives; inside one, comparators separated
by spaces or commas must all hold):

- comparators `=`, `!=`, `>`, `>=` (`=>`), `<`, `<=` (`=<`), space allowed after the operator;
- partial versions and wildcards: `1.2` = `1.2.x` = `1.2.*` = `>=1.2.0 <1.3.0`, `*`/`x` = any;
- tilde `~1.2.3` = `>=1.2.3 <1.3.0`, `~1` = `>=1.0.0 <2.0.0` (`~>` is the same);
- caret `^1.2.3` = `>=1.2.3 <2.0.0`, `^0.2.3` = `>=0.2.3 <0.3.0`, `^0.0.3` = `>=0.0.3 <0.0.4`;
- hyphen ranges `1.2.3 - 2.3.4` = `>=1.2.3 <=2.3.4`, `1.2 - 2` = `>=1.2.0 <3.0.0`.

Prereleases: an alternative admits versions with a prerelease only if one of its
comparators names a prerelease (`>=1.0.0-0` admits `1.4.0-rc.1`; `>=1.0.0` does not), as
in Masterminds; unlike npm the prerelease need not share the comparator's MAJOR.MINOR.PATCH.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import total_ordering

from conveyor.errors import ConveyorError

_IDENT = r"[0-9A-Za-z-]+"
_VERSION = re.compile(
    rf"^v?(?P<major>\d+)\.(?P<minor>\d+)\.(?P<patch>\d+)"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?(?:\+(?P<build>{_IDENT}(?:\.{_IDENT})*))?$"
)
_PART = r"x|X|\*|\d+"
_PARTIAL = re.compile(
    rf"^v?(?P<major>{_PART})(?:\.(?P<minor>{_PART})(?:\.(?P<patch>{_PART}))?)?"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?(?:\+(?P<build>{_IDENT}(?:\.{_IDENT})*))?$"
)
_OPERATORS = ("!=", ">=", "=>", "<=", "=<", "~>", ">", "<", "=", "~", "^")
_GLUE_OPERATOR = re.compile(r"(!=|>=|=>|<=|=<|~>|>|<|=|~|\^)\s+")
_ANY_VERSION = "*"

Identifier = int | str


class SemverRangeError(ConveyorError, ValueError):
    """A range that does not parse; the message quotes the part that failed."""


def _prerelease(text: str | None) -> tuple[Identifier, ...] | None:
    """Split a prerelease; None when a numeric identifier has a leading zero (invalid)."""
    if not text:
        return ()
    identifiers: list[Identifier] = []
    for part in text.split("."):
        if part.isdigit():
            if len(part) > 1 and part.startswith("0"):
                return None
            identifiers.append(int(part))
        else:
            identifiers.append(part)
    return tuple(identifiers)


@total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple[Identifier, ...] = ()
    build: str = field(default="", compare=False)
    _key: tuple[int, int, int, int, tuple[tuple[int, int, str], ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Precedence as one tuple, computed once: ranges compare each tag many times.
        # A release sorts after its prereleases; numeric identifiers before alphanumeric.
        pre = tuple((0, i, "") if isinstance(i, int) else (1, 0, i) for i in self.prerelease)
        key = (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)
        object.__setattr__(self, "_key", key)

    @classmethod
    def parse(cls, text: str) -> Version | None:
        """The version `text` spells, or None: tags that are not versions are skipped."""
        match = _VERSION.match(text)
        if not match:
            return None
        prerelease = _prerelease(match["pre"])
        if prerelease is None:
            return None
        return cls(
            int(match["major"]),
            int(match["minor"]),
            int(match["patch"]),
            prerelease,
            match["build"] or "",
        )

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key < other._key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(str(i) for i in self.prerelease)
        if self.build:
            text += f"+{self.build}"
        return text


def _floor(major: int, minor: int, patch: int) -> Version:
    """The lowest version at MAJOR.MINOR.PATCH, below all of its prereleases."""
    return Version(major, minor, patch, (0,))


@dataclass(frozen=True)
class _Interval:
    """`low <= v < high` (each end inclusive or not, None = unbounded), maybe negated."""

    low: Version | None = None
    low_inclusive: bool = True
    high: Version | None = None
    high_inclusive: bool = False
    negated: bool = False

    def contains(self, version: Version) -> bool:
        key = version._key
        inside = True
        if self.low is not None:
            inside = key >= self.low._key if self.low_inclusive else key > self.low._key
        if inside and self.high is not None:
            inside = key <= self.high._key if self.high_inclusive else key < self.high._key
        return inside != self.negated


_EVERYTHING = _Interval()
_NOTHING = _Interval(negated=True)


@dataclass(frozen=True)
class _Partial:
    """A version with trailing parts left open: `1.2` has major 1, minor 2, patch None."""

    major: int | None
    minor: int | None
    patch: int | None
    prerelease: tuple[Identifier, ...]

    @classmethod
    def parse(cls, text: str, *, context: str) -> _Partial:
        match = _PARTIAL.match(text)
        prerelease = _prerelease(match["pre"]) if match else None
        if not match or prerelease is None:
            raise SemverRangeError(f"{context!r}: {text!r} is not a version")
        parts: list[int | None] = []
        for name in ("major", "minor", "patch"):
            value = match[name]
            # Once a part is a wildcard (or missing) every later part is one too.
            open_part = value is None or not value.isdigit() or (parts and parts[-1] is None)
            parts.append(None if open_part else int(value))
        return cls(parts[0], parts[1], parts[2], prerelease)

    @property
    def complete(self) -> bool:
        return self.patch is not None

    def lowest(self) -> Version:
        return Version(self.major or 0, self.minor or 0, self.patch or 0, self.prerelease)

    def next_floor(self) -> Version:
        """The first version after everything this partial covers (for `1.2` that is
        `1.3.0-0`); only for partials with major set and some part open."""
        low = self.lowest()
        if self.minor is None:
            return _floor(low.major + 1, 0, 0)
        return _floor(low.major, low.minor + 1, 0)


def _comparator(operator: str, partial: _Partial) -> _Interval:
    if partial.major is None:
        # Wildcards: `*`, `>=*`, `<=*`, `~*`, `^*` match all; `<*`, `>*`, `!=*` nothing.
        return _NOTHING if operator in ("<", ">", "!=") else _EVERYTHING
    low = partial.lowest()
    if operator in ("", "=", "!="):
        high, inclusive = (low, True) if partial.complete else (partial.next_floor(), False)
        return _Interval(low, True, high, inclusive, negated=operator == "!=")
    if operator == ">":
        if partial.complete:
            return _Interval(low, False)
        return _Interval(partial.next_floor(), True)
    if operator in (">=", "=>"):
        return _Interval(low, True)
    if operator == "<":
        return _Interval(high=low if partial.complete else _floor(low.major, low.minor, 0))
    if operator in ("<=", "=<"):
        if partial.complete:
            return _Interval(high=low, high_inclusive=True)
        return _Interval(high=partial.next_floor(), high_inclusive=False)
    if operator in ("~", "~>"):
        if partial.minor is None:
            return _Interval(low, True, _floor(low.major + 1, 0, 0))
        return _Interval(low, True, _floor(low.major, low.minor + 1, 0))
    # Caret: the leftmost non-zero part (among those given) may not change.
    if low.major > 0 or partial.minor is None:
        high = _floor(low.major + 1, 0, 0)
    elif low.minor > 0 or partial.patch is None:
        high = _floor(0, low.minor + 1, 0)
    else:
        high = _floor(0, 0, low.patch + 1)
    return _Interval(low, True, high)


def _hyphen(first: _Partial, last: _Partial) -> list[_Interval]:
    low = _EVERYTHING if first.major is None else _Interval(first.lowest(), True)
    if last.major is None:
        high = _EVERYTHING
    elif last.complete:
        high = _Interval(high=last.lowest(), high_inclusive=True)
    else:
        high = _Interval(high=last.next_floor(), high_inclusive=False)
    return [low, high]


@dataclass(frozen=True)
class _Alternative:
    intervals: tuple[_Interval, ...]
    admits_prereleases: bool

    def allows(self, version: Version) -> bool:
        if version.prerelease and not self.admits_prereleases:
            return False
        return all(interval.contains(version) for interval in self.intervals)


def _split_operator(token: str) -> tuple[str, str]:
    for operator in _OPERATORS:
        if token.startswith(operator):
            return operator, token[len(operator) :]
    return "", token


def _alternative(text: str, *, context: str) -> _Alternative:
    tokens = [t for t in re.split(r"[\s,]+", _GLUE_OPERATOR.sub(r"\1", text.strip())) if t]
    if not tokens:
        tokens = [_ANY_VERSION]
    intervals: list[_Interval] = []
    prereleases = False
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if index + 2 < len(tokens) and tokens[index + 1] == "-":
            first = _Partial.parse(token, context=context)
            last = _Partial.parse(tokens[index + 2], context=context)
            intervals.extend(_hyphen(first, last))
            prereleases = prereleases or bool(first.prerelease or last.prerelease)
            index += 3
            continue
        operator, version = _split_operator(token)
        partial = _Partial.parse(version, context=context)
        intervals.append(_comparator(operator, partial))
        prereleases = prereleases or bool(partial.prerelease)
        index += 1
    return _Alternative(tuple(intervals), prereleases)


@dataclass(frozen=True)
class SemverRange:
    text: str
    alternatives: tuple[_Alternative, ...]

    @classmethod
    def parse(cls, text: str) -> SemverRange:
        alternatives = tuple(_alternative(part, context=text) for part in text.split("||"))
        return cls(text, alternatives)

    def allows(self, version: Version) -> bool:
        return any(alternative.allows(version) for alternative in self.alternatives)

    def __str__(self) -> str:
        return self.text
