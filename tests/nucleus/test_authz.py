"""accessControl parsing and decisions, as tables (Greengrass semantics, default deny)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nucleus.authz import (
    CLI,
    CONFIG,
    MQTTPROXY,
    PUBSUB,
    Authorizer,
    Policy,
    parse_access_control,
    resource_regex,
)
from nucleus.errors import ConfigurationError


@dataclass(frozen=True)
class Principal:
    name: str
    kind: str = "component"


SENSOR = Principal("com.example.Sensor")
OTHER = Principal("com.example.Other")

ACCESS = {
    PUBSUB: {
        "sensor:pubsub:1": {
            "policyDescription": "raw readings",
            "operations": ["aws.greengrass#PublishToTopic"],
            "resources": ["sensors/+/raw", "status/{iot:thingName}", "odd/{unknown:var}"],
        },
        "sensor:pubsub:2": {
            "operations": ["aws.greengrass#SubscribeToTopic"],
            "resources": ["commands/#", "lit${*}eral", "mid/#/x", "pre+fix/y"],
        },
        "sensor:pubsub:3": {
            "operations": ["*"],
            "resources": ["everything/*"],
        },
    },
    MQTTPROXY: {
        "sensor:mqtt:1": {
            "operations": ["aws.greengrass#PublishToIoTCore"],
            "resources": ["$aws/things/{iot:thingName}/shadow/#"],
        },
    },
    CONFIG: {
        "sensor:config:1": {
            "operations": ["aws.greengrass#GetConfiguration"],
            "resources": ["com.example.Other"],
        },
    },
    CLI: {
        "sensor:cli:1": {
            "operations": ["aws.greengrass#RestartComponent", "aws.greengrass#StopComponent"],
            "resources": ["com.example.*"],
        },
        "sensor:cli:2": {
            "operations": ["aws.greengrass#ListComponents"],
            "resources": ["*"],
        },
    },
}


@pytest.fixture
def authorizer() -> Authorizer:
    a = Authorizer(cache_size=8)
    policies = parse_access_control(SENSOR.name, ACCESS, variables={"iot:thingName": "turbine-7"})
    a.set_policies(SENSOR.name, policies)
    return a


TABLE = [
    # service, operation, resource, expected
    (PUBSUB, "aws.greengrass#PublishToTopic", "sensors/gearbox/raw", True),
    (PUBSUB, "PublishToTopic", "sensors/gearbox/raw", True),  # short operation names are the same op
    (PUBSUB, "aws.greengrass#PublishToTopic", "sensors//raw", True),  # + matches an empty level
    (PUBSUB, "aws.greengrass#PublishToTopic", "sensors/a/b/raw", False),  # + is one level
    (PUBSUB, "aws.greengrass#PublishToTopic", "sensors/gearbox/raw/x", False),
    (PUBSUB, "aws.greengrass#PublishToTopic", "status/turbine-7", True),  # variable substituted
    (PUBSUB, "aws.greengrass#PublishToTopic", "status/{iot:thingName}", False),
    (PUBSUB, "aws.greengrass#PublishToTopic", "odd/{unknown:var}", True),  # unknown variable literal
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "sensors/gearbox/raw", False),  # op not granted
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "commands", True),  # a/# matches a
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "commands/stop", True),
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "commands/+/now", True),  # filter inside the grant
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "commandsX", False),
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "lit*eral", True),  # ${*} is a literal star
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "litXeral", False),
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "mid/#/x", True),  # # not last: literal
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "mid/a/x", False),
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "pre+fix/y", True),  # + inside a level: literal
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "preAfix/y", False),
    (PUBSUB, "aws.greengrass#PublishToTopic", "everything/a/b/c", True),  # * op, * spans levels
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "everything/", True),
    (PUBSUB, "aws.greengrass#SubscribeToTopic", "everythin", False),
    (MQTTPROXY, "aws.greengrass#PublishToIoTCore", "$aws/things/turbine-7/shadow/update", True),
    (MQTTPROXY, "aws.greengrass#PublishToIoTCore", "$aws/things/other/shadow/update", False),
    (MQTTPROXY, "aws.greengrass#SubscribeToIoTCore", "$aws/things/turbine-7/shadow/update", False),
    (PUBSUB, "aws.greengrass#PublishToIoTCore", "$aws/things/turbine-7/shadow/update", False),  # wrong svc
    (CONFIG, "aws.greengrass#GetConfiguration", "com.example.Other", True),
    (CONFIG, "aws.greengrass#GetConfiguration", "com.example.Third", False),
    (CONFIG, "aws.greengrass#UpdateConfiguration", "com.example.Other", False),
    (CONFIG, "aws.greengrass#GetConfiguration", SENSOR.name, True),  # own configuration: no policy
    (CONFIG, "aws.greengrass#UpdateConfiguration", SENSOR.name, True),
    (CONFIG, "aws.greengrass#SubscribeToConfigurationUpdate", SENSOR.name, True),
    ("aws.greengrass.ipc.lifecycle", "aws.greengrass#UpdateState", "", True),  # acts on itself
    ("aws.greengrass.ipc.lifecycle", "aws.greengrass#DeferComponentUpdate", "", True),
    (CLI, "aws.greengrass#RestartComponent", "com.example.Other", True),  # standard glob
    (CLI, "aws.greengrass#RestartComponent", "com.examplX.Other", False),
    (CLI, "aws.greengrass#StopComponent", "com.example.a/b", True),  # standard * spans "/" too
    (CLI, "aws.greengrass#CreateLocalDeployment", "*", False),
    (CLI, "aws.greengrass#ListComponents", "anything", True),
    ("com.example.Unknown", "aws.greengrass#PublishToTopic", "sensors/gearbox/raw", False),  # unknown svc
]


@pytest.mark.parametrize(("service", "operation", "resource", "expected"), TABLE)
def test_decision_table(authorizer: Authorizer, service: str, operation: str, resource: str,
                        expected: bool) -> None:
    assert authorizer.is_authorized(SENSOR, service, operation, resource) is expected
    # asked twice: the cached answer is the same answer
    assert authorizer.is_authorized(SENSOR, service, operation, resource) is expected


def test_default_deny_for_a_principal_without_policies(authorizer: Authorizer) -> None:
    assert not authorizer.is_authorized(OTHER, PUBSUB, "aws.greengrass#PublishToTopic", "sensors/a/raw")
    assert authorizer.is_authorized(OTHER, CONFIG, "aws.greengrass#GetConfiguration", OTHER.name)
    assert not authorizer.is_authorized(OTHER, CONFIG, "aws.greengrass#GetConfiguration", SENSOR.name)


def test_nucleus_principal_is_always_allowed(authorizer: Authorizer) -> None:
    assert authorizer.is_authorized(Principal("cli", "nucleus"), CLI, "CreateLocalDeployment", "*")


def test_set_policies_invalidates_cached_decisions(authorizer: Authorizer) -> None:
    topic = "sensors/gearbox/raw"
    assert authorizer.is_authorized(SENSOR, PUBSUB, "PublishToTopic", topic)
    authorizer.set_policies(SENSOR.name, [])
    assert not authorizer.is_authorized(SENSOR, PUBSUB, "PublishToTopic", topic)
    authorizer.set_policies(SENSOR.name, [Policy("p", PUBSUB, frozenset({"PublishToTopic"}), ("sensors/#",))])
    assert authorizer.is_authorized(SENSOR, PUBSUB, "PublishToTopic", topic)
    authorizer.remove(SENSOR.name)
    assert not authorizer.is_authorized(SENSOR, PUBSUB, "PublishToTopic", topic)
    assert authorizer.policies(SENSOR.name) == ()


def test_cache_stays_bounded_and_correct(authorizer: Authorizer) -> None:
    for i in range(50):  # cache_size is 8
        assert authorizer.is_authorized(SENSOR, PUBSUB, "PublishToTopic", f"sensors/{i}/raw")
        assert not authorizer.is_authorized(SENSOR, PUBSUB, "PublishToTopic", f"sensors/{i}/cooked")
    assert len(authorizer._cache[SENSOR.name]) <= 8


def test_policy_without_resources_covers_only_resourceless_operations() -> None:
    a = Authorizer()
    a.set_policies("c", parse_access_control("c", {
        "aws.greengrass.ipc.componentmetric": {"m": {"operations": ["aws.greengrass#PutComponentMetric"]}}
    }))
    svc = "aws.greengrass.ipc.componentmetric"
    assert a.is_authorized(Principal("c"), svc, "PutComponentMetric", "")
    assert not a.is_authorized(Principal("c"), svc, "PutComponentMetric", "x")


def test_parse_accepts_json_string_and_case_insensitive_fields() -> None:
    text = '{"aws.greengrass.ipc.pubsub": {"p1": {"Operations": ["*"], "RESOURCES": ["a/b"]}}}'
    [policy] = parse_access_control("c", text)
    assert policy == Policy("p1", PUBSUB, frozenset({"*"}), ("a/b",))
    assert parse_access_control("c", None) == []
    assert parse_access_control("c", {}) == []


@pytest.mark.parametrize(
    ("access", "field", "words"),
    [
        ([1, 2], "accessControl", "map service names"),
        ("{not json", "accessControl", "not valid JSON"),
        ({PUBSUB: ["x"]}, f"accessControl.{PUBSUB}", "policy ids"),
        ({PUBSUB: {"p1": "publish"}}, f"accessControl.{PUBSUB}.p1", "operations and resources"),
        ({PUBSUB: {"p1": {"resources": ["a"]}}}, f"accessControl.{PUBSUB}.p1.operations", "required"),
        ({PUBSUB: {"p1": {"operations": []}}}, f"accessControl.{PUBSUB}.p1.operations", "at least one"),
        ({PUBSUB: {"p1": {"operations": "*"}}}, f"accessControl.{PUBSUB}.p1.operations", "single string"),
        ({PUBSUB: {"p1": {"operations": ["*"], "resources": [3]}}},
         f"accessControl.{PUBSUB}.p1.resources", "list of strings"),
        ({PUBSUB: {"p1": {"operations": ["*"], "resource": ["a"]}}},
         f"accessControl.{PUBSUB}.p1.resource", "unknown policy field"),
        ({PUBSUB: {"p1": {"operations": ["*"], "policyDescription": 5}}},
         f"accessControl.{PUBSUB}.p1.policyDescription", "must be a string"),
    ],
)
def test_malformed_policy_names_component_policy_and_field(access: object, field: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_access_control("com.example.Bad", access)
    err = info.value
    assert err.component == "com.example.Bad"
    assert err.field == field
    assert words in str(err)
    assert "com.example.Bad" in str(err)


# --- property: MQTT-style resources agree with MQTT filter matching on concrete topics -------------

_level = st.text(alphabet="abc", min_size=0, max_size=3)


def _mqtt_filter_matches(filt: str, topic: str) -> bool:
    """Reference MQTT matching (spec 4.7), written independently of the regex translation."""
    f_levels, t_levels = filt.split("/"), topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f not in ("+", t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


@given(
    filt=st.lists(st.one_of(_level, st.just("+")), min_size=1, max_size=4).flatmap(
        lambda levels: st.sampled_from([levels, [*levels, "#"]])
    ),
    topic=st.lists(_level, min_size=1, max_size=5),
)
def test_mqtt_resources_match_like_mqtt_filters(filt: list[str], topic: list[str]) -> None:
    f, t = "/".join(filt), "/".join(topic)
    assert bool(re.fullmatch(resource_regex(f, mqtt=True), t, re.DOTALL)) == _mqtt_filter_matches(f, t)


def test_the_example_in_docs_configuration_md() -> None:
    """The decision table printed in docs/configuration.md, kept true by this test."""
    access = {
        PUBSUB: {
            "com.example.Detector:pubsub:1": {
                "policyDescription": "Read raw sensor data, publish anomalies.",
                "operations": ["aws.greengrass#SubscribeToTopic"],
                "resources": ["sensors/+/raw"],
            },
            "com.example.Detector:pubsub:2": {
                "operations": ["aws.greengrass#PublishToTopic"],
                "resources": ["anomaly/{iot:thingName}/#"],
            },
        }
    }
    detector = Principal("com.example.Detector")
    a = Authorizer()
    a.set_policies(detector.name, parse_access_control(detector.name, access,
                                                       variables={"iot:thingName": "turbine-7"}))
    table = [
        ("SubscribeToTopic", "sensors/gearbox/raw", True),
        ("SubscribeToTopic", "sensors/+/raw", True),
        ("SubscribeToTopic", "sensors/#", False),
        ("PublishToTopic", "anomaly/turbine-7", True),
        ("PublishToTopic", "anomaly/turbine-7/gearbox/rms", True),
        ("PublishToTopic", "sensors/gearbox/raw", False),
    ]
    for op, resource, expected in table:
        assert a.is_authorized(detector, PUBSUB, f"aws.greengrass#{op}", resource) is expected, (op, resource)


@pytest.mark.parametrize(("resource", "topic", "expected"), [
    ("a/${+}/b", "a/+/b", True), ("a/${+}/b", "a/x/b", False),
    ("a/${#}", "a/#", True), ("a/${#}", "a/x", False),
    ("a${*}", "a*", True), ("a${*}", "ab", False),
])
def test_escapes(resource: str, topic: str, expected: bool) -> None:
    assert bool(re.fullmatch(resource_regex(resource, mqtt=True), topic)) is expected
