"""Declared local clients managed from the CLI (docs/configuration.md, "Access control"): a policy
changed without rotating the token, the list of clients, and removal, on a real daemon."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from test_authz_walk import add_client, connect, first_topic, subscribe_grant

from ipc.errors import ConnectionClosed, IpcError, Unauthenticated, Unauthorized

pytestmark = pytest.mark.slow



def news_policy(subscribe: str) -> dict[str, Any]:
    """Subscribe to ``subscribe``; publish anywhere under news/."""
    grant = subscribe_grant(subscribe)
    grant["aws.greengrass.ipc.pubsub"]["pub"] = {"operations": ["aws.greengrass#PublishToTopic"],
                                                 "resources": ["news/#"]}
    return grant


NEWS_ALL = news_policy("news/#")


def policy_file(daemon: Any, name: str, policy: dict[str, Any]) -> str:
    path = daemon.root.parent / f"{name}.json"
    path.write_text(json.dumps(policy))
    return str(path)


def listed(daemon: Any) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in json.loads(daemon.cli("client", "list", "--json").stdout)}


def test_keep_token_replaces_the_policy_and_keeps_the_session(gg_daemon: Any) -> None:
    """``client add`` rotated the token every time, so a client's policy could not be changed without
    cutting off the application. ``--keep-token`` replaces the policy only: the session stays, the
    subscriptions the new policy denies end, and what it allows goes on."""
    token = add_client(gg_daemon, "cl-keep", NEWS_ALL)
    token_file = Path(gg_daemon.root) / "clients" / "cl-keep.token"
    narrowed = news_policy("news/public")

    async def main() -> None:
        async with connect(gg_daemon, "cl-keep", token) as c, c.subscribe("news/#") as wide:
            await c.publish("news/public", b"1", confirm=True)
            assert await first_topic(wide) == "news/public"
            assert listed(gg_daemon)["cl-keep"]["sessions"] == 1
            out = gg_daemon.cli("client", "add", "cl-keep", "--policy", policy_file(gg_daemon, "narrow", narrowed),
                                "--keep-token").stdout
            assert "token unchanged" in out and token not in out
            assert token_file.read_text().strip() == token
            with pytest.raises(Unauthorized, match="SubscribeToTopic"):
                await first_topic(wide, timeout=10)
            async with c.subscribe("news/public") as narrow:  # the same session, under the new policy
                await c.publish("news/public", b"2", confirm=True)
                assert await first_topic(narrow) == "news/public"
            with pytest.raises(Unauthorized):
                async with c.subscribe("news/#"):
                    pass

    asyncio.run(main())


def test_keep_token_for_a_new_client_creates_its_token(gg_daemon: Any) -> None:
    out = gg_daemon.cli("client", "add", "cl-new", "--policy", policy_file(gg_daemon, "new", NEWS_ALL),
                        "--keep-token").stdout
    token = out.strip().splitlines()[-1]
    assert "added" in out and len(token) >= 32

    async def main() -> None:
        async with connect(gg_daemon, "cl-new", token) as c:
            await c.publish("news/x", b"x", confirm=True)

    asyncio.run(main())


def test_list_and_remove(gg_daemon: Any) -> None:
    """There was no way to see the declared clients, nor to remove one but deleting files under the
    root while the daemon kept its token. ``client remove`` ends its sessions, refuses its token from
    then on, and deletes its token and policy files; a second removal says there is no such client."""
    token = add_client(gg_daemon, "cl-gone", NEWS_ALL)
    clients_dir = Path(gg_daemon.root) / "clients"
    assert (clients_dir / "cl-gone.token").exists() and (clients_dir / "cl-gone.policy.json").exists()

    async def main() -> None:
        async with connect(gg_daemon, "cl-gone", token) as c:
            entry = listed(gg_daemon)["cl-gone"]
            assert entry["declared_by"] == "cli" and entry["sessions"] == 1
            assert "cl-gone" in gg_daemon.cli("client", "list").stdout
            out = gg_daemon.cli("client", "remove", "cl-gone").stdout
            assert "removed" in out
            with pytest.raises((ConnectionClosed, Unauthenticated, IpcError)):
                for _ in range(50):  # bounded: the session ends within a moment of the removal
                    await c.publish("news/x", b"x", confirm=True)
                    await asyncio.sleep(0.05)
        with pytest.raises(Unauthenticated):
            async with connect(gg_daemon, "cl-gone", token):
                pass

    asyncio.run(main())
    assert "cl-gone" not in listed(gg_daemon)
    assert not (clients_dir / "cl-gone.token").exists() and not (clients_dir / "cl-gone.policy.json").exists()
    again = gg_daemon.cli("client", "remove", "cl-gone", check=False)
    assert again.returncode != 0 and "no declared client named cl-gone" in again.stdout + again.stderr
