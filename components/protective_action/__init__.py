"""Protective action: anomaly events in, debounced protective decisions out, every one audited.

:mod:`.policy` (k-of-n debounce, hysteresis, latch, cooldown, fail-safe timers) and
:mod:`.events` (validation of incoming events) are pure and driven by an injected clock;
:mod:`.audit` owns the SQLite audit log; :mod:`.actuators` the seam to the machine;
:mod:`.service` wires them to the bus in the order the audit guarantee needs.
"""
