"""Where a learning ``knn`` model's run-time memory survives a detector restart.

Why. The memory is what makes a new normal stop alarming. Lost on a restart (a new detector version,
a crash, a reboot), every state the machine reached since the model was trained would be novel again
and alarm once more. So the detector writes each asset's memory to its work directory every
``memorySaveEveryS`` and when it stops, and a memory that belongs to the same model component,
version and asset is taken up again when that asset's first window arrives. A file that is missing,
unreadable or of another shape is ignored with a log line: the memory then starts empty, as it would
have without this file.

Writes are crash-safe (temporary file, fsync, rename): a ``kill -9`` leaves the previous memory.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import structlog

log = structlog.get_logger("anomaly_detector.knn_store")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def path_for(directory: Path, component: str, version: str, asset: str) -> Path:
    return directory / _UNSAFE.sub("_", f"{component}-{version}-{asset}.npz")


def save(path: Path, snapshot: dict[str, npt.NDArray[np.generic]]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **snapshot)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:  # a full disk: leave the previous file, not a half-written temporary
        tmp.unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, npt.NDArray[np.generic]] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("store", "next", "pending", "counts")}
    except (OSError, KeyError, ValueError) as exc:
        log.warning("detector.memory_unreadable", path=str(path), error=str(exc)[:200])
        return None
