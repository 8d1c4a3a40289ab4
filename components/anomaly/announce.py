"""The model component's one-shot Run step: tell the detector a model version is installed.

``python3 -m components.anomaly.announce --component NAME --version V --artifacts {artifacts:path}``
publishes ``{"component", "version", "artifacts_path", "published_at"}`` on
``models/<NAME>/available`` and exits 0, so the model component ends FINISHED. Nothing is verified
here: the detector verifies (it holds the trusted keys). The detector also finds the installed
version through ``components.get`` at start and on a timer, so a missed announcement only delays a
swap, it never loses it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from ipc import Client


def topic_for(component: str) -> str:
    return f"models/{component}/available"


async def announce(component: str, version: str, artifacts: str) -> None:
    async with Client.from_env() as client:
        await client.publish(topic_for(component), {"component": component, "version": version,
                                                     "artifacts_path": artifacts, "published_at": time.time()},
                             confirm=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.anomaly.announce")
    parser.add_argument("--component", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--artifacts", required=True)
    args = parser.parse_args(argv)
    asyncio.run(announce(args.component, args.version, args.artifacts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
