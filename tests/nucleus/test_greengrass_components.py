"""Components written with AWS's awsiotsdk (GreengrassCoreIPCClientV2, unmodified) on a real daemon.

Each program below is what a Greengrass component author writes: it finds the socket and token
in the environment the nucleus sets, and talks event-stream RPC to the daemon's Greengrass
front end. A native SDK client on the same daemon checks that both protocols share one bus.
One daemon serves the whole module so the deployments, not daemon starts, are what costs time.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from test_daemon_ipc import client_for, component, wait_file

pytest.importorskip("awsiot.greengrasscoreipc.clientv2", reason="awsiotsdk is not installed")

pytestmark = pytest.mark.slow

N = 10_000


@pytest.fixture
def work(gg_daemon: Any, request: pytest.FixtureRequest) -> Path:
    path: Path = gg_daemon.root.parent / request.node.name[:40]
    path.mkdir()
    return path


PUBSUB_COMPONENT = """
    import concurrent.futures, json, threading
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    from awsiot.greengrasscoreipc.model import BinaryMessage, JsonMessage, PublishMessage
    OUT = {out!r}
    N = {n}
    # one callback thread, so events are seen in the order they arrive
    client = GreengrassCoreIPCClientV2(executor=concurrent.futures.ThreadPoolExecutor(max_workers=1))
    got = []
    done = threading.Event()

    def on_event(event):
        if event.binary_message is not None:
            got.append(("bin", event.binary_message.message.decode(), event.binary_message.context.topic))
        else:
            got.append(("json", event.json_message.message["i"], event.json_message.context.topic))
        if len(got) % 500 == 0:  # application-level window so a burst never outruns the reader
            client.publish_to_topic(topic="from-gg/ack", publish_message=PublishMessage(
                json_message=JsonMessage(message={{"received": len(got)}})))
        if len(got) == N:
            done.set()

    client.subscribe_to_topic(topic="to-gg/#", on_stream_event=on_event)
    open(OUT, "w").write("subscribed\\n")
    done.wait(120)
    ok = [g[1] for g in got] == [str(i) if i % 2 == 0 else i for i in range(N)] and \\
        all(g[0] == ("bin" if i % 2 == 0 else "json") and g[2] == "to-gg/x" for i, g in enumerate(got))
    open(OUT, "a").write(json.dumps({{"received": len(got), "in_order": ok}}) + "\\n")
    futures = []
    for i in range(N):
        if i % 2 == 0:
            msg = PublishMessage(binary_message=BinaryMessage(message=bytes([i % 256, 0, 255]) + str(i).encode()))
        else:
            msg = PublishMessage(json_message=JsonMessage(message={{"i": i, "text": "ü"}}))
        futures.append(client.publish_to_topic_async(topic="from-gg/x", publish_message=msg))
        if len(futures) >= 256:
            for f in futures:
                f.result(30)
            futures.clear()
    for f in futures:
        f.result(30)
    open(OUT, "a").write("published\\n")
    threading.Event().wait(600)
"""


def test_awsiotsdk_and_native_exchange_10000_messages_each_way(gg_daemon: Any, work: Path) -> None:
    out = work / "pubsub.out"
    policy = {"aws.greengrass.ipc.pubsub": {"gg": {
        "operations": ["aws.greengrass#PublishToTopic", "aws.greengrass#SubscribeToTopic"],
        "resources": ["from-gg/#", "to-gg/#"]}}}
    recipe, art = component(work, "test.GgPubSub", "1.0.0", PUBSUB_COMPONENT.format(out=str(out), n=N),
                            config={"accessControl": policy})
    native = client_for(gg_daemon, "test.native", {"aws.greengrass.ipc.pubsub": {"n": {
        "operations": ["*"], "resources": ["from-gg/#", "to-gg/#"]}}}, work)

    async def exchange() -> tuple[list[Any], list[str]]:
        async with native, native.subscribe("from-gg/#", policy="block", queue_size=4096) as messages:
            gg_daemon.cli("deploy", "--artifacts", str(art), str(recipe))
            await asyncio.to_thread(wait_file, out, 30.0, "subscribed")
            acks: list[Any] = []
            back: list[Any] = []
            topics: list[str] = []
            async with asyncio.timeout(120):
                for start in range(0, N, 500):
                    for i in range(start, start + 500):
                        await native.publish("to-gg/x", str(i).encode() if i % 2 == 0 else {"i": i})
                    async for m in messages:  # wait for the component's ack of this window
                        if m.topic == "from-gg/ack":
                            acks.append(m.payload["received"])
                            break
                while len(back) < N:
                    m = await messages.__anext__()
                    if m.topic == "from-gg/x":
                        back.append(m.payload)
                        topics.append(m.topic)
            assert acks == list(range(500, N + 1, 500))
            return back, topics

    back, _ = asyncio.run(exchange())
    lines = wait_file(out, 60.0, "published").splitlines()
    assert json.loads(lines[1]) == {"received": N, "in_order": True}
    expected = [bytes([i % 256, 0, 255]) + str(i).encode() if i % 2 == 0 else {"i": i, "text": "ü"}
                for i in range(N)]
    assert back == expected


CONFIG_COMPONENT = """
    import datetime, json, os, threading
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    from awsiot.greengrasscoreipc.model import (
        JsonMessage, PublishMessage, ServiceError, UnauthorizedError, ResourceNotFoundError)
    OUT = {out!r}
    FIRST = os.path.join(os.getcwd(), "first-run-done")
    def log(x):
        with open(OUT, "a") as f:
            f.write(json.dumps(x) + "\\n")
    client = GreengrassCoreIPCClientV2()
    if not os.path.exists(FIRST):
        open(FIRST, "w").close()
        log({{"leaf": client.get_configuration(key_path=["threshold"]).value,
             "object": client.get_configuration(key_path=["nested"]).value,
             "whole": sorted(client.get_configuration().value)}})
        try:
            client.get_configuration(key_path=["missing"])
        except ResourceNotFoundError as exc:
            log({{"missing": type(exc).__name__}})
        client.update_configuration(key_path=["nested"], value_to_merge={{"b": 2}},
                                    timestamp=datetime.datetime.now())
        log({{"merged": client.get_configuration(key_path=["nested"]).value}})
        try:
            client.publish_to_topic(topic="secret/x", publish_message=PublishMessage(
                json_message=JsonMessage(message={{"x": 1}})))
            log({{"denied": None}})
        except UnauthorizedError as exc:
            log({{"denied": exc.message}})
        try:
            client.get_secret_value(secret_id="db-password")
        except ServiceError as exc:
            log({{"unsupported": exc.message}})
        names = [c.component_name for c in client.list_components().components]
        log({{"listed": "test.GgConfig" in names}})
        client.update_state(state="ERRORED")  # the nucleus restarts us, as for a failed run
        threading.Event().wait(30)
    else:
        changes = []
        def on_change(event):
            changes.append(event.configuration_update_event.key_path)
            log({{"changed": event.configuration_update_event.key_path,
                 "value": client.get_configuration(key_path=["threshold"]).value}})
        client.subscribe_to_configuration_update(key_path=["threshold"], on_stream_event=on_change)
        log({{"watching": True}})
        threading.Event().wait(600)
"""


def test_awsiotsdk_configuration_state_denial_and_unsupported(gg_daemon: Any, work: Path) -> None:
    out = work / "config.out"
    policy = {"aws.greengrass.Cli": {"c": {"operations": ["aws.greengrass#ListComponents"], "resources": ["*"]}}}
    recipe, art = component(work, "test.GgConfig", "1.0.0", CONFIG_COMPONENT.format(out=str(out)),
                            config={"threshold": 0.5, "nested": {"a": 1}, "accessControl": policy})
    gg_daemon.cli("deploy", "--failure-policy", "do-nothing", "--artifacts", str(art), str(recipe), check=False)
    text = wait_file(out, 30.0, "watching")
    entries = [json.loads(line) for line in text.splitlines()]
    assert entries[0] == {"leaf": {"threshold": 0.5}, "object": {"a": 1},
                          "whole": ["accessControl", "nested", "threshold"]}
    assert entries[1] == {"missing": "ResourceNotFoundError"}
    assert entries[2] == {"merged": {"a": 1, "b": 2}}
    assert "PublishToTopic" in entries[3]["denied"] and "secret/x" in entries[3]["denied"]
    assert "aws.greengrass#GetSecretValue" in entries[4]["unsupported"]
    assert entries[5] == {"listed": True}
    assert entries[6] == {"watching": True}  # second run: UpdateState(ERRORED) made the nucleus restart it
    assert gg_daemon.components()["test.GgConfig"]["error_count"] >= 1
    gg_daemon.cli("deploy", "--update-config", json.dumps({"test.GgConfig": {"MERGE": {"threshold": 0.9}}}))
    last = json.loads(wait_file(out, 20.0, "changed").splitlines()[-1])
    assert last == {"changed": ["threshold"], "value": {"threshold": 0.9}}


DEFER_COMPONENT = """
    import threading
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    OUT = {out!r}
    client = GreengrassCoreIPCClientV2()
    deferred = []
    def on_update(event):
        if event.pre_update_event is None:
            return
        did = event.pre_update_event.deployment_id
        if not deferred:
            deferred.append(did)
            open(OUT, "a").write("deferring\\n")
            client.defer_component_update(deployment_id=did, message="busy", recheck_after_ms=1000)
        else:
            open(OUT, "a").write("ready\\n")
            client.defer_component_update(deployment_id=did, recheck_after_ms=0)
    client.subscribe_to_component_updates(on_stream_event=on_update)
    open(OUT, "a").write("subscribed\\n")
    threading.Event().wait(600)
"""


def test_awsiotsdk_component_defers_an_update(gg_daemon: Any, work: Path) -> None:
    out = work / "defer.out"
    recipe, art = component(work, "test.GgBusy", "1.0.0", DEFER_COMPONENT.format(out=str(out)))
    gg_daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    wait_file(out, 20.0, "subscribed")
    recipe2, art2 = component(work, "test.GgBusy", "2.0.0", DEFER_COMPONENT.format(out=str(out)))
    result = gg_daemon.cli("deploy", "--artifacts", str(art2), str(recipe2))
    assert "deferred by test.GgBusy: busy" in result.stdout
    assert out.read_text().split()[:3] == ["subscribed", "deferring", "ready"]
    assert gg_daemon.components()["test.GgBusy"]["version"] == "2.0.0"


VALIDATE_COMPONENT = """
    import threading
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
    from awsiot.greengrasscoreipc.model import ConfigurationValidityReport, ConfigurationValidityStatus
    OUT = {out!r}
    client = GreengrassCoreIPCClientV2()
    def on_proposal(event):
        proposal = event.validate_configuration_update_event
        ok = proposal.configuration.get("threshold", 0) >= 0
        open(OUT, "a").write(("accepting" if ok else "rejecting") + "\\n")
        client.send_configuration_validity_report(configuration_validity_report=ConfigurationValidityReport(
            status=ConfigurationValidityStatus.ACCEPTED if ok else ConfigurationValidityStatus.REJECTED,
            deployment_id=proposal.deployment_id, message="" if ok else "threshold must not be negative"))
    client.subscribe_to_validate_configuration_updates(on_stream_event=on_proposal)
    open(OUT, "a").write("subscribed\\n")
    threading.Event().wait(600)
"""


def test_awsiotsdk_component_validates_its_configuration(gg_daemon: Any, work: Path) -> None:
    out = work / "validate.out"
    recipe, art = component(work, "test.GgValid", "1.0.0", VALIDATE_COMPONENT.format(out=str(out)),
                            config={"threshold": 0.5})
    gg_daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    wait_file(out, 20.0, "subscribed")

    def update(value: float) -> Any:
        return gg_daemon.cli("deploy", "--update-config",
                             json.dumps({"test.GgValid": {"MERGE": {"threshold": value}}}), check=False)

    refused = update(-1)
    assert refused.returncode == 1 and "FAILED_NO_STATE_CHANGE" in refused.stderr
    assert "test.GgValid rejected its new configuration: threshold must not be negative" in refused.stderr
    assert update(0.7).returncode == 0
    assert out.read_text().split() == ["subscribed", "rejecting", "accepting"]
    assert json.loads(gg_daemon.cli("status", "test.GgValid").stdout)["configuration"]["threshold"] == 0.7


def test_wrong_token_is_refused_with_access_denied(gg_daemon: Any) -> None:
    from awsiot.eventstreamrpc import AccessDeniedError  # type: ignore[import-untyped]
    from awsiot.greengrasscoreipc import connect  # type: ignore[import-untyped]

    with pytest.raises(AccessDeniedError):  # a refusing CONNECT_ACK, not a timeout or a reset
        connect(ipc_socket=str(gg_daemon.root / "gg.sock"), authtoken="not-a-token", timeout=10)
    # the daemon carries on: a real client still works
    assert gg_daemon.cli("list", "--json").returncode == 0
