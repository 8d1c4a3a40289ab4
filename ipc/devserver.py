"""A standalone bus without the nucleus, for component development, tests and benchmarks.

``python -m ipc.devserver --socket /tmp/x/bus.sock --token alice=SECRET --allow 'alice:*'``
serves the native protocol with a token table and an allow-list (``principal:topic-filter``
grants publish and subscribe on matching topics/filters). It prints ``READY <pid>`` on stdout once
listening, so a parent process can wait for it, and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ipc.core import IpcCore, Principal
from ipc.errors import Unauthenticated
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


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ipc.devserver", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--token", action="append", default=[], metavar="NAME=TOKEN")
    p.add_argument("--allow", action="append", default=[], metavar="NAME:FILTER")
    p.add_argument("--max-frame", type=int, default=16 * 1024 * 1024)
    p.add_argument("--handshake-timeout", type=float, default=5.0)
    p.add_argument("--trim-interval", type=float, default=5.0,
                   help="seconds between malloc_trim calls (0 = never); see release_free_memory")
    p.add_argument("--log-level", default="info", help="structlog level on stderr (stdout carries READY)")
    return p.parse_args(argv)


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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
