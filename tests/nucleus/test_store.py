"""The component store: recipes round-trip, prepare() is all-or-nothing, cleanup keeps what is asked."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import os
import stat
import threading
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from nucleus.errors import ArtifactError, DigestMismatchError, RecipeError, UnknownComponentError
from nucleus.paths import Paths
from nucleus.recipe import Recipe, parse_recipe
from nucleus.store import ComponentStore
from nucleus.versions import Version

NAME = "com.example.App"
PLATFORM = {"os": "linux", "architecture": "amd64"}


def b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def make_recipe(name: str = NAME, version: str = "1.0.0", artifacts: list[dict[str, Any]] | None = None,
                **extra: Any) -> Recipe:
    doc: dict[str, Any] = {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": name,
        "ComponentVersion": version,
        "ComponentConfiguration": {"DefaultConfiguration": {"interval": 5, "nested": {"list": [1, 2]}}},
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": "python3 {artifacts:path}/app.py"},
                       "Artifacts": artifacts or []}],
        **extra,
    }
    return parse_recipe(doc)


async def prepare(store: ComponentStore, recipe: Recipe, artifact_dir: Path | None = None) -> None:
    manifest = recipe.select(PLATFORM)
    assert manifest is not None
    await store.prepare(recipe, manifest.artifacts, artifact_dirs=[artifact_dir] if artifact_dir else [])


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under root with its mode and content hash: 'the store is unchanged' made checkable."""
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [*dirnames, *filenames]:
            p = Path(dirpath) / n
            st = p.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                p.chmod(st.st_mode | 0o400)
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                p.chmod(stat.S_IMODE(st.st_mode))
            out[str(p.relative_to(root))] = (st.st_mode, digest)
    return out


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths.at(tmp_path / "root")
    p.ensure()
    return p


@pytest.fixture
def store(paths: Paths) -> ComponentStore:
    return ComponentStore(paths)


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    d = tmp_path / "artifacts"
    (d / NAME / "1.0.0").mkdir(parents=True)
    return d


def put(artifact_dir: Path, file_name: str, data: bytes, version: str = "1.0.0") -> None:
    folder = artifact_dir / NAME / version
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file_name).write_bytes(data)


# --- recipes ---------------------------------------------------------------------------------------

def test_recipes_round_trip_through_the_store(paths: Paths, store: ComponentStore) -> None:
    deps = {"com.example.Dep": {"VersionRequirement": "^1.0"}}
    versions = ["1.10.0", "1.2.0", "1.2.0-rc.1", "2.0.0"]
    recipes = [make_recipe(version=v, ComponentDependencies=deps) for v in versions]
    for r in recipes:
        store.add_recipe(r)
    store.add_recipe(make_recipe("com.example.Other", "0.1.0"))
    fresh = ComponentStore(paths)  # read back from disk, not from memory
    assert fresh.names() == ["com.example.App", "com.example.Other"]
    assert fresh.versions(NAME) == [Version.parse(v) for v in ["1.2.0-rc.1", "1.2.0", "1.10.0", "2.0.0"]]
    for r in recipes:
        back = fresh.recipe(NAME, r.version)
        assert back.to_document() == r.to_document()
        assert back.source == str(paths.recipe_file(NAME, str(r.version)))
    assert fresh.versions("com.example.Missing") == []


def test_add_recipe_is_idempotent_and_replaces_a_changed_recipe(paths: Paths, store: ComponentStore) -> None:
    store.add_recipe(make_recipe())
    file = paths.recipe_file(NAME, "1.0.0")
    before = file.stat().st_mtime_ns, file.read_bytes()
    store.add_recipe(make_recipe())
    assert (file.stat().st_mtime_ns, file.read_bytes()) == before
    store.add_recipe(make_recipe(ComponentDescription="changed during development"))
    assert store.recipe(NAME, Version.parse("1.0.0")).description == "changed during development"
    reread = ComponentStore(paths).recipe(NAME, Version.parse("1.0.0"))
    assert reread.description == "changed during development"
    assert sorted(p.name for p in paths.recipes_dir.iterdir()) == [f"{NAME}@1.0.0.json"]  # no temp files


def test_unknown_recipe(store: ComponentStore) -> None:
    store.add_recipe(make_recipe())
    with pytest.raises(UnknownComponentError) as info:
        store.recipe(NAME, Version.parse("9.9.9"))
    assert info.value.component == NAME and "have: 1.0.0" in str(info.value)


def test_dot_names_are_refused(store: ComponentStore) -> None:
    with pytest.raises(RecipeError):
        store.add_recipe(make_recipe(name=".."))


# --- prepare ---------------------------------------------------------------------------------------

async def test_prepare_from_artifact_dir_with_base64_digest_and_permissions(
        store: ComponentStore, artifact_dir: Path) -> None:
    app, tool = b"print('app')\n", b"#!/bin/sh\necho tool\n"
    put(artifact_dir, "app.py", app)
    put(artifact_dir, "tool.sh", tool)
    recipe = make_recipe(artifacts=[
        {"Uri": "s3://bucket/app.py", "Digest": b64(app), "Algorithm": "SHA-256"},
        {"Uri": "s3://bucket/tool.sh", "Permission": {"Read": "ALL", "Execute": "OWNER"}},
    ])
    manifest = recipe.select(PLATFORM)
    assert manifest is not None
    assert not store.has_artifacts(recipe, PLATFORM)
    await store.prepare(recipe, manifest.artifacts, artifact_dirs=[artifact_dir])
    files = store.artifacts_path(NAME, "1.0.0")
    assert (files / "app.py").read_bytes() == app
    assert stat.S_IMODE((files / "app.py").stat().st_mode) == 0o400  # default Read OWNER
    assert stat.S_IMODE((files / "tool.sh").stat().st_mode) == 0o544
    assert store.has_artifacts(recipe, PLATFORM)
    assert list(store._paths.staging_dir.iterdir()) == []


async def test_prepare_over_http_with_hex_digest(store: ComponentStore, tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(300_000)
    (www / "model.bin").write_bytes(data)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.bin"
        recipe = make_recipe(artifacts=[{"Uri": url, "Digest": hashlib.sha256(data).hexdigest()}])
        await prepare(store, recipe)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert (store.artifacts_path(NAME, Version.parse("1.0.0")) / "model.bin").read_bytes() == data


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


async def test_prepare_from_file_uri(store: ComponentStore, tmp_path: Path) -> None:
    src = tmp_path / "src" / "app.py"
    src.parent.mkdir()
    src.write_bytes(b"x = 1\n")
    recipe = make_recipe(artifacts=[{"Uri": src.as_uri(), "Digest": b64(b"x = 1\n")}])
    await prepare(store, recipe)
    assert (store.artifacts_path(NAME, "1.0.0") / "app.py").read_bytes() == b"x = 1\n"


async def test_digest_mismatch_changes_nothing(
        paths: Paths, store: ComponentStore, artifact_dir: Path,
) -> None:
    # a store that already holds something: version 0.9.0 prepared, recipes for both
    old = make_recipe(version="0.9.0", artifacts=[{"Uri": "s3://b/app.py", "Digest": b64(b"old")}])
    put(artifact_dir, "app.py", b"old", version="0.9.0")
    store.add_recipe(old)
    await prepare(store, old, artifact_dir)
    before = snapshot(paths.root)

    put(artifact_dir, "good.py", b"good")
    put(artifact_dir, "app.py", b"tampered")
    put(artifact_dir, "bundle.zip", zip_bytes({"a.txt": b"a"}))
    new = make_recipe(artifacts=[
        {"Uri": "s3://b/good.py", "Digest": b64(b"good")},
        {"Uri": "s3://b/bundle.zip", "Unarchive": "ZIP"},
        {"Uri": "s3://b/app.py", "Digest": b64(b"expected")},  # last: the others were staged already
    ])
    with pytest.raises(DigestMismatchError) as info:
        await prepare(store, new, artifact_dir)
    err = info.value
    assert err.component == NAME and "s3://b/app.py" in str(err)
    assert b64(b"expected") in str(err) and b64(b"tampered") in str(err)
    assert snapshot(paths.root) == before


async def test_missing_artifact_changes_nothing(
        paths: Paths, store: ComponentStore, artifact_dir: Path,
) -> None:
    put(artifact_dir, "first.py", b"1")
    recipe = make_recipe(artifacts=[{"Uri": "s3://b/first.py"}, {"Uri": "s3://b/second.py"}])
    before = snapshot(paths.root)
    with pytest.raises(ArtifactError) as info:
        await prepare(store, recipe, artifact_dir)
    assert "s3://b/second.py" in str(info.value) and f"<dir>/{NAME}/1.0.0/second.py" in str(info.value)
    assert snapshot(paths.root) == before


async def test_verified_artifacts_are_reused_without_fetching(
        store: ComponentStore, artifact_dir: Path,
) -> None:
    put(artifact_dir, "app.py", b"v1")
    recipe = make_recipe(artifacts=[{"Uri": "s3://b/app.py", "Digest": b64(b"v1")}])
    await prepare(store, recipe, artifact_dir)
    (artifact_dir / NAME / "1.0.0" / "app.py").unlink()  # the source is gone: only reuse can succeed
    await prepare(store, recipe, artifact_dir)
    # a tampered file in the store is not reused: it is fetched again (and here cannot be)
    final = store.artifacts_path(NAME, "1.0.0") / "app.py"
    final.chmod(0o600)
    final.write_bytes(b"tampered")
    with pytest.raises(ArtifactError):
        await prepare(store, recipe, artifact_dir)
    put(artifact_dir, "app.py", b"v1")
    await prepare(store, recipe, artifact_dir)
    assert final.read_bytes() == b"v1"


async def test_zip_unarchived_into_decompressed_path(store: ComponentStore, artifact_dir: Path) -> None:
    data = zip_bytes({"my_app/main.py": b"print(1)", "my_app/lib/util.py": b"u = 1", "README": b"r"})
    put(artifact_dir, "my_archive.zip", data)
    recipe = make_recipe(artifacts=[{"Uri": "s3://b/path/my_archive.zip", "Unarchive": "ZIP",
                                     "Digest": b64(data), "Permission": {"Read": "ALL", "Execute": "ALL"}}])
    await prepare(store, recipe, artifact_dir)
    folder = store.decompressed_path(NAME, "1.0.0") / "my_archive"
    assert (folder / "my_app" / "main.py").read_bytes() == b"print(1)"
    assert (folder / "my_app" / "lib" / "util.py").read_bytes() == b"u = 1"
    assert stat.S_IMODE((folder / "README").stat().st_mode) == 0o555
    assert stat.S_IMODE((folder / "my_app" / "lib").stat().st_mode) == 0o755
    assert (store.artifacts_path(NAME, "1.0.0") / "my_archive.zip").read_bytes() == data  # archive kept
    assert store.has_artifacts(recipe, PLATFORM)
    # prepared again with a changed archive for the same version (development): folder replaced whole
    data2 = zip_bytes({"only.txt": b"2"})
    put(artifact_dir, "my_archive.zip", data2)
    recipe2 = make_recipe(artifacts=[{"Uri": "s3://b/path/my_archive.zip", "Unarchive": "ZIP"}])
    await prepare(store, recipe2, artifact_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["only.txt"]


async def test_zip_slip_rejected_and_nothing_changes(
        paths: Paths, store: ComponentStore, artifact_dir: Path,
) -> None:
    put(artifact_dir, "evil.zip", zip_bytes({"fine.txt": b"ok", "../evil": b"pwned"}))
    recipe = make_recipe(artifacts=[{"Uri": "s3://b/evil.zip", "Unarchive": "ZIP"}])
    before = snapshot(paths.root)
    with pytest.raises(ArtifactError) as info:
        await prepare(store, recipe, artifact_dir)
    assert "'../evil'" in str(info.value)
    assert snapshot(paths.root) == before
    assert not any(p.name == "evil" for p in paths.root.rglob("*"))


async def test_duplicate_file_names_in_a_manifest(store: ComponentStore, artifact_dir: Path) -> None:
    recipe = make_recipe(artifacts=[{"Uri": "s3://a/app.py"}, {"Uri": "s3://b/app.py"}])
    with pytest.raises(ArtifactError, match="same file name"):
        await prepare(store, recipe, artifact_dir)


# --- cleanup ---------------------------------------------------------------------------------------

async def test_remove_unused_keeps_what_is_asked(
        paths: Paths, store: ComponentStore, artifact_dir: Path,
) -> None:
    for version in ["1.0.0", "1.1.0", "2.0.0"]:
        put(artifact_dir, "app.py", version.encode(), version=version)
        put(artifact_dir, "b.zip", zip_bytes({"x": b"x"}), version=version)
        arts = [{"Uri": "s3://b/app.py"}, {"Uri": "s3://b/b.zip", "Unarchive": "ZIP"}]
        r = make_recipe(version=version, artifacts=arts)
        store.add_recipe(r)
        await prepare(store, r, artifact_dir)
    store.add_recipe(make_recipe("com.example.Gone", "0.1.0"))
    orphan = paths.artifacts("com.example.Orphan", "3.0.0")  # artifacts without a recipe
    orphan.mkdir(parents=True)
    (orphan / "f").write_bytes(b"f")
    work = paths.work(NAME)
    work.mkdir(parents=True)
    (work / "state.db").write_bytes(b"keep me")

    removed = store.remove_unused({(NAME, "2.0.0"), (NAME, "1.1.0")})
    assert removed == [(NAME, "1.0.0"), ("com.example.Gone", "0.1.0"), ("com.example.Orphan", "3.0.0")]
    assert store.versions(NAME) == [Version.parse("1.1.0"), Version.parse("2.0.0")]
    assert store.names() == [NAME]
    assert not paths.artifacts(NAME, "1.0.0").exists() and not paths.unarchived(NAME, "1.0.0").exists()
    assert not paths.recipe_file(NAME, "1.0.0").exists()
    assert not (paths.artifacts_dir / "com.example.Orphan").exists()
    assert (paths.artifacts(NAME, "2.0.0") / "app.py").read_bytes() == b"2.0.0"
    assert (paths.unarchived(NAME, "1.1.0") / "b" / "x").read_bytes() == b"x"
    assert (work / "state.db").read_bytes() == b"keep me"
    assert ComponentStore(paths).versions(NAME) == store.versions(NAME)
    with pytest.raises(UnknownComponentError):
        store.recipe(NAME, Version.parse("1.0.0"))
    assert store.remove_unused({(NAME, "2.0.0"), (NAME, "1.1.0")}) == []


def test_clear_staging(paths: Paths, store: ComponentStore) -> None:
    leftover = paths.staging_dir / "com.example.App@1.0.0.abc" / "files"
    leftover.mkdir(parents=True)
    (leftover / "half").write_bytes(b"x")
    (leftover / "half").chmod(0o400)
    leftover.chmod(0o500)
    store.clear_staging()
    assert list(paths.staging_dir.iterdir()) == []
