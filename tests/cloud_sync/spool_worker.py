"""A process for the kill -9 tests: ``write SPOOL`` appends forever, ``flush SPOOL URL`` drains to a broker.

``write`` prints ``A <id> <n>`` for every append *after* it was acknowledged (durable), so the
parent knows exactly which messages a publisher was told are safe when it sends SIGKILL.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from cloud_sync.settings import SyncSettings
from cloud_sync.spool import NewMessage, Spool
from cloud_sync.uplink import Uplink


async def write(path: Path) -> None:
    spool = Spool(path)
    await spool.open()
    out = sys.stdout

    async def writer(k: int) -> None:
        n = 0
        while True:
            i = k * 10_000_000 + n
            mid = await spool.append(NewMessage(f"w/{k % 4}", str(i).encode().ljust(256, b"."), "t"))
            out.write(f"A {mid} {i}\n")
            out.flush()
            n += 1

    await asyncio.gather(*(writer(k) for k in range(32)))


async def flush(path: Path, url: str) -> None:
    spool = Spool(path)
    await spool.open()
    s = SyncSettings(url=url, reconnect_initial_s=0.05, reconnect_max_s=0.2, batch_max_messages=50, max_inflight=8)
    uplink = Uplink(s, spool, thing_name="dev-kill")
    await uplink.run()


if __name__ == "__main__":
    mode, spool_path = sys.argv[1], Path(sys.argv[2])
    asyncio.run(write(spool_path) if mode == "write" else flush(spool_path, sys.argv[3]))
