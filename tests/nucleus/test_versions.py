"""Semantic versions and npm-style requirements as Greengrass recipes write them."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleus.errors import VersionError
from nucleus.versions import Requirement, Version

# Deterministic and untimed: same examples on every run, no deadline flakiness on slow CI.
DETERMINISTIC = settings(derandomize=True, max_examples=200, deadline=None)

# --- Version ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("1.2.3", (1, 2, 3, (), ())),
        ("0.0.0", (0, 0, 0, (), ())),
        ("10.20.30-alpha.1", (10, 20, 30, ("alpha", 1), ())),
        ("1.0.0-0.3.7", (1, 0, 0, (0, 3, 7), ())),
        ("1.0.0-x-y-z.--", (1, 0, 0, ("x-y-z", "--"), ())),
        ("1.0.0+20130313144700", (1, 0, 0, (), ("20130313144700",))),
        ("1.0.0-beta+exp.sha.5114f85", (1, 0, 0, ("beta",), ("exp", "sha", "5114f85"))),
        (" 2.0.0 ", (2, 0, 0, (), ())),
    ],
)
def test_version_parse(text: str, fields: tuple[object, ...]) -> None:
    v = Version.parse(text)
    assert (v.major, v.minor, v.patch, v.prerelease, v.build) == fields


@pytest.mark.parametrize(
    "text",
    ["", "1", "1.2", "1.2.3.4", "01.2.3", "1.02.3", "1.2.03", "1.2.3-01", "1.2.3-", "1.2.3+", "v1.2.3",
     "1.2.3-a..b", "a.b.c", "1.0.0—x", "NEXT_PATCH", "{COMPONENT_VERSION}"],
)
def test_version_parse_rejects(text: str) -> None:
    with pytest.raises(VersionError):
        Version.parse(text)


def test_version_ordering_follows_semver_spec_example() -> None:
    # The precedence chain from semver.org section 11.
    chain = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
             "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0", "10.0.0"]
    versions = [Version.parse(t) for t in chain]
    assert sorted(versions[1::2] + versions[::2]) == versions
    for a, b in itertools.pairwise(versions):
        assert a < b and b > a and a != b


def test_build_metadata_ignored_for_precedence_but_not_equality() -> None:
    a, b = Version.parse("1.0.0+a"), Version.parse("1.0.0+b")
    assert a.compare(b) == 0
    assert a != b
    assert sorted([b, a]) == [a, b]  # deterministic tie-break
    assert Version.parse("1.0.0+a") == a and hash(Version.parse("1.0.0+a")) == hash(a)


_ident = st.one_of(
    st.integers(min_value=0, max_value=10_000),
    st.from_regex(r"[A-Za-z-][0-9A-Za-z-]{0,6}", fullmatch=True),
)
_versions = st.builds(
    Version,
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.lists(_ident, max_size=3).map(tuple),
    st.lists(st.from_regex(r"[0-9A-Za-z-]{1,6}", fullmatch=True), max_size=2).map(tuple),
)


@DETERMINISTIC
@given(_versions)
def test_version_str_parse_round_trip(v: Version) -> None:
    assert Version.parse(str(v)) == v


@DETERMINISTIC
@given(_versions, _versions, _versions)
def test_version_ordering_is_total_and_transitive(a: Version, b: Version, c: Version) -> None:
    assert (a < b) + (a == b) + (a > b) == 1
    if a <= b and b <= c:
        assert a <= c
    assert (a.compare(b) < 0) == (a.precedence_key() < b.precedence_key())


@DETERMINISTIC
@given(_versions)
def test_release_outranks_its_prereleases(v: Version) -> None:
    release = Version(v.major, v.minor, v.patch)
    assert v.compare(release) <= 0
    if v.prerelease:
        assert v < release


# --- Requirement -----------------------------------------------------------------------------

# (requirement, allowed, refused) - every form the brief and the corpus use.
REQUIREMENT_TABLE: list[tuple[str | None, list[str], list[str]]] = [
    (">=1.0.0 <2.0.0", ["1.0.0", "1.9.9"], ["0.9.9", "2.0.0", "2.0.0-rc.1"]),
    ("^1.2", ["1.2.0", "1.9.0"], ["1.1.9", "2.0.0"]),
    ("^1.1", ["1.1.0", "1.5.3"], ["1.0.9", "2.0.0"]),
    ("^2.0", ["2.0.0", "2.13.0"], ["3.0.0", "1.9.9"]),
    ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0", "0.2.2"]),
    ("^0.0.3", ["0.0.3"], ["0.0.4", "0.0.2"]),
    ("^0.0", ["0.0.0", "0.0.9"], ["0.1.0"]),
    ("^0", ["0.0.0", "0.9.9"], ["1.0.0"]),
    ("~1.2.3", ["1.2.3", "1.2.99"], ["1.3.0", "1.2.2"]),
    ("~2.0.0", ["2.0.0", "2.0.5"], ["2.1.0"]),
    ("~1.2", ["1.2.0", "1.2.7"], ["1.3.0"]),
    ("~1", ["1.0.0", "1.9.0"], ["2.0.0"]),
    ("1.x", ["1.0.0", "1.99.0"], ["2.0.0", "0.9.0"]),
    ("1.2.x", ["1.2.0", "1.2.9"], ["1.3.0"]),
    ("1", ["1.0.0", "1.5.0"], ["2.0.0"]),
    ("=1.0.0", ["1.0.0", "1.0.0+build"], ["1.0.1"]),
    ("==1.12.134", ["1.12.134"], ["1.12.133", "1.12.135"]),
    (">= 0.1.3", ["0.1.3", "5.0.0"], ["0.1.2"]),
    (">= 2.0.3", ["2.0.3"], ["2.0.2"]),
    ("<2.0.0 >=1.3.0", ["1.3.0", "1.99.0"], ["1.2.9", "2.0.0"]),
    ("<2.0.0 >=1.12.36", ["1.12.134"], ["1.12.35"]),
    (">=0.2.5 <=0.3.9", ["0.2.5", "0.3.9"], ["0.3.10", "0.2.4"]),
    (">0.0.0", ["0.0.1"], ["0.0.0"]),
    (">1", ["2.0.0"], ["1.9.9"]),
    (">1.2", ["1.3.0"], ["1.2.9"]),
    ("<1.2", ["1.1.9"], ["1.2.0", "1.2.0-rc.1"]),
    ("<=1.2", ["1.2.9"], ["1.3.0"]),
    ("1.0.0", ["1.0.0"], ["1.0.1", "0.9.0"]),
    ("99.0.0", ["99.0.0"], ["1.0.0"]),
    ("", ["0.0.0", "1.0.0", "99.1.2"], ["1.0.0-alpha"]),
    (None, ["0.0.0", "3.4.5"], []),
    ("*", ["0.0.0", "3.4.5"], ["1.0.0-rc.1"]),
    ("x", ["1.0.0"], []),
    ("1.0.0 - 2.0.0", ["1.0.0", "1.5.0", "2.0.0"], ["0.9.9", "2.0.1"]),
    ("1.2 - 2.3", ["1.2.0", "2.3.99"], ["1.1.9", "2.4.0"]),
    ("1 - 2", ["1.0.0", "2.99.0"], ["3.0.0"]),
    ("1.0.0 || >=3.0.0", ["1.0.0", "3.0.0", "4.1.0"], ["2.0.0", "1.0.1"]),
    ("^1.0.0 || ^3.0.0", ["1.2.0", "3.2.0"], ["2.0.0"]),
    ("  >=1.0.0  ", ["1.0.0"], ["0.1.0"]),
    # Prerelease semantics as npm: only with a comparator on the same major.minor.patch.
    (">=1.2.3-alpha.1", ["1.2.3-alpha.1", "1.2.3-beta", "1.2.3", "1.3.0"], ["1.3.0-alpha", "1.2.3-alpha.0"]),
    ("^1.2.3-beta.2", ["1.2.3-beta.2", "1.2.3-beta.3", "1.9.0"], ["1.2.4-beta.2", "2.0.0-beta"]),
    (">=1.0.0", ["1.0.0", "2.0.0"], ["2.0.0-rc.1", "1.0.0-rc.1"]),
    ("~1.2.3-rc.1", ["1.2.3-rc.1", "1.2.3"], ["1.2.4-rc.1", "1.3.0"]),
    ("1.0.0-rc.1", ["1.0.0-rc.1"], ["1.0.0-rc.2", "1.0.0"]),
    ("1.0.0-alpha - 1.0.0", ["1.0.0-alpha", "1.0.0-beta", "1.0.0"], ["1.0.1-alpha"]),
]


@pytest.mark.parametrize(("text", "allowed", "refused"), REQUIREMENT_TABLE)
def test_requirement_allows(text: str | None, allowed: list[str], refused: list[str]) -> None:
    req = Requirement.parse(text)
    for v in allowed:
        assert req.allows(Version.parse(v)), f"{text!r} should allow {v}"
    for v in refused:
        assert not req.allows(Version.parse(v)), f"{text!r} should refuse {v}"


@pytest.mark.parametrize(
    ("text", "shown"),
    [(None, "*"), ("", "*"), ("  ", "*"), ("*", "*"), (" ^1.2 ", "^1.2"), (">= 0.1.3", ">= 0.1.3"),
     ("<2.0.0 >=1.3.0", "<2.0.0 >=1.3.0")],
)
def test_requirement_str_is_original_text(text: str | None, shown: str) -> None:
    assert str(Requirement.parse(text)) == shown


@pytest.mark.parametrize(
    "text",
    [">=", "^", "1.0.0.0", ">=abc", "!=1.0.0", "1.0.0 -", "latest", "{COMPONENT_VERSION}", ">=1.0.0 ||| 2"],
)
def test_requirement_rejects(text: str) -> None:
    with pytest.raises(VersionError):
        Requirement.parse(text)


def test_requirement_any_flag() -> None:
    assert Requirement.parse("").is_any
    assert Requirement.parse("1.x || *").is_any
    assert not Requirement.parse("^1.0.0").is_any


@DETERMINISTIC
@given(_versions)
def test_any_allows_every_release(v: Version) -> None:
    assert Requirement.parse("*").allows(v) == (not v.prerelease)


@DETERMINISTIC
@given(_versions)
def test_exact_requirement_matches_only_its_version(v: Version) -> None:
    req = Requirement.parse(f"={v}")
    assert req.allows(v)
    assert not req.allows(Version(v.major, v.minor, v.patch + 1))
