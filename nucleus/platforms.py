"""Which manifest of a recipe applies to this device.

Greengrass matches a manifest's ``Platform`` map attribute by attribute against the device:
exact values (case-insensitive), wildcards (``*``, ``all``, ``any``) and ``/regex/`` values.
The first manifest that matches wins, so recipe authors order them from specific to generic.
Our device reports ``runtime: nucleus`` so that recipes written for Greengrass Lite
(``runtime: aws_nucleus_lite``) are not picked up by mistake while ``runtime: "*"`` still is.
"""

from __future__ import annotations

import platform as _platform
import re
import sys
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import structlog

__all__ = ["WILDCARDS", "current_platform", "normalize_architecture", "platform_matches"]

log = structlog.get_logger(__name__)

WILDCARDS = frozenset({"*", "all", "any"})

# Names Greengrass uses for CPU architectures (recipes say amd64 and aarch64, not x86_64/arm64).
_ARCH_ALIASES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "x86": "x86",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "arm": "arm",
}


def normalize_architecture(machine: str) -> str:
    m = machine.lower()
    return _ARCH_ALIASES.get(m, "arm" if m.startswith("arm") else m)


def _os_name() -> str:
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "darwin":
        return "darwin"
    if sys.platform.startswith("win"):
        return "windows"
    return sys.platform


def current_platform(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The attributes this device is matched by; ``extra`` adds or overrides attributes
    (settings can declare e.g. ``{"gpu": "nvidia"}`` as Greengrass allows custom keys)."""
    machine = _platform.machine()
    result = {
        "os": _os_name(),
        "architecture": normalize_architecture(machine),
        "architecture.detail": machine.lower(),
        "runtime": "nucleus",
    }
    if extra:
        result.update({str(k): str(v) for k, v in extra.items()})
    return result


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        log.warning("platform.regex_invalid", pattern=pattern, error=str(exc))
        return None


def _value_matches(wanted: Any, have: str | None) -> bool:
    if wanted is None:
        return True
    text = str(wanted).strip()
    if text.lower() in WILDCARDS or text == "":
        return True
    if have is None:
        return False
    if len(text) >= 2 and text.startswith("/") and text.endswith("/"):
        rx = _compile(text[1:-1])
        return rx is not None and rx.fullmatch(have) is not None
    return text.lower() == have.lower()


def platform_matches(spec: Mapping[str, Any] | None, platform: Mapping[str, str]) -> bool:
    """Does a manifest's ``Platform`` map select this device?

    Keys compare case-insensitively. A key the device does not report (``random``, a
    custom attribute the settings did not declare) only matches a wildcard: guessing would
    run a recipe on hardware its author excluded.
    """
    if not spec:
        return True
    have = {k.lower(): v for k, v in platform.items()}
    return all(_value_matches(wanted, have.get(str(key).lower())) for key, wanted in spec.items())
