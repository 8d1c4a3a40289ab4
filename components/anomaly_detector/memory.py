"""Give back memory that only start-up and model loading needed.

Measured (benchmarks/detection.py): of a ~96 MB detector, ~54 MB are pages of shared libraries
(onnxruntime alone ~20 MB: creating the first session registers every CPU kernel and touches code
the scoring path never runs again; cryptography's ~6 MB are only used to verify a signature) and
~2.5 MB are freed-but-kept malloc heap. Both are clean or free memory that a device would reclaim
under pressure anyway; releasing them after a model is loaded makes the RSS say what the detector
needs, and frees the RAM now rather than at the next memory squeeze.

* ``malloc_trim(0)`` returns free heap to the kernel.
* ``madvise(MADV_PAGEOUT)`` on read-only and executable file mappings of shared libraries: the
  kernel drops those pages that no other process maps; any that are used again are read back from
  the page cache (or disk) on first touch. Writable mappings are never touched (their private pages
  would need swap). Linux 5.4+; on an older kernel or another libc this is a no-op that says so.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

MADV_PAGEOUT = 21


@dataclass(slots=True, frozen=True)
class Released:
    rss_before_mb: float
    rss_after_mb: float
    mappings: int  # library mappings the kernel accepted the advice for
    trimmed: bool


def rss_mb() -> float:
    """Resident set size from /proc (no psutil in the detector)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_bytes().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _library_ranges() -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    try:
        with Path("/proc/self/maps").open() as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or "w" in parts[1]:
                    continue
                path = parts[5].strip()
                name = Path(path).name
                if not path.startswith("/") or not (name.endswith(".so") or ".so." in name):
                    continue
                lo, _, hi = parts[0].partition("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def release() -> Released:
    """Trim the heap and page out library pages; cheap (a few ms), safe to call at any time."""
    before = rss_mb()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        trim = libc.malloc_trim
        madvise = libc.madvise
    except (OSError, AttributeError):  # not glibc / not Linux: nothing to do
        return Released(before, before, 0, False)
    trim.argtypes = [ctypes.c_size_t]
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    trim(0)
    accepted = 0
    for lo, hi in _library_ranges():
        accepted += madvise(lo, hi - lo, MADV_PAGEOUT) == 0
    return Released(round(before, 1), round(rss_mb(), 1), accepted, True)
