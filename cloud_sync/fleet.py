"""The cloud side of fleet deployments: ``nucleus fleet deploy`` and ``nucleus fleet status``.

A thin MQTT client; the broker (Mosquitto, EMQX, HiveMQ, AWS IoT Core) is the fleet's engine.
``deploy`` reads recipe files, builds a :class:`~cloud_sync.deployment_document.DeploymentDocument`
and publishes it retained with QoS 1 on the target's topic, so devices offline now get it when
they reconnect. Its ``sequence`` is above the one of the document it replaces (read back from the
broker first), so a newer deployment supersedes an older one even if operators' clocks disagree.

``status`` reads the devices' retained deployment status documents
(``nucleus/things/+/deployments/status``) and shows, for the target's current deployment, every
device's state; it can wait until they have all finished. Neither needs a local daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import structlog
from pydantic import ValidationError

from cloud_sync.deployment_document import (
    DeploymentDocument,
    DocumentRejected,
    RecipeText,
    Rollout,
    Target,
    combine_config_updates,
    new_document,
    parse,
    parse_run_with,
    to_request,
)
from cloud_sync.errors import LinkError, SyncError
from cloud_sync.mqtt_session import closed_after_handshake, connect_failure, fail_connect_on_close
from cloud_sync.settings import LinkNames, link_problem, parse_url
from cloud_sync.uplink import ignore_closed_socket_watch, tls_context

STATUS_FILTER = "nucleus/things/+/deployments/status"
DEFAULT_MAX_BYTES = 128 * 1024  # the devices' default max_inbound_bytes
FINAL = frozenset({"SUCCEEDED", "FAILED_NO_STATE_CHANGE", "FAILED_ROLLBACK_COMPLETE", "FAILED_ROLLBACK_NOT_REQUESTED",
                   "FAILED_ROLLBACK_FAILED", "CANCELED", "SUPERSEDED", "REJECTED"})
_RECIPE_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
# Errors name the operator's flags where the device's name its nucleus.yaml keys
FLAGS = LinkNames(url="--broker", ca_file="--ca", cert_file="--cert", key_file="--key", username="--username",
                  password="password")
log = structlog.get_logger("cloud_sync.fleet")
TLS_EOF_ATTEMPTS = 3  # connects tried when a TLS broker closes without a reason (see connect)
PASSWORD_ENV = "NUCLEUS_FLEET_PASSWORD"  # the password out of `ps` and the shell history (or --password-file)


class FleetError(SyncError):
    code = "FLEET_ERROR"


@dataclass(frozen=True, slots=True)
class Broker:
    """How the operator reaches the broker (TLS with a CA and client certificate, or a password)."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    mqtt_version: Literal["5", "3.1.1"] = "5"
    timeout_s: float = 10.0
    password_source: str = "--password"  # where the password came from, as errors name it

    def __post_init__(self) -> None:
        """Refuse what the connection would silently ignore, as the device's settings do for its
        ``mqtt`` section: credentials in the URL (paho never sends them), TLS files with a plain URL
        (the password would go in clear text), a key without its certificate, a password without a
        username (paho sends neither)."""
        problem = link_problem(self.url, (self.ca_file, self.cert_file, self.key_file), self.username,
                               self.password, self.names)
        if problem is not None:
            raise FleetError(problem)

    @property
    def names(self) -> LinkNames:
        """How errors name this connection's settings: the flags, and where the password came from."""
        given = self.password_source if self.password is not None else f"--password-file or {PASSWORD_ENV}"
        return replace(FLAGS, password=f"password ({given})")


@contextlib.asynccontextmanager
async def connect(broker: Broker) -> AsyncIterator[aiomqtt.Client]:
    """A connected client; a failed connect is one LinkError saying why, as the device's link says it
    (the TLS files and certificate checks of cloud_sync.uplink, naming ``--ca/--cert/--key``)."""
    address = parse_url(broker.url)
    tls = tls_context(broker.ca_file, broker.cert_file, broker.key_file, names=FLAGS.tls) if address.tls else None
    v5 = broker.mqtt_version == "5"
    for attempt in range(1, TLS_EOF_ATTEMPTS + 1):
        client = aiomqtt.Client(
            address.host, address.port, identifier=f"nucleus-fleet-{uuid.uuid4().hex[:12]}",
            username=broker.username, password=broker.password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else True, timeout=broker.timeout_s, tls_context=tls)
        fail_connect_on_close(client, log)  # a refused client certificate fails at once, not after the timeout
        try:
            await client.__aenter__()
            break
        except aiomqtt.MqttError as exc:
            if attempt < TLS_EOF_ATTEMPTS and closed_after_handshake(exc, address):
                # The broker's reason (an alert) lost the race with its close: the next attempt
                # usually reads it. The device's link learns it over its retries; this is one run.
                continue
            code, message, fields = connect_failure(exc, address, ca_file=broker.ca_file,
                                                    cert_file=broker.cert_file, username=broker.username,
                                                    names=broker.names)
            raise LinkError(f"broker {address}: {message}", reason=code.lower(), **fields) from exc
    try:
        yield client
    except aiomqtt.MqttError as exc:
        raise LinkError(f"broker {address}: {exc}", reason="broker") from exc
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)


def read_recipes(paths: Sequence[Path | str], *,
                 validate: Callable[[Path], object] | None = None) -> list[RecipeText]:
    """Recipe files, or the ``*.yaml``/``*.yml``/``*.json`` of directories (and their ``recipes/``)."""
    out: list[RecipeText] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(f for d in (path, path / "recipes") if d.is_dir() for f in d.iterdir()
                           if f.is_file() and f.suffix.lower() in _RECIPE_SUFFIXES)
            if not files:
                raise FleetError("no recipe files (*.yaml, *.yml, *.json) in this directory", path=path)
        else:
            raise FleetError("no such file or directory", path=path)
        for f in files:
            if validate is not None:
                validate(f)  # the nucleus's own recipe checks, before anything is published
            fmt: Literal["yaml", "json"] = "json" if f.suffix.lower() == ".json" else "yaml"
            out.append(RecipeText(text=f.read_text(), format=fmt, source=f.name))
    return out


async def _drain_until_ping(client: aiomqtt.Client, on_message: Callable[[aiomqtt.Message], None],
                            timeout_s: float) -> None:
    """Process what the broker has sent so far: retained messages of earlier subscriptions come
    before our own ping on the same connection."""
    ping = f"nucleus/fleet-tool/{uuid.uuid4().hex}"
    await client.subscribe(ping, qos=1)
    await client.publish(ping, b"", qos=1)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            async for m in client.messages:
                if m.topic.value == ping:
                    return
                on_message(m)


def _payload(m: aiomqtt.Message) -> bytes:
    p = m.payload
    return p if isinstance(p, bytes) else bytes(p) if isinstance(p, bytearray) else str(p or "").encode()


async def current_document(client: aiomqtt.Client, target: Target, timeout_s: float = 5.0) -> DeploymentDocument | None:
    """The document the broker holds retained for the target (None if none, or not one of ours)."""
    found: list[bytes] = []
    await client.subscribe(target.topic, qos=1)

    def take(m: aiomqtt.Message) -> None:
        if m.topic.value == target.topic and m.retain:
            found.append(_payload(m))

    await _drain_until_ping(client, take, timeout_s)
    await client.unsubscribe(target.topic)
    if not found or not found[-1]:
        return None
    try:
        return parse(found[-1])
    except DocumentRejected:
        return None


async def publish(broker: Broker, doc: DeploymentDocument, *, max_bytes: int = DEFAULT_MAX_BYTES) -> DeploymentDocument:
    """Publish retained, QoS 1; the sequence is raised above the retained document's if needed."""
    async with connect(broker) as client:
        previous = await current_document(client, doc.target, broker.timeout_s)
        if previous is not None and previous.sequence >= doc.sequence:
            doc = doc.model_copy(update={"sequence": previous.sequence + 1})
        data = doc.encode()
        if len(data) > max_bytes:
            raise FleetError(f"the deployment document is {len(data)} B, over the devices' limit of {max_bytes} B "
                             "(mqtt.max_inbound_bytes): put large files in artifacts, not recipes",
                             size=len(data), limit=max_bytes)
        await client.publish(doc.target.topic, data, qos=1, retain=True, timeout=broker.timeout_s)
    return doc


async def clear(broker: Broker, target: Target) -> None:
    """Remove the retained document (devices that have it keep what they applied)."""
    async with connect(broker) as client:
        await client.publish(target.topic, b"", qos=1, retain=True, timeout=broker.timeout_s)


# --- status -------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class FleetStatus:
    target: Target
    document: DeploymentDocument | None  # the retained (current) document, whichever deployment is shown
    things: dict[str, dict[str, Any]] = field(default_factory=dict)  # thing -> its entry for the deployment shown
    requested: str | None = None  # --deployment: shown instead of the current one

    @property
    def deployment_id(self) -> str | None:
        """The deployment shown: the one asked for, else the current document's."""
        if self.requested is not None:
            return self.requested
        return self.document.deployment_id if self.document is not None else None

    @property
    def is_current(self) -> bool:
        return self.document is not None and self.document.deployment_id == self.deployment_id

    @property
    def known(self) -> bool:
        """Whether anything is known of the deployment shown. A device never reports NOT_RECEIVED itself
        (it is what this side writes for a device without a report of the deployment), so any other
        state is a device's own report."""
        return self.is_current or any(self.state_of(t) != "NOT_RECEIVED" for t in self.things)

    def state_of(self, thing: str) -> str:
        entry = self.things[thing]
        if self.deployment_id is not None and entry.get("deployment_id") != self.deployment_id:
            return "NOT_RECEIVED"  # still on an older deployment (offline, or not there yet)
        return str(entry.get("status"))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for thing in self.things:
            state = self.state_of(thing)
            out[state] = out.get(state, 0) + 1
        return out

    def finished(self) -> list[str]:
        return [t for t in self.things if self.state_of(t) in FINAL]

    def all_succeeded(self, expect: int | None = None) -> bool:
        ok = [t for t in self.things if self.state_of(t) == "SUCCEEDED"]
        return bool(ok) and len(ok) == len(self.things) and (expect is None or len(ok) >= expect)


async def fleet_status(broker: Broker, target: Target, *, deployment_id: str | None = None, wait_s: float = 0.0,
                       expect: int | None = None) -> FleetStatus:
    """Every device's state for the target's current deployment (or ``deployment_id``).

    Waits up to ``wait_s`` until ``expect`` devices (default: every device that reported) have
    finished; with ``wait_s=0`` it is a snapshot of the retained reports. Raises :class:`FleetError`
    for a ``deployment_id`` that is neither the retained document nor reported by any device, rather
    than show every device as NOT_RECEIVED for an id that may be mistyped.
    """
    async with connect(broker) as client:
        doc = await current_document(client, target, broker.timeout_s)
        result = FleetStatus(target, doc, requested=deployment_id)
        wanted = deployment_id

        def take(m: aiomqtt.Message) -> None:
            try:
                report = json.loads(_payload(m))
            except ValueError:
                return
            if not isinstance(report, dict) or not isinstance(report.get("thing"), str):
                return
            entry = (report.get("deployments") or {}).get(target.key)
            member = (target.type == "group" and target.name in (report.get("groups") or [])) or \
                (target.type == "thing" and target.name == report["thing"])
            if entry is None and not member:
                return
            entry = dict(entry or {"status": "NOT_RECEIVED"})
            if wanted is not None and entry.get("deployment_id") != wanted:
                # The same id may have been used for another of the device's groups: match the target too.
                older = [r for r in report.get("recent") or []
                         if r.get("deployment_id") == wanted and r.get("target") == target.key]
                entry = dict(older[0]) if older else {"deployment_id": wanted, "status": "NOT_RECEIVED"}
            result.things[report["thing"]] = {**entry, "reported_at": report.get("ts")}

        await client.subscribe(STATUS_FILTER, qos=1)
        await _drain_until_ping(client, take, broker.timeout_s)
        # Before any wait: devices report only what was retained for them, so an id that is neither the
        # retained document nor in any device's report cannot turn up later. Waiting --wait-s on a
        # mistyped id would only delay the error.
        if deployment_id is not None and not result.known:
            current = f"the current one is {doc.deployment_id}" if doc is not None else "none is retained"
            raise FleetError(f"deployment {deployment_id} is unknown for {target.type} {target.name}: it is not "
                             f"the retained document ({current}) and no device has reported it")
        deadline = time.monotonic() + wait_s

        def done() -> bool:
            finished = len(result.finished())
            return finished >= expect if expect is not None else bool(result.things) and finished == len(result.things)

        while not done() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline - time.monotonic()):
                    async for m in client.messages:
                        take(m)
                        if done():
                            break
    return result


def _heading(status: FleetStatus) -> str:
    """What the table is about: the current document, or the deployment asked for, said as such."""
    doc, where = status.document, f"{status.target.type} {status.target.name}"
    if status.is_current and doc is not None:
        names = ", ".join(f"{n} {v}" for n, v in doc.components.items()) or "no components"
        return f"{where}: deployment {doc.deployment_id} (sequence {doc.sequence}, {names})"
    if status.requested is not None:
        current = f"the current one is {doc.deployment_id}" if doc is not None else "no document is retained"
        return f"{where}: deployment {status.requested} (not the current deployment: {current})"
    return f"{where}: no current deployment document"


def format_status(status: FleetStatus) -> str:
    """The operator's table. REASON is last and printed whole, on the device's line (line breaks in it
    folded), because the reason is why a device failed: a cut one sends the operator to --json."""
    head = _heading(status)
    rows = [[t, status.state_of(t), str(e.get("deployment_id") or "-"),
             time.strftime("%H:%M:%S", time.localtime(e["ts"])) if e.get("ts") else "-",
             " ".join(str(e.get("reason") or "").split())] for t, e in sorted(status.things.items())]
    if not rows:
        return head + "\nno device has reported"
    header = ["THING", "STATE", "DEPLOYMENT", "UPDATED", "REASON"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    summary = ", ".join(f"{k} {v}" for k, v in sorted(status.counts().items()))
    return "\n".join([head, *lines, f"{len(rows)} device(s): {summary}"])


# --- the command line (wired into `nucleus fleet`) ---------------------------------------------------------------
def _broker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, metavar="URL", help="mqtt://host[:1883] or mqtts://host[:8883]")
    p.add_argument("--username")
    p.add_argument("--password-file", metavar="FILE",
                   help=f"the password is the file's one line (or set ${PASSWORD_ENV})")
    p.add_argument("--password", help="visible in `ps` and the shell history: prefer --password-file or "
                   f"${PASSWORD_ENV}")
    p.add_argument("--ca", metavar="FILE", help="CA certificate of the broker")
    p.add_argument("--cert", metavar="FILE", help="client certificate")
    p.add_argument("--key", metavar="FILE", help="client key")
    p.add_argument("--mqtt-version", choices=["5", "3.1.1"], default="5")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--group", help="thing group: every device with it in thing_groups")
    group.add_argument("--thing", help="one device (its thing name)")


def _broker(args: argparse.Namespace) -> Broker:
    password, source = _password(args)
    return Broker(args.broker, args.username, password, Path(args.ca) if args.ca else None,
                  Path(args.cert) if args.cert else None, Path(args.key) if args.key else None, args.mqtt_version,
                  password_source=source)


def _password(args: argparse.Namespace) -> tuple[str | None, str]:
    """(the password, where it came from): --password-file or --password, else $NUCLEUS_FLEET_PASSWORD.

    A flag wins over the environment, as an explicit choice over an ambient one. --password still
    works (scripts use it) but says why not to: any user sees it in `ps`, and it stays in the history.
    """
    if args.password_file is not None and args.password is not None:
        raise FleetError("give the password once: --password-file or --password, not both")
    if args.password_file is not None:
        return read_password_file(Path(args.password_file)), "--password-file"
    if args.password is not None:
        print(f"nucleus fleet: warning: --password is visible to other users in `ps` and stays in the shell "
              f"history: use --password-file FILE or {PASSWORD_ENV}", file=sys.stderr)
        return args.password, "--password"
    return os.environ.get(PASSWORD_ENV) or None, PASSWORD_ENV


def read_password_file(path: Path) -> str:
    """The file's one line, without its line break (``echo pw > FILE`` and editors add one).

    A file of several lines is refused rather than guessed at: it is likely not the password file
    (a certificate, a key). Nothing of the content is ever printed.
    """
    try:
        text = path.read_bytes().decode()
    except OSError as exc:
        raise FleetError(f"--password-file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise FleetError(f"--password-file {path}: not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise FleetError(f"--password-file {path}: empty")
    if "\n" in text or "\r" in text:
        raise FleetError(f"--password-file {path}: more than one line (the file holds the password alone)")
    return text


def _target(args: argparse.Namespace) -> Target:
    try:
        return Target(type="group", name=args.group) if args.group else Target(type="thing", name=args.thing)
    except ValueError as exc:
        raise FleetError(f"--group/--thing: {exc}") from exc


def _config_updates(texts: list[str] | None) -> dict[str, Any]:
    try:
        return combine_config_updates(texts)
    except ValueError as exc:
        raise FleetError(f"--update-config: {exc}") from exc


def _run_with(texts: list[str] | None) -> dict[str, Any]:
    try:
        return parse_run_with(texts)
    except ValueError as exc:
        raise FleetError(f"--run-with: {exc}") from exc


def document_from_args(args: argparse.Namespace, *,
                       validate: Callable[[Path], object] | None = None) -> DeploymentDocument:
    roots = read_recipes(args.paths, validate=validate)
    extra = read_recipes(args.recipe_dir or [], validate=validate)
    if (args.rollout_rate is None) != (args.expected_devices is None):
        raise FleetError("--rollout-rate needs --expected-devices (the window is devices / rate)")
    rollout = Rollout(window_s=args.rollout_window, max_per_minute=args.rollout_rate,
                      expected_devices=args.expected_devices)
    base = new_document(roots, target=_target(args))
    fields: dict[str, Any] = {
        "artifacts_base_url": args.artifacts_url, "failure_policy": args.failure_policy.upper().replace("-", "_"),
        "timeout_s": args.timeout, "settle_time_s": args.settle, "rollout": rollout,
        "config_updates": _config_updates(args.update_config), "run_with": _run_with(args.run_with)}
    try:
        doc = new_document([*roots, *extra], target=base.target, components=base.components,
                           deployment_id=args.deployment_id, **fields)
    except ValidationError as exc:  # one line per problem, named by its field (pydantic's own text spans lines)
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise FleetError(f"invalid deployment: {problems}") from exc
    except ValueError as exc:
        raise FleetError(f"invalid deployment: {exc}") from exc
    try:  # the checks every device makes before it changes anything: refuse here, not on every device
        to_request(doc)
    except DocumentRejected as exc:
        hint = (" (a fleet artifact needs `Digest: <base64 SHA-256>` and `Algorithm: SHA-256`; "
                "`openssl dgst -sha256 -binary FILE | base64` gives the digest)" if exc.reason == "BAD_DIGEST" else "")
        raise FleetError(f"devices would reject this deployment, {exc.reason}: {exc.message}{hint}") from exc
    return doc


async def cmd_deploy(args: argparse.Namespace) -> int:
    doc = document_from_args(args, validate=args.validate_recipe)
    if args.dry_run:
        print(json.dumps(json.loads(doc.encode()), indent=2))  # as published: runWith inside components
        return 0
    broker = _broker(args)
    doc = await publish(broker, doc, max_bytes=args.max_bytes)
    names = ", ".join(f"{n} {v}" for n, v in doc.components.items()) or "no components"
    print(f"deployment {doc.deployment_id}: {names}")
    print(f"  published retained to {doc.target.topic} (sequence {doc.sequence}, {len(doc.encode())} B)")
    print("\n".join(follow_hint(args, broker, doc.target)))
    return 0


def follow_hint(args: argparse.Namespace, broker: Broker, target: Target) -> list[str]:
    """The ``nucleus fleet status`` line printed after a deploy, with the connection flags the deploy
    was given: copied, it reaches the same broker the same way (without them it failed against a TLS
    or password broker). The password itself is never printed; where it is not in a file, a note
    says how to give it."""
    words = ["nucleus", "fleet", "status", "--broker", args.broker]
    for flag, value in (("--ca", args.ca), ("--cert", args.cert), ("--key", args.key),
                        ("--username", args.username), ("--password-file", args.password_file)):
        if value is not None:
            words += [flag, value]
    if args.mqtt_version != "5":
        words += ["--mqtt-version", args.mqtt_version]
    lines = [f"  follow it with: {shlex.join([*words, f'--{target.type}', target.name, '--wait-s', '120'])}"]
    if broker.password is not None and broker.password_source == "--password":
        lines.append(f"    with the password in {PASSWORD_ENV} or --password-file FILE (it is not printed)")
    elif broker.password is not None and broker.password_source == PASSWORD_ENV:
        lines.append(f"    with {PASSWORD_ENV} set, as for this deploy")
    return lines


async def cmd_status(args: argparse.Namespace) -> int:
    status = await fleet_status(_broker(args), _target(args), deployment_id=args.deployment, wait_s=args.wait_s,
                                expect=args.expect)
    if args.json:
        print(json.dumps({"target": status.target.model_dump(), "deployment_id": status.deployment_id,
                          "things": {t: {**e, "state": status.state_of(t)} for t, e in status.things.items()},
                          "counts": status.counts()}, indent=2, default=str))
    else:
        print(format_status(status))
    reported = len(status.things)
    if args.expect is not None and reported < args.expect:
        print(f"expected {args.expect} device(s), {reported} reported", file=sys.stderr)
    return 0 if status.all_succeeded(args.expect) else 1


async def cmd_clear(args: argparse.Namespace) -> int:
    target = _target(args)
    await clear(_broker(args), target)
    print(f"cleared the retained deployment on {target.topic}")
    return 0


def build_parser(validate_recipe: Callable[[Path], object] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nucleus fleet",
                                     description="Fleet deployments through an MQTT broker (no local daemon needed).")
    fsub = parser.add_subparsers(dest="fleet_command", required=True)

    d = fsub.add_parser("deploy", help="publish a deployment for a thing group (retained, QoS 1)")
    d.add_argument("paths", nargs="+", metavar="RECIPE_OR_DIR", help="root components: the highest version per name")
    _broker_args(d)
    d.add_argument("--artifacts-url", metavar="BASE",
                   help="devices fetch non-http artifacts from BASE/<component>/<version>/<file>")
    d.add_argument("--recipe-dir", action="append", metavar="DIR", help="more recipes (dependencies), not roots")
    d.add_argument("--update-config", action="append", metavar="JSON",
                   help='{"Name": {"MERGE": {...}, "RESET": ["/ptr"]}} or @file; may be given again for other '
                   "components")
    d.add_argument("--run-with", action="append", metavar="NAME:FIELD=VALUE",
                   help="Greengrass runWith of a root component, as `nucleus deploy --run-with`: posixUser, memory "
                   "(KB), cpus (the limits given replace the old ones as a whole); NAME:posixUser= and "
                   "NAME:systemResourceLimits= clear them on the devices; or JSON / @file")
    d.add_argument("--failure-policy", choices=["rollback", "do-nothing"], default="rollback")
    d.add_argument("--timeout", type=float, metavar="S", help="device-side deployment timeout")
    d.add_argument("--settle", type=float, metavar="S", help="seconds RUNNING before success")
    d.add_argument("--rollout-window", type=float, metavar="S", help="spread the starts over S seconds")
    d.add_argument("--rollout-rate", type=float, metavar="PER_MIN", help="devices per minute (with --expected-devices)")
    d.add_argument("--expected-devices", type=int, metavar="N")
    d.add_argument("--deployment-id", help="default: a new UUID")
    d.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="refuse larger documents")
    d.add_argument("--dry-run", action="store_true", help="print the document, publish nothing")
    d.set_defaults(func=cmd_deploy, validate_recipe=validate_recipe)

    s = fsub.add_parser("status", help="every device's state for the current deployment of a group")
    _broker_args(s)
    s.add_argument("--deployment", metavar="ID", help="a specific deployment (default: the retained one)")
    s.add_argument("--wait-s", type=float, default=0.0, metavar="S", help="wait until every device has finished")
    s.add_argument("--expect", type=int, metavar="N", help="wait for N devices (and require N SUCCEEDED)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    c = fsub.add_parser("clear", help="remove the retained deployment document of a group or thing")
    _broker_args(c)
    c.set_defaults(func=cmd_clear)
    return parser


def main(argv: Sequence[str] | None = None, *, validate_recipe: Callable[[Path], object] | None = None) -> int:
    """``nucleus fleet ...``: 0 on success; 1 on an error (one line on stderr) or, for ``status``,
    unless every device reported SUCCEEDED for the current deployment."""
    args = build_parser(validate_recipe).parse_args(argv)
    try:
        return run(args.func(args))
    except SyncError as exc:
        where = f" ({exc.path})" if exc.path and exc.path not in exc.message else ""
        print(f"nucleus fleet: {exc.message}{where}", file=sys.stderr)
        return 1


def run(command: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run`` for a fleet command, with the uplink's closed-socket handler on the loop."""
    async def guarded() -> int:
        ignore_closed_socket_watch(asyncio.get_running_loop())
        return int(await command)

    return asyncio.run(guarded())
