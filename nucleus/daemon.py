"""The composition root: builds every part from settings and runs them under one owner.

Shutdown is ordered and bounded: stop accepting IPC connections, stop components in
reverse dependency order (each bounded by its shutdown timeout and the kill grace), flush and
close cloud sync, then close the journal. A second signal during shutdown kills what is left and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from cloud_sync.service import CloudSync
from cloud_sync.uplink import ignore_closed_socket_watch
from ipc.core import IpcCore
from ipc.greengrass.server import GreengrassServer
from ipc.memory import release_periodically
from ipc.server import IpcServer
from nucleus import __version__, authz, component_python, logconfig, users
from nucleus import run_with as runwith
from nucleus.cgroups import Cgroups, instance_name
from nucleus.config_store import ConfigStore
from nucleus.config_validation import ConfigValidators
from nucleus.control import Control
from nucleus.deployment import DeploymentEngine
from nucleus.durable import write_atomic
from nucleus.errors import ConfigurationError, NucleusError
from nucleus.identity import Identities
from nucleus.journal import Journal
from nucleus.orchestrator import Orchestrator
from nucleus.platforms import current_platform
from nucleus.settings import Settings
from nucleus.store import ComponentStore
from nucleus.supervisor import OrphanRecord, kill_orphans, process_start_time, process_user
from nucleus.update_policy import UpdateNotifier

log = structlog.get_logger("nucleus.daemon")

EXIT_RESTART = 75  # what `nucleus run` exits with when a bootstrap step asked for a restart


class AlreadyRunning(NucleusError):
    code = "ALREADY_RUNNING"


class ProcessRecords:
    """The pid file of live component process groups, rewritten on every spawn and exit.

    After ``kill -9`` of the daemon its components keep running in their own sessions; the
    next start reads this file and kills exactly those groups (checked by start time so a
    reused PID is never hit), so the restarted daemon never runs next to stale processes.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._records: dict[int, dict[str, Any]] = {}

    def previous(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def spawned(self, component: str, pid: int, pgid: int) -> None:
        self._records[pid] = {"component": component, "pid": pid, "pgid": pgid, "start_time": process_start_time(pid)}
        self._write()

    def exited(self, component: str, pid: int, pgid: int) -> None:
        """The supervisor saw the whole group empty: nothing of it can be orphaned any more."""
        if self._records.pop(pid, None) is not None:
            self._write()

    def _write(self) -> None:
        write_atomic(self._path, json.dumps(list(self._records.values())).encode())


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = settings.paths
        self._stop = asyncio.Event()
        self._restart = False
        self._started = time.time()

    def request_stop(self) -> None:
        self._stop.set()

    def request_restart(self) -> None:
        self._restart = True
        self._stop.set()

    @property
    def restart_requested(self) -> bool:
        return self._restart

    def _claim_root(self) -> None:
        self._refuse_if_running()
        self.paths.daemon_pid_file.write_text(f"{os.getpid()}\n")

    def _refuse_if_running(self) -> None:
        """AlreadyRunning if another daemon serves this root. Called first of all too, before this
        start changes anything in the root (modes, the log file): one of another user, say, whose
        log file this user may not open."""
        pid_file = self.paths.daemon_pid_file
        try:
            other = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            other = 0
        if other and other != os.getpid() and Path(f"/proc/{other}").exists():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.paths.ipc_socket))
                raise AlreadyRunning(
                    f"a nucleus (pid {other}) is already running with this root", path=self.paths.root
                )
            except PermissionError:
                # Its socket is another user's (a root daemon in a service user's root, started with
                # sudo): it is running all the same. Going on ended in a traceback at the pid file.
                raise AlreadyRunning(
                    f"a nucleus (pid {other}, user {process_user(other)}) is already running with this root",
                    path=self.paths.root,
                ) from None
            except OSError:
                pass
            finally:
                sock.close()

    async def run(self) -> None:
        paths = self.paths
        self._refuse_if_running()
        # run_with_default: refused before anything changes if the user is unknown or this is not root
        component_user = users.component_user(self.settings.run_with_default.posix_user)
        socket_group = users.socket_group_for(self.settings.ipc.socket_group, component_user)
        # run_with_default.system_resource_limits: refused here too if this device cannot enforce them
        cgroups = Cgroups(record=paths.run_dir / "cgroups.json", instance=instance_name(paths.root))
        default_limits = runwith.limits_of(None, self.settings)
        if (problem := cgroups.problem(default_limits)) is not None:
            raise ConfigurationError(f"limits ({default_limits.describe()}) cannot be enforced: {problem}",
                                     field="run_with_default.system_resource_limits")
        paths.ensure()
        if socket_group is not None:  # its members (and the component user) must reach the sockets in the root
            shared = (paths.packages_dir, paths.work_dir) if component_user is not None else ()
            tightened = users.open_root_to_group(paths.root, users.socket_group_id(socket_group),
                                                 (paths.ipc_socket, paths.gg_socket), shared)
            if component_user is not None:
                users.open_to_component_user(paths, component_user)
        else:
            tightened = []
        logconfig.configure(self.settings.logs.level, self.settings.logs.format, file=paths.nucleus_log,
                            max_bytes=self.settings.logs.max_bytes_per_file,
                            backup_count=self.settings.logs.backup_count)
        if tightened:  # said once the log is set up
            log.info("nucleus.root_entries_made_private", entries=[p.name for p in tightened],
                     reason="ipc.socket_group or run_with_default lets a group into the root")
        self._claim_root()
        records = ProcessRecords(paths.pid_file)
        orphans = records.previous()
        if orphans:
            killed = kill_orphans(
                OrphanRecord(int(r["pgid"]), int(r["pid"]), int(r["start_time"]))
                for r in orphans
                if r.get("start_time") is not None
            )
            if killed:  # every step gone with the daemon (the usual case after a kill -9) is no warning
                log.warning("nucleus.orphans_killed", groups=killed)
        stale = cgroups.remove_stale()  # the component groups a crashed run of this root left
        if stale:
            log.info("nucleus.stale_cgroups_removed", groups=stale)
        platform = current_platform(self.settings.platform)
        journal = Journal(paths.database)
        store = ComponentStore(paths, self.settings.deployments.artifact_limits(
            self.settings.mqtt.spool_min_free_bytes if self.settings.mqtt.url else 0))
        store.clear_staging()  # what a crash left mid-download would take the disk for good
        config = ConfigStore(paths)
        authorizer = authz.Authorizer()
        identities = Identities(paths, check_peer_pid=self.settings.ipc.check_peer_pid)
        variables = {"iot:thingName": self.settings.thing_name}
        core = IpcCore(identities, authorizer)
        identities.on_client_revoked = lambda name: core.revoke_sessions(name, "client")

        def apply_policies(component: str, doc: Any) -> None:
            _set_policies(component, doc)
            core.policies_changed()  # connected sessions must not keep a cached allow

        def _set_policies(component: str, doc: Any) -> None:
            if doc is None:
                authorizer.remove(component)
                return
            try:
                policies = authz.parse_access_control(
                    component, doc.get("accessControl") if isinstance(doc, dict) else None, variables=variables
                )
            except ConfigurationError as exc:
                log.error("authz.policy_invalid", component=component, error=str(exc))  # noqa: TRY400 - the message says it all
                policies = []
            authorizer.set_policies(component, policies)

        def set_client_policies(name: str, access_control: Any) -> None:
            policies = authz.parse_access_control(name, access_control, variables=variables)
            policy_file = paths.clients_dir / f"{name}.policy.json"
            policy_file.write_text(json.dumps(access_control or {}))
            authorizer.set_policies(name, policies)
            core.policies_changed()

        def remove_client_policies(name: str) -> None:
            (paths.clients_dir / f"{name}.policy.json").unlink(missing_ok=True)
            authorizer.set_policies(name, [])
            core.policies_changed()

        for policy_file in sorted(paths.clients_dir.glob("*.policy.json")):
            name = policy_file.name.removesuffix(".policy.json")
            try:
                set_client_policies(name, json.loads(policy_file.read_text()))
            except (ValueError, ConfigurationError) as exc:
                log.error("authz.client_policy_invalid", client=name, error=str(exc))  # noqa: TRY400

        python_bin = await asyncio.to_thread(component_python.ensure, fallback=paths.root)  # ≈ 3 s the first time
        orchestrator = Orchestrator(
            self.settings, store, config, identities, platform=platform,
            on_spawn=records.spawned, on_exit=records.exited,
            on_removed=core.close_sessions_of, python_bin=python_bin, component_user=component_user,
            cgroups=cgroups,
        )
        notifier = UpdateNotifier()
        validators = ConfigValidators()
        engine = DeploymentEngine(
            self.settings, journal, store, config, orchestrator, notifier,
            platform=platform, apply_policies=apply_policies, request_restart=self.request_restart,
            declare_client=identities.declare_client, undeclare_client=identities.remove_client,
            validators=validators,
        )
        def status() -> dict[str, Any]:
            return {
                "version": __version__,
                "pid": os.getpid(),
                "root": str(paths.root),
                "thing_name": self.settings.thing_name,
                "user": users.user_name(os.geteuid()),
                # who steps run as (RequiresPrivilege ones excepted): run_with_default, else the daemon's user
                "component_user": str(component_user) if component_user else users.user_name(os.geteuid()),
                "uptime_s": time.time() - self._started,
                "components": len(orchestrator.names()),
                "current_deployment": engine.current,
                "platform": platform,
                # connections still in their handshake, and those closed for it (ipc/admission.py)
                "ipc": core.admission.stats(),
            }

        Control(
            core, paths=paths, journal=journal, config=config, orchestrator=orchestrator, engine=engine,
            notifier=notifier, identities=identities, authorizer=authorizer,
            set_client_policies=set_client_policies, remove_client_policies=remove_client_policies,
            status=status, validators=validators,
        )
        def device_status() -> dict[str, Any]:
            comps = {n: orchestrator.describe(n) for n in sorted(orchestrator.names())}
            last = journal.recent(1)
            return {
                "nucleus_version": __version__,
                "components": {n: {"version": d["version"], "state": d["state"]} for n, d in comps.items()},
                "current_deployment": engine.current,
                "last_deployment": {k: last[0].summary().get(k) for k in ("id", "group", "status", "reason")}
                if last else None,
            }

        cloud = CloudSync(self.settings.mqtt, core, spool_path=paths.spool,
                          thing_name=self.settings.thing_name, status_provider=device_status,
                          thing_groups=self.settings.thing_groups)
        cloud.register_operations()

        def journal_summary(deployment_id: str) -> dict[str, Any] | None:
            record = journal.get(deployment_id)
            return record.summary() if record is not None else None

        # Fleet deployments go through the same engine as `nucleus deploy`; their progress is reported back.
        cloud.attach_deployments(lambda request: engine.submit(request).id, journal_summary)
        engine.add_listener(cloud.deployment_changed)
        loop = asyncio.get_running_loop()
        ignore_closed_socket_watch(loop)  # aiomqtt's race on a connect that fails at once
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        server = IpcServer(
            core,
            paths.ipc_socket,
            group=socket_group,
            max_frame=self.settings.ipc.max_frame_bytes,
            handshake_timeout=self.settings.ipc.handshake_timeout_s,
        )
        await server.start()
        gg_server: GreengrassServer | None = None
        if self.settings.ipc.greengrass_socket:  # components written with AWS's awsiotsdk
            gg_server = GreengrassServer(
                core,
                paths.gg_socket,
                group=socket_group,
                max_message_size=self.settings.ipc.max_frame_bytes,
                handshake_timeout=self.settings.ipc.handshake_timeout_s,
            )
            await gg_server.start()
        log.info("nucleus.started", root=str(paths.root), socket=str(paths.ipc_socket), pid=os.getpid(),
                 version=__version__)
        engine_task = asyncio.create_task(engine.run(), name="deployments")
        sync_task = asyncio.create_task(cloud.run(), name="cloud-sync")
        stop_task = asyncio.create_task(self._stop.wait())
        # Idle memory: trim the heap, page out start-up-only library code, and drop our mappings of
        # library pages other processes keep resident (RSS = working set; see ipc/memory.py).
        trim_task = asyncio.create_task(release_periodically(5.0, 30.0, unmap_shared=True), name="memory-release")
        # a child a component forked, OOM-killed at its memory limit while the step lives on: said at once
        oom_task = asyncio.create_task(orchestrator.watch_oom_kills(), name="oom-kills")
        try:
            done, _ = await asyncio.wait({engine_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if engine_task in done and engine_task.exception() is not None:
                log.error("nucleus.engine_crashed", error=repr(engine_task.exception()))
        finally:
            log.info("nucleus.stopping", restart=self._restart)
            # Second signal: give up on an orderly stop.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda: os._exit(1))
            # Deployments stop first, then the components (reverse dependency order) while their
            # IPC connections still work, so they shut down cleanly instead of seeing the bus vanish;
            # only then do the sockets close.
            engine_task.cancel()
            stop_task.cancel()
            trim_task.cancel()
            oom_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await engine_task
            await orchestrator.close()
            await server.close()
            if gg_server is not None:
                await gg_server.close()
            await cloud.close()  # PUBACKs in flight get flush_timeout_s; the spool is committed and closed
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sync_task
            journal.close()
            with contextlib.suppress(OSError):
                paths.daemon_pid_file.unlink()
            log.info("nucleus.stopped")


def run_daemon(settings: Settings) -> int:
    daemon = Daemon(settings)
    try:
        asyncio.run(daemon.run())
    except NucleusError as exc:
        print(f"nucleus: {exc}", file=sys.stderr)
        return 1
    if daemon.restart_requested:
        # Bootstrap asked for a restart: replace this process with a fresh daemon. The thing name goes
        # along: given as `run --thing-name`, it was lost, and the device came back as its host name
        # ({iot:thingName}, AWS_IOT_THING_NAME, the cloud topics) in the middle of the deployment.
        os.execv(sys.executable, [sys.executable, "-m", "nucleus", "--root", str(settings.root), "run",
                                  "--thing-name", settings.thing_name])
    return 0
