"""When a count of bad input is worth a log line: shared by the MQTT source and the CSV replay.

A counter nobody can read is no better than silence, and a line per bad sample floods the log of a
device that sends nothing else; so a count is reported when it passes 1, 10, 100, 1000 and every
10,000 (the protective action counts its bad events the same way).
"""

from __future__ import annotations

from collections.abc import Callable

LOG_AT = (1, 10, 100, 1000)

# reason (a stats field), detail, count so far, where (the MQTT topic, or the CSV file and line)
ProblemReport = Callable[[str, str, int, str | None], None]


def log_due(old: int, new: int) -> bool:
    """Whether a count that went from ``old`` to ``new`` passed 1, 10, 100, 1000 or a multiple of 10,000."""
    return any(old < t <= new for t in LOG_AT) or new // 10_000 > old // 10_000
