"""Keeping a long-running bus process's RSS near its live set.

Shared by the daemon and the development server: both relay payloads of any size, and
glibc keeps the heap holes that large freed buffers leave behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc only; a no-op elsewhere).

    Large payloads (tens of KiB) are malloc'ed outside Python's small-object allocator; once freed,
    glibc keeps the holes they leave in the heap, so RSS stays at the high-water mark of whatever
    was queued at the worst moment. ``malloc_trim`` returns those pages; calling it every few
    seconds keeps RSS near the live set without slowing the hot path. A daemon can do the same.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return


async def trim_forever(interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        release_free_memory()
