"""Component configuration: RESET-then-MERGE semantics, persistence, stale updates, watchers."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleus.config_store import ConfigStore, apply_update, diff_paths, format_pointer, parse_pointer
from nucleus.errors import ConfigurationError
from nucleus.paths import Paths

DEFAULTS: dict[str, Any] = {
    "interval": 5,
    "thresholds": {"warn": 0.7, "trip": 0.9},
    "assets": ["gearbox", "bearing"],
    "a/b": {"c~d": 1},
}
CURRENT: dict[str, Any] = {
    "interval": 1,
    "thresholds": {"warn": 0.5, "trip": 0.95, "extra": True},
    "assets": ["gearbox"],
    "a/b": {"c~d": 2},
    "added": "by a previous merge",
}


@pytest.mark.parametrize(
    ("reset", "merge", "expected"),
    [
        # reset a key that has a default: back to the default
        (["/interval"], None, {**CURRENT, "interval": 5}),
        # reset a key the defaults do not have: removed
        (["/added"], None, {k: v for k, v in CURRENT.items() if k != "added"}),
        (["/thresholds/extra"], None, {**CURRENT, "thresholds": {"warn": 0.5, "trip": 0.95}}),
        # reset a whole subtree
        (["/thresholds"], None, {**CURRENT, "thresholds": {"warn": 0.7, "trip": 0.9}}),
        # escaped pointer tokens (~1 is "/", ~0 is "~")
        (["/a~1b/c~0d"], None, {**CURRENT, "a/b": {"c~d": 1}}),
        # "" resets everything to the defaults
        ([""], None, DEFAULTS),
        # reset of a key absent everywhere: no change
        (["/nope/deeper"], None, CURRENT),
        # merge: maps merge deeply, lists replaced whole, scalars replaced
        ([], {"thresholds": {"warn": 0.6}, "assets": ["rotor"], "interval": 2},
         {**CURRENT, "interval": 2, "assets": ["rotor"],
          "thresholds": {"warn": 0.6, "trip": 0.95, "extra": True}}),
        # a map replaces a scalar, a scalar replaces a map
        ([], {"interval": {"seconds": 3}, "thresholds": 0},
         {**CURRENT, "interval": {"seconds": 3}, "thresholds": 0}),
        # RESET happens before MERGE: the merge wins on the same key
        (["/interval", "/added"], {"interval": 9},
         {**{k: v for k, v in CURRENT.items() if k != "added"}, "interval": 9}),
        ([""], {"new": [1, 2]}, {**DEFAULTS, "new": [1, 2]}),
    ],
)
def test_apply_update_table(reset: list[str], merge: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    current, defaults = copy.deepcopy(CURRENT), copy.deepcopy(DEFAULTS)
    assert apply_update(current, defaults, reset=reset, merge=merge) == expected
    assert current == CURRENT and defaults == DEFAULTS  # pure


def test_apply_update_result_does_not_alias_inputs() -> None:
    out = apply_update(CURRENT, DEFAULTS, reset=["/thresholds"], merge={"m": {"x": [1]}})
    out["thresholds"]["warn"] = -1
    out["assets"].append("x")
    assert DEFAULTS["thresholds"]["warn"] == 0.7
    assert CURRENT["assets"] == ["gearbox"]


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"reset": ["interval"]}, "reset", "not a JSON pointer"),
        ({"reset": "/interval"}, "reset", "list of JSON pointers"),
        ({"merge": ["a"]}, "merge", "must be an object"),
    ],
)
def test_apply_update_rejects_bad_input(kwargs: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        apply_update(CURRENT, DEFAULTS, **kwargs)
    assert info.value.field == field
    assert words in str(info.value)


def test_pointer_round_trip() -> None:
    for path in [(), ("a",), ("a/b", "c~d", ""), ("~1",)]:
        assert parse_pointer(format_pointer(path)) == path


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text("abc", max_size=2), children,
                                                                      max_size=3),
    max_leaves=10,
)
_docs = st.dictionaries(st.text("abc", max_size=2), _json, max_size=4)


@settings(deadline=None)  # wall-clock deadlines flake on a loaded CI machine
@given(current=_docs, defaults=_docs, merge=_docs)
def test_merge_is_idempotent_and_full_reset_gives_defaults(
    current: dict[str, Any], defaults: dict[str, Any], merge: dict[str, Any]
) -> None:
    once = apply_update(current, defaults, merge=merge)
    assert apply_update(once, defaults, merge=merge) == once
    assert apply_update(current, defaults, reset=[""]) == defaults
    assert (diff_paths(current, once) == []) == (current == once)


# --- the store --------------------------------------------------------------------------------------

@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.at(tmp_path / "root")
    p.ensure()
    return p


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_set_document_persists_atomically_and_reloads(paths: Paths) -> None:
    store = ConfigStore(paths)
    store.set_document("com.example.A", {"x": {"y": [1, 2]}, "t": (1, 2)})
    file = paths.config_file("com.example.A")
    assert json.loads(file.read_text()) == {"x": {"y": [1, 2]}, "t": [1, 2]}
    assert file.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in paths.config_dir.iterdir()) == ["com.example.A.json"]  # no temp files
    again = ConfigStore(paths)
    assert again.components() == ["com.example.A"]
    assert again.document("com.example.A") == {"x": {"y": [1, 2]}, "t": [1, 2]}


def test_get_returns_copies_and_names_missing_keys(paths: Paths) -> None:
    store = ConfigStore(paths)
    store.set_document("A", {"x": {"y": [1]}})
    got = store.get("A", ["x"])
    got["y"].append(2)
    assert store.get("A", ["x", "y"]) == [1]
    assert store.get("A") == {"x": {"y": [1]}}
    with pytest.raises(ConfigurationError) as info:
        store.get("A", ["x", "nope"])
    assert info.value.component == "A" and info.value.field == "/x/nope"
    with pytest.raises(ConfigurationError) as info:
        store.get("B")
    assert info.value.component == "B"


def test_set_document_rejects_non_json_and_bad_names(paths: Paths) -> None:
    store = ConfigStore(paths)
    with pytest.raises(ConfigurationError, match="not JSON-serializable"):
        store.set_document("A", {"x": object()})
    with pytest.raises(ConfigurationError, match="not JSON-serializable"):
        store.set_document("A", {"x": float("nan")})
    with pytest.raises(ConfigurationError, match="invalid component name"):
        store.set_document("../escape", {})
    assert store.components() == []


def test_update_merges_at_key_path_and_reports_changes(paths: Paths) -> None:
    store = ConfigStore(paths)
    store.set_document("A", {"cfg": {"k": 1, "keep": True, "list": [1, 2]}})
    changed = store.update("A", ["cfg"], {"k": 2, "list": [3], "new": {"deep": 1}})
    assert sorted(changed) == [["cfg", "k"], ["cfg", "list"], ["cfg", "new", "deep"]]
    assert store.get("A", ["cfg"]) == {"k": 2, "keep": True, "list": [3], "new": {"deep": 1}}
    assert store.update("A", ["cfg", "k"], 2) == []  # same value: no change
    assert store.update("A", ["fresh", "leaf"], "v") == [["fresh", "leaf"]]
    assert json.loads(paths.config_file("A").read_text())["fresh"] == {"leaf": "v"}
    with pytest.raises(ConfigurationError, match="only an object"):
        store.update("A", [], 5)
    with pytest.raises(ConfigurationError):
        store.update("missing", ["a"], 1)


def test_stale_updates_are_ignored(paths: Paths) -> None:
    clock = Clock()
    store = ConfigStore(paths, clock=clock)
    store.set_document("A", {"k": 0, "other": 0})  # deployment write at t=1000
    assert store.update("A", ["k"], 1, timestamp=999.0) == []  # older than the deployment
    assert store.update("A", ["k"], 2, timestamp=1001.0) == [["k"]]
    assert store.update("A", ["k"], 3, timestamp=1000.5) == []  # older than the last write of k
    assert store.update("A", ["other"], 4, timestamp=1000.5) == [["other"]]  # other keys unaffected
    # replacing a parent would clobber a newer child: ignored
    store.update("A", ["m", "child"], 1, timestamp=1005.0)
    assert store.update("A", ["m"], 7, timestamp=1002.0) == []
    assert store.get("A") == {"k": 2, "other": 4, "m": {"child": 1}}
    clock.now = 2000.0
    assert store.update("A", ["k"], 5) == [["k"]]  # no timestamp: now


async def _next(it: Any) -> list[str]:
    return await asyncio.wait_for(anext(it), timeout=5)


async def test_watch_yields_changed_paths_under_the_key(paths: Paths) -> None:
    store = ConfigStore(paths)
    store.set_document("A", {"cfg": {"k": 1}, "other": 1})
    store.set_document("B", {"cfg": {"k": 1}})
    async with store.watch("A", ["cfg"]) as changes:
        store.update("A", ["other"], 2)  # not under /cfg
        store.update("B", ["cfg", "k"], 2)  # another component
        store.update("A", ["cfg", "k"], 2)
        assert await _next(changes) == ["cfg", "k"]
        store.set_document("A", {"cfg": {"k": 2, "n": 1}})
        assert await _next(changes) == ["cfg", "n"]
        store.set_document("A", {})  # the whole subtree removed: every removed leaf is reported
        assert await _next(changes) == ["cfg", "k"]
        assert await _next(changes) == ["cfg", "n"]
        store.update("A", ["cfg"], {"z": 1})
        assert await _next(changes) == ["cfg", "z"]
        store.remove("A")
        assert await _next(changes) == ["cfg"]  # an ancestor (the document) changed


async def test_watch_coalesces_and_stays_bounded(paths: Paths) -> None:
    store = ConfigStore(paths, watch_limit=4)
    store.set_document("A", {})
    async with store.watch("A") as changes:
        for i in range(100):
            store.update("A", ["hot"], i)  # same key 100 times while nobody reads
        store.update("A", ["marker"], 1)
        assert await _next(changes) == ["hot"]
        assert await _next(changes) == ["marker"]
        for i in range(100):  # more distinct keys than the limit: collapse to the watched key
            store.update("A", [f"k{i}"], i)
        seen = [await _next(changes)]
        while seen[-1] != []:
            seen.append(await _next(changes))
            assert len(seen) <= 5  # never more than the limit pending (+ the collapse marker)
        # the collapse told the reader to re-read the document; what is left is bounded too
        store.update("A", ["sentinel"], 1)
        tail = [await _next(changes)]
        while tail[-1] != ["sentinel"]:
            tail.append(await _next(changes))
            assert len(tail) <= 5


async def test_watch_receives_updates_made_in_another_thread(paths: Paths) -> None:
    store = ConfigStore(paths)
    store.set_document("A", {"k": 0})
    async with store.watch("A", ["k"]) as changes:
        worker = threading.Thread(target=store.update, args=("A", ["k"], 1))
        worker.start()
        worker.join(timeout=5)
        assert await _next(changes) == ["k"]


async def test_snapshot_and_restore(paths: Paths) -> None:
    store = ConfigStore(paths)
    store.set_document("A", {"v": 1})
    store.set_document("B", {"v": 1})
    snap = store.snapshot()
    store.set_document("A", {"v": 2})
    store.set_document("C", {"v": 3})
    store.remove("B")
    async with store.watch("A") as changes:
        store.restore(snap)
        assert await _next(changes) == ["v"]
    assert store.snapshot() == {"A": {"v": 1}, "B": {"v": 1}}
    assert not paths.config_file("C").exists()
    assert ConfigStore(paths).snapshot() == snap


def test_corrupt_file_names_the_path(paths: Paths) -> None:
    paths.config_file("A").write_text("{not json")
    with pytest.raises(ConfigurationError) as info:
        ConfigStore(paths)
    assert info.value.path == str(paths.config_file("A"))
