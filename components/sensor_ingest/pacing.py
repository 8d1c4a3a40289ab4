"""Pacing batches against a monotonic clock: no drift, bounded catch-up.

A batch is due when its last sample would have been measured, so due times are an exact sum of
batch periods from one anchor and never accumulate sleep overshoot (drift). When the process falls
behind (a GC pause, a loaded CPU) it catches up by sending due batches back to back, but only
``max_burst`` of them: a consumer that sees a burst of hundreds of batches after a stall would be
flooded, and the data of a long stall is stale anyway. Beyond the bound the backlog is skipped in
whole batch periods and reported, so the caller can advance its source (the simulator skips the
samples, keeping ``t0`` equal to wall time) and say so in the log.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class PaceStep:
    delay_s: float  # sleep this long, then send
    skipped: int  # whole periods dropped from the schedule before this batch (0 normally)


@dataclass(slots=True)
class Pacer:
    max_burst: int = 10
    _due: float | None = None
    _burst: int = 0

    def step(self, now: float, period_s: float) -> PaceStep:
        """Schedule the next batch, which covers ``period_s`` seconds of samples."""
        if period_s <= 0:  # "as fast as possible": still bounded by the caller's own awaits
            self._due = now
            return PaceStep(0.0, 0)
        if self._due is None:
            self._due = now + period_s
        due = self._due
        if now < due:
            self._burst = 0
            self._due = due + period_s
            return PaceStep(due - now, 0)
        lateness = now - due
        if lateness < period_s:  # in its own slot, merely not asleep yet: not a catch-up
            self._burst = 0
            self._due = due + period_s
            return PaceStep(0.0, 0)
        self._burst += 1
        if self._burst <= self.max_burst:
            self._due = due + period_s
            return PaceStep(0.0, 0)
        skipped = int(lateness // period_s)
        self._burst = 0
        self._due = due + (skipped + 1) * period_s
        return PaceStep(0.0, skipped)

    def rebase(self) -> None:
        """Forget the schedule (a new source or rate): the next step starts a new anchor."""
        self._due = None
        self._burst = 0
