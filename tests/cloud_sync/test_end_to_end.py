"""The whole product, end to end: a component's messages reach the cloud through 10 outages (5 link
cuts, 5 broker stop/start) and 3 ``kill -9`` of the daemon. Nothing acknowledged is lost, and a
message arrives twice only if its delivery had not been recorded (it was still in the spool) when
the link or the daemon went away.
The scenario and the exact rules are in outage_kit.py; benchmarks/sync.py prints the same run's counts."""

from __future__ import annotations

import pytest
from outage_kit import Disruption, Outcome, check, run_scenario
from sync_testkit import Mosquitto


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_ten_outages_and_three_daemon_kills_lose_nothing_and_duplicate_only_the_unrecorded(
        broker: Mosquitto) -> None:
    outcome = await run_scenario(broker)
    counts = outcome.counts()
    print(counts)
    assert counts["outages"] == 10 and counts["kills"] == 3
    check(outcome)


# --- the checker itself: it must reject what it is there to catch -----------------------------------------
def quiet_run(n: int = 6) -> Outcome:
    """n messages published, acknowledged and received once, no disruption."""
    out = Outcome(daemon_pids=[100], done_runs={"r"}, last_sent={"r": n - 1})
    for i in range(n):
        mid = f"s:{i + 1}"
        out.sent.add(("r", i))
        out.acked.add(("r", i))
        out.arrivals.append(mid)
        out.key_of[mid] = ("r", i)
    out.by_topic = {"t": list(out.arrivals)}
    return out


def with_kill(out: Outcome, spooled: set[str], again: list[str]) -> Outcome:
    out.disruptions.append(Disruption("kill", len(out.arrivals), spooled))
    out.daemon_pids.append(200)
    out.arrivals += again
    out.by_topic["t"] += again
    return out


def test_check_accepts_a_clean_run_and_a_resend_of_what_was_still_spooled() -> None:
    check(quiet_run())
    resent = with_kill(quiet_run(), {"s:5", "s:6"}, ["s:5", "s:6"])
    check(resent)
    counts = resent.counts()
    got = (counts["duplicates"], counts["duplicates_kill"], counts["duplicates_recorded"], counts["lost"])
    assert got == (2, 2, 0, 0)


def test_check_rejects_a_lost_message() -> None:
    out = quiet_run()
    out.arrivals.remove("s:3")
    with pytest.raises(AssertionError, match="never reached the cloud"):
        check(out)


def test_check_rejects_a_resend_of_a_recorded_delivery() -> None:
    out = with_kill(quiet_run(), {"s:6"}, ["s:5", "s:6"])
    assert out.counts()["duplicates_recorded"] == 1
    with pytest.raises(AssertionError, match="had been recorded"):
        check(out)


def test_check_rejects_a_duplicate_without_a_disruption() -> None:
    out = quiet_run()
    out.arrivals.append("s:6")
    with pytest.raises(AssertionError, match="without a disruption"):
        check(out)


def test_check_rejects_a_message_acknowledged_twice_under_two_ids() -> None:
    out = quiet_run()
    out.arrivals.append("s:7")
    out.by_topic["t"].append("s:7")
    out.key_of["s:7"] = ("r", 4)
    with pytest.raises(AssertionError, match="under two ids"):
        check(out)
