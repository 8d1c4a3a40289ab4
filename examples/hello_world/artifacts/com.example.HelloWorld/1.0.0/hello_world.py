"""A minimal component: greets on the local bus through the nucleus SDK."""

import asyncio
import sys

from ipc import Client, run_component


async def main(client: Client) -> None:
    message = sys.argv[1] if len(sys.argv) > 1 else "Hello"
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    count = 0
    while True:
        count += 1
        await client.publish("hello/world", {"message": message, "count": count})
        print(f"{message} (#{count})", flush=True)
        await asyncio.sleep(interval)


if __name__ == "__main__":
    run_component(main)
