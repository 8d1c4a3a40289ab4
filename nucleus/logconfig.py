"""The one place structlog is configured.

Event names are stable dotted words (``component.state_changed``); variables go in keys.
Secrets (tokens) are never passed to a logger, so there is no redaction pass to get wrong.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog


def configure(level: str = "info", fmt: str = "console", file: Path | None = None,
              stream: TextIO | None = None) -> None:
    """Configure structlog for the daemon (file + stderr) or a CLI (stderr only)."""
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    out: Any = stream or sys.stderr
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        out = _Tee(out, file.open("a", buffering=1, encoding="utf-8"))
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


class _Tee:
    """Write the daemon's log to its file and to stderr."""

    def __init__(self, *streams: TextIO) -> None:
        self._streams = streams

    def write(self, data: str) -> int:
        for s in self._streams:
            try:
                s.write(data)
            except (OSError, ValueError):
                continue
        return len(data)

    def flush(self) -> None:
        for s in self._streams:
            try:
                s.flush()
            except (OSError, ValueError):
                continue
