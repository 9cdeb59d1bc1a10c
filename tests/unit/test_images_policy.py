"""Semver ranges and tag policies, including the tags that fooled earlier tools."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conveyor.images.policy import (
    AlphabeticalPolicy,
    NewestBuildPolicy,
    NumericalPolicy,
    Order,
    PolicyError,
    SemverPolicy,
    TagFilter,
    expand_template,
    flux_v1_filter,
    go_regex,
    image_policy,
    tag_time,
)
from conveyor.images.semver import SemverRange, SemverRangeError, Version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3", "1.2.3"),
        ("v1.2.3", "1.2.3"),
        ("1.2.3-rc.1+build.5", "1.2.3-rc.1+build.5"),
        ("1234567", None),  # a short git SHA made of digits is not a version
        ("1.2", None),
        ("v1", None),
        ("1.2.3-01", None),  # numeric prerelease with a leading zero
        ("refs-heads-master-abc", None),
        ("1.2.3.4", None),
    ],
)
def test_version_parse(text: str, expected: str | None) -> None:
    version = Version.parse(text)
    assert (str(version) if version else None) == expected


def test_version_precedence_follows_semver() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta", "1.0.0-rc.2", "1.0.0-rc.10", "1.0.0"]
    versions = [Version.parse(v) for v in ordered]
    assert sorted(versions, key=lambda v: v or Version(0, 0, 0)) == versions  # type: ignore[arg-type]
    assert Version.parse("1.0.0+a") == Version.parse("1.0.0+b")


@pytest.mark.parametrize(
    ("range_text", "version", "allowed"),
    [
        (">=1.0.0", "1.2.0", True),
        (">=1.0.0", "0.9.9", False),
        (">=1.0.0", "1.2.0-rc.1", False),  # no prereleases unless the range asks
        (">=1.0.0-0", "1.2.0-rc.1", True),
        (">=1.0.0-0", "0.9.0-rc.1", False),
        (">= 1.2, < 3.0.0 || >= 4.2.3", "2.9.0", True),
        (">= 1.2, < 3.0.0 || >= 4.2.3", "3.5.0", False),
        (">= 1.2, < 3.0.0 || >= 4.2.3", "4.2.3", True),
        ("=1.2.3", "1.2.3", True),
        ("1.2.3", "1.2.4", False),
        ("!=1.2.3", "1.2.4", True),
        ("!=1.2.x", "1.2.7", False),
        (">1.2", "1.2.9", False),
        (">1.2", "1.3.0", True),
        ("<1.2", "1.1.99", True),
        ("<1.2", "1.2.0", False),
        ("<=1.2", "1.2.99", True),
        ("<=1.2", "1.3.0", False),
        ("1.2.x", "1.2.7", True),
        ("1.2.*", "1.3.0", False),
        ("1.x", "1.9.0", True),
        ("*", "0.0.1", True),
        ("x", "9.0.0", True),
        ("~1.2.3", "1.2.9", True),
        ("~1.2.3", "1.3.0", False),
        ("~1", "1.9.0", True),
        ("~1", "2.0.0", False),
        ("~>2.3", "2.3.5", True),
        ("^1.2.3", "1.9.9", True),
        ("^1.2.3", "2.0.0", False),
        ("^0.2.3", "0.2.9", True),
        ("^0.2.3", "0.3.0", False),
        ("^0.0.3", "0.0.3", True),
        ("^0.0.3", "0.0.4", False),
        ("^0", "0.9.0", True),
        ("^0", "1.0.0", False),
        ("1.2.3 - 2.3.4", "2.3.4", True),
        ("1.2.3 - 2.3.4", "2.3.5", False),
        ("1.2 - 2", "2.9.9", True),
        ("1.2 - 2", "3.0.0", False),
        ("1.2 - 2", "1.1.9", False),
        ("v1.2.3", "1.2.3", True),
    ],
)
def test_range(range_text: str, version: str, allowed: bool) -> None:
    parsed = Version.parse(version)
    assert parsed is not None
    assert SemverRange.parse(range_text).allows(parsed) is allowed


@pytest.mark.parametrize("bad", [">=1.0.0 <", "1.2.3.4", ">=banana", "~v"])
def test_bad_range_is_an_error(bad: str) -> None:
    with pytest.raises(SemverRangeError):
        SemverRange.parse(bad)


def semver(range_text: str, **kwargs: object) -> SemverPolicy:
    return SemverPolicy(SemverRange.parse(range_text), **kwargs)  # type: ignore[arg-type]


def test_semver_skips_non_versions_and_numeric_shas() -> None:
    tags = ["1.2.0", "1234567", "9999999", "latest", "1.10.0", "1.9.0", "v2", "2.0"]
    assert semver(">=0.0.0").select(tags) == "1.10.0"


def test_semver_accepts_v_prefix_and_prefers_it_deterministically() -> None:
    assert semver(">=1.0.0").select(["v1.1.0", "1.0.5"]) == "v1.1.0"
    assert semver(">=1.0.0").select(["1.1.0", "v1.1.0"]) == "v1.1.0"
    assert semver(">=1.0.0").select(["v1.1.0", "1.1.0"]) == "v1.1.0"


def test_semver_prereleases_only_when_the_range_asks() -> None:
    tags = ["1.0.0", "1.1.0-rc.1", "1.1.0-rc.2"]
    assert semver(">=1.0.0").select(tags) == "1.0.0"
    assert semver(">=1.0.0-0").select(tags) == "1.1.0-rc.2"
    assert semver(">=1.0.0-0").select([*tags, "1.1.0"]) == "1.1.0"


def test_semver_nothing_matches() -> None:
    assert semver("^3.0.0").select(["1.0.0", "2.0.0"]) is None
    assert semver(">=0.0.0").select([]) is None


def test_semver_with_filter_and_extract() -> None:
    policy = semver(
        ">=1.0.0",
        tag_filter=TagFilter(go_regex(r"^app-(?P<version>.*)$", context="t"), "$version"),
    )
    assert policy.select(["app-1.2.0", "app-1.10.0", "other-9.0.0", "app-x"]) == "app-1.10.0"


def test_numerical_with_timestamp_extract() -> None:
    tag_filter = TagFilter(go_regex(r"^main-[a-f0-9]+-(?P<ts>[0-9]+)$", context="t"), "$ts")
    tags = [
        "main-abc1234-1700000000",
        "main-0ff1ce0-1700000500",
        "main-def5678-999999999",  # fewer digits, smaller number: not chosen by string order
        "feature-aaa1111-1800000000",
        "main-abc1234-notatime",
        "latest",
    ]
    assert NumericalPolicy(Order.asc, tag_filter).select(tags) == "main-0ff1ce0-1700000500"
    assert NumericalPolicy(Order.desc, tag_filter).select(tags) == "main-def5678-999999999"
    assert NumericalPolicy(Order.asc, tag_filter).matching(tags) == tags[:3]


def test_numerical_without_filter_skips_non_numbers() -> None:
    tags = ["10", "9", "100", "1e3x", "abc", "3.5", "1_000"]
    assert NumericalPolicy(Order.asc).select(tags) == "100"
    assert NumericalPolicy(Order.desc).select(tags) == "3.5"


def test_alphabetical_orders() -> None:
    tags = ["RELEASE.2023-01-31", "RELEASE.2024-05-01", "RELEASE.2023-12-24"]
    assert AlphabeticalPolicy(Order.asc).select(tags) == "RELEASE.2024-05-01"
    assert AlphabeticalPolicy(Order.desc).select(tags) == "RELEASE.2023-01-31"
    assert AlphabeticalPolicy(Order.asc).select([]) is None


def test_extract_template_follows_go() -> None:
    match = go_regex(r"^(?P<branch>[a-z]+)-(?<sha>[a-f0-9]+)-(\d+)$", context="t").search(
        "main-abc-42"
    )
    assert match is not None
    assert expand_template("$branch/${sha}/$3", match) == "main/abc/42"
    assert expand_template("$$ts-$missing-$9", match) == "$ts--"


def test_flux_v1_filters() -> None:
    glob = flux_v1_filter("glob:refs-heads-master-*")
    assert glob.needs_build_times
    assert glob.matching(["refs-heads-master-a", "refs-pull-1-merge-b", "refs-heads-master-"]) == [
        "refs-heads-master-a",
        "refs-heads-master-",
    ]
    assert flux_v1_filter("glob:1.?.x").matching(["1.?.x", "1.2.x"]) == ["1.?.x"]
    assert isinstance(flux_v1_filter("development-*"), NewestBuildPolicy)  # glob by default
    regex = flux_v1_filter("regex:^0.6")
    assert regex.matching(["0.6.1", "10.6", "0.7"]) == ["0.6.1"]
    assert flux_v1_filter("regexp:^v").matching(["v1", "1"]) == ["v1"]
    assert flux_v1_filter("semver:~4.0").select(["4.0.3", "4.1.0", "4.0.10"]) == "4.0.10"
    with pytest.raises(PolicyError, match="invalid semver range"):
        flux_v1_filter("semver:>=banana")
    with pytest.raises(PolicyError, match="invalid regular expression"):
        flux_v1_filter("regex:(")


def test_newest_build_picks_latest_build_time() -> None:
    policy = flux_v1_filter("glob:refs-heads-master-*")
    built = {
        "refs-heads-master-aaa": datetime(2024, 1, 2, tzinfo=UTC),
        "refs-heads-master-zzz": datetime(2024, 1, 1, tzinfo=UTC),
        "refs-heads-master-bbb": None,
        "refs-pull-1-merge-ccc": datetime(2025, 1, 1, tzinfo=UTC),
    }
    assert policy.select(list(built), built=built) == "refs-heads-master-aaa"
    assert policy.ties(list(built), built=built) == []
    # One build time and nothing in the tags to order by: no choice, never the smaller tag.
    tie = {"b": datetime(2024, 1, 1, tzinfo=UTC), "a": datetime(2024, 1, 1, tzinfo=UTC)}
    assert flux_v1_filter("glob:*").select(list(tie), built=tie) is None
    assert flux_v1_filter("glob:*").ties(list(tie), built=tie) == ["a", "b"]


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("refs-heads-master-4f5c0a1-1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("build-1700000000123", datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)),
        ("nightly.20240501", datetime(2024, 5, 1, tzinfo=UTC)),
        ("main_202405011230", datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
        ("20240501103000-abc", datetime(2024, 5, 1, 10, 30, tzinfo=UTC)),
        # the last timestamp of the tag counts
        ("1600000000-rebuilt-1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("refs-heads-master-4f5c0a1", None),  # a short SHA is not a time
        ("1234567", None),
        ("refs-heads-master-1111111-999999999", None),  # 9 digits: not a Unix time we read
        ("v12345678", None),  # digits glued to a letter
        ("release-19991231", None),  # before 2000
        ("release-20241399", None),  # no 13th month
        ("latest", None),
    ],
)
def test_tag_time(tag: str, expected: datetime | None) -> None:
    assert tag_time(tag) == expected


def _at(second: int) -> datetime:
    return datetime(2024, 1, 1, 0, 0, second, tzinfo=UTC)


def test_newest_build_orders_by_created_then_the_tag_timestamp() -> None:
    policy = flux_v1_filter("glob:refs-heads-master-*")
    old, new = "refs-heads-master-aaa-1700000000", "refs-heads-master-bbb-1700000500"
    # `created` first, even against the timestamps in the tags.
    assert policy.select([old, new], built={old: _at(2), new: _at(1)}) == old
    # Reproducible builds share one `created`: the tags' timestamps decide.
    assert policy.select([new, old], built={old: _at(0), new: _at(0)}) == new
    # No `created` at all (no config field): the tags' timestamps decide too.
    assert policy.select([new, old], built={old: None, new: None}) == new
    assert policy.select([old, new]) == new
    # A tag without `created` is older than any with one.
    assert policy.select([old, new], built={old: _at(0), new: None}) == old


def test_newest_build_without_an_order_chooses_nothing() -> None:
    policy = flux_v1_filter("regex:^main-")
    # One time, no timestamps: undecided, whatever the alphabet says.
    same = {"main-zzz": _at(0), "main-aaa": _at(0), "main-old": None}
    assert policy.select(list(same), built=same) is None
    assert policy.ties(list(same), built=same) == ["main-aaa", "main-zzz"]
    # One of the tied tags has a timestamp, the other not: they cannot be ordered.
    mixed = {"main-x-1700000000": _at(0), "main-y": _at(0)}
    assert policy.ties(list(mixed), built=mixed) == ["main-x-1700000000", "main-y"]
    # Equal timestamps are no order either.
    equal = ["main-a-1700000000", "main-b-1700000000"]
    assert policy.ties(equal) == equal
    # A single matching tag needs no order.
    assert policy.select(["main-only", "other"]) == "main-only"
    assert policy.ties(["other"]) == [] and policy.select(["other"]) is None
    # The total orders never tie.
    assert SemverPolicy(SemverRange.parse(">=1")).ties(["1.0.0", "v1.0.0"]) == []


def test_image_policy_specs() -> None:
    numerical = image_policy(
        {
            "imageRepositoryRef": {"name": "api"},
            "filterTags": {"pattern": "^main-[a-f0-9]+-(?P<ts>[0-9]+)", "extract": "$ts"},
            "policy": {"numerical": {"order": "asc"}},
        },
        context="t",
    )
    assert numerical.select(["main-abc-5", "main-abc-40", "main-abc-300"]) == "main-abc-300"
    assert image_policy({"policy": {"alphabetical": {}}}, context="t").select(["a", "b"]) == "b"
    assert (
        image_policy({"policy": {"semver": {"range": "^1"}}}, context="t").select(
            ["1.9.0", "2.0.0"]
        )
        == "1.9.0"
    )
    pattern_only = image_policy(
        {"filterTags": {"pattern": "^v"}, "policy": {"semver": {"range": "*"}}}, context="t"
    )
    assert pattern_only.select(["v1.0.0", "2.0.0"]) == "v1.0.0"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"policy": {"semver": {}}}, "range is required"),
        ({"policy": {"newest": {}}}, "unknown policy"),
        ({}, "policy must name one"),
        ({"policy": {"numerical": {"order": "up"}}}, "order must be asc or desc"),
        ({"filterTags": {"pattern": "("}, "policy": {"alphabetical": {}}}, "invalid regular"),
    ],
)
def test_image_policy_errors(spec: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        image_policy(spec, context="ImagePolicy x")
