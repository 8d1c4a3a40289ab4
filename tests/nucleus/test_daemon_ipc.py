"""Components and local applications on the real daemon's IPC bus, through the real SDK:
publish/subscribe under accessControl, configuration get/update/watch, state reports,
deferred updates, the PID check on tokens, declared clients."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_daemon import write_recipe

from ipc import Client
from ipc.errors import InvalidArguments, ResourceNotFound, Unauthenticated, Unauthorized

pytestmark = pytest.mark.slow


def component(base: Path, name: str, version: str, code: str, *, config: dict[str, Any] | None = None,
              deps: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """A Python component: its script as an artifact, its recipe; returns (recipe, artifacts dir)."""
    art = base / "artifacts"
    script_dir = art / name / version
    script_dir.mkdir(parents=True, exist_ok=True)
    (script_dir / "main.py").write_text(textwrap.dedent(code))
    recipe = write_recipe(base / "recipes", name, version, run="python3 -u {artifacts:path}/main.py",
                          config=config, deps=deps, artifacts=[{"URI": "s3://test-bucket/main.py"}])
    return recipe, art


def wait_file(path: Path, timeout: float = 20.0, contains: str | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if contains is None or contains in text:
                return text
        time.sleep(0.05)
    raise AssertionError(f"{path} never had {contains!r}")


def client_for(daemon: Any, name: str, policy: dict[str, Any], tmp: Path) -> Client:
    policy_file = tmp / f"{name}.json"
    policy_file.write_text(json.dumps(policy))
    out = daemon.cli("client", "add", name, "--policy", str(policy_file)).stdout
    token = out.strip().splitlines()[-1]
    assert (daemon.root / "clients" / f"{name}.token").stat().st_mode & 0o077 == 0
    return Client(daemon.root / "ipc.sock", token, name=name)


PUBLISHER = """
    import asyncio, os
    from ipc import Client, Unauthorized
    async def main():
        async with Client.from_env() as c:
            try:
                await c.publish("secret/x", b"nope")
            except Unauthorized as exc:
                open(os.environ["OUT"], "w").write("denied: " + str(exc))
            for i in range(100000):
                await c.publish("sensors/a/raw", {"i": i})
                await asyncio.sleep(0.02)
    asyncio.run(main())
"""


def test_component_publishes_under_policy_and_client_receives(daemon: Any, short_tmp: Path) -> None:
    out_file = short_tmp / "pub.out"
    code = PUBLISHER.replace('os.environ["OUT"]', repr(str(out_file)))
    policy = {"aws.greengrass.ipc.pubsub": {"p1": {"operations": ["aws.greengrass#PublishToTopic"],
                                                     "resources": ["sensors/+/raw"]}}}
    recipe, art = component(short_tmp, "test.Pub", "1.0.0", code, config={"accessControl": policy})
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    denied = wait_file(out_file)
    assert "denied" in denied and "PublishToTopic" in denied and "secret/x" in denied
    viewer = client_for(daemon, "test.viewer", {"aws.greengrass.ipc.pubsub": {"v": {
        "operations": ["aws.greengrass#SubscribeToTopic"], "resources": ["sensors/#"]}}}, short_tmp)

    async def receive() -> list[Any]:
        async with viewer, viewer.subscribe("sensors/#") as messages:
            got = []
            async with asyncio.timeout(20):
                async for m in messages:
                    got.append((m.topic, m.payload))
                    if len(got) == 3:
                        return got
        return got

    got = asyncio.run(receive())
    assert [t for t, _ in got] == ["sensors/a/raw"] * 3
    seq = [p["i"] for _, p in got]
    assert seq == sorted(seq) and len(set(seq)) == 3


def test_client_without_policy_is_denied(daemon: Any, short_tmp: Path) -> None:
    nobody = client_for(daemon, "test.nobody", {}, short_tmp)

    async def attempt() -> None:
        async with nobody:
            with pytest.raises(Unauthorized, match="SubscribeToTopic"):
                async with nobody.subscribe("sensors/#") as messages:
                    async for _ in messages:
                        break
            with pytest.raises(Unauthorized):
                await nobody.list_components()
            # a client has no configuration of its own: say so, not "component test.nobody ..."
            with pytest.raises(ResourceNotFound, match=r"test\.nobody is a declared client, not a component") as err:
                await nobody.get_configuration()
            assert err.value.details == {"component": "test.nobody"}
            with pytest.raises(InvalidArguments, match="'name' must be a non-empty string") as bad:
                await nobody.get_component("")
            assert bad.value.details == {"argument": "name"}

    asyncio.run(attempt())


CONFIG_COMPONENT = """
    import asyncio, json
    from ipc import Client
    OUT = {out!r}
    def log(x):
        with open(OUT, "a") as f:
            f.write(json.dumps(x) + "\\n")
    async def main():
        async with Client.from_env() as c:
            log({{"initial": await c.get_configuration(["threshold"])}})
            await c.update_configuration(["seen"], True)
            try:
                await c.update_configuration(["accessControl"], {{"ipc.pubsub": {{"p": {{"operations": ["*"]}}}}}})
                log({{"accessControl": "updated"}})
            except Exception as exc:
                log({{"accessControl": [type(exc).__name__, str(exc)]}})
            async with c.watch_configuration(["threshold"]) as changes:
                log({{"watching": True}})
                async for changed in changes:
                    log({{"changed": changed, "value": await c.get_configuration(["threshold"])}})
    asyncio.run(main())
"""


def test_component_configuration_get_update_watch(daemon: Any, short_tmp: Path) -> None:
    out = short_tmp / "cfg.out"
    recipe, art = component(short_tmp, "test.Cfg", "1.0.0", CONFIG_COMPONENT.format(out=str(out)),
                            config={"threshold": 0.5})
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    wait_file(out, contains="watching")
    assert json.loads(out.read_text().splitlines()[0]) == {"initial": 0.5}
    # Its own policies are not its to write: stored, they would be loaded at the next start (Greengrass
    # refuses this too).
    refused = json.loads(out.read_text().splitlines()[1])["accessControl"]
    assert refused[0] == "InvalidArguments" and "accessControl may not be updated at run time" in refused[1]
    status = json.loads(daemon.cli("status", "test.Cfg").stdout)
    assert status["configuration"]["seen"] is True and "accessControl" not in status["configuration"]
    pid = status["pids"]
    daemon.cli("deploy", "--update-config", json.dumps({"test.Cfg": {"MERGE": {"threshold": 0.9}}}))
    text = wait_file(out, contains="changed")
    last = json.loads(text.splitlines()[-1])
    assert last["value"] == 0.9
    assert last["changed"] == {"component": "test.Cfg", "key_path": ["threshold"]}  # as docs/sdk.md shows it
    # A configuration-only deployment does not restart the component.
    assert json.loads(daemon.cli("status", "test.Cfg").stdout)["pids"] == pid


VALIDATING_COMPONENT = """
    import asyncio, json
    from ipc import Client
    def parse(doc):
        if not isinstance(doc.get("threshold"), (int, float)) or doc["threshold"] < 0:
            raise ValueError(f"threshold must be a number >= 0, got {{doc.get('threshold')!r}}")
        return doc
    async def main():
        async with Client.from_env() as c:
            async for cfg in c.configuration_changes(parse, errors=(ValueError,), rejected=lambda exc: None):
                open({out!r}, "a").write(json.dumps(cfg["threshold"]) + "\\n")
    asyncio.run(main())
"""


def test_a_configuration_the_component_rejects_fails_the_deployment_and_changes_nothing(
        daemon: Any, short_tmp: Path) -> None:
    """Greengrass's configuration validation: it used to be SUCCEEDED, the component refused it, and the
    refused value stayed stored (refused again with each later change, fatal at the next restart)."""
    out = short_tmp / "val.out"
    recipe, art = component(short_tmp, "test.Val", "1.0.0", VALIDATING_COMPONENT.format(out=str(out)),
                            config={"threshold": 0.5})
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    pid = daemon.wait_state("test.Val", {"RUNNING"})["pids"]

    def update(value: Any) -> Any:
        return daemon.cli("deploy", "--update-config", json.dumps({"test.Val": {"MERGE": {"threshold": value}}}),
                          check=False)

    deadline = time.monotonic() + 20
    while update(0.6).returncode != 0 or "0.6" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, "the component never took a valid change"
        time.sleep(0.2)
    refused = update(-1)
    assert refused.returncode == 1 and "FAILED_NO_STATE_CHANGE" in refused.stderr, refused.stderr
    assert "test.Val rejected its new configuration: threshold must be a number >= 0, got -1" in refused.stderr
    status = json.loads(daemon.cli("status", "test.Val").stdout)
    assert status["configuration"]["threshold"] == 0.6 and status["pids"] == pid  # nothing written, still running
    assert update(0.9).returncode == 0  # the refused value is not in the way of the next change
    wait_file(out, contains="0.9")


MISANSWERING_COMPONENT = """
    import asyncio
    from ipc import Client, IpcError
    OUT = {out!r}
    def note(line):
        open(OUT, "a").write(line + "\\n")
    async def refused(call):
        try:
            await call
            note("accepted")
        except IpcError as exc:
            note(str(exc))
    async def main():
        async with Client.from_env() as c, c.configuration_validations() as proposals:
            note("subscribed")
            async for proposal in proposals:
                did = proposal["deployment_id"]
                await refused(c.report_configuration_validity("no-such-deployment", accepted=True))
                await refused(c.defer_update(did))  # validation is not pre_update: nothing asked
                await c.report_configuration_validity(did, accepted=True)
                note("answered")
                await refused(c.report_configuration_validity(did, accepted=False))  # twice
                note("done")
    asyncio.run(main())
"""


def test_an_answer_nothing_waits_for_is_refused_naming_the_deployment(daemon: Any, short_tmp: Path) -> None:
    """A validity report or a deferral for a deployment that is not asking (a wrong id, an answer given
    twice, one after the timeout) was taken silently: a client with a wrong id believed it had answered
    while the deployment waited out its timeout. Greengrass answers InvalidArgumentsError; so do we."""
    out = short_tmp / "mis.out"
    recipe, art = component(short_tmp, "test.Mis", "1.0.0", MISANSWERING_COMPONENT.format(out=str(out)),
                            config={"threshold": 0.5})
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    wait_file(out, contains="subscribed")
    started = time.monotonic()
    daemon.cli("deploy", "--update-config", json.dumps({"test.Mis": {"MERGE": {"threshold": 0.7}}}))
    assert time.monotonic() - started < 15  # answered, not timed out (the validation timeout is 20 s)
    lines = wait_file(out, contains="done").splitlines()
    assert lines[1] == ("INVALID_ARGUMENTS: no validation of deployment no-such-deployment is waiting for "
                        "test.Mis's report: it timed out, was answered already, or was never sent")
    assert lines[2].startswith("INVALID_ARGUMENTS: no update of deployment ") and "never announced" in lines[2]
    assert lines[3] == "answered"
    assert lines[4].startswith("INVALID_ARGUMENTS: no validation of deployment ")
    assert daemon.components()["test.Mis"]["state"] == "RUNNING"


STATE_COMPONENT = """
    import asyncio
    from ipc import Client
    async def main():
        async with Client.from_env() as c:
            await asyncio.sleep(0.3)
            await c.update_state("ERRORED", message="sensor bus unreachable:\\n  /dev/ttyUSB0 gone")
            await asyncio.sleep(60)
    asyncio.run(main())
"""


def test_reported_errored_state_triggers_restart(daemon: Any, short_tmp: Path) -> None:
    recipe, art = component(short_tmp, "test.Reporter", "1.0.0", STATE_COMPONENT)
    out = daemon.cli("deploy", "--settle", "10", "--failure-policy", "do-nothing", "--artifacts", str(art),
                     str(recipe), check=False)
    assert out.returncode == 1  # it keeps reporting ERRORED until BROKEN
    comp = daemon.wait_state("test.Reporter", {"BROKEN"})
    assert comp["error_count"] >= 3
    # its own reason, on one line, where the operator looks (it said only "reported ERRORED")
    assert "reported ERRORED by the component: sensor bus unreachable: /dev/ttyUSB0 gone" in comp["last_error"]
    assert "sensor bus unreachable: /dev/ttyUSB0 gone" in out.stderr


DEFER_COMPONENT = """
    import asyncio, os
    from ipc import Client
    OUT = {out!r}
    async def main():
        deferred = False
        async with Client.from_env() as c, c.component_updates() as updates:
            open(OUT, "a").write("subscribed\\n")
            async for event in updates:
                if event["kind"] == "pre_update" and not deferred:
                    deferred = True
                    open(OUT, "a").write("deferring\\n")
                    await c.defer_update(event["deployment_id"], recheck_after_s=1.0, message="busy")
                elif event["kind"] == "pre_update":
                    open(OUT, "a").write("ready\\n")
                    await c.defer_update(event["deployment_id"], recheck_after_s=0)
    asyncio.run(main())
"""


def test_component_defers_an_update(daemon: Any, short_tmp: Path) -> None:
    out = short_tmp / "defer.out"
    recipe, art = component(short_tmp, "test.Busy", "1.0.0", DEFER_COMPONENT.format(out=str(out)))
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    wait_file(out, contains="subscribed")
    recipe2, art2 = component(short_tmp, "test.Busy", "2.0.0", DEFER_COMPONENT.format(out=str(out)))
    result = daemon.cli("deploy", "--artifacts", str(art2), str(recipe2))
    assert "deferred by test.Busy: busy" in result.stdout
    assert out.read_text().split() == ["subscribed", "deferring", "ready", "subscribed"]
    assert daemon.components()["test.Busy"]["version"] == "2.0.0"


TOKEN_LEAK = """
    import os, time
    open({out!r}, "w").write(os.environ["SVCUID"])
    time.sleep(600)
"""


def test_a_components_token_is_refused_from_another_process(daemon: Any, short_tmp: Path) -> None:
    out = short_tmp / "token"
    recipe, art = component(short_tmp, "test.Leaky", "1.0.0", TOKEN_LEAK.format(out=str(out)))
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    token = wait_file(out)

    async def borrow() -> None:
        with pytest.raises(Unauthenticated, match="not one of its processes"):
            async with Client(daemon.root / "ipc.sock", token) as c:
                await c.list_components()

    asyncio.run(borrow())


CONTROL_COMPONENT = """
    import asyncio, json
    from ipc import Client, Unauthorized
    async def main():
        async with Client.from_env() as c:
            comps = await c.list_components()
            result = await c.restart_component("test.Target")
            try:
                await c.stop_component("test.Other")
                denied = None
            except Unauthorized as exc:
                denied = str(exc)
            open({out!r}, "w").write(json.dumps({{"names": [x["name"] for x in comps], "denied": denied}}))
            await asyncio.sleep(600)
    asyncio.run(main())
"""


def test_component_restarts_another_with_policy(daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "recipes"
    sleeper = "exec sleep 600"
    daemon.cli("deploy", str(write_recipe(d, "test.Target", "1.0.0", run=sleeper)),
               str(write_recipe(d, "test.Other", "1.0.0", run=sleeper)))
    target_pid = daemon.components()["test.Target"]["pids"]
    out = short_tmp / "control.out"
    policy = {"aws.greengrass.Cli": {"c1": {
        "operations": ["aws.greengrass#ListComponents", "aws.greengrass#RestartComponent"],
        "resources": ["*"]}}}
    recipe, art = component(short_tmp, "test.Operator", "1.0.0", CONTROL_COMPONENT.format(out=str(out)),
                            config={"accessControl": policy})
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    result = json.loads(wait_file(out))
    assert {"test.Target", "test.Other", "test.Operator"} <= set(result["names"])
    assert result["denied"] and "StopComponent" in result["denied"]
    comp = daemon.wait_state("test.Target", {"RUNNING"})
    assert comp["pids"] != target_pid
    assert daemon.components()["test.Other"]["state"] == "RUNNING"


def test_deployment_through_the_sdk(daemon: Any, short_tmp: Path) -> None:
    token = (daemon.root / "run" / "cli.token").read_text().strip()
    recipe = write_recipe(short_tmp / "r", "test.Sdk", "1.0.0", run="exec sleep 600")

    async def deploy() -> dict[str, Any]:
        async with Client(daemon.root / "ipc.sock", token) as c:
            did = await c.create_deployment(
                recipes=[{"source": str(recipe), "text": recipe.read_text(), "format": "json"}],
                root_components={"test.Sdk": "1.0.0"},
            )
            async with asyncio.timeout(30):
                while True:
                    status = await c.get_deployment(did)
                    if status["status"] not in ("QUEUED", "IN_PROGRESS"):
                        return status
                    await asyncio.sleep(0.1)

    status = asyncio.run(deploy())
    assert status["status"] == "SUCCEEDED"
    assert daemon.components()["test.Sdk"]["state"] == "RUNNING"


PEER_CONFIG = """
    import asyncio, json
    from ipc import Client, Unauthorized
    async def main():
        async with Client.from_env() as c:
            value = await c.get_configuration(["threshold"], component="test.Owner")
            await c.update_configuration(["threshold"], 0.7, component="test.Owner")
            try:
                await c.get_configuration([], component="test.Private")
                private = "read"
            except Unauthorized as exc:
                private = str(exc)
            await c.put_metric([{{"name": "windows", "unit": "Count", "value": 42}}])
            open({out!r}, "w").write(json.dumps({{"value": value, "private": private}}))
            await asyncio.sleep(600)
    asyncio.run(main())
"""


def test_another_components_configuration_with_policy_and_metrics(daemon: Any, short_tmp: Path) -> None:
    d = short_tmp / "recipes"
    daemon.cli("deploy", str(write_recipe(d, "test.Owner", "1.0.0", run="exec sleep 600", config={"threshold": 0.5})),
               str(write_recipe(d, "test.Private", "1.0.0", run="exec sleep 600", config={"secret": 1})))
    out = short_tmp / "peer.out"
    policy = {"aws.greengrass.ipc.config": {"c1": {
        "operations": ["aws.greengrass#GetConfiguration", "aws.greengrass#UpdateConfiguration"],
        "resources": ["test.Owner"]}},
        "aws.greengrass.ipc.componentmetric": {"m1": {  # no resources, as docs/configuration.md says
            "operations": ["aws.greengrass#PutComponentMetric"]}}}
    recipe, art = component(short_tmp, "test.Peer", "1.0.0", PEER_CONFIG.format(out=str(out)),
                            config={"accessControl": policy})
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    result = json.loads(wait_file(out))
    assert result["value"] == 0.5
    assert "GetConfiguration" in result["private"] and "test.Private" in result["private"]
    owner = json.loads(daemon.cli("status", "test.Owner").stdout)
    assert owner["configuration"]["threshold"] == 0.7
    peer = json.loads(daemon.cli("status", "test.Peer").stdout)
    assert peer["metrics"]["windows"]["value"] == 42


def test_recipe_without_lifecycle_declares_a_local_client(daemon: Any, short_tmp: Path) -> None:
    policy = {"aws.greengrass.ipc.pubsub": {"p": {"operations": ["aws.greengrass#PublishToTopic"],
                                                   "resources": ["dashboard/+"]}}}
    recipe = short_tmp / "app.json"
    recipe.write_text(json.dumps({
        "RecipeFormatVersion": "2020-01-25", "ComponentName": "test.Dashboard", "ComponentVersion": "1.0.0",
        "ComponentConfiguration": {"DefaultConfiguration": {"accessControl": policy}},
    }))
    out = daemon.cli("deploy", str(recipe)).stdout
    lines = out.strip().splitlines()
    assert "local client test.Dashboard: token (shown once" in lines[-2]
    token = lines[-1]
    token_file = daemon.root / "clients" / "test.Dashboard.token"
    assert token_file.read_text().strip() == token and token_file.stat().st_mode & 0o077 == 0
    assert token not in (daemon.root / "logs" / "nucleus.log").read_text()
    assert token not in (daemon.root / "db" / "nucleus.db").read_bytes().decode(errors="replace")
    # Redeploying keeps the token.
    again = daemon.cli("deploy", str(recipe)).stdout
    assert token not in again

    async def use() -> None:
        async with Client(daemon.root / "ipc.sock", token) as c:
            await c.publish("dashboard/a", {"x": 1}, confirm=True)
            with pytest.raises(Unauthorized):
                await c.publish("sensors/a/raw", {"x": 1}, confirm=True)

    asyncio.run(use())
    daemon.cli("deploy", "--remove", "test.Dashboard")
    assert not token_file.exists()

    async def refused() -> None:
        with pytest.raises(Unauthenticated):
            async with Client(daemon.root / "ipc.sock", token) as c:
                await c.list_components()

    asyncio.run(refused())


RECONFIGURING_COMPONENT = """
    import asyncio, json
    from ipc import Client
    def parse(doc):
        if not 0 <= doc["threshold"] <= 1:
            raise ValueError(f"threshold {{doc['threshold']}} is outside [0, 1]")
        return doc["threshold"]
    async def main():
        async with Client.from_env() as c:
            out = open({out!r}, "a", buffering=1)
            out.write("watching\\n")
            rejected = lambda exc: out.write(json.dumps({{"rejected": str(exc)}}) + "\\n")
            async for value in c.configuration_changes(parse, errors=(ValueError,), rejected=rejected):
                out.write(json.dumps({{"applied": value}}) + "\\n")
    asyncio.run(main())
"""


def test_configuration_changes_yields_valid_configurations_and_reports_refused_ones(daemon: Any,
                                                                                    short_tmp: Path) -> None:
    out = short_tmp / "reconf.out"
    recipe, art = component(short_tmp, "test.Reconf", "1.0.0", RECONFIGURING_COMPONENT.format(out=str(out)),
                            config={"threshold": 0.5})
    daemon.cli("deploy", "--artifacts", str(art), str(recipe))
    wait_file(out, contains="watching")
    daemon.cli("deploy", "--update-config", json.dumps({"test.Reconf": {"MERGE": {"threshold": 0.6}}}))
    wait_file(out, contains="applied")  # iterating: it also answers validations now
    # Through a deployment, the component's own parser refuses it first: nothing is written.
    refused = daemon.cli("deploy", "--update-config", json.dumps({"test.Reconf": {"MERGE": {"threshold": 2.0}}}),
                         check=False)
    assert refused.returncode == 1
    assert "test.Reconf rejected its new configuration: threshold 2.0 is outside [0, 1]" in refused.stderr
    # A change that bypasses deployments (a client's UpdateConfiguration) is not validated: the component
    # refuses it when it arrives and goes on with the last good configuration.
    token = (daemon.root / "run" / "cli.token").read_text().strip()

    async def bypass() -> None:
        async with Client(daemon.root / "ipc.sock", token) as c:
            await c.update_configuration(["threshold"], 2.0, component="test.Reconf")

    asyncio.run(bypass())
    wait_file(out, contains="rejected")
    daemon.cli("deploy", "--update-config", json.dumps({"test.Reconf": {"MERGE": {"threshold": 0.7}}}))
    lines = [json.loads(x) for x in wait_file(out, contains="0.7").splitlines()[1:]]
    assert lines == [{"applied": 0.6}, {"rejected": "threshold 2.0 is outside [0, 1]"}, {"applied": 0.7}]
