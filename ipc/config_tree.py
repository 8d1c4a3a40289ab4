"""A component's configuration as a document tree: what a key path reaches, what a merge at a key
path writes, and which key paths a change touched (what a configuration watch reports).

One owner for these rules, so the nucleus's configuration store and the bare bus's stand-in for it
(``ipc.devserver --config``) cannot drift apart: a component developed against the devserver sees the
same change notifications it will see under the nucleus. Pure: no I/O, no clock. It lives in ``ipc``
because the devserver may not import the nucleus (the dependency runs nucleus -> ipc only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

KeyPath = tuple[str, ...]
MISSING: Final = object()

RESTRICTED_KEYS: Final = ("accessControl",)
"""Top-level keys no component may write at run time, as on Greengrass. A component's policies are
read from its configuration's ``accessControl`` at the next start or deployment, so a component that
could write it (its own, or another's it may update) would grant itself any operation. Only
deployments set it."""


def restricted_keys(key_path: Sequence[str], value: Any) -> list[str]:
    """The restricted keys an update at ``key_path`` writes: its first key, or, for a merge at the
    root, the merged document's top-level keys."""
    touched = list(key_path[:1]) if key_path else list(value) if isinstance(value, Mapping) else []
    return [k for k in touched if k in RESTRICTED_KEYS]


def format_pointer(key_path: Iterable[str]) -> str:
    """The JSON pointer of a key path, for messages (``()`` is ``""``)."""
    return "".join("/" + k.replace("~", "~0").replace("/", "~1") for k in key_path)


def watched(prefix: KeyPath, path: KeyPath) -> KeyPath | None:
    """What a watch of ``prefix`` reports for a change at ``path``: the path itself at or below the
    watched key, the watched key when an ancestor of it changed, else nothing."""
    if path[: len(prefix)] == prefix:
        return path
    if prefix[: len(path)] == path:
        return prefix
    return None


def lookup(doc: Any, key_path: Sequence[str]) -> Any:
    """The value at ``key_path``, or :data:`MISSING`."""
    node = doc
    for key in key_path:
        if not isinstance(node, Mapping) or key not in node:
            return MISSING
        node = node[key]
    return node


def set_at(doc: dict[str, Any], key_path: Sequence[str], value: Any) -> None:
    """Set a value, creating (or replacing non-object) parents: maps replace scalars, as MERGE does."""
    node = doc
    for key in key_path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[key_path[-1]] = value


def leaves(value: Any, prefix: KeyPath) -> list[tuple[KeyPath, Any]]:
    """Each leaf of ``value`` with its key path under ``prefix`` (an empty object is a leaf)."""
    if isinstance(value, Mapping) and value:
        out: list[tuple[KeyPath, Any]] = []
        for key, child in value.items():
            out.extend(leaves(child, (*prefix, key)))
        return out
    return [(prefix, value)]


def merge_at(doc: dict[str, Any], key_path: KeyPath, value: Any,
             skip: Callable[[KeyPath], bool] = lambda path: False) -> list[KeyPath]:
    """Merge ``value`` (plain JSON data) at ``key_path`` as UpdateConfiguration does: objects key by
    key, anything else replaces; an empty object makes sure an object is there. A leaf whose path
    ``skip`` refuses (the nucleus: a stale timestamp) is left alone. Returns the leaf paths written."""
    written: list[KeyPath] = []
    for path, leaf in leaves(value, key_path):
        if not path or skip(path):
            continue  # an empty object merged at the root changes nothing
        if isinstance(leaf, dict):
            if not isinstance(lookup(doc, path), dict):
                set_at(doc, path, {})
        else:
            set_at(doc, path, leaf)
        written.append(path)
    return written


def diff_paths(old: Any, new: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """Key paths whose value differs: leaves, added or removed keys (descending into new maps)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[KeyPath] = []
        for key in [*old, *(k for k in new if k not in old)]:
            out.extend(diff_paths(old.get(key, MISSING), new.get(key, MISSING), (*prefix, key)))
        return out
    if old is MISSING and isinstance(new, Mapping) and new:
        return diff_paths({}, new, prefix)
    if new is MISSING and isinstance(old, Mapping) and old:
        return diff_paths(old, {}, prefix)
    if old is MISSING or new is MISSING or old != new or type(old) is not type(new):
        return [prefix]
    return []


def shape_problem(value: Any, *, max_depth: int, max_values: int) -> str | None:
    """Why a loaded document is too deep or too large to walk, or None.

    A value counts each time it is reached, so a YAML alias counts as often as it is used: an
    "alias bomb" of a few hundred bytes loads cheaply (aliases share one object) and is a billion
    values to whatever walks it. Iterative, and stops at the first excess. One owner for the
    recipe loader (nucleus) and the fleet document checks (cloud_sync).
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > max_values:
            return f"holds more than {max_values} values (YAML aliases count each time they are used)"
        if depth > max_depth:
            return f"is nested deeper than {max_depth} levels"
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return None
