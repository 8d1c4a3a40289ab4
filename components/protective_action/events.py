"""Validation of ``anomaly/<asset>`` events: anything malformed is rejected with a reason, never guessed.

Hand-written rather than pydantic because it is on the latency path (a few microseconds) and
because each rejection needs a short stable reason to count by (``nan_score``, ``no_event_id``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from components.protective_action.config import Trigger


class BadEvent(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, frozen=True)
class Observation:
    """One scored window, as much of the event as the policy needs."""

    event_id: str
    asset: str
    score: float
    threshold: float
    ts: float
    published_at: float | None
    is_anomaly: bool | None = None  # the detector's verdict; None when absent (required by trigger is_anomaly)


def _finite(doc: dict[str, Any], key: str, reason: str) -> float:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadEvent(f"bad_{key}", f"{key} must be a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise BadEvent(reason, f"{key} is {f}")
    return f


def parse_event(payload: Any, topic_asset: str, trigger: Trigger = "score") -> Observation:
    """The observation in an event on ``anomaly/<topic_asset>``, or :class:`BadEvent`.

    ``score`` and ``threshold`` are required whatever the trigger: the audit records the scores, and a
    detector that sends a NaN score is broken even if it still sends verdicts. ``is_anomaly`` is
    required (a real boolean, not 0/1 or "true") only when it is what trips, so trigger ``score``
    still accepts the events it always did."""
    if not isinstance(payload, dict):
        raise BadEvent("not_a_map", type(payload).__name__)
    event_id = payload.get("event_id")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 128:
        what = ("missing" if event_id is None else f"of type {type(event_id).__name__}, not a string"
                if not isinstance(event_id, str) else "empty" if not event_id else
                f"{len(event_id)} characters long, more than 128")
        raise BadEvent("no_event_id", f"event_id is {what}")
    asset = payload.get("asset", topic_asset)
    if asset != topic_asset:
        raise BadEvent("asset_mismatch", f"payload asset {asset!r} on the topic of {topic_asset!r}")
    score = _finite(payload, "score", "nan_score")
    threshold = _finite(payload, "threshold", "nan_threshold")
    ts = payload.get("ts", 0.0)
    ts = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) and math.isfinite(ts) else 0.0
    pub = payload.get("published_at")
    # Only for the latency figures; a NaN or infinite one would put a NaN in actions/<asset>, which
    # strict JSON readers downstream (the cloud bridge) cannot take.
    published_at = float(pub) if isinstance(pub, int | float) and not isinstance(pub, bool) and math.isfinite(pub) \
        else None
    verdict = payload.get("is_anomaly")
    if not isinstance(verdict, bool):
        if trigger == "is_anomaly":
            raise BadEvent("bad_is_anomaly", f"is_anomaly must be a boolean, got {type(verdict).__name__}")
        verdict = None
    return Observation(event_id, topic_asset, score, threshold, ts, published_at, verdict)
