"""Recipe variables: every form, unresolved ones left as written, cross-component lookups."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from nucleus.interpolation import (
    ComponentContext,
    InterpolationContext,
    find_variables,
    interpolate,
    interpolate_lifecycle,
    json_pointer_get,
)
from nucleus.recipe import Lifecycle, Step

CONFIG: dict[str, Any] = {
    "message": "hello",
    "password": "s3cret",
    "ModelResourceKey": {"armv7l": "model-arm", "x86_64": "model-x86"},
    "model_sha256": "abc123",
    "port": 8883,
    "ratio": 0.5,
    "enabled": True,
    "disabled": False,
    "nothing": None,
    "list": ["a", {"b": 1}],
    "nested": {"k": "v", "n": [1, 2]},
    "a/b": "slash",
    "m~n": "tilde",
    "": "empty-key",
    "looks": "{iot:thingName}",
    "startupTimeoutSeconds": 90,
    "requiresPrivilege": "true",
}


def _ctx() -> InterpolationContext:
    own = ComponentContext(
        name="com.example.App",
        configuration=CONFIG,
        artifacts_path="/nuc/packages/artifacts/com.example.App/1.0.0",
        decompressed_path="/nuc/packages/artifacts-unarchived/com.example.App/1.0.0",
        work_path="/nuc/work/com.example.App",
    )
    dep = ComponentContext(
        name="com.example.Model",
        configuration={"path": "/models/m1", "threshold": 0.75},
        artifacts_path="/nuc/packages/artifacts/com.example.Model/2.0.0",
        decompressed_path="/nuc/packages/artifacts-unarchived/com.example.Model/2.0.0",
        work_path="/nuc/work/com.example.Model",
    )
    return InterpolationContext(component=own, kernel_root="/nuc", thing_name="edge-01",
                                dependencies={dep.name: dep})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{artifacts:path}/app.py", "/nuc/packages/artifacts/com.example.App/1.0.0/app.py"),
        ("{artifacts:decompressedPath}/app", "/nuc/packages/artifacts-unarchived/com.example.App/1.0.0/app"),
        ("cd {work:path}", "cd /nuc/work/com.example.App"),
        ("{kernel:rootPath}/bin", "/nuc/bin"),
        ("$aws/things/{iot:thingName}/jobs/+/get", "$aws/things/edge-01/jobs/+/get"),
        ("say {configuration:/message}", "say hello"),
        ("{configuration:password}", "s3cret"),  # no leading slash, seen in real recipes
        ("{configuration:/ModelResourceKey/armv7l}", "model-arm"),
        ("""'{"model_sha256":"{configuration:/model_sha256}"}'""", """'{"model_sha256":"abc123"}'"""),
        ("{configuration:/port}", "8883"),
        ("{configuration:/ratio}", "0.5"),
        ("{configuration:/enabled}/{configuration:/disabled}", "true/false"),
        ("{configuration:/nothing}", "null"),
        ("{configuration:/list/0}", "a"),
        ("{configuration:/list/1}", '{"b":1}'),
        ("{configuration:/nested}", '{"k":"v","n":[1,2]}'),
        ("{configuration:/nested/n}", "[1,2]"),
        ("{configuration:/a~1b} {configuration:/m~0n}", "slash tilde"),
        ("{configuration:/}", "empty-key"),
        ("{configuration:/looks}", "{iot:thingName}"),  # one pass: values are not re-expanded
        ("{com.example.Model:configuration:/path}", "/models/m1"),
        ("{com.example.Model:configuration:/threshold}", "0.75"),
        ("{com.example.Model:artifacts:path}/m.bin", "/nuc/packages/artifacts/com.example.Model/2.0.0/m.bin"),
        ("{com.example.Model:artifacts:decompressedPath}",
         "/nuc/packages/artifacts-unarchived/com.example.Model/2.0.0"),
        ("{com.example.Model:work:path}", "/nuc/work/com.example.Model"),
        ("{com.example.App:configuration:/message}", "hello"),  # own name spelled out
        ("no variables here", "no variables here"),
        ("{COMPONENT_NAME} ${HOME} {} {{x}} {foo:bar}", "{COMPONENT_NAME} ${HOME} {} {{x}} {foo:bar}"),
    ],
)
def test_resolved_variables(text: str, expected: str) -> None:
    warned: list[str] = []
    assert interpolate(text, _ctx(), warn=warned.append) == expected
    assert warned == []


@pytest.mark.parametrize(
    "variable",
    [
        "{configuration:/newKey}",
        "{configuration:/ModelResourceKey/riscv}",
        "{configuration:/list/9}",
        "{configuration:/list/01}",
        "{configuration:/message/deeper}",
        "{artifacts:unknown}",
        "{work:dir}",
        "{kernel:root}",
        "{iot:thingArn}",
        "{com.example.NotADependency:configuration:/path}",
        "{com.example.NotADependency:artifacts:path}",
        "{com.example.Model:configuration:/missing}",
        "{com.example.Model:kernel:rootPath}",  # device-wide namespaces have no component form
        "{com.example.Model:iot:thingName}",
    ],
)
def test_unresolved_left_as_written_with_warning(variable: str) -> None:
    warned: list[str] = []
    text = f"echo {variable} and {variable} {{artifacts:path}}"
    result = interpolate(text, _ctx(), warn=warned.append)
    assert result == f"echo {variable} and {variable} /nuc/packages/artifacts/com.example.App/1.0.0"
    assert warned == [variable, variable]  # once per occurrence


def test_default_warning_is_a_structlog_event() -> None:
    with capture_logs() as logs:
        out = interpolate("x {configuration:/nope}", _ctx())
    assert out == "x {configuration:/nope}"
    assert logs == [{"event": "recipe.variable_unresolved", "log_level": "warning",
                     "component": "com.example.App", "variable": "{configuration:/nope}"}]


def test_interpolate_lifecycle_types_timeout_and_privilege() -> None:
    lc = Lifecycle(
        setenv={"ROOT": "{kernel:rootPath}", "PLAIN": "x"},
        steps={
            "install": Step("pip install -r {artifacts:decompressedPath}/req.txt", timeout=300.0,
                            skipif="onpath {configuration:/message}"),
            "startup": Step("start {iot:thingName}", timeout="{configuration:/startupTimeoutSeconds}",
                            requires_privilege="{configuration:/requiresPrivilege}",
                            setenv={"MODEL": "{com.example.Model:configuration:/path}"}),
            "run": Step("run", timeout="{configuration:/missing}",
                        requires_privilege="{configuration:/gone}"),
        },
    )
    warned: list[str] = []
    out = interpolate_lifecycle(lc, _ctx(), warn=warned.append)
    assert out.setenv == {"ROOT": "/nuc", "PLAIN": "x"}
    install = out.steps["install"]
    assert install.script == "pip install -r /nuc/packages/artifacts-unarchived/com.example.App/1.0.0/req.txt"
    assert install.skipif == "onpath hello" and install.timeout == 300.0
    startup = out.steps["startup"]
    assert startup == Step("start edge-01", timeout=90.0, requires_privilege=True,
                           setenv={"MODEL": "/models/m1"})
    run = out.steps["run"]
    assert run.timeout == "{configuration:/missing}"
    assert run.requires_privilege == "{configuration:/gone}"
    assert warned == ["{configuration:/missing}", "{configuration:/gone}"]
    assert lc.steps["startup"].timeout == "{configuration:/startupTimeoutSeconds}"  # input untouched


def test_find_variables() -> None:
    text = "a {artifacts:path} b {X.Y:configuration:/k} {COMPONENT_NAME} {iot:thingName}"
    assert find_variables(text) == ["{artifacts:path}", "{X.Y:configuration:/k}", "{iot:thingName}"]


def test_json_pointer_rfc6901_examples() -> None:
    doc = {"foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3, "g|h": 4, "i\\j": 5, 'k"l': 6,
           " ": 7, "m~n": 8}
    assert json_pointer_get(doc, "") == doc
    cases = {"/foo": ["bar", "baz"], "/foo/0": "bar", "/": 0, "/a~1b": 1, "/c%d": 2, "/e^f": 3,
             "/g|h": 4, "/i\\j": 5, '/k"l': 6, "/ ": 7, "/m~0n": 8}
    for pointer, value in cases.items():
        assert json_pointer_get(doc, pointer) == value, pointer
    assert json_pointer_get(doc, "foo/1") == "baz"  # tolerated missing leading slash
    for bad in ("/nope", "/foo/2", "/foo/-", "/foo/bar", "/foo/0/x"):
        with pytest.raises(KeyError):
            json_pointer_get(doc, bad)
