"""The protective action's I/O: bus subscriptions, the audit worker, the actuator, the fail-safe tick.

The order of one decision is the guarantee the issue asks for, so it lives in one method
(:meth:`ActionService.apply`), serialised per asset (one lock each: an asset's decisions are acted
on in the order they were taken, and one asset's slow actuator never holds back another's):

* ``write_ahead`` (default): commit the decision without waiting for the fsync (it is in the OS:
  it survives ``kill -9``) → call the actuator → commit the outcome with fsync (which makes both
  durable) → publish on ``actions/<asset>``. A crash of the process never leaves an action without
  its record, and the actuator does not wait for the disk (an fsync here is 0.3 ms at the median
  and more than 10 ms at p99 when the disk is busy).
* ``act_first``: call the actuator → commit decision and outcome together (fsync) → publish. A few
  tens of microseconds faster still; a crash between the two leaves an action without its record.

Either way nothing is acknowledged (published, or answered to a reset) before it is durable. If
the audit write fails, the actuator still runs — protecting the machine comes first — but the
decision is not acknowledged, and the failure is logged; the decision is kept and recorded (then
acknowledged) once the log takes it, ahead of the asset's later decisions. A reset is the exception:
it lowers the protection, so one that cannot be recorded is undone. An action that fails is retried
(``actuator.retryS``) while its state still wants it, and holds back the dead-man keepalive.

SQLite runs on one dedicated worker thread, so an fsync never stalls the event loop that watches
the heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from components.configuration import ConfigError, component_name, config_changes
from components.protective_action.actuators import ActionRequest, Actuator, CommandActuator, SimulatedActuator
from components.protective_action.audit import AuditError, AuditLog, Outcome
from components.protective_action.config import ActionConfig, ActuatorConfig, load_config
from components.protective_action.events import BadEvent, parse_event
from components.protective_action.policy import AssetPolicy, Decision, State
from ipc import Client, IpcError

log = structlog.get_logger(__name__)

COMPONENT = "com.nucleus.ProtectiveAction"


HEARTBEAT_TOPIC = "heartbeat/anomaly_detector"
STATUS_TOPIC = "heartbeat/protective_action"
UNRECORDED_RETRY_S = 1.0  # how often decisions an audit failure left out are tried again
UNRECORDED_MAX = 10_000  # per asset: beyond this the oldest are dropped (and that is logged)


@dataclass(slots=True)
class Clocks:
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    perf: Callable[[], float] = time.perf_counter


@dataclass(slots=True)
class Stats:
    events: int = 0
    decisions: int = 0
    bad_events: Counter[str] = field(default_factory=Counter)
    unknown_assets: Counter[str] = field(default_factory=Counter)
    dropped: int = 0  # anomaly events the bus dropped because we were behind
    audit_failures: int = 0
    keepalives: int = 0  # keepalive calls made (actuator.keepaliveS)
    keepalive_failures: int = 0
    recorded_late: int = 0  # decisions recorded (and acknowledged) after an audit failure
    unrecorded_dropped: int = 0  # decisions left out for good: more than UNRECORDED_MAX waiting
    # receive of the anomaly event -> actuator call, seconds (bounded)
    receive_to_actuator: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))


def make_actuator(cfg: ActuatorConfig) -> Actuator:
    if cfg.kind == "command":
        commands = {a: argv for a in cfg.commands if (argv := cfg.argv(a)) is not None}
        return CommandActuator(commands, cfg.timeout_s)
    return SimulatedActuator(cfg.record_path)


class ActionService:
    def __init__(self, client: Client, cfg: ActionConfig, audit: AuditLog, *, actuator: Actuator | None = None,
                 clocks: Clocks | None = None) -> None:
        self.client = client
        self.cfg = cfg
        self.audit = audit
        self.actuator = actuator or make_actuator(cfg.actuator)
        self._check_actuator()
        self.clocks = clocks or Clocks()
        self.stats = Stats()
        self._locks: dict[str, asyncio.Lock] = {}  # per asset: its decisions in order, others not waiting
        self._tasks: asyncio.TaskGroup | None = None  # serve()'s: where decisions are applied off the loops
        self._keepalive_failing: set[str] = set()  # assets whose last keepalive failed
        # per asset: decisions acted on that the audit log could not take yet (decision, outcomes, timing)
        self._unrecorded: dict[str, list[tuple[Decision, list[Outcome], dict[str, float]]]] = {}
        # per asset: failed actions still wanted (actuator.retryS): (actions, the decision they failed in, when next)
        self._failed: dict[str, tuple[tuple[str, ...], str, float]] = {}
        self._retrying: set[str] = set()  # assets with a retry decided and not yet applied
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        now = self.clocks.monotonic()
        restored = audit.last_states()
        self.policies: dict[str, AssetPolicy] = {}
        for asset in cfg.assets:
            state = restored.get(asset, State.NORMAL)
            self.policies[asset] = AssetPolicy(asset, cfg.policy, now, state)
            if state is not State.NORMAL:
                log.warning("action.state_restored", asset=asset, state=state.value, audit=str(audit.path))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _check_actuator(self) -> None:
        if isinstance(self.actuator, CommandActuator):
            for action, problem in self.actuator.unavailable().items():
                log.warning("action.command_unavailable", action=action, problem=problem,
                            note="the action will fail when it is taken, unless the program is there by then")

    def reconfigure(self, cfg: ActionConfig) -> None:
        """A new configuration: policies keep their state, timers and last windows (judged again under
        the new rule); assets come and go.

        The configuration already running is not applied again (the first one the SDK yields may be the
        one read at start)."""
        if cfg == self.cfg:
            return
        if cfg.audit_path != self.cfg.audit_path:
            log.warning("action.audit_path_change_needs_restart", current=str(self.cfg.audit_path),
                        configured=str(cfg.audit_path))
        now = self.clocks.monotonic()
        policies: dict[str, AssetPolicy] = {}
        restored: dict[str, State] | None = None
        for asset in cfg.assets:
            old = self.policies.get(asset)
            if old is not None:
                new = AssetPolicy(asset, cfg.policy, old.started, old.state)
                new.carry_over(old)
            else:
                # An asset added (or added back) starts where the audit log left it, as at a restart:
                # taking an asset out of the list and back in must not release its latch without a reset.
                if restored is None:
                    restored = self.audit.last_states()
                new = AssetPolicy(asset, cfg.policy, now, restored.get(asset, State.NORMAL))
                if new.state is not State.NORMAL:
                    log.warning("action.state_restored", asset=asset, state=new.state.value,
                                audit=str(self.audit.path))
            policies[asset] = new
        self.policies = policies
        if cfg.actuator != self.cfg.actuator:
            self.actuator = make_actuator(cfg.actuator)
            self._check_actuator()
        self.cfg = cfg
        log.info("action.reconfigured", assets=list(cfg.assets), trigger=cfg.policy.trigger, k=cfg.policy.k,
                 n=cfg.policy.n, latch=cfg.policy.latch, actuator=cfg.actuator.kind)

    # --- the decision path ---------------------------------------------------------------------
    async def _audit(self, d: Decision, fn: Callable[..., None], *args: Any) -> bool:
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
            return True
        except Exception as exc:
            self._audit_failed(d, exc)
            return False

    def _audit_now(self, d: Decision) -> bool:
        try:
            self.audit.record(d, (), durable=False)
            return True
        except Exception as exc:
            self._audit_failed(d, exc)
            return False

    def _audit_failed(self, d: Decision, exc: Exception | str) -> None:
        self.stats.audit_failures += 1
        log.error("action.audit_failed", path=str(self.audit.path), error=str(exc), asset=d.asset,
                  decision_id=d.decision_id, state=d.state.value, actions=list(d.actions),
                  note="the actions were carried out; the decision is not acknowledged")

    async def _actuate(self, d: Decision) -> list[Outcome]:
        requests = [ActionRequest(a, d.asset, d.decision_id, d.reason) for a in d.actions]
        if not requests:
            return []
        if len(requests) == 1:
            return [await self.actuator.execute(requests[0])]
        return list(await asyncio.gather(*(self.actuator.execute(r) for r in requests)))

    async def apply(self, d: Decision, received: float | None = None, published_at: float | None = None, *,
                    undone_if_unrecorded: bool = False) -> bool:
        """Audit, act, acknowledge — in the configured order. True if acknowledged.

        A decision the log cannot take is kept to be recorded later, unless the caller undoes it then
        (``undone_if_unrecorded``: a reset)."""
        async with self._locks.setdefault(d.asset, asyncio.Lock()):
            self.stats.decisions += 1
            if self._unrecorded.get(d.asset) and not await self._record_late(d.asset):
                # Earlier decisions of this asset are still unrecorded: this one waits behind them (the
                # log's order is what a restart restores), and the machine is protected meanwhile.
                acted_at, acted_wall = self.clocks.perf(), self.clocks.wall()
                outcomes = await self._actuate(d)
                self._audit_failed(d, "earlier decisions of this asset are not recorded yet")
                durable = False
            elif self.cfg.audit_order == "write_ahead" and d.actions:
                # The intent: written to the OS on the loop (tens of microseconds, no fsync) so it
                # survives kill -9; the outcome's commit fsyncs both before anything is acknowledged.
                intent = self._audit_now(d)
                acted_at, acted_wall = self.clocks.perf(), self.clocks.wall()
                outcomes = await self._actuate(d)
                durable = intent and await self._audit(d, self.audit.record_outcomes, d.decision_id, outcomes)
            elif self.cfg.audit_order == "write_ahead":  # nothing to actuate: one durable commit
                durable = await self._audit(d, self.audit.record, d, ())
                acted_at, acted_wall, outcomes = self.clocks.perf(), self.clocks.wall(), []
            else:
                acted_at, acted_wall = self.clocks.perf(), self.clocks.wall()
                outcomes = await self._actuate(d)
                durable = await self._audit(d, self.audit.record, d, outcomes)
            timing: dict[str, float] = {"actuated_at": acted_wall}
            if received is not None and d.actions:
                latency = acted_at - received
                self.stats.receive_to_actuator.append(latency)
                timing["receive_to_actuator_ms"] = latency * 1e3
            if published_at is not None and d.actions:
                timing["event_to_actuator_ms"] = (acted_wall - published_at) * 1e3
            failed = [o for o in outcomes if not o.ok]
            policy = self.policies.get(d.asset)
            if policy is not None:
                for o in failed:
                    policy.action_failed(o.action, d.decided_at)
            if durable or not undone_if_unrecorded:
                self._note_failures(d, outcomes)
            log_fn = log.error if failed else log.info
            log_fn("action.decision", asset=d.asset, decision_id=d.decision_id, state=d.state.value,
                   previous=d.previous.value, actions=list(d.actions), suppressed=list(d.suppressed),
                   reason=d.reason, failed=[f"{o.action}: {o.detail}" for o in failed], durable=durable, **timing)
            if not durable:
                if not undone_if_unrecorded:
                    self._keep_unrecorded(d, outcomes, timing)
                return False
            await self._acknowledge(d, outcomes, timing)
            return True

    async def _acknowledge(self, d: Decision, outcomes: list[Outcome], timing: dict[str, float]) -> None:
        payload = d.payload()
        payload["outcomes"] = [{"action": o.action, "ok": o.ok, "detail": o.detail} for o in outcomes]
        payload["timing"] = timing
        await self.client.publish(f"actions/{d.asset}", payload)

    def _note_failures(self, d: Decision, outcomes: list[Outcome]) -> None:
        """What is left to retry for the asset: the actions that failed and were not carried out since,
        while the asset is in a state that wants them (``normal`` wants none)."""
        if d.state is State.NORMAL:
            self._failed.pop(d.asset, None)
            return
        left = self._failed.get(d.asset, ((), "", 0.0))[0]
        ok = {o.action for o in outcomes if o.ok}
        failed = [o.action for o in outcomes if not o.ok]
        actions = tuple(dict.fromkeys(a for a in (*left, *failed) if a not in ok))
        if not actions:
            self._failed.pop(d.asset, None)
        elif failed or d.asset not in self._failed:
            self._failed[d.asset] = (actions, d.decision_id, self.clocks.monotonic() + self.cfg.actuator.retry_s)
        else:
            self._failed[d.asset] = (actions, *self._failed[d.asset][1:])

    def _retries_due(self) -> list[Decision]:
        every = self.cfg.actuator.retry_s
        if not every:
            return []
        now, wall = self.clocks.monotonic(), self.clocks.wall()
        out = []
        wanted = {*self.cfg.policy.trip_actions, *self.cfg.policy.safe_state_actions}
        for asset, (failed, failed_in, due) in list(self._failed.items()):
            # an action a new configuration no longer lists is not retried (nor holds the keepalive back)
            actions = tuple(a for a in failed if a in wanted)
            if actions != failed:
                if not actions:
                    del self._failed[asset]
                    continue
                self._failed[asset] = (actions, failed_in, due)
            policy = self.policies.get(asset)
            # One attempt at a time: with a program slower than retryS (a hung relay, killed at timeoutS)
            # attempts queued up behind the asset's lock, each to run when its turn came, even after one
            # had succeeded, and the asset's next real decision (a safe state) waited behind them all.
            if policy is None or now < due or asset in self._retrying:
                continue
            self._failed[asset] = (actions, failed_in, now + every)
            if (d := policy.retry(actions, now, wall, failed_in)) is not None:
                self._retrying.add(asset)
                out.append(d)
        return out

    async def _apply_retry(self, d: Decision) -> None:
        try:
            await self.apply(d)
        finally:
            self._retrying.discard(d.asset)

    def _keep_unrecorded(self, d: Decision, outcomes: list[Outcome], timing: dict[str, float]) -> None:
        """A decision the audit log could not take, kept to be recorded (and acknowledged) when it can: it
        was acted on, and a restart restores the state of the log's last decision, so a safe state left
        out would come back as the state before it."""
        pending = self._unrecorded.setdefault(d.asset, [])
        pending.append((d, outcomes, timing))
        if len(pending) > UNRECORDED_MAX:
            del pending[0]
            self.stats.unrecorded_dropped += 1
            log.error("action.unrecorded_dropped", asset=d.asset, kept=UNRECORDED_MAX,
                      dropped=self.stats.unrecorded_dropped)

    async def _record_late(self, asset: str) -> bool:
        """Record the asset's decisions an audit failure left out, oldest first, and acknowledge each;
        True when none is left. Called under the asset's lock."""
        pending = self._unrecorded.get(asset, [])
        loop = asyncio.get_running_loop()
        while pending:
            d, outcomes, timing = pending[0]
            try:  # a write-ahead intent may be in the log already: replaced, with its outcomes
                await loop.run_in_executor(self._pool, functools.partial(self.audit.record, d, outcomes,
                                                                         replace=True))
            except Exception:
                return False
            pending.pop(0)
            self.stats.recorded_late += 1
            log.warning("action.recorded_late", asset=asset, decision_id=d.decision_id, state=d.state.value,
                        left=len(pending))
            await self._acknowledge(d, outcomes, {**timing, "recorded_late": 1.0})
        return True

    async def _retry_unrecorded(self, asset: str) -> None:
        lock = self._locks.setdefault(asset, asyncio.Lock())
        if lock.locked():
            return  # a decision of this asset is being applied: it records the backlog first
        async with lock:
            await self._record_late(asset)

    def _spawn(self, coro: Any) -> None:
        """Apply off the bus loop that decided it, so the next message (another asset's) is judged and
        acted on meanwhile; per asset the lock in :meth:`apply` keeps the order (tasks start in the order
        they are made, and an asyncio lock is first come, first served)."""
        if self._tasks is None:
            raise RuntimeError("decisions are spawned only while serving")
        self._tasks.create_task(coro)

    async def on_anomaly(self, topic: str, payload: Any, received: float) -> Decision | None:
        """Judge one event and apply its decision (awaited: for callers outside :meth:`serve`)."""
        decision, valid, published_at = self.judge_anomaly(topic, payload)
        if decision is not None:
            await self.apply(decision, received if valid else None, published_at)
        return decision

    def judge_anomaly(self, topic: str, payload: Any) -> tuple[Decision | None, bool, float | None]:
        """The decision one event leads to (None: none), taken now; whether the event was valid (the
        decision of an invalid one carries no latency figures) and its ``published_at``."""
        self.stats.events += 1
        asset = topic.split("/", 1)[1] if "/" in topic else ""
        policy = self.policies.get(asset)
        if policy is None:
            self.stats.unknown_assets[asset] += 1
            if self.stats.unknown_assets[asset] in (1, 10, 100, 1000) or self.stats.unknown_assets[asset] % 10000 == 0:
                log.warning("action.unknown_asset", asset=asset, count=self.stats.unknown_assets[asset],
                            configured=list(self.policies))
            return None, False, None
        now, wall = self.clocks.monotonic(), self.clocks.wall()
        try:
            obs = parse_event(payload, asset, policy.cfg.trigger)
        except BadEvent as exc:
            self.stats.bad_events[exc.reason] += 1
            n = self.stats.bad_events[exc.reason]
            if n in (1, 10, 100, 1000) or n % 10000 == 0:
                log.warning("action.bad_event", asset=asset, reason=exc.reason, detail=exc.detail, count=n)
            return policy.on_invalid(now, wall, exc.reason), False, None
        return policy.on_event(obs, now, wall), True, obs.published_at

    def due(self) -> list[Decision]:
        """The fail-safe decisions due now, one per asset at most (the state changes as they are taken)."""
        now, wall = self.clocks.monotonic(), self.clocks.wall()
        return [d for policy in list(self.policies.values()) if (d := policy.on_tick(now, wall)) is not None]

    async def tick(self) -> None:
        """Apply what is due now, the assets side by side (for callers outside :meth:`serve`)."""
        await asyncio.gather(*(self.apply(d) for d in self.due()))

    async def on_reset(self, asset: str, request: Any, sender: str | None) -> dict[str, Any]:
        policy = self.policies.get(asset)
        if policy is None:
            return {"ok": False, "state": None, "reason": f"unknown asset {asset!r}"}
        problem = _reset_request_problem(asset, request)
        if problem is not None:
            log.warning("action.reset_refused", asset=asset, client=sender, reason=problem)
            return {"ok": False, "state": policy.state.value, "reason": f"refused: {problem}"}
        operator = request.get("operator") if isinstance(request, dict) else None
        if not isinstance(operator, str) or not operator:
            operator = sender or "unknown"
        operator = operator[:64]
        # The operator name is what the request says; the client is who the bus authenticated. The audit
        # log keeps both, so a reset cannot be put on someone else's name without a trace.
        who = operator if sender is None or sender == operator else f"{operator} (client {sender})"
        result = policy.reset(self.clocks.monotonic(), self.clocks.wall(), who)
        if result.decision is not None and not await self.apply(result.decision, undone_if_unrecorded=True):
            if result.undo is not None:
                result.undo()
            log.error("action.reset_refused", asset=asset, operator=who, state=policy.state.value,
                      reason="the reset could not be recorded in the audit log")
            return {"ok": False, "state": policy.state.value,
                    "reason": f"refused: the reset could not be recorded in the audit log {self.audit.path}"}
        log.info("action.reset", asset=asset, operator=operator, ok=result.ok, state=result.state.value,
                 reason=result.reason)
        return {"ok": result.ok, "state": result.state.value, "reason": result.reason}

    # --- bus loops ------------------------------------------------------------------------------
    async def _anomalies(self) -> None:
        async with self.client.subscribe("anomaly/+", queue_size=4096) as messages:
            async for m in messages:
                received = self.clocks.perf()
                if m.dropped:
                    self.stats.dropped += m.dropped
                    log.warning("action.events_dropped", count=m.dropped, total=self.stats.dropped)
                try:
                    payload = m.payload
                except IpcError:
                    payload = None  # undecodable: counted by parse_event as not_a_map
                decision, valid, published_at = self.judge_anomaly(m.topic, payload)
                if decision is not None:
                    self._spawn(self.apply(decision, received if valid else None, published_at))

    async def _heartbeats(self) -> None:
        async with self.client.subscribe(HEARTBEAT_TOPIC, queue_size=64) as messages:
            async for _ in messages:
                now = self.clocks.monotonic()
                for policy in self.policies.values():
                    policy.on_heartbeat(now)

    async def _sensors(self) -> None:
        # Liveness only: the payload is never decoded (10+ batches/s per asset would cost CPU for nothing).
        async with self.client.subscribe("sensors/+/raw", queue_size=256) as messages:
            async for m in messages:
                parts = m.topic.split("/")
                policy = self.policies.get(parts[1]) if len(parts) == 3 else None
                if policy is not None:
                    policy.on_sensor(self.clocks.monotonic())

    async def _resets(self) -> None:
        async with self.client.subscribe("control/+/reset", queue_size=64) as messages:
            async for m in messages:
                try:
                    request = m.payload
                except IpcError as exc:
                    request = Undecodable(str(exc))  # refused: garbage is not a reset with no operator
                self._spawn(self._answer_reset(m, request))

    async def _answer_reset(self, m: Any, request: Any) -> None:
        reply = await self.on_reset(m.topic.split("/")[1], request, m.sender)
        if m.reply_to is not None:
            await m.reply(reply)

    async def _ticks(self) -> None:
        retried = self.clocks.monotonic()
        while True:
            await asyncio.sleep(self.cfg.check_interval_s)
            for d in self.due():
                self._spawn(self.apply(d))
            for d in self._retries_due():
                self._spawn(self._apply_retry(d))
            if self.clocks.monotonic() - retried >= UNRECORDED_RETRY_S:
                retried = self.clocks.monotonic()
                for asset in [a for a, pending in self._unrecorded.items() if pending]:
                    self._spawn(self._retry_unrecorded(asset))

    async def keepalive(self) -> None:
        """One round of the dead-man refresh: each asset whose protection is working, and only those.

        An asset in the safe state or with a silent detector or sensor stream gets none, so its
        external timer runs out as well (the same verdict twice, in hardware). A failed call is logged
        when the calls start or stop failing, not every time. The assets' calls run side by side."""
        await asyncio.gather(*(self._keepalive_one(asset) for asset in self._keepalive_due()))

    def _keepalive_due(self) -> list[str]:
        now = self.clocks.monotonic()
        # An asset whose protective action failed (and has not succeeded on a retry since) is not
        # protected either: the external timer is the backstop for exactly that, so it must run out.
        return [asset for asset, policy in list(self.policies.items())
                if policy.state is not State.SAFE_STATE and policy.stale(now) is None and asset not in self._failed]

    async def _keepalive_one(self, asset: str) -> None:
        outcome = await self.actuator.execute(ActionRequest("keepalive", asset, "", "keepalive"))
        self.stats.keepalives += 1
        if not outcome.ok:
            self.stats.keepalive_failures += 1
            if asset not in self._keepalive_failing:
                log.error("action.keepalive_failed", asset=asset, detail=outcome.detail)
            self._keepalive_failing.add(asset)
        elif asset in self._keepalive_failing:
            log.info("action.keepalive_recovered", asset=asset)
            self._keepalive_failing.discard(asset)

    async def _keepalives(self) -> None:
        """Each asset's refresh on its own: one asset's keepalive program that hangs (until its
        ``timeoutS``) must not let another asset's external timer run out. An asset whose call is
        still running skips the round."""
        running: set[str] = set()

        async def one(asset: str) -> None:
            try:
                await self._keepalive_one(asset)
            finally:
                running.discard(asset)

        while True:
            every = self.cfg.actuator.keepalive_s
            await asyncio.sleep(every or 1.0)  # off: look again in a second (a new configuration may turn it on)
            if every:
                for asset in self._keepalive_due():
                    if asset not in running:
                        running.add(asset)
                        self._spawn(one(asset))

    def status(self) -> dict[str, Any]:
        """What heartbeat/protective_action carries: the counters docs/components.md names (bad events by
        reason, audit failures, ...) were only in this process, and a log line at counts 1, 10, 100;
        a monitor (or an operator) needs each asset's state, what failed, and whether the audit log
        keeps up, without reading the log."""
        now = self.clocks.monotonic()
        st = self.stats
        return {
            "ts": self.clocks.wall(),
            "audit": str(self.audit.path),
            "assets": {asset: {"state": policy.state.value, "stale": policy.stale(now),
                               "failed_actions": list(self._failed.get(asset, ((), "", 0.0))[0]),
                               "unrecorded": len(self._unrecorded.get(asset, ()))}
                       for asset, policy in self.policies.items()},
            "events": st.events, "decisions": st.decisions, "bad_events": dict(st.bad_events),
            "unknown_assets": dict(st.unknown_assets.most_common(10)), "dropped": st.dropped,
            "audit_failures": st.audit_failures, "recorded_late": st.recorded_late,
            "unrecorded_dropped": st.unrecorded_dropped, "keepalives": st.keepalives,
            "keepalive_failures": st.keepalive_failures,
        }

    async def _statuses(self) -> None:
        failing = False
        while True:
            every = self.cfg.status_interval_s
            await asyncio.sleep(every or 1.0)  # off: look again in a second (a new configuration may turn it on)
            if not every:
                continue
            try:
                await self.client.publish(STATUS_TOPIC, self.status())
                failing = False
            except IpcError as exc:  # e.g. not allowed by the recipe's accessControl: logged, never fatal
                if not failing:
                    log.warning("action.status_not_published", topic=STATUS_TOPIC, error=str(exc))
                failing = True

    async def serve(self, changes: AsyncIterator[ActionConfig] | None = None) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tasks = tg
            for loop in (self._anomalies, self._heartbeats, self._sensors, self._resets, self._ticks,
                         self._keepalives, self._statuses):
                tg.create_task(loop())
            if changes is not None:
                async for cfg in changes:
                    self.reconfigure(cfg)


RESET_KEYS = ("operator", "asset")


@dataclass(slots=True, frozen=True)
class Undecodable:
    """A reset request whose payload could not be decoded."""

    error: str


def _reset_request_problem(asset: str, request: Any) -> str | None:
    """What is wrong with a reset request, or None. A reset releases a brake, so a request that asks for
    something else (one action, another asset, a misspelt operator) is refused, naming the key, rather
    than read as a reset of the whole asset on this topic."""
    if request is None:
        return None
    if isinstance(request, Undecodable):
        return f"the reset request could not be decoded ({request.error[:200]})"
    if not isinstance(request, dict):
        return f"a reset request is a map such as {{\"operator\": \"alice\"}}, not {type(request).__name__}"
    unknown = sorted(str(k) for k in request if k not in RESET_KEYS)
    if unknown:
        return (f"unknown key(s) {unknown} in the reset request (it takes {list(RESET_KEYS)}; a reset is of the "
                f"whole asset {asset!r})")
    operator = request.get("operator")
    if operator is not None and (not isinstance(operator, str) or not operator):
        return f"operator must be a non-empty string, not {operator!r}"[:200]
    if "asset" in request and request["asset"] != asset:
        return f"the request names asset {str(request['asset'])[:64]!r} on the reset topic of {asset!r}"
    return None


def _config_changes(client: Client) -> AsyncIterator[ActionConfig]:
    return config_changes(client, lambda doc: load_config(doc, component_name(COMPONENT)), "action.config_rejected")


AUDIT_RETRY_S = 2.0  # how often an audit log that cannot be opened is tried again


def _audit_path(cfg: ActionConfig, audit_dir: Path | None) -> Path:
    return cfg.audit_path if cfg.audit_path.is_absolute() else (audit_dir or Path.cwd()) / cfg.audit_path


async def _safe_state_unaudited(cfg: ActionConfig, problem: str) -> list[tuple[Decision, list[Outcome]]]:
    """Every asset to its safe state, without a record: the audit log cannot be opened, so neither the
    state the assets were left in (a latch) nor any decision can be kept. Protection comes first; the
    decisions are recorded (and acknowledged) once the log opens."""
    actuator = make_actuator(cfg.actuator)
    reason = f"fail-safe: audit log unavailable ({problem}); the state before is unknown"
    now, wall = time.monotonic(), time.time()
    decisions = [Decision(uuid.uuid4().hex, asset, wall, State.SAFE_STATE, State.NORMAL,
                          cfg.policy.safe_state_actions, (), reason, decided_at=now) for asset in cfg.assets]

    async def act(d: Decision) -> list[Outcome]:
        outcomes = list(await asyncio.gather(*(actuator.execute(ActionRequest(a, d.asset, d.decision_id, d.reason))
                                               for a in d.actions)))
        failed = [f"{o.action}: {o.detail}" for o in outcomes if not o.ok]
        log.error("action.decision", asset=d.asset, decision_id=d.decision_id, state=d.state.value,
                  actions=list(d.actions), reason=d.reason, failed=failed, durable=False)
        return outcomes

    return list(zip(decisions, await asyncio.gather(*(act(d) for d in decisions)), strict=True))


async def _open_audit(client: Client, cfg: ActionConfig, audit_dir: Path | None, watching: bool
                      ) -> tuple[ActionConfig, AuditLog]:
    """The audit log, and the configuration it was opened under.

    A log that cannot be opened (a read-only or full disk, a bad ``auditPath``) must not end the
    component: it would be restarted and end again until BROKEN, with no asset moved to its safe state
    and the cause only in a traceback. Every asset goes to its safe state at once instead (logged as
    ``action.audit_unavailable`` and unaudited decisions), and the log is tried again every
    ``AUDIT_RETRY_S`` seconds under the latest configuration (a deployment may fix ``auditPath``); when
    it opens, those decisions are recorded and acknowledged, and the assets start in ``safe_state``."""
    pending: list[tuple[Decision, list[Outcome]]] | None = None  # the unaudited safe state, once taken
    recorded: list[tuple[Decision, list[Outcome]]] = []
    while True:
        path = _audit_path(cfg, audit_dir)
        audit: AuditLog | None = None
        try:
            audit = AuditLog(path)
            audit.last_states()  # a log that opens but cannot be read (a malformed page) is no log either
            while pending:
                audit.record(*pending[0])
                recorded.append(pending.pop(0))
        except (AuditError, sqlite3.Error) as exc:
            if audit is not None:
                with contextlib.suppress(sqlite3.Error):
                    audit.close()
            if pending is None:
                log.error("action.audit_unavailable", path=str(path), error=str(exc),  # noqa: TRY400
                          assets=list(cfg.assets),
                          note=f"every asset goes to its safe state, unaudited; retrying every {AUDIT_RETRY_S:g} s")
                pending = await _safe_state_unaudited(cfg, str(exc))
            await asyncio.sleep(AUDIT_RETRY_S)
            if watching:
                with contextlib.suppress(ConfigError, IpcError):
                    cfg = load_config(await client.get_configuration(), component_name(COMPONENT))
            continue
        if recorded:
            log.warning("action.audit_recovered", path=str(path), recorded=len(recorded))
        for d, outcomes in recorded:
            payload = d.payload()
            payload["outcomes"] = [{"action": o.action, "ok": o.ok, "detail": o.detail} for o in outcomes]
            payload["timing"] = {"actuated_at": min((o.started_at for o in outcomes), default=d.ts)}
            with contextlib.suppress(IpcError):
                await client.publish(f"actions/{d.asset}", payload)
        return cfg, audit


async def run(client: Client, cfg: ActionConfig | None = None, audit_dir: Path | None = None) -> None:
    """The component. ``cfg`` given: fixed configuration (development against ``ipc.devserver``)."""
    watching = cfg is None
    if cfg is None:
        cfg = load_config(await client.get_configuration(), component_name(COMPONENT))
    cfg, audit = await _open_audit(client, cfg, audit_dir, watching)
    service = ActionService(client, cfg, audit)
    log.info("action.started", assets=list(cfg.assets), audit=str(audit.path), audit_order=cfg.audit_order,
             actuator=cfg.actuator.kind, trigger=cfg.policy.trigger, k=cfg.policy.k, n=cfg.policy.n,
             latch=cfg.policy.latch)
    try:
        await service.serve(_config_changes(client) if watching else None)
    finally:
        service.close()
        audit.close()
