"""Long-lived streams against a policy change, on a real daemon linked to a real Mosquitto.

A stream op (SubscribeToIoTCore on either socket, ``deployments.watch``, a watch of another
component's configuration) was authorized once, when opened: after a deployment (or ``nucleus client
add``) took the grant away it went on delivering. Now each such stream ends with the Unauthorized a
new call would get, naming the operation and the resource, while the streams the new policy still
allows, on the same connection, go on receiving.
"""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipc import Client
from ipc.errors import Unauthorized
from tests.cloud_sync.sync_testkit import Mosquitto, require_mosquitto
from tests.conftest import FAST_SETTINGS, Daemon, kill_component_processes

pytestmark = pytest.mark.slow

IOT_SUBSCRIBE = "aws.greengrass#SubscribeToIoTCore"


@pytest.fixture(scope="module")
def linked() -> Iterator[tuple[Daemon, Mosquitto]]:
    """One daemon whose link goes to one broker, for the whole module."""
    require_mosquitto()
    root = Path(tempfile.mkdtemp(prefix="azs-", dir="/tmp"))
    broker = Mosquitto(root / "broker")
    broker.start()
    mqtt = {"url": broker.url, "reconnect_initial_s": 0.05}
    d = Daemon(root / "d", {**FAST_SETTINGS, "thing_name": "dev-azs", "mqtt": mqtt})
    try:
        d.start()
        yield d, broker
    finally:
        d.stop()
        kill_component_processes(d.root)
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def iot_grant(*filters: str) -> dict[str, Any]:
    return {"aws.greengrass.ipc.mqttproxy": {"iot": {"operations": [IOT_SUBSCRIBE], "resources": list(filters)}}}


def write_declared(directory: Path, name: str, access_control: dict[str, Any]) -> Path:
    """A recipe without lifecycle: a declared client whose policy deployments manage."""
    from test_daemon import write_recipe

    return write_recipe(directory, name, "1.0.0", config={"accessControl": access_control})


async def cloud_publisher(broker: Mosquitto) -> AsyncIterator[Any]:
    import aiomqtt

    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-azs") as cloud:
        yield cloud


class Pump:
    """A stream read by a task into a queue: a timed-out wait must not cancel (and so end) the stream."""

    def __init__(self, items: AsyncIterator[Any]) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(items))

    async def _run(self, items: AsyncIterator[Any]) -> None:
        try:
            async for item in items:
                await self.queue.put(item)
        except Exception as exc:
            await self.queue.put(exc)
        else:
            await self.queue.put(StopAsyncIteration())

    async def next(self, timeout: float) -> Any:
        """The next item; the stream's error (or StopAsyncIteration at its end) is raised."""
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until_received(cloud: Any, topic: str, pump: Pump, *, tries: int = 60) -> Any:
    """Publish on ``topic`` until the stream hands it out (the link subscribes in the background)."""
    for _ in range(tries):  # bounded: about 30 s
        await cloud.publish(topic, b"x", qos=1)
        try:
            return await pump.next(0.5)
        except TimeoutError:
            continue
    raise AssertionError(f"{topic} never arrived through the link")


def test_a_narrowing_deployment_ends_the_iot_core_stream_it_denies_and_keeps_the_other(
        linked: tuple[Daemon, Mosquitto], short_tmp: Path) -> None:
    d, broker = linked
    recipe = write_declared(short_tmp / "recipes", "azs.Cloud", iot_grant("cmd/#", "public/#"))
    d.cli("deploy", str(recipe), "--settle", "0")
    token = (Path(d.root) / "clients" / "azs.Cloud.token").read_text().strip()
    narrow = json.dumps({"azs.Cloud": {"MERGE": {"accessControl": iot_grant("public/#")}}})

    async def main() -> None:
        gen = cloud_publisher(broker)
        cloud = await anext(gen)
        try:
            async with Client(Path(d.root) / "ipc.sock", token, name="azs.Cloud") as c, \
                    c.subscribe_to_cloud("cmd/#") as cmd_items, c.subscribe_to_cloud("public/#") as public_items:
                cmd, public = Pump(cmd_items), Pump(public_items)
                assert (await until_received(cloud, "cmd/a", cmd)).topic == "cmd/a"
                assert (await until_received(cloud, "public/a", public)).topic == "public/a"
                await asyncio.to_thread(d.cli, "deploy", "--update-config", narrow, "--settle", "0")
                await cloud.publish("cmd/secret", b"x", qos=1)
                with pytest.raises(Unauthorized, match=r"SubscribeToIoTCore on 'cmd/#'"):
                    for _ in range(20):  # bounded; without the fix cmd/secret is delivered
                        msg = await cmd.next(30)
                        assert msg.topic != "cmd/secret", "a narrowed policy still delivers cmd/secret"
                # the allowed stream on the same connection keeps receiving
                assert (await until_received(cloud, "public/b", public)).topic == "public/b"
                # and a new subscription is checked against the new policy
                with pytest.raises(Unauthorized, match="SubscribeToIoTCore"):
                    async with c.subscribe_to_cloud("cmd/#") as again:
                        await Pump(again).next(5)
                await public.close()
        finally:
            await gen.aclose()

    asyncio.run(main())
    d.cli("deploy", "--remove", "azs.Cloud", "--settle", "0")


def test_a_narrowing_deployment_ends_subscribe_to_iot_core_on_the_greengrass_socket(
        linked: tuple[Daemon, Mosquitto], short_tmp: Path) -> None:
    """The same through awsiotsdk's SubscribeToIoTCore on gg.sock: the stream sees UnauthorizedError."""
    pytest.importorskip("awsiot.greengrasscoreipc.clientv2", reason="awsiotsdk is not installed")
    from awsiot.greengrasscoreipc import connect as gg_connect  # type: ignore[import-untyped]
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2  # type: ignore[import-untyped]
    from awsiot.greengrasscoreipc.model import QOS  # type: ignore[import-untyped]
    from test_authz_walk import gg_stream_denied

    d, broker = linked
    recipe = write_declared(short_tmp / "recipes", "azs.GgCloud", iot_grant("gcmd/#", "gpublic/#"))
    d.cli("deploy", str(recipe), "--settle", "0")
    token = (Path(d.root) / "clients" / "azs.GgCloud.token").read_text().strip()
    narrow = json.dumps({"azs.GgCloud": {"MERGE": {"accessControl": iot_grant("gpublic/#")}}})
    events: dict[str, queue.Queue[Any]] = {"gcmd": queue.Queue(), "gpublic": queue.Queue()}

    def handlers(key: str) -> dict[str, Any]:
        return {"on_stream_event": lambda e: events[key].put(e.message.topic_name),
                "on_stream_error": lambda err: events[key].put(err) or True,
                "on_stream_closed": lambda: events[key].put("closed")}

    client = GreengrassCoreIPCClientV2(client=gg_connect(ipc_socket=str(d.root / "gg.sock"), authtoken=token,
                                                         timeout=10))

    async def until(cloud: Any, topic: str, key: str) -> Any:
        for _ in range(60):  # bounded: about 30 s
            await cloud.publish(topic, b"x", qos=1)
            try:
                return await asyncio.to_thread(events[key].get, True, 0.5)
            except queue.Empty:
                continue
        raise AssertionError(f"{topic} never arrived through the link")

    async def main() -> None:
        gen = cloud_publisher(broker)
        cloud = await anext(gen)
        try:
            client.subscribe_to_iot_core(topic_name="gcmd/#", qos=QOS.AT_LEAST_ONCE, **handlers("gcmd"))
            client.subscribe_to_iot_core(topic_name="gpublic/#", qos=QOS.AT_LEAST_ONCE, **handlers("gpublic"))
            assert await until(cloud, "gcmd/a", "gcmd") == "gcmd/a"
            assert await until(cloud, "gpublic/a", "gpublic") == "gpublic/a"
            await asyncio.to_thread(d.cli, "deploy", "--update-config", narrow, "--settle", "0")
            await cloud.publish("gcmd/secret", b"x", qos=1)
            await gg_stream_denied(events["gcmd"], "gcmd/secret", "SubscribeToIoTCore", "gcmd/#")
            assert await until(cloud, "gpublic/b", "gpublic") == "gpublic/b"
        finally:
            await gen.aclose()

    try:
        asyncio.run(main())
    finally:
        client.close()
    d.cli("deploy", "--remove", "azs.GgCloud", "--settle", "0")


def test_a_narrowing_deployment_ends_deployments_watch_and_a_configuration_watch(
        linked: tuple[Daemon, Mosquitto], short_tmp: Path) -> None:
    """A deployment that takes the grants away ends the principal's ``deployments.watch`` (of a
    deployment queued behind it) and its watch of another component's configuration at once, each
    naming what it lost; its SubscribeToIoTCore stream, still allowed, goes on."""
    from test_daemon import write_recipe

    d, broker = linked
    recipes = short_tmp / "recipes"
    cli_read = {"aws.greengrass.Cli": {"r": {"operations": ["aws.greengrass#GetLocalDeploymentStatus"],
                                             "resources": ["*"]}}}
    config_read = {"aws.greengrass.ipc.config": {"c": {
        "operations": ["aws.greengrass#SubscribeToConfigurationUpdate"], "resources": ["azs.Watched"]}}}
    # the recipe grants only the IoT Core stream; the deployment adds the other two
    widen = json.dumps({"azs.Watcher": {"MERGE": {"accessControl": {**cli_read, **config_read}}}})
    d.cli("deploy", str(write_recipe(recipes, "azs.Watched", "1.0.0", config={"mode": "a"})),
          str(write_declared(recipes, "azs.Watcher", iot_grant("wpublic/#"))), "--update-config", widen,
          "--settle", "0")
    token = (Path(d.root) / "clients" / "azs.Watcher.token").read_text().strip()

    def queue_deployment(*args: str) -> str:
        out = d.cli("deploy", *args, "--no-wait").stdout
        return out.split()[1].rstrip(":")

    # A blocker runs for 8 s; behind it the narrowing; behind that the deployment the client watches,
    # so the watch is open, unfinished, when the narrowing applies.
    queue_deployment(str(write_recipe(recipes, "azs.Slow", "1.0.0", run="sleep 600")), "--settle", "8")
    narrow = json.dumps({"azs.Watcher": {"RESET": ["/accessControl"]}})  # back to the recipe's grant
    queue_deployment("--update-config", narrow, "--settle", "0")
    watched_id = queue_deployment("--remove", "azs.Slow", "--settle", "0")

    async def main() -> None:
        gen = cloud_publisher(broker)
        cloud = await anext(gen)
        try:
            async with Client(Path(d.root) / "ipc.sock", token, name="azs.Watcher") as c, \
                    c.subscribe_to_cloud("wpublic/#") as public_items, \
                    c.stream("deployments.watch", {"id": watched_id}) as progress_items, \
                    c.watch_configuration(["mode"], component="azs.Watched") as change_items:
                public, progress, changes = Pump(public_items), Pump(progress_items), Pump(change_items)
                assert (await until_received(cloud, "wpublic/a", public)).topic == "wpublic/a"
                with pytest.raises(Unauthorized, match=r"GetLocalDeploymentStatus on '\*'"):
                    for _ in range(100):  # bounded; without the fix it reports until the deployment ends
                        event = await progress.next(60)
                        assert event["event"] != "finished", f"deployments.watch outlived its policy: {event}"
                with pytest.raises(Unauthorized, match=r"SubscribeToConfigurationUpdate on 'azs.Watched'"):
                    # no change is made: the watch ends with the policy change, not at the next change
                    change = await changes.next(10)
                    raise AssertionError(f"the watch still reports {change} without a policy")
                assert (await until_received(cloud, "wpublic/b", public)).topic == "wpublic/b"
                await public.close()
        finally:
            await gen.aclose()

    asyncio.run(main())
    d.cli("deploy", "--remove", "azs.Watched", "--remove", "azs.Watcher", "--settle", "0")


def test_sync_status_shows_a_component_the_figures_but_not_the_others_cloud_filters(
        linked: tuple[Daemon, Mosquitto], short_tmp: Path) -> None:
    """``sync.status`` needs no policy, and it handed any component every other component's cloud
    filters, the broker's address, the link's error lines (naming the MQTT user) and the fleet
    deployments. A component now gets the link state and the counters; the CLI sees it all."""
    d, _broker = linked
    d.cli("deploy", str(write_declared(short_tmp / "recipes", "azs.Subscriber", iot_grant("private-plans/#"))),
          str(write_declared(short_tmp / "recipes", "azs.Nosy", {})), "--settle", "0")
    sub_token = (Path(d.root) / "clients" / "azs.Subscriber.token").read_text().strip()
    nosy_token = (Path(d.root) / "clients" / "azs.Nosy.token").read_text().strip()

    async def main() -> None:
        async with Client(Path(d.root) / "ipc.sock", sub_token, name="azs.Subscriber") as s, \
                s.subscribe_to_cloud("private-plans/#"), \
                Client(Path(d.root) / "ipc.sock", nosy_token, name="azs.Nosy") as nosy:
            for _ in range(100):  # bounded: the link subscribes in the background
                full = json.loads(await asyncio.to_thread(lambda: d.cli("sync", "status", "--json").stdout))
                if "private-plans/#" in full["link"]["subscriptions"]:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the operator's sync status never listed the subscription")
            assert full["link"]["broker"].startswith("mqtt://")
            seen = await nosy.call("sync.status")
            assert seen["link"]["state"] == "connected" and "spool" in seen and "publish" in seen
            assert "private-plans/#" not in json.dumps(seen, default=str)
            for key in ("broker", "subscriptions", "errors"):
                assert key not in seen["link"], key
            assert "errors" not in seen and "deployments" not in seen
            # nor where the daemon keeps its files (the spool's path names the root)
            assert "path" not in seen["spool"] and str(d.root) not in json.dumps(seen, default=str)
            assert "messages" in seen["spool"]

    asyncio.run(main())
    d.cli("deploy", "--remove", "azs.Subscriber", "--remove", "azs.Nosy", "--settle", "0")
