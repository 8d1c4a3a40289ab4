"""The protective policy of one asset: a pure state machine driven by an injected clock.

States::

    normal ──k of last n windows anomalous──► tripped (latch: false) ──releaseCount windows
       ▲                                └────► latched (latch: true)     clear──► normal
       │                                                │
       └──────────── operator reset (condition clear, streams alive) ◄───────┘
    any ──detector heartbeat or sensor stream silent too long, or too many bad events──► safe_state
    safe_state ──operator reset (streams alive again)──► normal

What makes a window *anomalous* (it counts toward k of n) or *clear* (it counts toward the release)
is ``trigger``. With ``score`` (the default) levels are relative to the threshold each event carries
(models are retrained and their thresholds change): ``level(r) = threshold + (r - 1)·|threshold|``,
which is ``r·threshold`` for the usual positive threshold and still orders correctly for a negative
one. Anomalous at or above ``tripRatio``, clear strictly below ``releaseRatio`` (≤ tripRatio):
hysteresis, so a score hovering at the threshold cannot toggle the brake. With ``is_anomaly`` the
detector's own verdict decides (anomalous when true, clear when false): in likelihood mode it is the
detector's re-fitted distribution, not the static threshold, that says a window is anomalous, and the
action follows it. Its hysteresis is then the detector's (averaging, red zone) plus ``releaseCount``.
Every trip, release and refused reset names the trigger, so the audit log says which rule decided.

A *decision* is produced only when something changes (a trip, a release, a reset, the safe
state): those are what the audit log records and what ``actions/<asset>`` carries. Cooldown is per
action: an action taken less than its cooldown ago is listed as suppressed, not executed again.
Nothing here does I/O or reads a clock; ``now`` (monotonic seconds) and ``wall`` (epoch seconds)
are arguments, so every rule is tested as a table of events and times.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from components.protective_action.config import PolicyConfig
from components.protective_action.events import Observation


class State(StrEnum):
    NORMAL = "normal"
    TRIPPED = "tripped"
    LATCHED = "latched"
    SAFE_STATE = "safe_state"


@dataclass(slots=True, frozen=True)
class Decision:
    decision_id: str
    asset: str
    ts: float  # wall clock, epoch seconds
    state: State  # the state after the decision
    previous: State
    actions: tuple[str, ...]  # to execute now
    suppressed: tuple[str, ...]  # wanted but within their cooldown
    reason: str
    event_ids: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    decided_at: float = 0.0  # monotonic ``now`` of the decision: when its actions' cooldowns started

    def payload(self) -> dict[str, Any]:
        """The ``actions/<asset>`` message (the pipeline contract, plus the full action list)."""
        return {
            "decision_id": self.decision_id,
            "asset": self.asset,
            "ts": self.ts,
            "action": self.actions[0] if self.actions else None,
            "actions": list(self.actions),
            "suppressed": list(self.suppressed),
            "state": self.state.value,
            "previous": self.previous.value,
            "reason": self.reason,
            "event_ids": list(self.event_ids),
            "scores": list(self.scores),
        }


def level(ratio: float, threshold: float) -> float:
    return threshold + (ratio - 1.0) * abs(threshold)


@dataclass(slots=True)
class _Window:
    event_id: str
    score: float
    threshold: float
    is_anomaly: bool | None
    above: bool  # anomalous: at or above the trip level, or is_anomaly true
    below: bool  # clear: below the release level, or is_anomaly false


@dataclass(slots=True)
class ResetResult:
    ok: bool
    state: State
    reason: str
    decision: Decision | None = None
    undo: Callable[[], None] | None = None  # puts the state back if the reset cannot be recorded


@dataclass(slots=True)
class AssetPolicy:
    asset: str
    cfg: PolicyConfig
    started: float  # monotonic time the policy started (the startup grace counts from here)
    state: State = State.NORMAL
    new_id: Callable[[], str] = field(default=lambda: uuid.uuid4().hex)
    _recent: deque[_Window] = field(init=False)
    _below_run: int = 0
    _last_heartbeat: float | None = None
    _last_sensor: float | None = None
    _last_window: float | None = None  # last valid scored window (policy.windowTimeoutS)
    _last_action: dict[str, float] = field(default_factory=dict)
    _invalid_run: int = 0
    _seen_ids: deque[str] = field(default_factory=lambda: deque(maxlen=256))
    _seen_set: set[str] = field(default_factory=set)
    duplicates: int = 0

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.cfg.n)

    # --- inputs ---------------------------------------------------------------------------------
    def on_heartbeat(self, now: float) -> None:
        self._last_heartbeat = now

    def on_sensor(self, now: float) -> None:
        self._last_sensor = now

    def on_event(self, obs: Observation, now: float, wall: float) -> Decision | None:
        """A valid scored window; a decision if it trips or releases.

        With trigger ``is_anomaly`` a window without a verdict is invalid, never read as either answer
        (the service rejects such events before they get here; this keeps the policy safe on its own)."""
        c = self.cfg
        if c.trigger == "is_anomaly" and obs.is_anomaly is None:
            return self.on_invalid(now, wall, "bad_is_anomaly")
        if obs.event_id in self._seen_set:
            self.duplicates += 1
            return None
        self._remember(obs.event_id)
        self._invalid_run = 0
        self._last_window = now
        w = self._judge(obs.event_id, obs.score, obs.threshold, obs.is_anomaly)
        assert w is not None  # a missing verdict under trigger is_anomaly was refused above
        self._recent.append(w)
        self._below_run = self._below_run + 1 if w.below else 0
        if self.state is State.NORMAL:
            hits = [x for x in self._recent if x.above]
            if len(hits) >= c.k:
                target = State.LATCHED if c.latch else State.TRIPPED
                reason = (f"{len(hits)} of the last {len(self._recent)} windows {self._anomalous} "
                          f"(trigger {c.trigger}, k={c.k}, n={c.n})")
                return self._decide(target, c.trip_actions, now, wall, reason=reason, windows=hits)
        elif self.state is State.TRIPPED and self._below_run >= c.release_count:
            self._recent.clear()
            reason = f"released: {self._below_run} consecutive windows {self._clear} (trigger {c.trigger})"
            return self._decide(State.NORMAL, (), now, wall, reason=reason, windows=[w])
        return None

    def carry_over(self, old: AssetPolicy) -> None:
        """Take over what ``old`` (the same asset under the previous configuration) has seen: its timers,
        the event ids it took, and its last windows judged again under this rule.

        Without the windows a reset right after any configuration change (a cooldown, an action list)
        was accepted while the fault still lasted, because the "condition still active" check had
        nothing to count. A window that cannot be judged under the new rule (no verdict, for trigger
        is_anomaly) is left out rather than guessed."""
        self._last_heartbeat, self._last_sensor = old._last_heartbeat, old._last_sensor
        self._last_window = old._last_window
        self._last_action = dict(old._last_action)
        self._invalid_run = old._invalid_run
        self._seen_ids, self._seen_set, self.duplicates = old._seen_ids, old._seen_set, old.duplicates
        for w in old._recent:
            judged = self._judge(w.event_id, w.score, w.threshold, w.is_anomaly)
            if judged is not None:
                self._recent.append(judged)
        self._recount_below()

    def _recount_below(self) -> None:
        self._below_run = 0
        for judged in reversed(self._recent):
            if not judged.below:
                break
            self._below_run += 1

    def on_invalid(self, now: float, wall: float, reason: str) -> Decision | None:
        """A malformed event (NaN score, ...): counted; too many in a row is a dead detector."""
        self._invalid_run += 1
        limit = self.cfg.max_consecutive_invalid
        if limit and self._invalid_run >= limit and self.state is not State.SAFE_STATE:
            why = f"{self._invalid_run} invalid anomaly events in a row (last: {reason})"
            self._forget_windows()
            return self._decide(State.SAFE_STATE, self.cfg.safe_state_actions, now, wall, reason=why, windows=[])
        return None

    def stale(self, now: float) -> str | None:
        """Why the inputs count as stopped, or None while they are alive.

        With ``windowTimeoutS`` the asset's own scored windows count too: the detector heartbeat is one
        for all assets and says the detector runs, not that it scores this asset's windows."""
        c = self.cfg
        inputs = [("detector heartbeat", self._last_heartbeat, c.heartbeat_timeout_s),
                  ("sensor stream", self._last_sensor, c.sensor_timeout_s)]
        if c.window_timeout_s > 0:
            inputs.append((f"scored windows of {self.asset}", self._last_window, c.window_timeout_s))
        for name, last, timeout in inputs:
            if last is None:
                if now - self.started > max(c.startup_grace_s, timeout):
                    return f"no {name} since start ({now - self.started:.1f} s)"
            elif now - last > timeout:
                return f"{name} silent for {now - last:.2f} s (timeout {timeout:g} s)"
        return None

    def on_tick(self, now: float, wall: float) -> Decision | None:
        """Fail-safe check: the safe state when the detector or the sensor stream has stopped."""
        if self.state is State.SAFE_STATE:
            return None
        why = self.stale(now)
        if why is None:
            return None
        self._forget_windows()
        return self._decide(State.SAFE_STATE, self.cfg.safe_state_actions, now, wall, reason=f"fail-safe: {why}",
                            windows=[])

    def _forget_windows(self) -> None:
        """The windows judged before a safe state say nothing of the machine after the outage (or the
        broken detector) that caused it: a reset is judged on n windows seen since, as after a restart.
        Kept, they let a reset through the moment the inputs came back, on windows from before."""
        self._recent.clear()
        self._below_run = 0

    def reset(self, now: float, wall: float, operator: str) -> ResetResult:
        """Operator reset: only when the trip condition is gone and the inputs are alive."""
        if self.state is State.NORMAL:
            return ResetResult(True, self.state, "already normal")
        why = self.stale(now)
        if why is not None:
            return ResetResult(False, self.state, f"refused: {why}")
        hits = sum(1 for x in self._recent if x.above)
        if hits >= self.cfg.k:
            return ResetResult(False, self.state, f"refused: condition still active ({hits} of the last "
                                                  f"{len(self._recent)} windows {self._anomalous}, "
                                                  f"trigger {self.cfg.trigger})")
        if len(self._recent) < self.cfg.n:
            # A state restored from the audit log after a restart starts with no windows: "fewer than k
            # of them anomalous" would hold trivially, and a reset right after a crash released the
            # brake while the fault still lasted. The condition is judged on n windows, or not at all.
            return ResetResult(False, self.state, f"refused: {len(self._recent)} of the {self.cfg.n} windows "
                                                  f"needed to judge the condition seen so far")
        before, windows, invalid_run = self.state, list(self._recent), self._invalid_run
        cooldowns = dict(self._last_action)
        self._recent.clear()
        self._below_run = 0
        self._invalid_run = 0
        # A reset re-arms the protection: the first trip after it acts in full. Cooldowns are there to
        # keep a chattering release/trip from hammering the actuator, not to hold back the first trip
        # after an operator has put the machine back in service.
        self._last_action.clear()
        d = self._decide(State.NORMAL, (), now, wall, reason=f"operator reset by {operator}", windows=[])

        def undo() -> None:
            # A reset is the one decision that lowers the protection, so one the audit log could not
            # take must not hold: back to the state it left, with the windows that judged the condition
            # (and any judged since). A state decided meanwhile (a trip, a safe state) is left alone.
            if self.state is State.NORMAL:
                self.state = before
                self._recent = deque([*windows, *self._recent], maxlen=self.cfg.n)
                self._invalid_run = max(self._invalid_run, invalid_run)
                self._last_action = {**cooldowns, **self._last_action}
                self._recount_below()

        return ResetResult(True, State.NORMAL, d.reason, d, undo)

    def retry(self, actions: tuple[str, ...], now: float, wall: float, failed: str) -> Decision | None:
        """Run ``actions`` again, which failed in ``failed`` (a decision id) and are still wanted: the
        state stays, the attempt is a decision of its own. None in ``normal``, where nothing is wanted."""
        if self.state is State.NORMAL or not actions:
            return None
        reason = f"retry of {', '.join(actions)}: failed in decision {failed}, still {self.state.value}"
        return self._decide(self.state, actions, now, wall, reason=reason, windows=[])

    def action_failed(self, action: str, decided_at: float) -> None:
        """An action the actuator reported failed does not start its cooldown: the next decision that
        wants it (a re-trip, the safe state) runs it again instead of listing it as suppressed while
        it was never carried out."""
        if self._last_action.get(action) == decided_at:
            del self._last_action[action]

    # --- internals ------------------------------------------------------------------------------
    def _judge(self, event_id: str, score: float, threshold: float, is_anomaly: bool | None) -> _Window | None:
        """One window under this policy's trigger; None if the trigger needs a verdict it lacks."""
        c = self.cfg
        if c.trigger == "is_anomaly":
            if is_anomaly is None:
                return None
            return _Window(event_id, score, threshold, is_anomaly, is_anomaly, not is_anomaly)
        return _Window(event_id, score, threshold, is_anomaly, score >= level(c.trip_ratio, threshold),
                       score < level(c.release_ratio, threshold))

    @property
    def _anomalous(self) -> str:
        """What an anomalous window is, in the words of the reasons the audit log keeps."""
        if self.cfg.trigger == "is_anomaly":
            return "with is_anomaly true"
        return f"at or above {self.cfg.trip_ratio:g}x threshold"

    @property
    def _clear(self) -> str:
        if self.cfg.trigger == "is_anomaly":
            return "with is_anomaly false"
        return f"below {self.cfg.release_ratio:g}x threshold"

    def _remember(self, event_id: str) -> None:
        if len(self._seen_ids) == self._seen_ids.maxlen:
            self._seen_set.discard(self._seen_ids[0])
        self._seen_ids.append(event_id)
        self._seen_set.add(event_id)

    def _decide(self, target: State, wanted: tuple[str, ...], now: float, wall: float, *, reason: str,
                windows: list[_Window]) -> Decision:
        run: list[str] = []
        held: list[str] = []
        for action in wanted:
            last = self._last_action.get(action)
            if last is not None and now - last < self.cfg.cooldown(action):
                held.append(action)
            else:
                run.append(action)
                self._last_action[action] = now
        previous, self.state = self.state, target
        return Decision(self.new_id(), self.asset, wall, target, previous, tuple(run), tuple(held), reason,
                        tuple(x.event_id for x in windows), tuple(x.score for x in windows), now)
