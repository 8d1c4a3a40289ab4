"""Durable small-file writes: the one place that knows how to replace a file crash-safely.

Recipes, configuration documents, tokens and the pid records are all small files that a
``kill -9`` or a power cut must leave either old or new, never half written.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(target: Path, data: bytes, *, mode: int = 0o644) -> None:
    """tmp + fsync + rename + fsync(dir): the file is the old one or the new one, never half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
