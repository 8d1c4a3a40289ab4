"""awsiotsdk programs against a real daemon's Greengrass socket, as the docs' walk-through found them.

A declared client (``nucleus client add``) connects to ``<root>/gg.sock`` with its token, as a
component connects with ``SVCUID``; no deployment is needed, so each check takes a moment. Each
test is a defect the walk of docs/greengrass-ipc.md turned up.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytest.importorskip("awsiot.greengrasscoreipc.clientv2", reason="awsiotsdk is not installed")

pytestmark = pytest.mark.slow


def gg_client(daemon: Any, name: str, policy: dict[str, Any]) -> Any:
    """An awsiotsdk GreengrassCoreIPCClientV2 on the daemon's Greengrass socket, as declared client NAME."""
    from awsiot.greengrasscoreipc import connect  # type: ignore[import-untyped]
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2  # type: ignore[import-untyped]

    policy_file = daemon.root.parent / f"{name}.json"
    policy_file.write_text(json.dumps(policy))
    token = daemon.cli("client", "add", name, "--policy", str(policy_file)).stdout.strip().splitlines()[-1]
    return GreengrassCoreIPCClientV2(client=connect(ipc_socket=str(daemon.root / "gg.sock"), authtoken=token,
                                                    timeout=10))


def test_refused_subscription_fails_the_call_instead_of_succeeding(gg_daemon: Any) -> None:
    """A subscription the nucleus refuses raises from the call, as on Greengrass.

    Before, the response went out first and the refusal came later as the stream's error, so
    ``subscribe_to_configuration_update`` returned as if subscribed.
    """
    from awsiot.greengrasscoreipc.model import (  # type: ignore[import-untyped]
        InvalidArgumentsError,
        ResourceNotFoundError,
    )

    client = gg_client(gg_daemon, "walk-refused", {"aws.greengrass.ipc.config": {"c": {
        "operations": ["aws.greengrass#SubscribeToConfigurationUpdate"], "resources": ["*"]}}})
    stream_errors: list[Any] = []

    def on_error(exc: Exception) -> bool:
        stream_errors.append(exc)
        return True

    try:
        with pytest.raises(ResourceNotFoundError) as missing:
            client.subscribe_to_configuration_update(component_name="no.Such", key_path=["a"],
                                                     on_stream_event=print, on_stream_error=on_error)
        assert "no.Such" in missing.value.message
        with pytest.raises(InvalidArgumentsError) as not_component:  # only components validate
            client.subscribe_to_validate_configuration_updates(on_stream_event=print, on_stream_error=on_error)
        assert "only components" in not_component.value.message
        # the connection still works (a declared client has no configuration of its own)
        with pytest.raises(ResourceNotFoundError):
            client.subscribe_to_configuration_update(key_path=[], on_stream_event=print, on_stream_error=on_error)
        assert stream_errors == []  # nothing arrived as a stream error as well
    finally:
        client.close()


def test_local_deployments_read_as_the_greengrass_cli_writes_them(gg_daemon: Any) -> None:
    """createdOn is ``dd-MM-yyyy HH:mm:ss UTC`` and an unknown id names itself in the error.

    Before, createdOn was the journal's float seconds as text (``'1795586984.2721686'``), which a
    component parsing the Greengrass form fails on, and ResourceNotFoundError had no resource.
    """
    import datetime

    from awsiot.greengrasscoreipc.model import ResourceNotFoundError

    client = gg_client(gg_daemon, "walk-cli", {"aws.greengrass.Cli": {"c": {"operations": ["*"], "resources": ["*"]}}})
    try:
        before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        did = client.create_local_deployment(root_component_versions_to_add={"walk.NoSuch": "1.0.0"}).deployment_id
        listed = {d.deployment_id: d for d in client.list_local_deployments().local_deployments}
        status = client.get_local_deployment_status(deployment_id=did).deployment
        for shown in (listed[did].created_on, status.created_on):
            when = datetime.datetime.strptime(shown, "%d-%m-%Y %H:%M:%S %Z").replace(tzinfo=datetime.UTC)
            assert before <= when <= datetime.datetime.now(datetime.UTC), shown
        with pytest.raises(ResourceNotFoundError) as missing:
            client.get_local_deployment_status(deployment_id="0f0f0f0f-0000-4000-8000-000000000000")
        assert (missing.value.resource_type, missing.value.resource_name) == (
            "LocalDeployment", "0f0f0f0f-0000-4000-8000-000000000000")
        for _ in range(100):  # let the deployment end before the daemon stops (bounded: 10 s)
            if client.get_local_deployment_status(deployment_id=did).deployment.status not in ("QUEUED", "IN_PROGRESS"):
                break
            time.sleep(0.1)
    finally:
        client.close()


ACL_WRITER = """
import datetime, json
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
client = GreengrassCoreIPCClientV2()
grant = {"aws.greengrass.ipc.pubsub": {"mine": {"operations": ["*"], "resources": ["*"]}}}
results = {}
for name, key_path, value in (("at_key", ["accessControl"], grant), ("at_root", [], {"accessControl": grant}),
                              ("other_key", ["note"], {"x": 1})):
    try:
        client.update_configuration(key_path=key_path, value_to_merge=value, timestamp=datetime.datetime.now())
        results[name] = "updated"
    except Exception as exc:
        results[name] = [type(exc).__name__, getattr(exc, "message", "")]
open(OUT, "w").write(json.dumps(results))
"""


def test_component_cannot_grant_itself_policies_over_ipc(gg_daemon: Any) -> None:
    """UpdateConfiguration of ``accessControl`` is refused, as Greengrass refuses it.

    Before, both forms were written to the component's configuration, which the nucleus loads as
    its policies at the next start or deployment: a component with no policy got ``*``.
    """
    work = gg_daemon.root.parent / "acl"
    out = work / "acl.json"
    art = work / "artifacts" / "walk.AclWriter" / "1.0.0"
    art.mkdir(parents=True)
    (art / "main.py").write_text(f"OUT = {str(out)!r}\n" + ACL_WRITER)
    recipe = work / "walk.AclWriter-1.0.0.json"
    recipe.write_text(json.dumps({
        "RecipeFormatVersion": "2020-01-25", "ComponentName": "walk.AclWriter", "ComponentVersion": "1.0.0",
        "Manifests": [{"Platform": {"os": "linux"}, "Artifacts": [{"URI": "s3://bucket/main.py"}],
                       "Lifecycle": {"Run": "python3 -u {artifacts:path}/main.py"}}]}))
    gg_daemon.cli("deploy", "--settle", "0", "--artifacts", str(work / "artifacts"), str(recipe))
    for _ in range(300):  # bounded: 30 s
        if out.exists() and out.read_text():
            break
        time.sleep(0.1)
    results = json.loads(out.read_text())
    for form in ("at_key", "at_root"):
        assert results[form][0] == "InvalidArgumentsError", results
        assert "accessControl" in results[form][1]
    assert results["other_key"] == "updated"  # the rest of its own configuration stays writable
    configuration = json.loads(gg_daemon.cli("status", "walk.AclWriter").stdout)["configuration"]
    assert "accessControl" not in configuration and configuration["note"] == {"x": 1}


def test_create_local_deployment_carries_component_to_run_with_info(gg_daemon: Any) -> None:
    """CreateLocalDeployment's componentToRunWithInfo sets the component's runWith, as Greengrass does.

    Before, the field was dropped without a word: a component deployed through the Greengrass CLI
    API with a memory limit ran with none.
    """
    from awsiot.greengrasscoreipc.model import (  # type: ignore[import-untyped]
        InvalidArgumentsError,
        RunWithInfo,
        SystemResourceLimits,
    )

    from nucleus.cgroups import Cgroups, Limits

    problem = Cgroups().problem(Limits(memory_kb=1024, cpus=0.5))
    if problem is not None:
        pytest.skip(f"cgroups not writable here: {problem}")
    recipes = gg_daemon.root.parent / "runwith-recipes"
    recipes.mkdir()
    (recipes / "walk.Limited-1.0.0.json").write_text(json.dumps({
        "RecipeFormatVersion": "2020-01-25", "ComponentName": "walk.Limited", "ComponentVersion": "1.0.0",
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": "exec sleep 600"}}]}))
    client = gg_client(gg_daemon, "walk-runwith", {"aws.greengrass.Cli": {"c": {"operations": ["*"],
                                                                                "resources": ["*"]}}})
    try:
        with pytest.raises(InvalidArgumentsError) as refused:  # a bad limit names itself; nothing is queued
            client.create_local_deployment(
                recipe_directory_path=str(recipes), root_component_versions_to_add={"walk.Limited": "1.0.0"},
                component_to_run_with_info={"walk.Limited": RunWithInfo(
                    system_resource_limits=SystemResourceLimits(cpus=0.0))})
        assert "cpus" in refused.value.message and "walk.Limited" in refused.value.message
        limits = SystemResourceLimits(memory=65536, cpus=0.5)
        did = client.create_local_deployment(
            recipe_directory_path=str(recipes), root_component_versions_to_add={"walk.Limited": "1.0.0"},
            component_to_run_with_info={"walk.Limited": RunWithInfo(windows_user="ignored-on-linux",
                                                                    system_resource_limits=limits)}).deployment_id
        for _ in range(300):  # bounded: 30 s
            status = client.get_local_deployment_status(deployment_id=did).deployment.status
            if status not in ("QUEUED", "IN_PROGRESS"):
                break
            time.sleep(0.1)
        assert status == "SUCCEEDED"
    finally:
        client.close()
    run_with = json.loads(gg_daemon.cli("status", "walk.Limited").stdout)["run_with"]
    assert run_with["systemResourceLimits"] == {"memory": 65536, "cpus": 0.5}
    gg_daemon.cli("deploy", "--settle", "0", "--remove", "walk.Limited")
