"""Live component configuration, with Greengrass update semantics and change watchers.

A component's configuration starts as its recipe's ``DefaultConfiguration``; deployments then
apply ``{"reset": [pointers], "merge": {...}}`` — RESET first, then MERGE — and components update
their own keys over IPC. Greengrass users rely on these exact rules (lists are replaced whole, a
reset pointer returns to the recipe default or disappears), so :func:`apply_update` is a pure
function that the deployment engine and the tests share.

Each component's document is persisted as one JSON file (``Paths.config_file``), written
atomically, so a crash never leaves half a document. Update timestamps are kept in memory: an
update older than the last write of the same key is ignored, as Greengrass does, so that late
messages cannot undo newer values.

All methods are meant to be called from the event loop's thread; a call from another thread
still reaches watchers safely (``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import structlog

from ipc.config_tree import MISSING, KeyPath, diff_paths, format_pointer, lookup, merge_at, set_at, watched
from nucleus.durable import write_atomic
from nucleus.errors import ConfigurationError
from nucleus.paths import Paths

log = structlog.get_logger(__name__)

DEFAULT_WATCH_LIMIT: Final = 256


# --- JSON pointers and pure document operations ---------------------------------------------------

def parse_pointer(pointer: str) -> KeyPath:
    """RFC 6901: ``""`` is the whole document, ``/a/b~1c`` is ``("a", "b/c")``."""
    if pointer == "":
        return ()
    if not isinstance(pointer, str) or not pointer.startswith("/"):
        raise ConfigurationError(
            f"reset entry {pointer!r} is not a JSON pointer (it must be \"\" or start with \"/\")",
            field="reset",
        )
    return tuple(tok.replace("~1", "/").replace("~0", "~") for tok in pointer[1:].split("/"))


def _delete(doc: dict[str, Any], key_path: Sequence[str]) -> None:
    parent = lookup(doc, key_path[:-1])
    if isinstance(parent, dict):
        parent.pop(key_path[-1], None)


def _plain(value: Any, *, what: str, component: str | None = None) -> Any:
    """A JSON-able deep copy (tuples become lists), or a ConfigurationError saying why not."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{what} is not JSON-serializable: {exc}", component=component) from exc


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """MERGE as Greengrass: maps merge key by key; lists and scalars replace whole. Mutates ``base``."""
    for key, value in update.items():
        current = base.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            deep_merge(current, value)
        else:
            base[key] = copy.deepcopy(dict(value)) if isinstance(value, Mapping) else copy.deepcopy(value)
    return base


def apply_update(
    current: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    reset: Sequence[str] = (),
    merge: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The configuration after a deployment's update: RESET every pointer, then MERGE.

    A reset pointer takes the recipe default's value at that pointer, or removes the key when the
    default has none there; ``""`` resets the whole document to the defaults. Pure: the inputs
    are not modified.
    """
    doc: dict[str, Any] = copy.deepcopy(dict(current))
    if isinstance(reset, str):
        raise ConfigurationError("reset must be a list of JSON pointers, not a string", field="reset")
    for pointer in reset:
        tokens = parse_pointer(pointer)
        if not tokens:
            doc = copy.deepcopy(dict(defaults))
            continue
        default = lookup(defaults, tokens)
        if default is MISSING:
            _delete(doc, tokens)
        else:
            set_at(doc, tokens, copy.deepcopy(default))
    if merge is not None:
        if not isinstance(merge, Mapping):
            raise ConfigurationError(
                f"merge must be an object, got {type(merge).__name__}", field="merge"
            )
        deep_merge(doc, merge)
    return doc


# --- watchers -------------------------------------------------------------------------------------

class _Watcher:
    """One subscription: an ordered set of pending changed paths, coalesced and bounded.

    Duplicate paths coalesce; past ``limit`` distinct paths the set collapses to the watched key
    itself ("something under here changed, read it again"), so a slow reader costs O(limit).
    """

    def __init__(self, component: str, prefix: KeyPath, limit: int) -> None:
        self.component = component
        self.prefix = prefix
        self.limit = max(1, limit)
        self.loop = asyncio.get_running_loop()
        self._pending: dict[KeyPath, None] = {}
        self._event = asyncio.Event()

    def relevant(self, path: KeyPath) -> KeyPath | None:
        return watched(self.prefix, path)

    def offer(self, path: KeyPath) -> None:
        if path not in self._pending and len(self._pending) >= self.limit:
            self._pending.clear()
            path = self.prefix
        self._pending[path] = None
        self._event.set()

    def __aiter__(self) -> _Watcher:
        return self

    async def __anext__(self) -> list[str]:
        while not self._pending:
            self._event.clear()
            await self._event.wait()
        path = next(iter(self._pending))
        del self._pending[path]
        return list(path)


# --- the store ------------------------------------------------------------------------------------

class ConfigStore:
    """Every component's live configuration document."""

    def __init__(self, paths: Paths, *, clock: Callable[[], float] = time.time,
                 watch_limit: int = DEFAULT_WATCH_LIMIT) -> None:
        self._paths = paths
        self._clock = clock
        self._watch_limit = watch_limit
        self._docs: dict[str, dict[str, Any]] = {}
        self._stamps: dict[str, dict[KeyPath, float]] = {}
        self._watchers: list[_Watcher] = []
        self._load()

    # -- reading --

    def components(self) -> list[str]:
        return sorted(self._docs)

    def has(self, component: str) -> bool:
        return component in self._docs

    def document(self, component: str) -> dict[str, Any]:
        return copy.deepcopy(self._doc(component))

    def get(self, component: str, key_path: Sequence[str] = ()) -> Any:
        value = lookup(self._doc(component), key_path)
        if value is MISSING:
            pointer = format_pointer(key_path)
            raise ConfigurationError(f"no configuration value at {pointer!r}",
                                     component=component, field=pointer)
        return copy.deepcopy(value)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self._docs)

    # -- writing --

    def set_document(self, component: str, doc: Mapping[str, Any]) -> None:
        """Replace a whole document (deployments, rollback); watchers see the differing keys."""
        _check_name(component)
        if not isinstance(doc, Mapping):
            raise ConfigurationError(f"configuration must be an object, got {type(doc).__name__}",
                                     component=component)
        new = _plain(doc, what="configuration", component=component)
        old = self._docs.get(component, {})
        changed = diff_paths(old, new)
        self._persist(component, new)
        self._docs[component] = new
        # A deployment's write is newer than every earlier IPC update of this component.
        self._stamps[component] = {(): self._clock()}
        self._notify(component, changed)
        if changed:
            log.info("config.document_set", component=component, changed=len(changed))

    def update(self, component: str, key_path: Sequence[str], value: Any, *,
               timestamp: float | None = None) -> list[list[str]]:
        """Merge ``value`` at ``key_path`` (a component's own UpdateConfiguration).

        Returns the changed key paths. Leaves whose last write is newer than ``timestamp`` keep
        their value (Greengrass ignores stale updates rather than failing them).
        """
        doc = self._doc(component)
        key_path = tuple(key_path)
        if not all(isinstance(k, str) and k for k in key_path):
            raise ConfigurationError(f"key path {list(key_path)!r} must be non-empty strings",
                                     component=component, field=format_pointer(map(str, key_path)))
        value = _plain(value, what=f"value at {format_pointer(key_path)!r}", component=component)
        if not key_path and not isinstance(value, dict):
            raise ConfigurationError("only an object can be merged at the document root",
                                     component=component, field="")
        ts = self._clock() if timestamp is None else timestamp
        stamps = self._stamps.setdefault(component, {})
        new = copy.deepcopy(doc)

        def stale(path: KeyPath) -> bool:
            if self._stale(stamps, path, ts):
                log.debug("config.stale_update_ignored", component=component, key=format_pointer(path))
                return True
            return False

        for path in merge_at(new, key_path, value, skip=stale):
            stamps[path] = ts
        changed = diff_paths(doc, new)
        if not changed:
            return []
        self._persist(component, new)
        self._docs[component] = new
        self._notify(component, changed)
        log.debug("config.updated", component=component, key=format_pointer(key_path), changed=len(changed))
        return [list(p) for p in changed]

    def remove(self, component: str) -> None:
        if component not in self._docs:
            return
        try:
            self._paths.config_file(component).unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot remove configuration file: {exc}", component=component,
                                     path=self._paths.config_file(component)) from exc
        del self._docs[component]
        self._stamps.pop(component, None)
        self._notify(component, [()])
        log.info("config.removed", component=component)

    def restore(self, snapshot: Mapping[str, Mapping[str, Any]]) -> None:
        """Put back exactly the documents of :meth:`snapshot` (rollback)."""
        for component in [c for c in self._docs if c not in snapshot]:
            self.remove(component)
        for component, doc in snapshot.items():
            self.set_document(component, doc)

    # -- watching --

    def watch(self, component: str, key_path: Sequence[str] = ()
              ) -> AbstractAsyncContextManager[AsyncIterator[list[str]]]:
        """Changed key paths at or under ``key_path`` while the context is open."""
        return self._watch(component, tuple(key_path))

    @asynccontextmanager
    async def _watch(self, component: str, key_path: KeyPath) -> AsyncIterator[AsyncIterator[list[str]]]:
        watcher = _Watcher(component, key_path, self._watch_limit)
        self._watchers.append(watcher)
        try:
            yield watcher
        finally:
            self._watchers.remove(watcher)

    # -- internals --

    def _doc(self, component: str) -> dict[str, Any]:
        try:
            return self._docs[component]
        except KeyError:
            raise ConfigurationError("no configuration for this component (not deployed)",
                                     component=component) from None

    @staticmethod
    def _stale(stamps: Mapping[KeyPath, float], path: KeyPath, ts: float) -> bool:
        for stamped, when in stamps.items():
            if when > ts and (path[: len(stamped)] == stamped or stamped[: len(path)] == path):
                return True
        return False

    def _notify(self, component: str, changed: Sequence[KeyPath]) -> None:
        if not changed:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for watcher in list(self._watchers):
            if watcher.component != component:
                continue
            for path in changed:
                hit = watcher.relevant(path)
                if hit is None:
                    continue
                if watcher.loop is running:
                    watcher.offer(hit)
                else:
                    watcher.loop.call_soon_threadsafe(watcher.offer, hit)

    def _load(self) -> None:
        directory = self._paths.config_dir
        if not directory.is_dir():
            return
        for file in sorted(directory.glob("*.json")):
            try:
                doc = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"cannot read configuration: {exc}", path=file) from exc
            if not isinstance(doc, dict):
                raise ConfigurationError("configuration file must hold a JSON object", path=file)
            self._docs[file.stem] = doc

    def _persist(self, component: str, doc: dict[str, Any]) -> None:
        target = self._paths.config_file(component)
        try:
            write_atomic(target, json.dumps(doc, indent=1, sort_keys=True).encode(), mode=0o600)
        except OSError as exc:
            raise ConfigurationError(f"cannot write configuration: {exc}", component=component,
                                     path=target) from exc


def _check_name(component: str) -> None:
    if not component or "/" in component or "\0" in component or component.startswith("."):
        raise ConfigurationError(f"invalid component name {component!r}", component=component)


