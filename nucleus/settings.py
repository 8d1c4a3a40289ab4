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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cloud_sync.settings import SyncSettings
from nucleus.errors import ConfigurationError
from nucleus.paths import Paths

SETTINGS_FILE = "nucleus.yaml"


class RestartPolicy(BaseModel):
    """Restart behaviour of a component whose run step fails (ERRORED)."""

    model_config = ConfigDict(extra="forbid")

    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_multiplier: float = 2.0
    backoff_jitter: float = Field(0.2, ge=0.0, le=1.0, description="± fraction of the delay")
    max_errors: int = Field(3, ge=1, description="errors within error_window_s that make it BROKEN")
    error_window_s: float = 3600.0


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_bytes_per_file: int = 10 * 1024 * 1024
    backup_count: int = Field(4, ge=0, description="rotated files kept per component")
    level: str = "info"
    format: str = Field("console", pattern="^(console|json)$")


class DeploymentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settle_time_s: float = Field(5.0, ge=0.0, description="RUNNING this long before success")
    default_timeout_s: float = 600.0
    keep_versions: int = Field(1, ge=0, description="previous versions kept per component")
    allow_reboot: bool = False


class IpcSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    socket_group: str | None = None
    max_frame_bytes: int = 16 * 1024 * 1024
    handshake_timeout_s: float = 5.0
    check_peer_pid: bool = True
    greengrass_socket: bool = True


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: Path
    thing_name: str = Field(default_factory=lambda: socket.gethostname() or "nucleus")
    thing_groups: list[str] = Field(default_factory=list)
    platform: dict[str, str] = Field(default_factory=dict, description="extra platform attributes")
    restart: RestartPolicy = RestartPolicy()
    logs: LogSettings = LogSettings()
    deployments: DeploymentSettings = DeploymentSettings()
    ipc: IpcSettings = IpcSettings()
    mqtt: SyncSettings = Field(default_factory=SyncSettings, description="cloud link + spool: docs/cloud-sync.md")
    stop_grace_s: float = Field(5.0, description="SIGTERM → SIGKILL grace after a shutdown step")

    @property
    def paths(self) -> Paths:
        return Paths.at(self.root)


def _env_overrides() -> dict[str, Any]:
    out: dict[str, Any] = {}
    if name := os.environ.get("NUCLEUS_THING_NAME"):
        out["thing_name"] = name
    if url := os.environ.get("NUCLEUS_MQTT_URL"):
        out.setdefault("mqtt", {})["url"] = url
    if settle := os.environ.get("NUCLEUS_SETTLE_TIME_S"):
        out.setdefault("deployments", {})["settle_time_s"] = float(settle)
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
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"not valid YAML: {exc}", path=file) from exc
        if not isinstance(loaded, dict):
            raise ConfigurationError("must be a mapping", path=file)
        data = loaded
    _merge(data, _env_overrides())
    _merge(data, overrides)
    data["root"] = root
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError("; ".join(_problem(e) for e in exc.errors()), path=file) from None
    settings.mqtt = settings.mqtt.with_paths_under(root)
    return settings


def _problem(error: Any) -> str:
    """One pydantic error as ``key.path: reason``, without the input value: a mistyped
    ``mqtt.password`` (a YAML number, say) must not end up in a log or on a terminal."""
    where = ".".join(str(part) for part in error["loc"])
    reason = "unknown key" if error["type"] == "extra_forbidden" else str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {reason}" if where else reason


def machine_architecture() -> str:
    """The architecture name Greengrass uses (amd64, aarch64, arm, x86)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        machine, "arm" if machine.startswith("arm") else machine
    )
