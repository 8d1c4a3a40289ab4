"""Who is calling: per-component tokens, declared local clients, the CLI — and a PID check.

Tokens are regenerated at every daemon start and handed to a component only through its
environment (``SVCUID``), never logged. Where the kernel tells us the peer's PID
(SO_PEERCRED), a component token is accepted only from a process inside that component's
own process tree, so one component cannot borrow another's token from a leaked env dump.
Declared clients (local applications that are not components) get a persistent token
stored owner-only under ``clients/``; the CLI gets one in ``run/cli.token``.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

import structlog

from ipc.core import Principal
from ipc.errors import Unauthenticated
from nucleus.durable import write_atomic
from nucleus.paths import Paths

log = structlog.get_logger("nucleus.identity")

CLI_PRINCIPAL = "nucleus.cli"


def _new_token() -> str:
    return secrets.token_urlsafe(32)


def _write_private(path: Path, text: str) -> None:
    write_atomic(path, text.encode(), mode=0o600)


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields after the last ")" are fixed.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def process_ancestry(pid: int, limit: int = 64) -> list[int]:
    """``pid`` and its ancestors (bounded), read from /proc."""
    chain = [pid]
    current = pid
    for _ in range(limit):
        parent = _parent_pid(current)
        if parent is None or parent <= 1:
            break
        chain.append(parent)
        current = parent
    return chain


class Identities:
    """Token table; satisfies ``ipc.core.Authenticator``."""

    def __init__(
        self,
        paths: Paths,
        *,
        component_pids: Callable[[str], Iterable[int]] | None = None,
        check_peer_pid: bool = True,
    ) -> None:
        self._paths = paths
        self._by_token: dict[str, Principal] = {}
        self._component_tokens: dict[str, str] = {}
        self._component_pids = component_pids
        self._check_peer_pid = check_peer_pid and Path("/proc/self/stat").exists()
        #: Called with a declared client's name when its token is rotated or removed, so that the
        #: sessions opened with the old token end with it (the daemon ends them in the IPC core).
        self.on_client_revoked: Callable[[str], None] | None = None
        self.cli_token = _new_token()
        self._by_token[self.cli_token] = Principal(CLI_PRINCIPAL, "nucleus")
        _write_private(paths.cli_token, self.cli_token)
        self._load_clients()

    def set_pid_lookup(self, component_pids: Callable[[str], Iterable[int]]) -> None:
        self._component_pids = component_pids

    # --- components ----------------------------------------------------------------------
    def component_token(self, component: str) -> str:
        """The component's token for this daemon run (created on first use)."""
        token = self._component_tokens.get(component)
        if token is None:
            token = _new_token()
            self._component_tokens[component] = token
            self._by_token[token] = Principal(component, "component")
        return token

    def revoke_component(self, component: str) -> None:
        token = self._component_tokens.pop(component, None)
        if token is not None:
            self._by_token.pop(token, None)

    # --- declared clients ------------------------------------------------------------------
    def _load_clients(self) -> None:
        directory = self._paths.clients_dir
        if not directory.exists():
            return
        for file in sorted(directory.glob("*.token")):
            try:
                token = file.read_text().strip()
            except OSError as exc:
                log.warning("identity.client_token_unreadable", path=str(file), error=str(exc))
                continue
            if token:
                self._by_token[token] = Principal(file.stem, "client")

    def add_client(self, name: str) -> str:
        """Create (or rotate) a declared client's token; stored owner-only, returned once.

        Rotating ends the sessions of the old token: rotation is how a leaked token is revoked."""
        if self._drop_client_tokens(name) and self.on_client_revoked is not None:
            self.on_client_revoked(name)
        token = _new_token()
        _write_private(self._paths.client_token(name), token + "\n")
        self._by_token[token] = Principal(name, "client")
        log.info("identity.client_added", client=name)
        return token

    def declare_client(self, name: str) -> bool:
        """Make sure ``name`` has a client token (a recipe with no lifecycle: a local application).

        Returns True when the token was created now, so its creator can show it once; an existing
        token is kept, so redeploying the recipe does not lock the application out.
        """
        if any(p.kind == "client" and p.name == name for p in self._by_token.values()):
            return False
        self.add_client(name)
        return True

    def _drop_client_tokens(self, name: str) -> bool:
        dropped = False
        for token, principal in list(self._by_token.items()):
            if principal.kind == "client" and principal.name == name:
                del self._by_token[token]
                dropped = True
        return dropped

    def remove_client(self, name: str) -> None:
        """Forget a declared client's token and end its live sessions."""
        if self._drop_client_tokens(name) and self.on_client_revoked is not None:
            self.on_client_revoked(name)
        with contextlib.suppress(FileNotFoundError):
            self._paths.client_token(name).unlink()

    def clients(self) -> list[str]:
        return sorted(p.name for p in self._by_token.values() if p.kind == "client")

    # --- ipc.core.Authenticator ------------------------------------------------------------
    def lookup(self, token: str) -> Principal | None:
        principal = self._by_token.get(token)
        if principal is not None:
            return principal
        # Constant-time comparison is moot for dict lookups of random 256-bit tokens, but
        # keep the miss path free of early exits that depend on the token's content.
        for known in self._by_token:
            hmac.compare_digest(known, token)
        return None

    def authenticate(self, token: str, peer_pid: int | None) -> Principal:
        if not token:
            raise Unauthenticated("missing token")
        principal = self.lookup(token)
        if principal is None:
            raise Unauthenticated("unknown token")
        if (
            principal.kind == "component"
            and self._check_peer_pid
            and peer_pid is not None
            and self._component_pids is not None
        ):
            owned = set(self._component_pids(principal.name))
            try:
                session = os.getsid(peer_pid)
            except OSError:
                session = -1
            if session not in owned and not owned.intersection(process_ancestry(peer_pid)):
                raise Unauthenticated(
                    f"token of component {principal.name} presented by pid {peer_pid}, "
                    "which is not one of its processes"
                )
        return principal
