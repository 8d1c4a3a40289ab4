"""The protective action's configuration (the recipe's ``ComponentConfiguration``), validated once.

camelCase keys as Greengrass configurations usually are; snake_case accepted; unknown keys are
errors (a misspelt ``heartbeatTimeoutS`` must not silently leave the default in a safety
function). ``accessControl`` belongs to the nucleus and is dropped
(the rule all built-in components share: ``components/configuration.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from components.configuration import parse_config

ACTIONS = ("engage_brake", "pitch_to_feather", "disconnect_generator")
KEEPALIVE = "keepalive"  # not a protective action: the periodic "still here" of actuator.keepaliveS
ActionName = Literal["engage_brake", "pitch_to_feather", "disconnect_generator"]
Trigger = Literal["score", "is_anomaly"]
_ASSET = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _known_actions(keys: Any) -> None:
    unknown = sorted(set(keys) - set(ACTIONS))
    if unknown:
        raise ValueError(f"unknown actions {unknown}; known: {list(ACTIONS)}")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class PolicyConfig(_Model):
    """One asset's protective policy.

    ``trigger`` says what makes a window count as anomalous: ``score`` (the default) compares the
    event's ``score`` with its ``threshold`` scaled by ``tripRatio``/``releaseRatio``; ``is_anomaly``
    takes the detector's own per-window verdict, which in likelihood mode (``docs/anomaly.md``) is
    not ``score >= threshold`` at all. With ``is_anomaly`` a ratio other than its default is refused,
    not ignored: the verdict is a yes or no, so there is no level to scale, and a margin that reads
    as applied while it is not is the same silent failure as the misspelt key this model already
    refuses. The defaults stay allowed because the recipe's DefaultConfiguration spells them out.
    """

    trigger: Trigger = "score"  # what counts a window as anomalous: its score, or the detector's is_anomaly
    k: int = Field(3, ge=1)  # trip when k of the last n valid windows are anomalous (see trigger)
    n: int = Field(5, ge=1)
    trip_ratio: float = Field(1.0, gt=0)  # trip level = tripRatio x the event's threshold
    release_ratio: float = Field(0.8, gt=0)  # hysteresis: release level = releaseRatio x threshold
    release_count: int = Field(5, ge=1)  # consecutive windows below the release level (not anomalous) to release
    latch: bool = True  # a trip stays until an operator reset on control/<asset>/reset
    trip_actions: tuple[ActionName, ...] = ("engage_brake", "pitch_to_feather")
    cooldown_s: float = Field(5.0, ge=0)  # an action is not repeated within this time
    action_cooldown_s: dict[str, float] = Field(default_factory=dict)  # per action, overrides cooldownS
    heartbeat_timeout_s: float = Field(3.0, gt=0)  # no detector heartbeat this long: safe state
    sensor_timeout_s: float = Field(2.0, gt=0)  # no sensors/<asset>/raw batch this long: safe state
    # No scored window (anomaly/<asset>) this long: safe state; 0 = off. The heartbeat says the detector
    # runs, not that it scores this asset: its batches may all be dropped (a missing channel, another rate).
    window_timeout_s: float = Field(0.0, ge=0)
    startup_grace_s: float = Field(15.0, ge=0)  # before the first heartbeat/batch/window is ever seen
    safe_state_actions: tuple[ActionName, ...] = ("pitch_to_feather", "engage_brake")
    max_consecutive_invalid: int = Field(50, ge=0)  # that many bad events in a row: safe state (0: never)

    @field_validator("trip_actions", "safe_state_actions")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # Listed twice, an action ran twice at once (cooldown 0: two relay scripts racing on one
        # device) or its second copy showed as suppressed, and the audit kept one outcome of the two.
        twice = sorted({a for a in v if v.count(a) > 1})
        if twice:
            raise ValueError(f"{twice} listed more than once")
        return v

    @field_validator("action_cooldown_s")
    @classmethod
    def _cooldown_actions(cls, v: dict[str, float]) -> dict[str, float]:
        _known_actions(v)
        if any(x < 0 for x in v.values()):
            raise ValueError("cooldowns cannot be negative")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PolicyConfig:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) cannot exceed n ({self.n})")
        if self.trigger == "is_anomaly":
            fields = type(self).model_fields
            ratios = ("trip_ratio", "release_ratio")
            moved = [f"{to_camel(r)} {getattr(self, r):g}" for r in ratios if getattr(self, r) != fields[r].default]
            if moved:
                defaults = ", ".join(f"{to_camel(r)} {fields[r].default:g}" for r in ratios)
                raise ValueError(f"{', '.join(moved)}: the ratios do not apply with trigger is_anomaly (the "
                                 "detector's verdict is yes or no, with no level to scale); use trigger score, "
                                 f"or leave them at their defaults ({defaults})")
        if self.release_ratio > self.trip_ratio:
            raise ValueError(f"releaseRatio ({self.release_ratio}) must not exceed tripRatio ({self.trip_ratio}): "
                             "hysteresis releases below a lower level than it trips at")
        return self

    def cooldown(self, action: str) -> float:
        return self.action_cooldown_s.get(action, self.cooldown_s)


class ActuatorConfig(_Model):
    kind: Literal["simulated", "command"] = "simulated"
    # command: action -> argv (list) or a shell-free command line split on whitespace
    commands: dict[str, tuple[str, ...] | str] = Field(default_factory=dict)
    timeout_s: float = Field(5.0, gt=0)
    # > 0: an action the actuator reported failed is run again every retryS seconds while the asset
    # stays in the state that wanted it (latched, tripped, safe_state), each attempt a decision of its
    # own in the audit log; 0: a failed action is not retried.
    retry_s: float = Field(5.0, ge=0)
    record_path: Path | None = None  # simulated: also append each call as a JSON line here
    # > 0: every keepaliveS seconds, for each asset whose protection is working (not in the safe state,
    # detector and sensor stream alive), call the actuator's "keepalive": the refresh of a dead-man
    # timer outside nucleus, which goes to the safe state when the refreshes stop (this component
    # crashed or is BROKEN, the nucleus is down). 0: off.
    keepalive_s: float = Field(0.0, ge=0, le=60)

    @field_validator("commands")
    @classmethod
    def _command_actions(cls, v: dict[str, tuple[str, ...] | str]) -> dict[str, tuple[str, ...] | str]:
        _known_actions(k for k in v if k != KEEPALIVE)
        empty = [a for a, c in v.items() if not (c.split() if isinstance(c, str) else c)]
        if empty:
            raise ValueError(f"empty command for {empty}")
        return v

    def argv(self, action: str) -> tuple[str, ...] | None:
        cmd = self.commands.get(action)
        if cmd is None:
            return None
        return tuple(cmd.split()) if isinstance(cmd, str) else tuple(cmd)


class ActionConfig(_Model):
    assets: tuple[str, ...] = ("turbine-1",)
    policy: PolicyConfig = PolicyConfig()
    actuator: ActuatorConfig = ActuatorConfig()
    audit_path: Path = Path("audit.db")  # relative to the working directory ({work:path})
    # write_ahead: audit commit -> actuator -> outcome commit -> publish (the log never misses an action);
    # act_first: actuator -> one audit commit -> publish (lower latency; an action may precede its record)
    audit_order: Literal["write_ahead", "act_first"] = "write_ahead"
    check_interval_s: float = Field(0.05, gt=0, le=5)  # how often the fail-safe timers are checked
    # how often heartbeat/protective_action carries each asset's state and the counters (0: never)
    status_interval_s: float = Field(1.0, ge=0, le=3600)

    @field_validator("assets")
    @classmethod
    def _assets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in v if not _ASSET.match(a)]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"assets must be distinct topic-level names (letters, digits, '_.-'); bad: {bad}")
        return v

    @model_validator(mode="after")
    def _checked_often_enough(self) -> ActionConfig:
        # The timers are looked at every checkIntervalS: a silence is noticed up to that much after its
        # timeout, so a check slower than the shortest timeout makes that timeout a promise not kept.
        p = self.policy
        timeouts = {"policy.heartbeatTimeoutS": p.heartbeat_timeout_s, "policy.sensorTimeoutS": p.sensor_timeout_s}
        if p.window_timeout_s > 0:
            timeouts["policy.windowTimeoutS"] = p.window_timeout_s
        name, shortest = min(timeouts.items(), key=lambda kv: kv[1])
        if self.check_interval_s > shortest:
            raise ValueError(f"checkIntervalS ({self.check_interval_s:g}) exceeds {name} ({shortest:g}): a silence "
                             f"would be noticed up to {self.check_interval_s:g} s late; check at least as often")
        return self

    @model_validator(mode="after")
    def _commands_cover_actions(self) -> ActionConfig:
        if self.actuator.kind == "command":
            needed: set[str] = set(self.policy.trip_actions) | set(self.policy.safe_state_actions)
            if self.actuator.keepalive_s > 0:
                needed.add(KEEPALIVE)
            missing = sorted(a for a in needed if self.actuator.argv(a) is None)
            if missing:
                raise ValueError(f"actuator.commands has no command for {missing}")
        return self


def load_config(raw: Any, component: str = "com.nucleus.ProtectiveAction") -> ActionConfig:
    return parse_config(ActionConfig, raw, component)
