"""The single owner of the on-disk layout under the nucleus root.

Nothing else in the code base joins path fragments under the root: a layout change is a
change to this file only. The layout (documented in docs/architecture.md)::

    <root>/
      ipc.sock                          native IPC socket (short path: sun_path is 108 bytes)
      gg.sock                           Greengrass event-stream IPC socket
      run/cli.token                     token of the local CLI, mode 0600
      run/pids.json                     process groups of running components (orphan cleanup)
      db/nucleus.db                     deployments journal, active set (SQLite, WAL)
      db/spool.db                       cloud_sync's outbound spool (SQLite, WAL)
      config/<component>.json           live component configuration
      packages/recipes/<name>@<version>.json
      packages/artifacts/<name>/<version>/...
      packages/artifacts-unarchived/<name>/<version>/...
      work/<component>/                 the component's working directory ({work:path})
      logs/<component>.log              rotated, size-capped per component
      logs/nucleus.log
      clients/<name>.token              tokens of declared local clients, mode 0600
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT_ENV = "NUCLEUS_ROOT"


def default_root() -> Path:
    """``$NUCLEUS_ROOT``, else ``/var/lib/nucleus`` for root, else ``~/.local/share/nucleus``."""
    env = os.environ.get(DEFAULT_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/nucleus")
    return Path.home() / ".local" / "share" / "nucleus"


@dataclass(frozen=True, slots=True)
class Paths:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Paths:
        return cls(Path(root).expanduser().resolve())

    # --- sockets and runtime files -------------------------------------------------------
    @property
    def ipc_socket(self) -> Path:
        return self.root / "ipc.sock"

    @property
    def gg_socket(self) -> Path:
        return self.root / "gg.sock"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def cli_token(self) -> Path:
        return self.run_dir / "cli.token"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "pids.json"

    @property
    def daemon_pid_file(self) -> Path:
        return self.run_dir / "nucleus.pid"

    # --- state ---------------------------------------------------------------------------
    @property
    def db_dir(self) -> Path:
        return self.root / "db"

    @property
    def database(self) -> Path:
        return self.db_dir / "nucleus.db"

    @property
    def spool(self) -> Path:
        return self.db_dir / "spool.db"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    def config_file(self, component: str) -> Path:
        return self.config_dir / f"{component}.json"

    @property
    def clients_dir(self) -> Path:
        return self.root / "clients"

    def client_token(self, name: str) -> Path:
        return self.clients_dir / f"{name}.token"

    # --- component store -----------------------------------------------------------------
    @property
    def packages_dir(self) -> Path:
        return self.root / "packages"

    @property
    def recipes_dir(self) -> Path:
        return self.packages_dir / "recipes"

    def recipe_file(self, name: str, version: str) -> Path:
        return self.recipes_dir / f"{name}@{version}.json"

    @property
    def artifacts_dir(self) -> Path:
        return self.packages_dir / "artifacts"

    def artifacts(self, name: str, version: str) -> Path:
        return self.artifacts_dir / name / version

    @property
    def unarchived_dir(self) -> Path:
        return self.packages_dir / "artifacts-unarchived"

    def unarchived(self, name: str, version: str) -> Path:
        return self.unarchived_dir / name / version

    @property
    def staging_dir(self) -> Path:
        return self.packages_dir / ".staging"

    # --- work and logs -------------------------------------------------------------------
    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    def work(self, component: str) -> Path:
        return self.work_dir / component

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def component_log(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"

    @property
    def nucleus_log(self) -> Path:
        return self.logs_dir / "nucleus.log"

    def ensure(self) -> None:
        """Create the directories; private ones owner-only."""
        for d in (self.root, self.run_dir, self.db_dir, self.config_dir, self.clients_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        for d in (
            self.recipes_dir,
            self.artifacts_dir,
            self.unarchived_dir,
            self.staging_dir,
            self.work_dir,
            self.logs_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)
