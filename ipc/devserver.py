"""A standalone bus without the nucleus, for component development, tests and benchmarks.

``python -m ipc.devserver --socket /tmp/x/bus.sock --token alice=SECRET --allow 'alice:*'``
serves the native protocol with a token table and an allow-list (``principal:topic-filter``
grants publish and subscribe on matching topics/filters). ``--config alice=cfg.yaml`` gives alice a
configuration (get, update, watch, as the nucleus serves it); SIGHUP reads the files again. It prints
``READY <pid>`` on stdout once listening, so a parent process can wait for it, and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ipc.config_tree import MISSING, KeyPath, diff_paths, format_pointer, lookup, merge_at, watched
from ipc.core import CallContext, IpcCore, Principal
from ipc.errors import InvalidArguments, Unauthenticated, UnknownOperation
from ipc.memory import trim_forever
from ipc.server import IpcServer
from ipc.topics import matches


@dataclass(slots=True)
class TokenTable:
    """Authenticator over a fixed token → principal table (optionally pinned to PIDs)."""

    tokens: dict[str, Principal]
    pids: dict[str, set[int]] = field(default_factory=dict)

    def authenticate(self, token: str, peer_pid: int | None) -> Principal:
        principal = self.tokens.get(token)
        if principal is None:
            raise Unauthenticated("unknown token")
        allowed = self.pids.get(principal.name)
        if allowed is not None and peer_pid not in allowed:
            raise Unauthenticated(f"peer pid {peer_pid} may not use the token of {principal.name}",
                                  {"pid": peer_pid})
        return principal


@dataclass(slots=True)
class AllowList:
    """Authorizer: principal name → topic filters it may publish/subscribe on; ``*`` allows all."""

    grants: dict[str, list[str]]

    def is_authorized(self, principal: Principal, service: str, operation: str, resource: str) -> bool:
        return any(pattern == "*" or covers(pattern, resource)
                   for pattern in self.grants.get(principal.name, ()))


def covers(pattern: str, resource: str) -> bool:
    """Whether every topic the resource (a topic or a filter) can name also matches ``pattern``."""
    if "+" not in resource and "#" not in resource:
        return matches(pattern, resource)
    g, f = pattern.split("/"), resource.split("/")
    for i, level in enumerate(g):
        if level == "#":
            return True
        if i >= len(f) or f[i] == "#":
            return False
        if level != "+" and level != f[i]:
            return False
    return len(g) == len(f)


log = structlog.get_logger("ipc.devserver")


def load_config_file(path: Path) -> dict[str, Any]:
    """A configuration file's document (JSON, or YAML for .yaml/.yml); ValueError naming the file."""
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml  # only then: the bare bus stays as small as it was for benchmarks

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # OSError, JSON's ValueError, yaml.YAMLError: one line naming the file
        raise ValueError(f"{path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a configuration is an object (a mapping), not {type(doc).__name__}")
    return doc


@dataclass(slots=True)
class _Watch:
    component: str
    prefix: KeyPath
    pending: dict[KeyPath, None] = field(default_factory=dict)
    event: asyncio.Event = field(default_factory=asyncio.Event)


class Configurations:
    """Configuration per principal from files (``--config NAME=FILE``), so that a component that reads,
    updates and watches its configuration runs unchanged on the bare bus: config.get / config.update /
    config.subscribe answer as the nucleus does, in memory. A principal without a file gets
    UNKNOWN_OPERATION, which the SDK takes as "no configuration store" (as before this existed).
    SIGHUP reads the files again and notifies the watchers of each changed key, as a deployment would;
    a file that no longer reads keeps its last configuration (logged)."""

    def __init__(self, files: Mapping[str, Path]) -> None:
        self.files = dict(files)
        self.docs = {name: load_config_file(path) for name, path in self.files.items()}
        self._watches: list[_Watch] = []

    def register(self, core: IpcCore) -> None:
        core.register("config.get", self.get)
        core.register("config.update", self.update)
        core.register_stream("config.subscribe", self.subscribe)

    def reload(self) -> None:
        for name, path in self.files.items():
            try:
                new = load_config_file(path)
            except ValueError as exc:
                log.warning("devserver.config_unreadable", component=name, error=str(exc))
                continue
            self._set(name, new)
            log.info("devserver.config_reloaded", component=name, path=str(path))

    def _target(self, ctx: CallContext, args: Mapping[str, Any]) -> tuple[str, KeyPath]:
        target = args.get("component") or ctx.principal.name
        key_path = args.get("key_path") or []
        if not isinstance(target, str):
            raise InvalidArguments("component must be a string")
        if not isinstance(key_path, list) or not all(isinstance(k, str) and k for k in key_path):
            raise InvalidArguments(f"key_path must be a list of non-empty strings, not {key_path!r}")
        if target not in self.docs:
            raise UnknownOperation(f"the devserver has no configuration for {target} (start it with "
                                   f"--config {target}=FILE)", {"component": target})
        return target, tuple(key_path)

    async def get(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        target, key_path = self._target(ctx, args)
        value = lookup(self.docs[target], key_path)
        if value is MISSING:
            pointer = format_pointer(key_path)
            raise InvalidArguments(f"{target}: no configuration value at {pointer!r}",
                                   {"component": target, "field": pointer})
        return copy.deepcopy(value)

    async def update(self, ctx: CallContext, args: dict[str, Any]) -> Any:
        target, key_path = self._target(ctx, args)
        if not key_path:
            raise InvalidArguments("key_path must name at least one key")
        value = args.get("value")
        try:  # plain JSON data, as the nucleus keeps it (tuples become lists)
            value = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidArguments(f"value is not JSON-serializable: {exc}", {"argument": "value"}) from exc
        new = copy.deepcopy(self.docs[target])
        merge_at(new, key_path, value)
        return {"changed": [list(p) for p in self._set(target, new)]}

    async def subscribe(self, ctx: CallContext, args: dict[str, Any]) -> AsyncIterator[Any]:
        target, key_path = self._target(ctx, args)
        watch = _Watch(target, key_path)
        self._watches.append(watch)
        try:
            while True:
                await watch.event.wait()
                watch.event.clear()
                pending, watch.pending = watch.pending, {}
                for path in pending:
                    yield {"component": target, "key_path": list(path)}
        finally:
            self._watches.remove(watch)

    def _set(self, component: str, new: dict[str, Any]) -> list[KeyPath]:
        changed = diff_paths(self.docs[component], new)
        self.docs[component] = new
        for watch in self._watches:
            if watch.component != component:
                continue
            for path in changed:
                if (hit := watched(watch.prefix, path)) is not None:
                    watch.pending[hit] = None
            if watch.pending:
                watch.event.set()
        return changed


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ipc.devserver", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--token", action="append", default=[], metavar="NAME=TOKEN")
    p.add_argument("--allow", action="append", default=[], metavar="NAME:FILTER")
    p.add_argument("--config", action="append", default=[], metavar="NAME=FILE",
                   help="NAME's configuration (JSON, or YAML for .yaml/.yml), as the nucleus would serve it; "
                        "SIGHUP reads the files again and notifies watchers")
    p.add_argument("--max-frame", type=int, default=16 * 1024 * 1024)
    p.add_argument("--handshake-timeout", type=float, default=5.0)
    p.add_argument("--trim-interval", type=float, default=5.0,
                   help="seconds between malloc_trim calls (0 = never); see release_free_memory")
    p.add_argument("--log-level", default="info", help="structlog level on stderr (stdout carries READY)")
    args = p.parse_args(argv)
    files: dict[str, Path] = {}
    for spec in args.config:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            p.error(f"--config {spec}: expected NAME=FILE")
        files[name] = Path(file)
    try:
        args.configurations = Configurations(files)
    except ValueError as exc:
        p.error(f"--config: {exc}")
    return args


async def serve(args: argparse.Namespace) -> None:
    tokens: dict[str, Principal] = {}
    for spec in args.token:
        name, _, token = spec.partition("=")
        tokens[token] = Principal(name, "client")
    grants: dict[str, list[str]] = {}
    for spec in args.allow:
        name, _, pattern = spec.partition(":")
        grants.setdefault(name, []).append(pattern)
    core = IpcCore(TokenTable(tokens), AllowList(grants))
    configurations: Configurations = args.configurations
    configurations.register(core)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, configurations.reload)
    async with IpcServer(core, args.socket, max_frame=args.max_frame,
                         handshake_timeout=args.handshake_timeout):
        sys.stdout.write(f"READY {os.getpid()}\n")
        sys.stdout.flush()
        if args.trim_interval > 0:
            async with asyncio.TaskGroup() as tg:
                trim = tg.create_task(trim_forever(args.trim_interval))
                await stop.wait()
                trim.cancel()
        else:
            await stop.wait()


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop if installed (an optional speed-up, never required)."""
    try:
        module = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = module.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(args.log_level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
