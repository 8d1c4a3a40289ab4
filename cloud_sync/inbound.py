"""Fleet deployments, device side: documents from the broker → the nucleus's deployment engine.

The device subscribes to ``nucleus/things/<thing>/deployments`` and
``nucleus/groups/<group>/deployments`` for each of its thing groups. Documents are published
retained (and the session is persistent), so a device that was offline gets the newest one when it
reconnects. Each document is checked before anything changes (:mod:`cloud_sync.deployment_document`);
a refused one is reported as ``REJECTED`` with the reason on the deployment status topic, in the
device status errors and in the log.

cloud_sync does not import nucleus: the daemon hands over ``submit(request) -> deployment id`` (the
same engine as ``nucleus deploy``), optionally ``lookup(deployment id) -> summary | None`` (the
journal), and calls :meth:`FleetDeployments.deployment_changed` from the engine's listener.

Rules, per target (the thing, or one group):

* A deployment id is applied at most once: every id seen is kept in a small state file next to the
  spool (written atomically, fsynced), and the journal is asked before submitting. A retained
  document delivered again on every reconnect, or after a restart, is recognised and ignored.
* A higher ``sequence`` supersedes a lower one. A deployment that has not been handed to the
  engine yet (waiting for its rollout slot, or behind another fleet deployment) is skipped and
  reported ``SUPERSEDED``; an older document arriving late is reported ``SUPERSEDED`` too.
  Once handed to the engine a deployment runs to its end.
* Fleet deployments reach the engine one at a time, so ``remove`` can be computed: a group's new
  document lists its complete set of root components, and what the group's last applied
  deployment had but this one does not is removed.
* The start waits for the deployment's rollout slot (:func:`deployment_document.start_delay`).

Status reports (retained, QoS 1, not spooled) go to ``nucleus/things/<thing>/deployments/status``::

    {"thing": "dev-1", "groups": ["turbines"], "ts": ..., "seq": 7,
     "deployments": {"thinggroup/turbines": {"deployment_id": "...", "sequence": 1732450000123,
                     "status": "SUCCEEDED", "reason": null, "ts": ..., "components": {"A": "1.0.0"}}},
     "recent": [{"deployment_id": "...", "target": "thinggroup/turbines", "status": "SUPERSEDED", ...}],
     "errors": [{"ts": ..., "code": "BAD_DIGEST", "message": "...", "topic": "..."}]}
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cloud_sync import deployment_document as dd
from cloud_sync.deployment_document import DeploymentDocument, DocumentRejected
from cloud_sync.uplink import ERRORS_KEPT, Uplink

log = structlog.get_logger("cloud_sync.inbound")

Submit = Callable[[dict[str, Any]], str]
Lookup = Callable[[str], "dict[str, Any] | None"]

QUEUED = "QUEUED"
IN_PROGRESS = "IN_PROGRESS"
SUPERSEDED = "SUPERSEDED"
REJECTED = "REJECTED"
CANCELED = "CANCELED"  # the operator cleared the target's document before the deployment started
APPLIED = frozenset({"SUCCEEDED", "FAILED_ROLLBACK_NOT_REQUESTED"})  # the deployment's set is now active
UNFINISHED = frozenset({QUEUED, IN_PROGRESS})
STATE_VERSION = 1
KEEP_DEPLOYMENTS = 256
KEEP_REJECTED_DIGESTS = 64
REJECTED_SAVE_DELAY_S = 2.0  # refusals are written at most this often (one fsync for a flood of bad documents)
_PRIVATE = ("submitted", "digest")  # kept in the state file, not reported


@dataclass(slots=True)
class _Pending:
    doc: DeploymentDocument
    start_at: float  # monotonic


class FleetDeployments:
    def __init__(self, uplink: Uplink, *, thing_name: str, thing_groups: Sequence[str], state_path: Path,
                 on_error: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._uplink = uplink
        self._thing = thing_name
        self._groups = list(dict.fromkeys(thing_groups))
        self._path = state_path
        self._on_error = on_error
        self._clock = clock
        self._submit: Submit | None = None
        self._lookup: Lookup | None = None
        self._pending: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._rejected_digests: deque[str] = deque(maxlen=KEEP_REJECTED_DIGESTS)
        self._unsaved_since: float | None = None  # monotonic time of the oldest refusal not yet written
        self._seq = itertools.count(1)
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_KEPT)
        self.counters = {"received": 0, "duplicates": 0, "rejected": 0, "superseded": 0, "submitted": 0,
                         "cleared": 0}
        self.status_topic = dd.STATUS_TOPIC.format(thing=thing_name)
        self.topics = [dd.THING_TOPIC.format(thing=thing_name),
                       *(dd.GROUP_TOPIC.format(group=g) for g in self._groups)]
        self._targets: dict[str, dict[str, Any]] = {}
        self._deployments: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._load()

    # --- wiring ------------------------------------------------------------------------------------------
    def attach(self, submit: Submit, lookup: Lookup | None = None) -> None:
        """The daemon's engine: submit(request) -> id; lookup(id) -> journal summary or None."""
        self._submit = submit
        self._lookup = lookup
        self._wake.set()

    def deployment_changed(self, deployment_id: str, summary: dict[str, Any]) -> None:
        """The engine's listener: called on every status change of any deployment."""
        entry = self._deployments.get(deployment_id)
        if entry is None or not entry.get("submitted"):
            return
        status = str(summary.get("status"))
        if status == QUEUED or (status == entry["status"] and summary.get("reason") == entry.get("reason")):
            return
        entry.update(status=status, reason=summary.get("reason"), ts=self._clock())
        if status in APPLIED:
            self._targets.setdefault(entry["target"], {})["applied"] = dict(entry["components"])
        log.info("fleet.deployment_status", deployment_id=deployment_id, target=entry["target"], status=status,
                 reason=entry.get("reason"))
        self._changed()
        self._wake.set()

    # --- state ---------------------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("fleet.state_unreadable", path=str(self._path), error=str(exc))  # noqa: TRY400
            return
        if isinstance(data, dict) and data.get("v") == STATE_VERSION:
            self._targets = dict(data.get("targets") or {})
            self._deployments = OrderedDict(data.get("deployments") or {})
            # The broker hands a retained document over again after every restart: one refused before
            # stays refused without a second report, error and log line.
            self._rejected_digests.extend(e["digest"] for e in self._deployments.values()
                                          if e.get("status") == REJECTED and isinstance(e.get("digest"), str))

    def _trim(self) -> None:
        """Keep KEEP_DEPLOYMENTS records: refused documents go first, so that a flood of bad ones
        cannot push out what the targets applied (their status would vanish from the reports)."""
        while len(self._deployments) > KEEP_DEPLOYMENTS:
            finished = [k for k, v in self._deployments.items() if v["status"] not in UNFINISHED]
            if not finished:
                break
            del self._deployments[next((k for k in finished if self._deployments[k]["status"] == REJECTED),
                                       finished[0])]

    def _save(self) -> None:
        self._unsaved_since = None
        self._trim()
        data = json.dumps({"v": STATE_VERSION, "targets": self._targets, "deployments": self._deployments},
                          default=str).encode()
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self._path)
            dfd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            self._error("STATE_WRITE_FAILED", f"cannot record fleet deployments in {self._path}: {exc}",
                        path=str(self._path))

    def _changed(self) -> None:
        self._save()
        self._report()

    # --- status ---------------------------------------------------------------------------------------------
    def _latest(self) -> dict[str, Any]:
        latest: dict[str, Any] = {}
        for key, target in self._targets.items():
            last = target.get("last")
            if isinstance(last, str) and last in self._deployments:
                entry = self._deployments[last]
                latest[key] = {"deployment_id": last, **{k: v for k, v in entry.items() if k not in _PRIVATE}}
        return latest

    def _recent(self, n: int = 10) -> list[dict[str, Any]]:
        """The last deployments seen, any target (a superseded or stale one shows here)."""
        items = list(self._deployments.items())[-n:]
        return [{"deployment_id": i, **{k: v for k, v in e.items() if k not in (*_PRIVATE, "components")}}
                for i, e in reversed(items)]

    def status_document(self) -> dict[str, Any]:
        return {"thing": self._thing, "groups": self._groups, "ts": self._clock(), "seq": next(self._seq),
                "deployments": self._latest(), "recent": self._recent(), "errors": list(self.errors)}

    def summary(self) -> dict[str, Any]:
        """For the device status document: the latest deployment per target."""
        return {"topics": self.topics, "deployments": self._latest(),
                "pending": sorted(p.doc.deployment_id for p in self._pending.values()), **self.counters}

    def _report(self) -> None:
        self._uplink.publish_latest(self.status_topic, json.dumps(self.status_document(), default=str).encode())

    def _error(self, code: str, message: str, **fields: Any) -> None:
        entry = {"ts": self._clock(), "code": code, "message": message, **fields}
        self.errors.append(entry)
        if self._on_error is not None:
            self._on_error({**entry, "code": "DEPLOYMENT_REJECTED" if code != "STATE_WRITE_FAILED" else code,
                            "reason": code})

    def _record(self, deployment_id: str, key: str, *, status: str, reason: str | None, sequence: int | None,
                components: dict[str, str], latest: bool = True, digest: str | None = None) -> None:
        self._deployments[deployment_id] = {"target": key, "sequence": sequence, "status": status, "reason": reason,
                                            "ts": self._clock(), "components": components, "submitted": False,
                                            "digest": digest}
        self._deployments.move_to_end(deployment_id)
        if latest:
            self._targets.setdefault(key, {})["last"] = deployment_id

    def reject(self, topic: str, code: str, message: str, *, deployment_id: str | None = None,
               payload: bytes | None = None, record: bool = True) -> None:
        """A document refused before anything changed: REJECTED on the status topic, an error, a log line."""
        if payload is not None:
            digest = hashlib.sha256(payload).hexdigest()
            if digest in self._rejected_digests:  # the same retained document again (reconnect)
                return
            self._rejected_digests.append(digest)
        self.counters["rejected"] += 1
        target = dd.target_of_topic(topic)
        key = target.key if target is not None else topic
        did = deployment_id or f"rejected:{hashlib.sha256(payload or topic.encode()).hexdigest()[:16]}"
        log.error("fleet.deployment_rejected", topic=topic, deployment_id=did, code=code, error=message)
        self._error(code, message, topic=topic, deployment_id=did)
        if not record or (deployment_id is not None
                          and self._deployments.get(deployment_id, {}).get("status") not in (None, REJECTED)):
            self._report()  # never overwrite what a real deployment with this id did
            return
        self._record(did, key, status=REJECTED, reason=f"{code}: {message}", sequence=None, components={},
                     digest=hashlib.sha256(payload).hexdigest() if payload is not None else None)
        # Reported at once, written a little later: a refusal changes nothing on the device, and a flood
        # of bad documents must not cost an fsync each in the event loop. Written it is, so that the
        # retained copy the broker sends after a restart is known (see _load).
        self._trim()
        self._report()
        if self._unsaved_since is None:
            self._unsaved_since = time.monotonic()
            self._wake.set()

    def inbound_dropped(self, entry: dict[str, Any]) -> None:
        """The uplink dropped a cloud message (oversized); report it if it was one of ours."""
        topic = entry.get("topic")
        if isinstance(topic, str) and topic in self.topics:
            self.reject(topic, "OVERSIZED", str(entry.get("message")))

    # --- receiving --------------------------------------------------------------------------------------------
    def receive(self, topic: str, payload: bytes) -> None:
        """One document from the broker: check it, then queue, supersede, or ignore it."""
        self.counters["received"] += 1
        if not payload:  # MQTT's "retained message removed" (`nucleus fleet clear`), not a document
            self._cleared(topic)
            return
        try:
            doc = dd.parse(payload)
        except DocumentRejected as exc:
            self.reject(topic, exc.reason or "SCHEMA", exc.message, payload=payload)
            return
        did, key = doc.deployment_id, doc.target.key
        digest = hashlib.sha256(payload).hexdigest()
        known = self._deployments.get(did)
        if known is not None and known.get("digest") not in (None, digest):
            # An id names one document: another one under it is never applied (nor silently dropped).
            self.reject(topic, "DUPLICATE_ID", f"deployment id {did} was already used by another document "
                        f"({known['status']}); nothing of this one is applied: publish it with a new id",
                        deployment_id=did, payload=payload, record=False)
            return
        if known is not None and (known["submitted"] or known["status"] not in UNFINISHED
                                  or did in {p.doc.deployment_id for p in self._pending.values()}):
            self.counters["duplicates"] += 1
            log.debug("fleet.deployment_known", deployment_id=did, status=known["status"])
            return
        try:
            dd.check_target(doc, topic=topic, thing=self._thing, groups=self._groups)
            dd.to_request(doc)  # every check the device can make before anything changes
        except DocumentRejected as exc:
            self.reject(topic, exc.reason or "SCHEMA", exc.message, deployment_id=did, payload=payload)
            return
        target = self._targets.setdefault(key, {})
        newest = target.get("sequence")
        if known is None and newest is not None and doc.sequence <= newest:
            self.counters["superseded"] += 1
            reason = f"older than deployment {target.get('accepted')} (sequence {doc.sequence} <= {newest})"
            log.warning("fleet.deployment_superseded", deployment_id=did, target=key, reason=reason)
            self._record(did, key, status=SUPERSEDED, reason=reason, sequence=doc.sequence,
                         components=doc.components, latest=False, digest=digest)
            self._changed()
            return
        # Accepted: everything of this target not handed to the engine yet is superseded.
        for other_id, entry in self._deployments.items():
            if entry["target"] == key and other_id != did and entry["status"] == QUEUED and not entry["submitted"]:
                self.counters["superseded"] += 1
                entry.update(status=SUPERSEDED, reason=f"superseded by {did} before it started", ts=self._clock())
                log.info("fleet.deployment_superseded", deployment_id=other_id, target=key, by=did)
        self._pending.pop(key, None)
        target.update(sequence=max(doc.sequence, newest or 0), accepted=did)
        delay = dd.start_delay(doc, self._thing, self._clock())
        self._pending[key] = _Pending(doc, time.monotonic() + delay)
        self._record(did, key, status=QUEUED, sequence=doc.sequence, components=doc.components, digest=digest,
                     reason=f"starts in {delay:.1f} s (rollout window)" if delay > 0 else None)
        log.info("fleet.deployment_accepted", deployment_id=did, target=key, sequence=doc.sequence,
                 start_delay_s=round(delay, 3))
        self._changed()
        self._wake.set()

    def _cleared(self, topic: str) -> None:
        """The operator removed the target's retained document. What was applied stays (as when a
        Greengrass deployment is canceled after it reached the device); a deployment still waiting for
        its rollout slot is withdrawn and reported ``CANCELED``; one handed to the engine runs to its end."""
        self.counters["cleared"] += 1
        target = dd.target_of_topic(topic)
        key = target.key if target is not None else topic
        pending = self._pending.pop(key, None)
        log.info("fleet.deployment_document_cleared", topic=topic, target=key,
                 canceled=pending.doc.deployment_id if pending is not None else None)
        if pending is None:
            return
        entry = self._deployments.get(pending.doc.deployment_id)
        if entry is not None:
            entry.update(status=CANCELED, reason="the deployment document was cleared before it started",
                         ts=self._clock())
        self._changed()

    # --- handing over to the engine ---------------------------------------------------------------------------
    def _in_flight(self) -> str | None:
        return next((i for i, e in self._deployments.items() if e["submitted"] and e["status"] in UNFINISHED), None)

    def _refresh_from_journal(self) -> None:
        """After a restart: deployments handed over before it finished or failed in the meantime."""
        if self._lookup is None:
            return
        for did, entry in list(self._deployments.items()):
            if entry["submitted"] and entry["status"] in UNFINISHED:
                summary = self._lookup(did)
                if summary is None:
                    entry.update(status="FAILED_NO_STATE_CHANGE", reason="the nucleus has no record of it")
                    self._changed()
                else:
                    self.deployment_changed(did, summary)

    def _hand_over(self, pending: _Pending) -> None:
        assert self._submit is not None
        doc = pending.doc
        did, key = doc.deployment_id, doc.target.key
        del self._pending[key]
        entry = self._deployments[did]
        if self._lookup is not None:
            summary = self._lookup(did)
            if summary is not None:  # handed over before a crash: never twice
                entry["submitted"] = True
                self.deployment_changed(did, summary)
                return
        applied = self._targets.get(key, {}).get("applied") or {}
        try:
            request = dd.to_request(doc, remove=list(applied))
            self._submit(request)
        except DocumentRejected as exc:
            self.counters["rejected"] += 1
            entry.update(status=REJECTED, reason=f"{exc.reason}: {exc.message}")
            self._error(exc.reason or "SCHEMA", exc.message, deployment_id=did, topic=doc.target.topic)
            self._changed()
            return
        except Exception as exc:  # the engine refused the request (recipe errors name the field)
            self.counters["rejected"] += 1
            entry.update(status=REJECTED, reason=f"ENGINE_REFUSED: {exc}")
            self._error("ENGINE_REFUSED", str(exc), deployment_id=did, topic=doc.target.topic)
            log.error("fleet.deployment_refused", deployment_id=did, error=str(exc))  # noqa: TRY400
            self._changed()
            return
        self.counters["submitted"] += 1
        entry.update(submitted=True, ts=self._clock())
        log.info("fleet.deployment_submitted", deployment_id=did, target=key, remove=sorted(applied))
        self._save()

    async def _work(self) -> None:
        self._refresh_from_journal()
        while True:
            self._wake.clear()
            timeout: float | None = None
            if self._unsaved_since is not None:
                timeout = self._unsaved_since + REJECTED_SAVE_DELAY_S - time.monotonic()
                if timeout <= 0:
                    self._save()
                    continue
            if self._submit is not None and self._in_flight() is None and self._pending:
                first = min(self._pending.values(), key=lambda p: p.start_at)
                start_in = first.start_at - time.monotonic()
                if start_in <= 0:
                    self._hand_over(first)
                    continue
                timeout = start_in if timeout is None else min(timeout, start_in)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _listen(self, topic: str) -> None:
        async with self._uplink.subscribe(topic, queue_size=64, keep_on_broker=True) as messages:
            async for message, dropped in messages:
                if dropped:
                    log.warning("fleet.documents_dropped", topic=topic, count=dropped)
                try:
                    self.receive(message.topic, message.payload)
                except Exception as exc:  # one message must never end the subscription (nor go unreported)
                    log.exception("fleet.document_check_failed", topic=message.topic)
                    with contextlib.suppress(Exception):
                        self.reject(message.topic, "CHECK_FAILED", f"the device could not check this document: "
                                    f"{type(exc).__name__}: {exc}"[:500], payload=message.payload)

    async def run(self) -> None:
        """Subscribe to the deployment topics and hand documents to the engine, until cancelled."""
        self._report()
        log.info("fleet.listening", topics=self.topics, status_topic=self.status_topic)
        try:
            async with asyncio.TaskGroup() as tg:
                for topic in self.topics:
                    tg.create_task(self._listen(topic), name=f"fleet {topic}")
                tg.create_task(self._work(), name="fleet worker")
        finally:
            if self._unsaved_since is not None:  # a refusal not written yet: a stop must not forget it
                self._save()
