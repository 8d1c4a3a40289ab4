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

from nucleus.component_logs import shift_rotated


def configure(level: str = "info", fmt: str = "console", file: Path | None = None,
              stream: TextIO | None = None, *, max_bytes: int | None = None, backup_count: int = 0) -> None:
    """Configure structlog for the daemon (file + stderr) or a CLI (stderr only).

    With ``max_bytes`` the file rotates as the components' logs do (``logs.max_bytes_per_file``,
    ``logs.backup_count``): the daemon's own log must not be the one file that grows without bound.
    """
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    out: Any = stream or sys.stderr
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        sink: Any = (_RotatingFile(file, max_bytes, backup_count) if max_bytes is not None
                     else file.open("a", buffering=1, encoding="utf-8"))
        out = _Tee(out, sink)
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


class _RotatingFile:
    """The daemon's log file, rotated at ``max_bytes`` into ``x.log.1`` (newest) .. ``x.log.N``.

    structlog prints a record and then its newline (two writes): the file rotates only between
    records, so a record never straddles two files (a file may pass the cap by that newline). Errors
    (a full disk) propagate to :class:`_Tee`, which drops the record rather than stop the daemon."""

    def __init__(self, path: Path, max_bytes: int, backup_count: int) -> None:
        self._path = path
        self._max = max(64, max_bytes)
        self._backups = max(0, backup_count)
        self._fh: TextIO | None = None
        self._size = 0
        self._at_record_start = True

    def _open(self) -> TextIO:
        if self._fh is None:
            self._fh = self._path.open("a", buffering=1, encoding="utf-8")
            self._size = self._path.stat().st_size
        return self._fh

    def write(self, data: str) -> int:
        size = len(data.encode("utf-8", errors="replace"))
        fh = self._open()
        if self._at_record_start and self._size > 0 and self._size + size > self._max:
            fh.close()
            self._fh = None
            shift_rotated(self._path, self._backups)
            fh = self._open()
        fh.write(data)
        self._size += size
        self._at_record_start = data.endswith("\n")
        return len(data)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
