"""ipc.memory: what release() advises must be safe to advise, and it must change nothing but RSS.

Run in a fresh interpreter (a real process): the pages it touches, maps and unmaps are its own, and
the pytest process (which maps the same libpython and numpy) makes those pages shared, as the
other components do on a device.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ipc import memory

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/<pid>/smaps")

REPO = Path(__file__).resolve().parents[2]


def _anonymous_kb_by_range() -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    current: tuple[int, int] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if not head.endswith(":"):
            lo, _, hi = head.partition("-")
            current = (int(lo, 16), int(hi, 16))
        elif head == "Anonymous:" and current is not None:
            out[current] = int(line.split()[1])
    return out


def test_unshared_only_ranges_hold_no_private_page() -> None:
    """MADV_DONTNEED on a mapping with copy-on-write pages (relocated RELRO data) would discard them:
    every range offered for unmapping must hold none, and be a read-only library range."""
    import numpy  # noqa: F401 - maps numpy's libraries, some with relocated read-only data

    all_ranges = set(memory._library_ranges())
    unshared = memory._library_ranges(unshared_only=True)
    anonymous = _anonymous_kb_by_range()
    assert unshared, "a Python process maps libraries without private pages"
    assert set(unshared) <= all_ranges
    assert all(anonymous[r] == 0 for r in unshared)
    relocated = [r for r in all_ranges if anonymous.get(r, 0) > 0]
    assert relocated, "libpython's RELRO pages are private: there must be ranges to leave alone"
    assert not set(relocated) & set(unshared)


_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ipc import memory

    def rss_file_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1])
        return 0

    x = np.random.default_rng(1).standard_normal((64, 1024))
    before = np.fft.rfft(x).sum()
    plain = memory.release()
    file_plain = rss_file_kb()
    unmapped = memory.release(unmap_shared=True)
    file_unmapped = rss_file_kb()
    after = np.fft.rfft(x).sum()
    print(json.dumps({"same": bool(before == after), "file_plain": file_plain, "file_unmapped": file_unmapped,
                      "trimmed": unmapped.trimmed, "rss_after": unmapped.rss_after_mb, "plain_trimmed": plain.trimmed}))
""")


def test_unmapping_shared_pages_lowers_rss_and_changes_no_result() -> None:
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, cwd=REPO,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.splitlines()[-1])
    assert r["same"], "code run again after the release must compute the same"
    assert r["trimmed"] and r["plain_trimmed"] and r["rss_after"] > 0
    # libpython and numpy are also mapped by this pytest process, so the page-out keeps them;
    # unmapping drops them from the child's RSS (its file pages were several MB).
    assert r["file_unmapped"] < r["file_plain"] - 1024, r
