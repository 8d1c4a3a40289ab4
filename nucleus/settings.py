"""Daemon settings: one pydantic model, read from ``<root>/nucleus.yaml`` and ``NUCLEUS_*``.

Defaults are the embedded case: no broker, no cloud, everything local. Every knob that
Greengrass users have asked for (backoff, error budget, log caps, settle time) lives here so
that it is documented in one place (docs/configuration.md mirrors this file).
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cloud_sync.settings import LinkNames, SyncSettings, link_problem
from nucleus.artifacts import Limits
from nucleus.errors import ConfigurationError
from nucleus.paths import Paths

SETTINGS_FILE = "nucleus.yaml"


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _check_topic_level(name: str) -> None:
    if not name or any(c in name for c in "/+#") or any(c.isspace() for c in name):
        raise ValueError("must be a non-empty name without '/', '+', '#' or spaces: it is one level of MQTT topics")


class RestartPolicy(BaseModel):
    """Restart behaviour of a component whose run step fails (ERRORED)."""

    model_config = ConfigDict(extra="forbid")

    backoff_initial_s: float = Field(1.0, ge=0.0)
    backoff_max_s: float = Field(60.0, ge=0.0)
    backoff_multiplier: float = Field(2.0, ge=1.0, description="below 1 the delays would shrink")
    backoff_jitter: float = Field(0.2, ge=0.0, le=1.0, description="± fraction of the delay")
    max_errors: int = Field(3, ge=1, description="errors within error_window_s that make it BROKEN")
    error_window_s: float = Field(3600.0, gt=0.0)


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_bytes_per_file: int = Field(10 * 1024 * 1024, ge=64, description="the component log writer's minimum")
    backup_count: int = Field(4, ge=0, description="rotated files kept per component")
    level: str = Field("info", description="debug, info, warning, error or critical")
    format: str = Field("console", pattern="^(console|json)$")

    @field_validator("level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        """A misspelt level (``warn``, ``verbose``) would otherwise log at info without a word."""
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.lower()


_LIMITS = Limits()


class DeploymentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settle_time_s: float = Field(5.0, ge=0.0, description="RUNNING this long before success")
    default_timeout_s: float = Field(600.0, gt=0.0)
    keep_versions: int = Field(1, ge=0, description="previous versions kept per component")
    allow_reboot: bool = False
    # What one artifact may put on the disk (nucleus.artifacts.Limits): a digest is only checked
    # once every byte is written, so it cannot keep a wrong file or a ZIP bomb off a full disk.
    max_artifact_bytes: int = Field(_LIMITS.max_artifact_bytes, ge=1, description="per artifact file")
    max_unarchived_bytes: int = Field(_LIMITS.max_unarchived_bytes, ge=1, description="what one ZIP unpacks to")
    max_archive_entries: int = Field(_LIMITS.max_archive_entries, ge=1, description="files and folders of one ZIP")
    disk_reserve_bytes: int = Field(_LIMITS.disk_reserve_bytes, ge=0,
                                    description="left free by artifacts, for the spool, logs, journal")
    disk_reserve_percent: float = Field(_LIMITS.disk_reserve_percent, ge=0.0, le=90.0,
                                        description="of the store's filesystem; the larger reserve counts")

    def artifact_limits(self, spool_min_free_bytes: int = 0) -> Limits:
        """The store's limits. The reserve is at least what the cloud spool needs free to take new
        messages: a deployment must not silence the device's uplink by filling the disk."""
        return Limits(max_artifact_bytes=self.max_artifact_bytes, max_unarchived_bytes=self.max_unarchived_bytes,
                      max_archive_entries=self.max_archive_entries,
                      disk_reserve_bytes=max(self.disk_reserve_bytes, spool_min_free_bytes),
                      disk_reserve_percent=self.disk_reserve_percent)


class IpcSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    socket_group: str | None = None
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="smaller would refuse every request")
    handshake_timeout_s: float = Field(5.0, gt=0.0)
    check_peer_pid: bool = True
    greengrass_socket: bool = True


def check_posix_user(value: str) -> str:
    """The form of a ``posixUser`` (``user`` or ``user:group``). Only the form: whether the user and
    group exist is a question for the device the daemon runs on (nucleus/users.py)."""
    user, sep, group = value.partition(":")
    if not user or (sep and not group) or ":" in group or any(c.isspace() for c in value):
        raise ValueError("must be 'user' or 'user:group' (names or numeric ids, no spaces)")
    return value


MAX_MEMORY_KB = (2**63 - 1) // 1024  # the most a cgroup limit file takes (bytes in a signed 64-bit word)


class SystemResourceLimits(BaseModel):
    """Greengrass's ``systemResourceLimits``: enforced with cgroups (nucleus/cgroups.py)."""

    model_config = ConfigDict(extra="forbid")

    memory: int | None = Field(None, gt=0, le=MAX_MEMORY_KB,
                               description="KB, a hard limit on the component's processes together")
    # finite: "inf" (float() reads it) would be no limit spelled as one, and Infinity is not JSON
    cpus: float | None = Field(None, gt=0, allow_inf_nan=False, description="CPU time in cores (0.5: half of one core)")

    @field_validator("memory", "cpus", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        """Not a boolean (pydantic reads ``true`` as 1: a 1 KB limit nobody meant). ``memory: 1e6`` in
        nucleus.yaml: YAML 1.1 reads a number with an exponent and no dot as a string, which pydantic
        refuses as 'unable to parse string as an integer'."""
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return value
            if number.is_integer():
                return int(number)
        return value


class RunWithDefault(BaseModel):
    """Greengrass's ``runWithDefault``: the user components run as under a root nucleus, and the
    limits of components whose deployment set none."""

    model_config = ConfigDict(extra="forbid")

    posix_user: str | None = Field(None, description="user or user:group; unset: the nucleus's own user")
    system_resource_limits: SystemResourceLimits = SystemResourceLimits()

    @field_validator("posix_user")
    @classmethod
    def _user_and_group(cls, value: str | None) -> str | None:
        return None if value is None else check_posix_user(value)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: Path
    thing_name: str = Field(default_factory=lambda: socket.gethostname() or "nucleus",
                            description="the {thing} of every MQTT topic")
    thing_groups: list[str] = Field(default_factory=list)
    platform: dict[str, str] = Field(default_factory=dict, description="extra platform attributes")
    restart: RestartPolicy = RestartPolicy()
    logs: LogSettings = LogSettings()
    deployments: DeploymentSettings = DeploymentSettings()
    ipc: IpcSettings = IpcSettings()
    run_with_default: RunWithDefault = RunWithDefault()
    mqtt: SyncSettings = Field(default_factory=SyncSettings, description="cloud link + spool: docs/cloud-sync.md")
    stop_grace_s: float = Field(5.0, ge=0.0, description="SIGTERM → SIGKILL grace after a shutdown step")

    @field_validator("thing_name")
    @classmethod
    def _topic_level_name(cls, value: str) -> str:
        """The thing name is one level of MQTT topics (``nucleus/things/{thing}/…``): empty, or with
        ``/``, ``+``, ``#`` in it, the device would publish and subscribe where nobody expects."""
        _check_topic_level(value)
        return value

    @field_validator("thing_groups")
    @classmethod
    def _topic_level_names(cls, value: list[str]) -> list[str]:
        for group in value:
            _check_topic_level(group)
        return value

    @property
    def paths(self) -> Paths:
        return Paths.at(self.root)


# The settings the environment can set, by the variable that sets them.
ENV_NAMES = {"thing_name": "NUCLEUS_THING_NAME", "mqtt.url": "NUCLEUS_MQTT_URL",
             "deployments.settle_time_s": "NUCLEUS_SETTLE_TIME_S"}


def _env_overrides() -> dict[str, Any]:
    out: dict[str, Any] = {}
    if name := os.environ.get("NUCLEUS_THING_NAME"):
        out["thing_name"] = name
    if url := os.environ.get("NUCLEUS_MQTT_URL"):
        # Checked here, alone: the section's own check would blame nucleus.yaml for it.
        problem = link_problem(url, (None, None, None), None, None, LinkNames(url="NUCLEUS_MQTT_URL"))
        if problem is not None:
            raise ConfigurationError(problem if problem.startswith("NUCLEUS_MQTT_URL")
                                     else f"NUCLEUS_MQTT_URL (in the environment): {problem}")
        out.setdefault("mqtt", {})["url"] = url
    if settle := os.environ.get("NUCLEUS_SETTLE_TIME_S"):
        try:
            out.setdefault("deployments", {})["settle_time_s"] = float(settle)
        except ValueError:
            raise ConfigurationError(f"NUCLEUS_SETTLE_TIME_S (in the environment): must be a number of seconds, "
                                     f"not {settle!r}") from None
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def load_settings(root: Path, **overrides: Any) -> Settings:
    """Settings for the nucleus at ``root``: file, then environment, then explicit overrides."""
    root = Path(root).expanduser().resolve()
    data: dict[str, Any] = {}
    file = root / SETTINGS_FILE
    if file.exists():
        try:
            loaded = yaml.load(file.read_text(encoding="utf-8"), Loader=_Loader) or {}  # a SafeLoader
        except OSError as exc:
            raise ConfigurationError(f"cannot be read: {exc.strerror or exc}", path=file) from None
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"is not UTF-8 text (byte {exc.start})", path=file) from None
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"not valid YAML: {_yaml_problem(exc)}", path=file) from None
        if not isinstance(loaded, dict):
            raise ConfigurationError("must be a mapping", path=file)
        # A section left with every key commented out (`mqtt:` and nothing under it) is YAML's null:
        # it means "the defaults", as an empty file does, not a type error naming a pydantic class.
        data = {k: v for k, v in loaded.items() if not (v is None and k in _SECTIONS)}
    env = _env_overrides()
    _merge(data, env)
    _merge(data, overrides)
    data["root"] = root
    # Where a value came from when it is not the file: its error must send the operator to the
    # variable or the flag, not to a nucleus.yaml that does not say it.
    sources = {key: var for key, var in ENV_NAMES.items() if _dotted(env, key)}
    sources.update({key: f"--{key.replace('_', '-')}" for key in overrides})
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(e, sources) for e in exc.errors()]
        text = "; ".join(p for p, _ in problems)
        if all(from_elsewhere for _, from_elsewhere in problems):
            raise ConfigurationError(text) from None
        raise ConfigurationError(text, path=file) from None
    settings.mqtt = settings.mqtt.with_paths_under(root)
    return settings


_SECTIONS = frozenset({"restart", "logs", "deployments", "ipc", "mqtt", "platform", "thing_groups",
                       "run_with_default"})


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: YAML parsers keep the last one
    silently, so a second ``mqtt:`` section would drop every key of the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: overriding it is the point
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (the second would silently replace the first)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one line with the line and column of the file: its own text spans several
    lines (and quotes the file as ``<unicode string>``), which the one-line error must not."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = ": ".join(p for p in (exc.context, exc.problem) if p)
        if mark is not None:
            return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
        return what
    return " ".join(str(exc).split())


def _dotted(data: dict[str, Any], key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _problem(error: Any, sources: dict[str, str]) -> tuple[str, bool]:
    """One pydantic error as ``key.path: reason``, without the input value: a mistyped
    ``mqtt.password`` (a YAML number, say) must not end up in a log or on a terminal. The flag is
    whether the value came from the environment or a flag (``sources``) rather than the file."""
    where = ".".join(str(part) for part in error["loc"])
    reason = {"extra_forbidden": "unknown key",
              "string_type": "must be a string (YAML read it as another type: put it in quotes)"}.get(
        error["type"], str(error["msg"]).removeprefix("Value error, "))
    source = next((src for key, src in sources.items() if where == key or where.startswith(key + ".")), None)
    if source is not None:
        return f"{source}: {reason}", True
    return (f"{where}: {reason}" if where else reason), False


def machine_architecture() -> str:
    """The architecture name Greengrass uses (amd64, aarch64, arm, x86)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        machine, "arm" if machine.startswith("arm") else machine
    )
