"""Giving back memory that only start-up, loading or a burst needed.

Shared by every long-running process built on the bus: the daemon, the development server and
the components. Measured (benchmarks/detection.py, benchmarks/deploy.py): a large share of a
Python process's RSS after start-up is pages of shared libraries touched once (onnxruntime
registering every CPU kernel, pydantic-core building its first schemas, OpenSSL initialising) and
freed-but-kept malloc heap (large payloads relayed by the bus). Both are clean or free memory
that the kernel would reclaim under pressure anyway; releasing them makes RSS say what the
process needs and frees the RAM now rather than at the next memory squeeze.

* ``malloc_trim(0)`` returns free heap to the kernel.
* ``madvise(MADV_PAGEOUT)`` on read-only and executable file mappings of shared libraries: the
  kernel drops those pages that no other process maps; any that are used again are read back from
  the page cache (or disk) on first touch. Writable mappings are never touched (their private pages
  would need swap). Linux 5.4+; on an older kernel or another libc this is a no-op.
* Optionally (``unmap_shared=True``), ``madvise(MADV_DONTNEED)`` on the same mappings when they hold
  no private (copy-on-write) page. The page-out skips pages another process also maps (libpython,
  numpy, libcrypto... in every component); those stay counted in this process's RSS although
  start-up alone touched them. Dropping our page-table entries leaves the pages in the page cache
  (the other processes keep them resident: the system frees nothing) and costs a minor fault for
  any page used again, so RSS and PSS become this process's working set. A mapping with private
  pages (RELRO data the loader relocated, then made read-only) is skipped: DONTNEED would discard
  them.
"""


from __future__ import annotations

import asyncio
import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

MADV_DONTNEED = 4
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


def _library_ranges(*, unshared_only: bool = False) -> list[tuple[int, int]]:
    """Read-only/executable private mappings of shared libraries (``unshared_only``: holding no
    anonymous page, which /proc/self/smaps tells; /proc/self/maps is enough otherwise)."""
    ranges: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    try:
        with Path("/proc/self/smaps" if unshared_only else "/proc/self/maps").open() as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if parts[0].endswith(":"):  # an smaps field of the mapping above
                    if parts[0] == "Anonymous:" and current is not None:
                        if int(parts[1]) == 0:
                            ranges.append(current)
                        current = None
                    continue
                current = None
                if len(parts) < 6 or "w" in parts[1] or not parts[1].endswith("p"):
                    continue
                path = parts[5].strip()
                name = Path(path).name
                if not path.startswith("/") or not (name.endswith(".so") or ".so." in name):
                    continue
                lo, _, hi = parts[0].partition("-")
                if unshared_only:
                    current = (int(lo, 16), int(hi, 16))
                else:
                    ranges.append((int(lo, 16), int(hi, 16)))
    except (OSError, ValueError, IndexError):
        return []
    return ranges


def release(*, unmap_shared: bool = False) -> Released:
    """Trim the heap and page out library pages; cheap (a few ms), safe to call at any time.

    ``unmap_shared`` also drops this process's mappings of library pages other processes keep
    resident (see the module docstring): RSS falls to the working set, system memory does not."""
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
    if unmap_shared:
        for lo, hi in _library_ranges(unshared_only=True):
            madvise(lo, hi - lo, MADV_DONTNEED)
    return Released(round(before, 1), round(rss_mb(), 1), accepted, True)


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc only; a no-op elsewhere).

    Large payloads (tens of KiB) are malloc'ed outside Python's small-object allocator; once freed,
    glibc keeps the holes they leave in the heap, so RSS stays at the high-water mark of whatever
    was queued at the worst moment. ``malloc_trim`` returns those pages; calling it every few
    seconds keeps RSS near the live set without slowing the hot path. A daemon can do the same.
    The process's own symbol table is used (as :func:`release` does): ``find_library`` would run
    ``ldconfig`` in a subprocess on every call (≈ 3 ms, on the event loop).
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return


async def trim_forever(interval: float) -> None:
    """``malloc_trim`` every ``interval`` s, in a worker thread (it walks every arena; ctypes drops the GIL)."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(release_free_memory)


async def release_periodically(first_after_s: float, every_s: float, *, unmap_shared: bool = False) -> None:
    """:func:`release` once start-up is over, then at an idle pace (off the event loop)."""
    await asyncio.sleep(first_after_s)
    while True:
        await asyncio.to_thread(release, unmap_shared=unmap_shared)
        await asyncio.sleep(every_s)
