"""The deployment document as a device checks it: schema, target, components, digests, artifact URLs,
and the rollout slot. Pure functions: no broker, milliseconds."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync import deployment_document as dd
from cloud_sync.deployment_document import DocumentRejected, RecipeText, Rollout, Target, new_document

SHA = "a" * 64
TARGET = Target(type="group", name="g1")


def _recipe(name: str = "com.example.A", version: str = "1.0.0", *, uri: str = "s3://b/k/app.tar.gz",
            digest: Any = SHA, algorithm: str | None = None) -> RecipeText:
    art: dict[str, Any] = {"URI": uri}
    if digest is not None:
        art["Digest"] = digest
    if algorithm is not None:
        art["Algorithm"] = algorithm
    doc = {"RecipeFormatVersion": "2020-01-25", "componentName": name, "ComponentVersion": version,
           "Manifests": [{"Platform": {"os": "linux"}, "Artifacts": [art], "Lifecycle": {"run": "sleep 1"}}]}
    return RecipeText(text=json.dumps(doc), format="json", source=f"{name}.json")


def _doc(*recipes: RecipeText, **kw: Any) -> dd.DeploymentDocument:
    kw.setdefault("artifacts_base_url", "https://cdn.example.com/artifacts/")
    return new_document(list(recipes or [_recipe()]), target=kw.pop("target", TARGET), **kw)


def _reason(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(DocumentRejected) as err:
        fn(*args, **kw)
    return str(err.value.reason)


def test_roots_default_to_the_highest_version_of_each_recipe() -> None:
    doc = _doc(_recipe(version="1.2.0"), _recipe(version="1.10.0"), _recipe(version="1.10.0-rc1"),
               _recipe("com.example.B", "0.1.0"))
    assert doc.components == {"com.example.A": "1.10.0", "com.example.B": "0.1.0"}
    assert dd.parse(doc.encode()) == doc


def test_request_rewrites_non_http_artifacts_to_the_base_url_and_keeps_http_ones() -> None:
    doc = _doc(_recipe(), _recipe("com.example.B", uri="https://example.com/b.zip"))
    req = dd.to_request(doc, remove=["com.example.Old", "com.example.A"])
    assert req["group"] == "thinggroup/g1" and req["deployment_id"] == doc.deployment_id
    assert req["root_components"] == {"com.example.A": "=1.0.0", "com.example.B": "=1.0.0"}
    assert req["remove"] == ["com.example.Old"]  # never remove what the deployment names
    a, b = req["recipes"]
    art = json.loads(a["text"])["Manifests"][0]["Artifacts"][0]
    assert art == {"URI": "https://cdn.example.com/artifacts/com.example.A/1.0.0/app.tar.gz", "Digest": SHA}
    assert b["text"] == _recipe("com.example.B", uri="https://example.com/b.zip").text  # untouched


@pytest.mark.parametrize(("payload", "fragment"), [
    (b"not json", "not JSON"),
    (b"[]", "not a v1 deployment document"),
    (b'{"v": 2}', "v:"),
    (json.dumps({"v": 1, "deployment_id": "bad id with spaces", "target": {"type": "group", "name": "g1"},
                 "sequence": 1, "created_at": 1, "components": {}}).encode(), "deployment_id"),
    (json.dumps({"v": 1, "deployment_id": "d", "target": {"type": "group", "name": "g/#"},
                 "sequence": 1, "created_at": 1, "components": {}}).encode(), "target.name"),
    (json.dumps({"v": 1, "deployment_id": "d", "target": {"type": "group", "name": "g"}, "sequence": 1,
                 "created_at": 1, "components": {}, "surprise": 1}).encode(), "surprise"),
])
def test_schema_errors_name_the_field(payload: bytes, fragment: str) -> None:
    with pytest.raises(DocumentRejected) as err:
        dd.parse(payload)
    assert err.value.reason == "SCHEMA" and fragment in err.value.message


def test_target_must_be_this_thing_or_one_of_its_groups_and_the_topic() -> None:
    doc = _doc()
    dd.check_target(doc, topic=TARGET.topic, thing="t1", groups=["g1"])
    assert _reason(dd.check_target, doc, topic=TARGET.topic, thing="t1", groups=["g2"]) == "WRONG_TARGET"
    assert _reason(dd.check_target, doc, topic="nucleus/groups/g2/deployments", thing="t1",
                   groups=["g1", "g2"]) == "WRONG_TARGET"
    other = _doc(target=Target(type="thing", name="t2"))
    assert _reason(dd.check_target, other, topic=other.target.topic, thing="t1", groups=[]) == "WRONG_TARGET"
    assert dd.target_of_topic("nucleus/things/t1/deployments") == Target(type="thing", name="t1")
    assert dd.target_of_topic("nucleus/things/t1/status") is None


@pytest.mark.parametrize(("kw", "code"), [
    ({"components": {"com.example.A": "9.9.9"}}, "UNKNOWN_COMPONENT"),
    ({"components": {"com.example.Z": "1.0.0"}}, "UNKNOWN_COMPONENT"),
    ({"config_updates": {"com.example.Z": {"merge": {"x": 1}}}}, "UNKNOWN_COMPONENT"),
    ({"artifacts_base_url": None}, "ARTIFACT_UNREACHABLE"),
])
def test_unknown_components_and_unreachable_artifacts(kw: dict[str, Any], code: str) -> None:
    assert _reason(dd.to_request, _doc(**kw)) == code


@pytest.mark.parametrize(("recipe", "code"), [
    (_recipe(digest=None), "BAD_DIGEST"),
    (_recipe(digest="abc"), "BAD_DIGEST"),
    (_recipe(digest="z" * 64), "BAD_DIGEST"),
    (_recipe(digest=1234), "BAD_DIGEST"),
    (_recipe(digest=SHA, algorithm="MD5"), "BAD_DIGEST"),
    (_recipe(digest=SHA, algorithm="SHA-512"), "BAD_DIGEST"),  # 32 bytes is not a SHA-512 digest
    (_recipe(uri="file:///etc/shadow"), "ARTIFACT_UNREACHABLE"),
    (RecipeText(text="- a list", format="yaml"), "RECIPE_INVALID"),
    (RecipeText(text="{", format="json"), "RECIPE_INVALID"),
    (RecipeText(text="ComponentName: x", format="yaml"), "RECIPE_INVALID"),
])
def test_bad_recipes_and_digests_are_refused(recipe: RecipeText, code: str) -> None:
    doc = dd.DeploymentDocument(deployment_id="d1", target=TARGET, sequence=1, created_at=1.0, components={},
                                recipes=[recipe], artifacts_base_url="http://127.0.0.1:1/")
    assert _reason(dd.to_request, doc) == code


def test_digest_notations_accepted() -> None:
    import base64

    for digest, algorithm in ((SHA, None), (base64.b64encode(bytes(32)).decode(), "SHA-256"),
                              ("b" * 128, "SHA-512")):
        dd.to_request(_doc(_recipe(digest=digest, algorithm=algorithm)))
    # SHA-1 is refused from the fleet (collisions are practical): see test_fleet_walk
    assert _reason(dd.to_request, _doc(_recipe(digest="c" * 40, algorithm="sha1"))) == "BAD_DIGEST"


def test_rollout_slot_is_deterministic_spread_and_bounded() -> None:
    doc = _doc(rollout=Rollout(max_per_minute=60, expected_devices=100), created_at=1000.0)
    assert doc.rollout.effective_window_s == 100.0
    delays = [dd.start_delay(doc, f"thing-{i}", now=1000.0) for i in range(1000)]
    assert delays == [dd.start_delay(doc, f"thing-{i}", now=1000.0) for i in range(1000)]
    assert all(0 <= d < 100 for d in delays)
    per_10s = [sum(1 for d in delays if k * 10 <= d < (k + 1) * 10) for k in range(10)]
    assert min(per_10s) > 60 and max(per_10s) < 140, per_10s  # about 100 each: uniform
    assert dd.start_delay(doc, "thing-1", now=5000.0) == 0.0  # came online after its slot
    assert dd.start_delay(_doc(), "thing-1", now=0.0) == 0.0  # no rollout: at once


@settings(max_examples=200, deadline=None)
@given(window=st.floats(0, dd.MAX_ROLLOUT_WINDOW_S), created=st.floats(0, 4e9), now=st.floats(0, 4e9),
       thing=st.text(min_size=1, max_size=20))
def test_rollout_delay_never_exceeds_the_window(window: float, created: float, now: float, thing: str) -> None:
    doc = dd.DeploymentDocument(deployment_id="d", target=TARGET, sequence=0, created_at=created, components={},
                                rollout=Rollout(window_s=window))
    assert 0.0 <= dd.start_delay(doc, thing, now) <= window
