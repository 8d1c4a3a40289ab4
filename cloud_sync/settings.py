"""Settings of the cloud link and the spool: one pydantic model, documented in docs/cloud-sync.md.

The daemon's ``mqtt`` settings section is read into this model by :meth:`SyncSettings.from_section`,
which takes every key this model knows from any pydantic model or mapping, so the nucleus can
grow its section (or embed this model) without cloud_sync importing nucleus.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cloud_sync.errors import LinkError

MiB = 1024 * 1024
KiB = 1024

Overflow = Literal["drop_lowest_priority", "drop_oldest", "reject_new"]
TLS_FILES = ("ca_file", "cert_file", "key_file")


@dataclass(frozen=True, slots=True)
class LinkNames:
    """What an error calls each part of the link: the device's nucleus.yaml keys by default, or a
    command line's flags (``nucleus fleet``), so that both say which of their own settings to fix."""

    url: str = "mqtt.url"
    ca_file: str = "mqtt.ca_file"
    cert_file: str = "mqtt.cert_file"
    key_file: str = "mqtt.key_file"
    username: str = "mqtt.username"
    password: str = "mqtt.password"

    @property
    def tls(self) -> tuple[str, str, str]:
        """(CA of the broker, client certificate, its key), as ``uplink.tls_context`` takes them."""
        return self.ca_file, self.cert_file, self.key_file


SETTINGS_NAMES = LinkNames()


def link_problem(url: str | None, tls_files: tuple[object | None, object | None, object | None],
                 username: str | None, password: str | None, names: LinkNames = SETTINGS_NAMES) -> str | None:
    """Why these link settings would be silently ignored when connecting, or None. One rule for the
    device's settings and the operator's flags: credentials in the URL are never sent (and would be
    echoed), TLS files with a plain URL leave the password in clear text, a key without its
    certificate and a password without a user name are never sent."""
    _, cert_file, key_file = tls_files
    if key_file is not None and cert_file is None:
        return f"{names.key_file} is set without {names.cert_file}: the client certificate goes in {names.cert_file}"
    if password is not None and username is None:
        return f"{names.password} is set without {names.username}: MQTT sends a password only with a user name"
    if url is None:
        return None
    if "@" in urlsplit(url).netloc:  # the URL is not echoed: it holds a password
        return (f"{names.url} must not carry credentials (user:password@): give {names.username} and "
                f"{names.password} instead")
    try:
        address = parse_url(url)
    except LinkError as exc:
        return exc.message
    given = [name for name, path in zip(names.tls, tls_files, strict=True) if path is not None]
    if given and not address.tls:
        return f"{', '.join(given)} set but {names.url} {url} is not TLS: use mqtts://"
    return None


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (1883) or ``mqtts://host[:port]`` (8883; also ``ssl://``, ``tls://``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in {"mqtt", "tcp", "mqtts", "ssl", "tls"} or not parts.hostname:
        raise LinkError(f"broker url {url!r} must be mqtt://host[:port] or mqtts://host[:port]", reason="bad_url")
    tls = scheme in {"mqtts", "ssl", "tls"}
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise LinkError(f"broker url {url!r}: bad port", reason="bad_url") from exc
    return BrokerAddress(parts.hostname, port, tls)


def check_topic_template(template: str, fields: tuple[str, ...]) -> str:
    """A topic to publish to, with ``{name}`` fields: only the given names, and no MQTT wildcard or
    empty topic (a broker refuses to take a PUBLISH on ``a/+/b``, so every message would fail)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a topic template ({exc})") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in fields:
            raise ValueError(f"unknown field {{{name}}}: the fields are {', '.join('{' + f + '}' for f in fields)}")
        if spec or conversion:
            raise ValueError(f"{{{name}}} takes no conversion or format")
    literal = template.format(**dict.fromkeys(fields, "x"))
    if not literal or "+" in literal or "#" in literal:
        raise ValueError("must be a topic to publish to: not empty, without the wildcards + and #")
    return template


def check_topic_filter(value: str) -> str:
    """An MQTT topic filter: '+' and '#' only as whole levels, '#' only last."""
    levels = value.split("/")
    if not value or any(("+" in lv and lv != "+") or ("#" in lv and lv != "#") for lv in levels) or \
            "#" in levels[:-1]:
        raise ValueError("must be an MQTT topic filter: not empty, + and # only as whole levels, # only last")
    return value


class ForwardRule(BaseModel):
    """Forward local bus messages matching ``filter`` to the cloud (bus → spool → broker)."""

    model_config = ConfigDict(extra="forbid")

    filter: str
    cloud_topic: str = Field("{topic}", description="template: {topic} (the local topic), {thing}")
    priority: int = Field(0, ge=0, le=255)
    ttl_s: float | None = Field(None, gt=0)
    queue_size: int = Field(10_000, ge=1, description="local subscription queue (drop-oldest, counted)")
    when: dict[str, Any] | None = Field(
        None, description="forward only messages whose payload is a map with these top-level values")

    @field_validator("filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        return check_topic_filter(value)

    @field_validator("cloud_topic")
    @classmethod
    def _cloud_topic(cls, value: str) -> str:
        return check_topic_template(value, ("topic", "thing"))


# What leaves the device without any configuration (``forward_defaults``): protective-action
# decisions, retraining samples, and the anomaly events that are anomalous. Raw sensor streams stay
# local unless a ``forward`` rule names them.
DEFAULT_FORWARD: tuple[ForwardRule, ...] = (
    ForwardRule(filter="actions/+", cloud_topic="nucleus/things/{thing}/{topic}", priority=200),
    ForwardRule(filter="anomaly/+", cloud_topic="nucleus/things/{thing}/{topic}", priority=100,
                when={"is_anomaly": True}),
    ForwardRule(filter="retraining/+", cloud_topic="nucleus/things/{thing}/{topic}", priority=50,
                ttl_s=30 * 24 * 3600.0),
)


class SyncSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- the broker link (absent url: everything stays spooled) ---------------------------------
    url: str | None = Field(None, description="mqtt://host[:1883] or mqtts://host[:8883]")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    client_id: str | None = Field(None, min_length=1, description="MQTT client id; default: the thing name")
    mqtt_version: Literal["5", "3.1.1"] = Field("5", description="5 carries message ids in raw mode")
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, description="broker keeps cloud subscriptions offline")
    keepalive_s: int = Field(30, ge=5)
    connect_timeout_s: float = Field(10.0, gt=0)
    reconnect_initial_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(120.0, gt=0)
    reconnect_jitter: float = Field(0.5, ge=0.0, le=1.0, description="delay * uniform(1 - j, 1)")

    # --- the spool --------------------------------------------------------------------------------
    spool_max_bytes: int = Field(512 * MiB, ge=4 * KiB)
    spool_max_messages: int = Field(2_000_000, ge=1)
    overflow: Overflow = "drop_lowest_priority"
    durability: Literal["full", "normal"] = Field(
        "full", description="full: survives power loss (fsync per commit); normal: survives kill -9 only")
    spool_reserve_bytes: int = Field(1 * MiB, ge=0, description="disk kept free so deliveries can be recorded")
    spool_min_free_bytes: int = Field(16 * MiB, ge=0, description="below this free disk, new messages are refused")
    max_payload_bytes: int = Field(128 * KiB, ge=1, description="larger cloud.publish payloads are refused")

    # --- what goes on the wire ----------------------------------------------------------------------
    envelope: Literal["batch", "raw"] = "batch"
    batch_max_messages: int = Field(200, ge=1)
    batch_max_bytes: int = Field(96 * KiB, ge=1024)
    max_inflight: int = Field(16, ge=1, le=1000, description="MQTT messages awaiting PUBACK")
    publish_timeout_s: float = Field(15.0, gt=0, description="no PUBACK this long: the link is considered lost")
    flush_timeout_s: float = Field(5.0, ge=0, description="on shutdown, wait this long for PUBACKs in flight")
    max_inbound_bytes: int = Field(128 * KiB, ge=1, description="larger cloud messages are dropped")

    # --- device status ------------------------------------------------------------------------------
    status_topic: str = "nucleus/things/{thing}/status"
    heartbeat_s: float = Field(300.0, gt=0)
    status_check_s: float = Field(1.0, gt=0, description="how often the device status is compared")

    forward: list[ForwardRule] = Field(default_factory=list)
    forward_defaults: bool = Field(True, description="also forward DEFAULT_FORWARD (actions, anomalies, retraining)")

    # --- fleet deployments (cloud_sync.inbound) -------------------------------------------------------
    deployments: bool = Field(True, description="accept fleet deployments for this thing and its groups")

    @property
    def forward_rules(self) -> list[ForwardRule]:
        return [*(DEFAULT_FORWARD if self.forward_defaults else ()), *self.forward]

    @classmethod
    def from_section(cls, section: Any = None, **overrides: Any) -> SyncSettings:
        """Build from the daemon's ``mqtt`` section: a pydantic model, a mapping, or None."""
        if section is None:
            data: dict[str, Any] = {}
        elif isinstance(section, BaseModel):
            data = section.model_dump()
        else:
            data = dict(section)
        known = {k: v for k, v in data.items() if k in cls.model_fields}
        known.update(overrides)
        return cls.model_validate(known)

    def with_paths_under(self, base: Path) -> SyncSettings:
        """The TLS files, relative ones taken from ``base`` (the directory of nucleus.yaml, the root).

        Without this they would be looked up from whatever directory the daemon was started in.
        """
        update = {k: base / v for k in TLS_FILES if (v := getattr(self, k)) is not None and not v.is_absolute()}
        return self.model_copy(update=update) if update else self

    @model_validator(mode="after")
    def _link_is_consistent(self) -> SyncSettings:
        """Refuse settings that would be silently ignored at connect time (:func:`link_problem`)."""
        problem = link_problem(self.url, (self.ca_file, self.cert_file, self.key_file), self.username,
                               self.password)
        if problem is not None:
            raise ValueError(problem)
        return self

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, value: str) -> str:
        """``s/{thin}`` was a traceback when the daemon started, ``s/#`` a status never published."""
        return check_topic_template(value, ("thing",))

    @field_validator("username", "password", mode="before")
    @classmethod
    def _credential_is_text(cls, value: object) -> object:
        """YAML reads `password: 0123` as the number 83: refuse it rather than send the wrong password."""
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a string: put it in quotes in nucleus.yaml")
        return value

    @field_validator("mqtt_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: object) -> object:
        """YAML reads `mqtt_version: 5` as a number; it means the same as "5"."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value
