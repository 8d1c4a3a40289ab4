"""Per-component log files: rotated, size-capped, and readable while they are written.

Why our own rotation rather than ``logging.handlers.RotatingFileHandler``: the cap must
hold *per component* whatever the component prints (Greengrass users have had component
logs fill 50 GB), a full disk must never block or crash the daemon, and ``nucleus logs -f``
must keep following across rotations. With ``max_bytes`` per file and ``backup_count``
rotated files (``x.log.1`` newest .. ``x.log.N`` oldest), a component uses at most
``(backup_count + 1) * max_bytes`` bytes: every record is written whole into one file and a
record longer than ``max_bytes`` is cut.

Record format, one line each::

    2025-01-31T12:00:00.123Z [stdout] [run] the line the component printed
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import structlog

log = structlog.get_logger("nucleus.component_logs")

_REPORT_EVERY_S = 60.0
_BLOCK = 64 * 1024


def rotated(path: Path, index: int) -> Path:
    """``x.log`` for 0, ``x.log.<index>`` otherwise."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


def shift_rotated(path: Path, backup_count: int) -> None:
    """Make room for a new ``path``: ``x.log`` becomes ``x.log.1`` (newest) and so on, the oldest
    beyond ``backup_count`` is replaced; with no backups the file is just removed. One rule for the
    components' logs and the daemon's own (``nucleus.logconfig``)."""
    if backup_count <= 0:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    for index in range(backup_count - 1, -1, -1):
        with contextlib.suppress(FileNotFoundError):
            rotated(path, index).replace(rotated(path, index + 1))


def _timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ComponentLog:
    """Append-only writer for one component's log; the runner owns it once handed over."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backup_count: int,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < 64:
            raise ValueError("max_bytes must be at least 64")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backup_count = max(0, backup_count)
        self._wall_clock = wall_clock
        self._fh: BinaryIO | None = None
        self._size = 0
        self.dropped = 0
        self._last_report = -_REPORT_EVERY_S
        self._dropped_at_report = 0

    @property
    def cap_bytes(self) -> int:
        return (self.backup_count + 1) * self.max_bytes

    def write(self, line: str, *, stream: str = "stdout", step: str = "") -> None:
        """Append one record; never raises for I/O trouble (counts and reports instead)."""
        text = line.rstrip("\r\n")
        record = f"{_timestamp(self._wall_clock())} [{stream}] [{step}] {text}\n".encode(errors="replace")
        if len(record) > self.max_bytes:
            record = record[: self.max_bytes - 1] + b"\n"
        try:
            fh = self._open()
            if self._size > 0 and self._size + len(record) > self.max_bytes:
                self._rotate()
                fh = self._open()
            fh.write(record)
            self._size += len(record)
        except OSError as exc:
            self._failed(exc)

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    def _open(self) -> BinaryIO:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open across writes
            self._size = os.fstat(fh.fileno()).st_size
            self._fh = fh
        return self._fh

    def _rotate(self) -> None:
        self.close()
        shift_rotated(self.path, self.backup_count)
        self._size = 0

    def _failed(self, exc: OSError) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_report >= _REPORT_EVERY_S:
            log.warning(
                "component.log_write_failed",
                path=str(self.path),
                error=str(exc),
                errno=exc.errno,
                dropped=self.dropped,
                dropped_since_last_report=self.dropped - self._dropped_at_report,
            )
            self._last_report = now
            self._dropped_at_report = self.dropped
        # A later write reopens the file: the disk may have been freed or the dir recreated.
        self.close()


def _last_lines(fh: BinaryIO, end: int, count: int) -> list[bytes]:
    """The last ``count`` complete lines of ``fh`` before offset ``end``, read backwards."""
    if count <= 0 or end <= 0:
        return []
    pos, data = end, b""
    while pos > 0 and data.count(b"\n") <= count:
        step = min(_BLOCK, pos)
        pos -= step
        fh.seek(pos)
        data = fh.read(step) + data
    lines = data.splitlines()
    if pos > 0:
        lines = lines[1:]  # the first one is probably cut
    return lines[-count:]


def _decode(raw: bytes) -> str:
    return raw.decode(errors="replace")


def tail(path: Path, lines: int = 100) -> list[str]:
    """The last ``lines`` lines of a component log, reaching into rotated files if needed."""
    path = Path(path)
    out: list[bytes] = []
    index = 0
    while len(out) < lines:
        file = rotated(path, index)
        try:
            with open(file, "rb") as fh:
                end = os.fstat(fh.fileno()).st_size
                out = _last_lines(fh, end, lines - len(out)) + out
        except FileNotFoundError:
            if index > 0:
                break
        index += 1
    return [_decode(b) for b in out]


async def follow(
    path: Path, *, lines: int = 0, from_end: bool = True, poll_s: float = 0.25
) -> AsyncIterator[str]:
    """Yield the last ``lines`` lines, then every new line, forever (``tail -F``).

    ``from_end=False`` reads the current file from its beginning instead (``lines`` is
    then ignored).

    Survives rotation: when the name points at a new file, the old one is drained first
    (we still hold it open) and the new one is read from its start. Polls at most every
    ``poll_s`` seconds (clamped to 10 ms .. 1 s) while idle; the caller ends it by
    breaking out of the loop or cancelling.
    """
    path = Path(path)
    poll = min(1.0, max(0.01, poll_s))
    fh: BinaryIO | None = None
    pending = b""
    first = True
    try:
        while True:
            if fh is None:
                try:
                    fh = open(path, "rb")  # noqa: SIM115, ASYNC230 - local file, held across polls
                except FileNotFoundError:
                    first = False  # a file that appears later is read from its start
                    await asyncio.sleep(poll)
                    continue
                if first:
                    first = False
                    if from_end:
                        end = os.fstat(fh.fileno()).st_size
                        for raw in _last_lines(fh, end, lines):
                            yield _decode(raw)
                        fh.seek(end)
            chunk = fh.read(_BLOCK)
            if chunk:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    yield _decode(raw)
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                st = None
            if st is None or st.st_ino != os.fstat(fh.fileno()).st_ino:
                rest = fh.read()  # whatever was written before the rename
                fh.close()
                fh = None
                pending += rest
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    yield _decode(raw)
                if pending:
                    yield _decode(pending)
                    pending = b""
                continue
            if st.st_size < fh.tell():
                fh.seek(0)  # truncated in place
                continue
            await asyncio.sleep(poll)
    finally:
        if fh is not None:
            fh.close()
