"""Per-component log files: format, rotation cap, tail across rotations, follow."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nucleus.component_logs import ComponentLog, follow, rotated, tail


def total_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def test_record_carries_timestamp_stream_and_step(tmp_path: Path) -> None:
    log = ComponentLog(tmp_path / "c.log", max_bytes=4096, backup_count=1, wall_clock=lambda: 0.0)
    log.write("hello\n", stream="stderr", step="install")
    assert (tmp_path / "c.log").read_text() == "1970-01-01T00:00:00.000Z [stderr] [install] hello\n"


@pytest.mark.parametrize("backup_count", [0, 1, 3])
def test_many_lines_never_exceed_the_cap(tmp_path: Path, backup_count: int) -> None:
    path = tmp_path / "logs" / "big.log"
    log = ComponentLog(path, max_bytes=2000, backup_count=backup_count)
    for i in range(3000):
        log.write(f"line {i} " + "x" * (i % 97), stream="stdout", step="run")
    log.close()
    files = sorted(path.parent.glob("big.log*"))
    assert len(files) == backup_count + 1
    assert all(f.stat().st_size <= 2000 for f in files)
    assert total_size(path) <= log.cap_bytes
    # the newest line is at the end of the current file, nothing torn
    assert path.read_text().splitlines()[-1].endswith("line 2999 " + "x" * (2999 % 97))
    assert all(" [stdout] [run] line " in ln for f in files for ln in f.read_text().splitlines())


def test_an_oversized_record_is_cut_to_fit(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ComponentLog(path, max_bytes=200, backup_count=1)
    log.write("y" * 10_000)
    log.write("after")
    assert total_size(path) <= 400
    assert tail(path, 1)[0].endswith("after")


def test_tail_reaches_into_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ComponentLog(path, max_bytes=300, backup_count=5)
    for i in range(40):
        log.write(f"n{i}")
    assert rotated(path, 1).exists()
    last = tail(path, 12)
    assert [ln.rsplit(" ", 1)[1] for ln in last] == [f"n{i}" for i in range(28, 40)]
    assert tail(tmp_path / "absent.log", 5) == []


def test_write_failure_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = ComponentLog(blocker / "c.log", max_bytes=1000, backup_count=1)
    log.write("lost")  # the parent is a file: OSError inside, nothing raised
    log.write("lost too")
    assert log.dropped == 2


def test_full_disk_is_counted_not_raised(tmp_path: Path) -> None:
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("/dev/full is not available to simulate ENOSPC")
    log = ComponentLog(full, max_bytes=1 << 20, backup_count=0)
    log.write("nowhere to go")
    assert log.dropped == 1  # ENOSPC from /dev/full


async def test_follow_yields_tail_then_new_lines_across_rotation(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ComponentLog(path, max_bytes=400, backup_count=2)
    for i in range(3):
        log.write(f"old{i}")
    seen: list[str] = []

    async def reader() -> None:
        async for line in follow(path, lines=2, poll_s=0.01):
            seen.append(line.rsplit(" ", 1)[1])
            if seen[-1] == "new29":
                return

    task = asyncio.create_task(reader())
    for _ in range(200):
        if len(seen) >= 2:
            break
        await asyncio.sleep(0.01)
    for i in range(30):  # several rotations while following
        log.write(f"new{i}")
        await asyncio.sleep(0.002)
    await asyncio.wait_for(task, 10)
    assert seen[:2] == ["old1", "old2"]
    assert [s for s in seen if s.startswith("new")] == [f"new{i}" for i in range(30)]
    assert rotated(path, 2).exists()


async def test_follow_waits_for_a_file_that_does_not_exist_yet(tmp_path: Path) -> None:
    path = tmp_path / "later.log"

    async def first_line() -> str:
        async for line in follow(path, lines=10, poll_s=0.01):
            return line
        raise AssertionError("follow ended")

    task = asyncio.create_task(first_line())
    await asyncio.sleep(0.05)
    ComponentLog(path, max_bytes=1000, backup_count=1).write("born")
    assert (await asyncio.wait_for(task, 10)).endswith("born")


async def test_follow_from_start_reads_existing_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    log = ComponentLog(path, max_bytes=4000, backup_count=1)
    for i in range(3):
        log.write(f"l{i}")
    got: list[str] = []
    async for line in follow(path, from_end=False, poll_s=0.01):
        got.append(line.rsplit(" ", 1)[1])
        if len(got) == 3:
            break
    assert got == ["l0", "l1", "l2"]
