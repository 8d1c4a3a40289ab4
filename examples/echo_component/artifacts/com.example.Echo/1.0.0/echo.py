"""Echo: answers requests on a topic and republishes plain messages, using the nucleus SDK.

Run by the nucleus (see ../../../recipes/com.example.Echo-1.0.0.yaml), or by hand against a bare
bus: ``python -m ipc.devserver --socket /tmp/bus.sock --token me=T --allow 'me:echo/#'`` then
``NUCLEUS_IPC_SOCKET=/tmp/bus.sock SVCUID=T python echo.py echo``.
"""

import sys

from ipc import Client, run_component


async def main(client: Client) -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "echo"
    count = 0
    # queue_size bounds what waits for us; "drop_oldest" means a burst we cannot keep up with costs
    # us the oldest messages (counted in m.dropped), never the publisher's speed.
    async with client.subscribe(f"{base}/in", queue_size=256) as messages:
        print(f"echo: listening on {base}/in", flush=True)
        async for m in messages:
            count += 1
            if m.dropped:
                print(f"echo: missed {m.dropped} messages", flush=True)
            if m.reply_to is not None:  # sent with client.request(...): answer the requester only
                await m.reply({"echo": m.payload, "count": count})
            else:
                await client.publish(f"{base}/out", {"echo": m.payload, "count": count, "from": m.sender})


if __name__ == "__main__":
    run_component(main)
