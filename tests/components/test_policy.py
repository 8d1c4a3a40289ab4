"""The protective policy as tables of events and times: debounce, hysteresis, latch, cooldown, fail-safe."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from components.protective_action.config import PolicyConfig
from components.protective_action.events import BadEvent, Observation, parse_event
from components.protective_action.policy import AssetPolicy, Decision, State, level

_ids = itertools.count()


def obs(score: float, threshold: float = 1.0) -> Observation:
    return Observation(f"e{next(_ids)}", "t1", score, threshold, 0.0, None)


def policy(**kw: Any) -> AssetPolicy:
    base: dict[str, Any] = {"k": 2, "n": 3, "release_count": 2, "latch": False, "cooldown_s": 0,
                            "heartbeat_timeout_s": 1.0, "sensor_timeout_s": 1.0, "startup_grace_s": 5.0}
    base.update(kw)
    p = AssetPolicy("t1", PolicyConfig(**base), started=0.0)
    p.on_heartbeat(0.0)
    p.on_sensor(0.0)
    return p


def feed(p: AssetPolicy, scores: list[float], t: float = 0.1) -> list[Decision | None]:
    return [p.on_event(obs(s), t, 1000.0 + t) for s in scores]


def test_k_of_n_debounce() -> None:
    p = policy()
    out = feed(p, [1.5, 0.1, 0.1, 1.5, 0.1])  # never 2 of the last 3
    assert out == [None] * 5 and p.state is State.NORMAL
    (d,) = [x for x in feed(p, [1.2]) if x]  # 1.5, 0.1, 1.2: 2 of 3
    assert d.state is State.TRIPPED and d.previous is State.NORMAL
    assert d.actions == ("engage_brake", "pitch_to_feather")
    assert d.scores == (1.5, 1.2) and len(d.event_ids) == 2
    assert "2 of the last 3" in d.reason


def test_hysteresis_releases_only_below_the_lower_level() -> None:
    p = policy()
    feed(p, [2.0, 2.0])
    assert p.state is State.TRIPPED
    assert feed(p, [0.9, 0.85, 0.9, 0.81]) == [None] * 4  # under the threshold but above 0.8 x
    assert p.state is State.TRIPPED
    assert feed(p, [0.5]) == [None]  # one below: release_count is 2
    (d,) = feed(p, [0.4])
    assert d is not None and d.state is State.NORMAL and d.actions == () and "released" in d.reason
    assert feed(p, [1.0]) == [None]  # the window history restarted at the release


def test_threshold_is_taken_from_each_event_and_levels_order_for_negative_thresholds() -> None:
    assert level(1.0, 0.5) == 0.5 and level(0.8, 0.5) == pytest.approx(0.4)
    assert level(0.8, -0.5) < level(1.0, -0.5) == -0.5
    p = policy(k=1, n=1)
    assert p.on_event(obs(0.6, threshold=0.5), 0, 0) is not None
    q = policy(k=1, n=1)
    assert q.on_event(obs(-0.45, threshold=-0.5), 0, 0) is not None


def test_latch_holds_until_an_operator_reset_when_the_condition_is_clear() -> None:
    p = policy(latch=True)
    (d,) = [x for x in feed(p, [2, 2]) if x]
    assert d.state is State.LATCHED
    assert [x for x in feed(p, [0.0] * 10) if x] == []  # no release while latched
    feed(p, [2, 2])
    r = p.reset(0.2, 0.0, "alice")
    assert not r.ok and "condition still active" in r.reason and p.state is State.LATCHED
    feed(p, [0.0, 0.0])
    r = p.reset(0.3, 0.0, "alice")
    assert r.ok and r.state is State.NORMAL and r.decision is not None
    assert r.decision.reason == "operator reset by alice" and r.decision.previous is State.LATCHED
    assert p.reset(0.3, 0.0, "bob").reason == "already normal"


def test_cooldown_suppresses_repeated_actions_per_action() -> None:
    p = policy(k=1, n=1, release_count=1, cooldown_s=10, action_cooldown_s={"pitch_to_feather": 0})
    d1 = p.on_event(obs(2), 1.0, 0)
    assert d1 is not None and d1.actions == ("engage_brake", "pitch_to_feather")
    p.on_event(obs(0), 2.0, 0)
    d2 = p.on_event(obs(2), 3.0, 0)  # brake within its 10 s cooldown, feather has none
    assert d2 is not None and d2.actions == ("pitch_to_feather",) and d2.suppressed == ("engage_brake",)
    p.on_event(obs(0), 4.0, 0)
    d3 = p.on_event(obs(2), 11.5, 0)
    assert d3 is not None and d3.actions == ("engage_brake", "pitch_to_feather")


@pytest.mark.parametrize("stop", ["heartbeat", "sensor"])
def test_fail_safe_when_an_input_stops(stop: str) -> None:
    p = policy(safe_state_actions=("disconnect_generator",))
    for t in (0.3, 0.6, 0.9):
        if stop != "heartbeat":
            p.on_heartbeat(t)
        if stop != "sensor":
            p.on_sensor(t)
        assert p.on_tick(t, 0) is None
    d = p.on_tick(1.2, 0)  # the stopped input was last seen at 0.0: 1.2 s > 1 s
    assert d is not None and d.state is State.SAFE_STATE and d.actions == ("disconnect_generator",)
    assert ("heartbeat" if stop == "heartbeat" else "sensor") in d.reason
    assert p.on_tick(2.1, 0) is None  # entered once
    assert feed(p, [5, 5, 5]) == [None] * 3  # nothing leaves the safe state but a reset
    r = p.reset(2.2, 0, "op")
    assert not r.ok and "refused" in r.reason
    p.on_heartbeat(2.3)
    p.on_sensor(2.3)
    assert "condition still active" in p.reset(2.4, 0, "op").reason  # the 5s seen while safe still count
    feed(p, [0.1, 0.1], t=2.4)
    assert p.reset(2.4, 0, "op").ok and p.state is State.NORMAL


def test_startup_grace_before_any_input_is_seen() -> None:
    p = AssetPolicy("t1", PolicyConfig(heartbeat_timeout_s=1, sensor_timeout_s=1, startup_grace_s=5), started=100.0)
    assert p.on_tick(104.9, 0) is None
    d = p.on_tick(105.1, 0)
    assert d is not None and "since start" in d.reason


def test_too_many_invalid_events_in_a_row_is_a_dead_detector() -> None:
    p = policy(max_consecutive_invalid=3)
    assert p.on_invalid(0.1, 0, "nan_score") is None
    assert p.on_invalid(0.1, 0, "nan_score") is None
    feed(p, [0.1])  # a valid one resets the count
    assert p.on_invalid(0.1, 0, "nan_score") is None
    assert p.on_invalid(0.1, 0, "nan_score") is None
    d = p.on_invalid(0.1, 0, "nan_score")
    assert d is not None and d.state is State.SAFE_STATE and "3 invalid" in d.reason


def test_duplicate_event_ids_are_counted_not_counted_twice() -> None:
    p = policy()
    e = obs(2)
    assert p.on_event(e, 0, 0) is None
    assert p.on_event(e, 0, 0) is None  # the same window again must not make "2 of 3"
    assert p.duplicates == 1 and p.state is State.NORMAL


def test_config_rejects_inconsistent_policy() -> None:
    with pytest.raises(ValueError, match="cannot exceed"):
        PolicyConfig(k=4, n=3)
    with pytest.raises(ValueError, match="releaseRatio"):
        PolicyConfig(trip_ratio=1.0, release_ratio=1.2)
    with pytest.raises(ValueError, match="unknown actions"):
        PolicyConfig(action_cooldown_s={"launch": 1})


GOOD = {"event_id": "abc", "asset": "t1", "score": 0.7, "threshold": 0.5, "ts": 1.0, "published_at": 2.0}


@pytest.mark.parametrize(("patch", "reason"), [
    ({"score": float("nan")}, "nan_score"), ({"score": float("inf")}, "nan_score"), ({"score": "high"}, "bad_score"),
    ({"score": True}, "bad_score"), ({"threshold": None}, "bad_threshold"),
    ({"threshold": float("nan")}, "nan_threshold"),
    ({"event_id": ""}, "no_event_id"), ({"event_id": 5}, "no_event_id"), ({"asset": "t2"}, "asset_mismatch"),
])
def test_bad_events_are_rejected_with_a_reason(patch: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadEvent) as info:
        parse_event({**GOOD, **patch}, "t1")
    assert info.value.reason == reason


def test_good_event_parses_and_non_maps_are_rejected() -> None:
    o = parse_event(GOOD, "t1")
    assert (o.event_id, o.score, o.threshold, o.published_at) == ("abc", 0.7, 0.5, 2.0)
    for junk in (None, b"x", [1], 3.0):
        with pytest.raises(BadEvent, match="not_a_map"):
            parse_event(junk, "t1")
