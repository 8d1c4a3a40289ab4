"""Semantic versions and npm-style version requirements, as Greengrass recipes write them.

Greengrass resolves ``ComponentDependencies.*.VersionRequirement`` with npm semantics
(the Java nucleus uses semver4j in NPM mode), so a requirement written for the cloud service
must mean the same thing here: ``^1.2`` is ``>=1.2.0 <2.0.0-0``, ``~1.2.3`` is
``>=1.2.3 <1.3.0-0``, ``1.x`` is ``>=1.0.0 <2.0.0-0``, ``1.0.0 - 2.0.0`` is inclusive, ``||``
separates alternatives and an empty text or ``*`` means any version.

Prereleases follow npm: a version with a prerelease tag satisfies a range only if some
comparator of the same alternative carries a prerelease on the same ``major.minor.patch``.
Without that rule ``^1.0.0`` would pick ``2.0.0-rc.1`` over ``1.9.0``.

Greengrass spellings that npm does not have are accepted too: ``==1.12.134`` (same as
``=``) and a space after an operator (``>= 0.1.3``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import total_ordering
from typing import Literal

from nucleus.errors import VersionError

__all__ = ["Comparator", "Requirement", "Version"]

_NUM = r"0|[1-9]\d*"
_IDENT = r"[0-9A-Za-z-]+"
_SEMVER_RE = re.compile(
    rf"^(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?"
    rf"(?:\+(?P<build>{_IDENT}(?:\.{_IDENT})*))?$"
)

PreIdent = str | int


def _pre_key(pre: tuple[PreIdent, ...]) -> tuple[tuple[int, int, str], ...]:
    """Sort key of a prerelease: numeric identifiers sort before alphanumeric ones."""
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in pre)


@total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    """A semantic version (semver 2.0.0).

    Equality includes build metadata so that two artifacts built from the same release stay
    distinct in a catalog; precedence ignores it, and it only breaks ties so that ``sorted``
    is deterministic and consistent with ``==``.
    """

    major: int
    minor: int
    patch: int
    prerelease: tuple[PreIdent, ...] = ()
    build: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        if not isinstance(text, str):
            raise VersionError(f"version must be a string, got {type(text).__name__}")
        m = _SEMVER_RE.match(text.strip())
        if m is None:
            raise VersionError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH[-PRE][+BUILD])")
        pre: tuple[PreIdent, ...] = ()
        if m.group("pre"):
            idents: list[PreIdent] = []
            for part in m.group("pre").split("."):
                if part.isdigit():
                    if len(part) > 1 and part[0] == "0":
                        raise VersionError(
                            f"{text!r}: numeric prerelease identifier {part!r} has a leading zero")
                    idents.append(int(part))
                else:
                    idents.append(part)
            pre = tuple(idents)
        build = tuple(m.group("build").split(".")) if m.group("build") else ()
        return cls(int(m.group("major")), int(m.group("minor")), int(m.group("patch")), pre, build)

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    def precedence_key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        """The semver precedence: a release sorts after all of its prereleases."""
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, _pre_key(self.prerelease))

    def compare(self, other: Version) -> int:
        """Semver precedence comparison (-1, 0, 1), build metadata ignored."""
        a, b = self.precedence_key(), other.precedence_key()
        return (a > b) - (a < b)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        a, b = self.precedence_key(), other.precedence_key()
        if a != b:
            return a < b
        return self.build < other.build

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(str(p) for p in self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text

    def __repr__(self) -> str:
        return f"Version('{self}')"


Op = Literal["<", "<=", ">", ">=", "="]


@dataclass(frozen=True, slots=True)
class Comparator:
    op: Op
    version: Version

    def test(self, v: Version) -> bool:
        c = v.compare(self.version)
        match self.op:
            case "<":
                return c < 0
            case "<=":
                return c <= 0
            case ">":
                return c > 0
            case ">=":
                return c >= 0
            case "=":
                return c == 0
        return False  # pragma: no cover - exhaustive above

    def __str__(self) -> str:
        return f"{self.op}{self.version}"


# A partial version: MAJOR[.MINOR[.PATCH[-PRE][+BUILD]]] where any part may be x, X or *.
_XR = r"(?:0|[1-9]\d*|[xX*])"
_PARTIAL_RE = re.compile(
    rf"^v?(?P<major>{_XR})(?:\.(?P<minor>{_XR})(?:\.(?P<patch>{_XR})"
    rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?(?:\+(?P<build>{_IDENT}(?:\.{_IDENT})*))?)?)?$"
)
_OP_RE = re.compile(r"^(==|<=|>=|<|>|=|\^|~>|~)?(.*)$")
_ZERO_PRE: tuple[PreIdent, ...] = (0,)


@dataclass(frozen=True, slots=True)
class _Partial:
    major: int | None
    minor: int | None
    patch: int | None
    pre: tuple[PreIdent, ...]

    def full(self) -> Version:
        return Version(self.major or 0, self.minor or 0, self.patch or 0, self.pre)


def _parse_partial(text: str, whole: str) -> _Partial:
    m = _PARTIAL_RE.match(text)
    if m is None:
        raise VersionError(f"{whole!r}: {text!r} is not a version or version range")

    def num(name: str) -> int | None:
        g = m.group(name)
        return None if g is None or g in ("x", "X", "*") else int(g)

    major, minor, patch = num("major"), num("minor"), num("patch")
    # "1.x.3" is read as "1.x": once a part is a wildcard the rest are too.
    if major is None:
        minor = patch = None
    elif minor is None:
        patch = None
    pre: tuple[PreIdent, ...] = ()
    if m.group("pre") and patch is not None:
        pre = Version.parse(f"{major}.{minor}.{patch}-{m.group('pre')}").prerelease
    return _Partial(major, minor, patch, pre)


def _v(major: int, minor: int, patch: int, pre: tuple[PreIdent, ...] = ()) -> Version:
    return Version(major, minor, patch, pre)


def _desugar(op: str, p: _Partial) -> list[Comparator]:
    """One npm comparator token to plain comparators (empty list = any version)."""
    if op in ("", "=", "=="):
        if p.major is None:
            return []
        if p.minor is None:
            return [Comparator(">=", _v(p.major, 0, 0)), Comparator("<", _v(p.major + 1, 0, 0, _ZERO_PRE))]
        if p.patch is None:
            return [
                Comparator(">=", _v(p.major, p.minor, 0)),
                Comparator("<", _v(p.major, p.minor + 1, 0, _ZERO_PRE)),
            ]
        return [Comparator("=", p.full())]
    if op in ("~", "~>"):
        if p.major is None:
            return []
        if p.minor is None:
            return [Comparator(">=", _v(p.major, 0, 0)), Comparator("<", _v(p.major + 1, 0, 0, _ZERO_PRE))]
        return [Comparator(">=", p.full()), Comparator("<", _v(p.major, p.minor + 1, 0, _ZERO_PRE))]
    if op == "^":
        if p.major is None:
            return []
        low = Comparator(">=", p.full())
        if p.major > 0 or p.minor is None:
            return [low, Comparator("<", _v(p.major + 1, 0, 0, _ZERO_PRE))]
        if p.minor > 0 or p.patch is None:
            return [low, Comparator("<", _v(0, p.minor + 1, 0, _ZERO_PRE))]
        return [low, Comparator("<", _v(0, 0, p.patch + 1, _ZERO_PRE))]
    # Primitive comparators with a partial version, as npm desugars them.
    if p.major is None:
        # ">=*" and "<=*" allow anything; ">*" and "<*" allow nothing.
        return [] if op in (">=", "<=") else [Comparator("<", _v(0, 0, 0, _ZERO_PRE))]
    if op == ">":
        if p.minor is None:
            return [Comparator(">=", _v(p.major + 1, 0, 0))]
        if p.patch is None:
            return [Comparator(">=", _v(p.major, p.minor + 1, 0))]
        return [Comparator(">", p.full())]
    if op == ">=":
        return [Comparator(">=", p.full())]
    if op == "<":
        if p.patch is None:
            return [Comparator("<", _v(p.major, p.minor or 0, 0, _ZERO_PRE))]
        return [Comparator("<", p.full())]
    if op == "<=":
        if p.minor is None:
            return [Comparator("<", _v(p.major + 1, 0, 0, _ZERO_PRE))]
        if p.patch is None:
            return [Comparator("<", _v(p.major, p.minor + 1, 0, _ZERO_PRE))]
        return [Comparator("<=", p.full())]
    raise VersionError(f"unknown operator {op!r}")  # pragma: no cover - _OP_RE limits op


def _hyphen(low: _Partial, high: _Partial) -> list[Comparator]:
    out: list[Comparator] = []
    if low.major is not None:
        out.append(Comparator(">=", low.full()))
    if high.major is None:
        pass
    elif high.minor is None:
        out.append(Comparator("<", _v(high.major + 1, 0, 0, _ZERO_PRE)))
    elif high.patch is None:
        out.append(Comparator("<", _v(high.major, high.minor + 1, 0, _ZERO_PRE)))
    else:
        out.append(Comparator("<=", high.full()))
    return out


_HYPHEN_RE = re.compile(r"^(\S+)\s+-\s+(\S+)$")
_OP_SPACE_RE = re.compile(r"(==|<=|>=|<|>|=|\^|~>|~)\s+")


def _parse_range(text: str, whole: str) -> tuple[Comparator, ...]:
    text = text.strip()
    hm = _HYPHEN_RE.match(text)
    if hm:
        return tuple(_hyphen(_parse_partial(hm.group(1), whole), _parse_partial(hm.group(2), whole)))
    text = _OP_SPACE_RE.sub(r"\1", text)
    comps: list[Comparator] = []
    for token in text.split():
        om = _OP_RE.match(token)
        assert om is not None  # the pattern matches every string
        op, rest = om.group(1) or "", om.group(2)
        if not rest:
            raise VersionError(f"{whole!r}: operator {op!r} without a version")
        comps.extend(_desugar(op, _parse_partial(rest, whole)))
    return tuple(comps)


def _range_allows(comps: tuple[Comparator, ...], v: Version) -> bool:
    if not all(c.test(v) for c in comps):
        return False
    if not v.prerelease:
        return True
    # npm: a prerelease is only admitted by a comparator that names the same release
    # with a prerelease, so "^1.0.0" never picks "2.0.0-rc.1" or "1.5.0-beta".
    return any(c.version.prerelease and c.version.release == v.release for c in comps)


@dataclass(frozen=True, slots=True)
class Requirement:
    """A parsed version requirement: alternatives (``||``) of comparator sets."""

    text: str
    alternatives: tuple[tuple[Comparator, ...], ...] = field(default=((),))

    @classmethod
    def parse(cls, text: str | None) -> Requirement:
        if text is None:
            return cls("*")
        if not isinstance(text, str):
            raise VersionError(f"version requirement must be a string, got {type(text).__name__}")
        stripped = text.strip()
        if stripped in ("", "*"):
            return cls(stripped or "*")
        alts = tuple(_parse_range(part, stripped) for part in stripped.split("||"))
        return cls(stripped, alts)

    @classmethod
    def any(cls) -> Requirement:
        return cls("*")

    @property
    def is_any(self) -> bool:
        return any(len(a) == 0 for a in self.alternatives)

    def allows(self, version: Version) -> bool:
        return any(_range_allows(alt, version) for alt in self.alternatives)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Requirement('{self.text}')"
