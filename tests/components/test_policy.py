"""The protective policy as tables of events and times: debounce, hysteresis, latch, cooldown, fail-safe,
and the trigger (the event's score or the detector's is_anomaly)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from components.configuration import ConfigError
from components.protective_action.config import PolicyConfig, load_config
from components.protective_action.events import BadEvent, Observation, parse_event
from components.protective_action.policy import AssetPolicy, Decision, State, level

_ids = itertools.count()


def obs(score: float, threshold: float = 1.0, is_anomaly: bool | None = None) -> Observation:
    return Observation(f"e{next(_ids)}", "t1", score, threshold, 0.0, None, is_anomaly)


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
    assert d.reason == "2 of the last 3 windows at or above 1x threshold (trigger score, k=2, n=3)"


def test_hysteresis_releases_only_below_the_lower_level() -> None:
    p = policy()
    feed(p, [2.0, 2.0])
    assert p.state is State.TRIPPED
    assert feed(p, [0.9, 0.85, 0.9, 0.81]) == [None] * 4  # under the threshold but above 0.8 x
    assert p.state is State.TRIPPED
    assert feed(p, [0.5]) == [None]  # one below: release_count is 2
    (d,) = feed(p, [0.4])
    assert d is not None and d.state is State.NORMAL and d.actions == ()
    assert d.reason == "released: 2 consecutive windows below 0.8x threshold (trigger score)"
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


def test_a_reconfiguration_keeps_the_windows_so_a_reset_is_still_refused_during_the_fault() -> None:
    """The service rebuilds each asset's policy on a new configuration; the new one used to start with no
    windows, so a reset right after, say, a cooldown change was accepted while the fault lasted."""
    p = policy(latch=True)
    feed(p, [2.0, 2.0, 2.0])
    assert p.state is State.LATCHED
    changed = AssetPolicy("t1", PolicyConfig(**{**p.cfg.model_dump(), "cooldown_s": 30.0}), started=0.0,
                          state=p.state)
    changed.carry_over(p)
    refused = changed.reset(0.2, 1000.2, "op")
    assert not refused.ok and "condition still active (3 of the last 3 windows" in refused.reason
    assert feed(changed, [0.1, 0.1]) == [None, None]  # 2.0, 0.1, 0.1: the fault has gone
    assert changed.reset(0.3, 1000.3, "op").ok
    # Judged again under the new rule: under trigger is_anomaly a window without a verdict is left out.
    q = policy(latch=True)
    q.on_event(obs(2.0, is_anomaly=True), 0.1, 1000.1)
    q.on_event(obs(2.0), 0.1, 1000.1)
    verdicts = AssetPolicy("t1", PolicyConfig(**{**q.cfg.model_dump(), "trigger": "is_anomaly"}), started=0.0)
    verdicts.carry_over(q)
    assert [w.above for w in verdicts._recent] == [True]
    assert verdicts.duplicates == 0 and verdicts.on_event(obs(1.0, is_anomaly=False), 0.2, 1000.2) is None


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


# (score, is_anomaly) per window, threshold 1.0: what a likelihood-mode detector sends. Its verdict and
# score >= threshold part both ways: a low score in the red zone of a re-fitted distribution (a drifting
# stream's quiet level), and a high score that is the new normal once the distribution has moved.
LIKELIHOOD = [(0.3, True), (0.2, True)]
DRIFTED = [(2.0, False), (2.5, False)]


@pytest.mark.parametrize(("trigger", "windows", "states"), [
    ("score", LIKELIHOOD, [None, None]),
    ("is_anomaly", LIKELIHOOD, [None, State.TRIPPED]),
    ("score", DRIFTED, [None, State.TRIPPED]),
    ("is_anomaly", DRIFTED, [None, None]),
    # k of n in the verdict's sense: never 2 true of the last 3, then 2
    ("is_anomaly", [(0.3, True), (5.0, False), (5.0, False), (0.3, True), (5.0, False), (0.1, True)],
     [None, None, None, None, None, State.TRIPPED]),
    # release after releaseCount (2) verdicts false in a row, whatever the scores; a true one restarts the run
    ("is_anomaly", [*LIKELIHOOD, (5.0, False), (0.1, True), (5.0, False), (9.0, False)],
     [None, State.TRIPPED, None, None, None, State.NORMAL]),
])
def test_trigger_decides_what_counts(trigger: str, windows: list[tuple[float, bool]],
                                     states: list[State | None]) -> None:
    p = policy(trigger=trigger)
    out = [p.on_event(obs(s, is_anomaly=a), 0.1, 0) for s, a in windows]
    assert [d.state if d else None for d in out] == states


def test_is_anomaly_trigger_names_itself_in_every_reason() -> None:
    p = policy(trigger="is_anomaly", latch=True)
    d = [x for x in (p.on_event(obs(s, is_anomaly=a), 0.1, 0) for s, a in LIKELIHOOD) if x]
    assert [x.reason for x in d] == ["2 of the last 2 windows with is_anomaly true (trigger is_anomaly, k=2, n=3)"]
    assert d[0].scores == (0.3, 0.2)  # the audit still has the scores: below the threshold, and it tripped
    p.on_event(obs(9.0, is_anomaly=False), 0.1, 0)  # true, true, false: still 2 of the last 3
    r = p.reset(0.2, 0, "alice")
    assert not r.ok and r.reason == ("refused: condition still active (2 of the last 3 windows with is_anomaly "
                                     "true, trigger is_anomaly)")
    p.on_event(obs(9.0, is_anomaly=False), 0.1, 0)
    assert p.reset(0.2, 0, "alice").ok
    q = policy(trigger="is_anomaly")
    for s, a in [*LIKELIHOOD, (0.0, False), (0.0, False)]:
        d2 = q.on_event(obs(s, is_anomaly=a), 0.1, 0)
    assert d2 is not None and d2.reason == "released: 2 consecutive windows with is_anomaly false (trigger is_anomaly)"


def test_is_anomaly_trigger_never_reads_a_missing_verdict_as_an_answer() -> None:
    p = policy(trigger="is_anomaly", max_consecutive_invalid=2)
    assert p.on_event(obs(5.0), 0.1, 0) is None
    d = p.on_event(obs(5.0), 0.1, 0)
    assert d is not None and d.state is State.SAFE_STATE and "bad_is_anomaly" in d.reason
    assert policy().on_event(obs(0.1), 0.1, 0) is None  # trigger score does not need it


def test_config_refuses_ratios_with_the_is_anomaly_trigger() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"policy": {"trigger": "is_anomaly", "tripRatio": 1.2, "releaseRatio": 0.5}})
    assert str(info.value) == (
        "com.nucleus.ProtectiveAction: invalid configuration: policy: tripRatio 1.2, releaseRatio 0.5: the ratios do "
        "not apply with trigger is_anomaly (the detector's verdict is yes or no, with no level to scale); use "
        "trigger score, or leave them at their defaults (tripRatio 1, releaseRatio 0.8)")
    with pytest.raises(ConfigError, match=r"policy: releaseRatio 0.9: the ratios do not apply"):
        load_config({"policy": {"trigger": "is_anomaly", "releaseRatio": 0.9}})
    # the recipe's DefaultConfiguration spells the default ratios out: they are no contradiction
    cfg = load_config({"policy": {"trigger": "is_anomaly", "tripRatio": 1.0, "releaseRatio": 0.8}})
    assert cfg.policy.trigger == "is_anomaly"
    assert load_config({"policy": {"tripRatio": 1.2}}).policy.trigger == "score"
    with pytest.raises(ConfigError, match=r"policy\.trigger: Input should be 'score' or 'is_anomaly'"):
        load_config({"policy": {"trigger": "alarm"}})


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


@pytest.mark.parametrize("verdict", [None, 1, 0, "true", [True]])
def test_is_anomaly_must_be_a_boolean_when_it_is_the_trigger(verdict: Any) -> None:
    event = {**GOOD, "is_anomaly": verdict} if verdict is not None else GOOD
    with pytest.raises(BadEvent) as info:
        parse_event(event, "t1", "is_anomaly")
    assert info.value.reason == "bad_is_anomaly"
    assert parse_event(event, "t1").is_anomaly is None  # trigger score: accepted as it always was


def test_good_event_parses_and_non_maps_are_rejected() -> None:
    o = parse_event(GOOD, "t1")
    assert (o.event_id, o.score, o.threshold, o.published_at, o.is_anomaly) == ("abc", 0.7, 0.5, 2.0, None)
    for verdict in (True, False):
        assert parse_event({**GOOD, "is_anomaly": verdict}, "t1", "is_anomaly").is_anomaly is verdict
    for junk in (None, b"x", [1], 3.0):
        with pytest.raises(BadEvent, match="not_a_map"):
            parse_event(junk, "t1")


def test_a_reset_rearms_the_cooldowns() -> None:
    """An operator reset within cooldownS of the trip left the actions in their cooldown, so a fault
    coming back right after the reset was a trip with every action suppressed: nothing braked."""
    p = policy(k=1, n=1, latch=True, cooldown_s=30)
    trip = p.on_event(obs(2), 0.1, 0)
    assert trip is not None and trip.actions == ("engage_brake", "pitch_to_feather")
    p.on_event(obs(0), 0.5, 0)
    reset = p.reset(0.6, 0, "alice")
    assert reset.ok and reset.state is State.NORMAL
    again = p.on_event(obs(2), 0.7, 0)
    assert again is not None and again.actions == ("engage_brake", "pitch_to_feather") and again.suppressed == ()


@pytest.mark.parametrize("cause", ["heartbeat", "invalid"])
def test_after_a_safe_state_a_reset_is_judged_on_windows_seen_since(cause: str) -> None:
    """Safe state after the detector stopped (or sent only garbage): once it was back, a reset was
    accepted at once on the windows judged before the outage, which say nothing of the machine since."""
    p = policy(k=2, n=3, max_consecutive_invalid=3)
    feed(p, [0.1, 0.1, 0.1], t=0.1)
    if cause == "heartbeat":
        p.on_sensor(1.5)
        d = p.on_tick(1.5, 0)
    else:
        d = [p.on_invalid(1.0, 0, "nan_score") for _ in range(3)][-1]
    assert d is not None and d.state is State.SAFE_STATE
    p.on_heartbeat(1.6)
    p.on_sensor(1.6)
    refused = p.reset(1.7, 0, "op")
    assert not refused.ok and "0 of the 3 windows" in refused.reason
    feed(p, [0.1, 0.1, 0.1], t=1.7)
    assert p.reset(1.8, 0, "op").ok
