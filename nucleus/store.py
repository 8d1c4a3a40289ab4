"""The component store: versioned recipes and digest-checked artifacts under the nucleus root.

Layout (owned by :class:`nucleus.paths.Paths`)::

    packages/recipes/<name>@<version>.json          canonical recipe documents
    packages/artifacts/<name>/<version>/<file>      verified artifacts, read-only
    packages/artifacts-unarchived/<name>/<version>/<archive stem>/...
    packages/.staging/                              work in progress, never read by components

The deployment engine relies on one promise: :meth:`ComponentStore.prepare` either makes every
artifact of a component version present and verified, or changes nothing. So all fetching,
hashing and unpacking happens in a private staging directory, and only verified results are
renamed into place. The store also serves the resolver as its ``Catalog`` (``versions`` and
``recipe``), fully offline.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from nucleus import artifacts as art
from nucleus.durable import write_atomic
from nucleus.errors import ArtifactError, RecipeError, UnknownComponentError, VersionError
from nucleus.paths import Paths
from nucleus.recipe import Artifact, Recipe, parse_recipe
from nucleus.versions import Version

log = structlog.get_logger(__name__)

_RECIPE_SUFFIX = ".json"


@dataclass(slots=True)
class _Staged:
    """What prepare() will rename into place once everything is verified."""

    artifact: Artifact
    file_name: str
    staged_file: Path | None  # None: the file already in the store is verified and reused
    staged_folder: Path | None  # None: no archive, or its unpacked folder is reused


def _version_text(version: Version | str) -> str:
    return str(version) if isinstance(version, Version) else str(Version.parse(version))


def _check_name(name: str) -> None:
    # The recipe parser enforces [A-Za-z0-9-_.]; "." and ".." pass that rule but are path syntax.
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise RecipeError(f"component name {name!r} cannot be stored", component=name,
                          field="ComponentName")


class ComponentStore:
    """Recipes and artifacts on disk; also the resolver's ``Catalog``."""

    def __init__(self, paths: Paths, limits: art.Limits | None = None) -> None:
        self._paths = paths
        self.limits = limits or art.Limits()
        self._index: dict[str, dict[Version, Path]] | None = None
        self._recipes: dict[tuple[str, Version], Recipe] = {}

    # --- recipes -----------------------------------------------------------------------------

    def add_recipe(self, recipe: Recipe) -> None:
        """Persist a recipe (idempotent). A different recipe for the same name@version replaces
        the stored one — Greengrass allows this for local development."""
        _check_name(recipe.name)
        version = str(recipe.version)
        target = self._paths.recipe_file(recipe.name, version)
        data = (json.dumps(recipe.to_document(), indent=1, ensure_ascii=False) + "\n").encode()
        if target.is_file():
            try:
                if target.read_bytes() == data:
                    self._remember(recipe, target)
                    return
            except OSError:
                pass  # unreadable: overwrite it below
            log.warning("store.recipe_replaced", component=recipe.name, version=version)
        try:
            write_atomic(target, data)
        except OSError as exc:
            raise RecipeError(f"cannot store recipe: {exc}", component=recipe.name, path=target) from exc
        self._remember(recipe, target)
        log.info("store.recipe_added", component=recipe.name, version=version)

    def names(self) -> list[str]:
        return sorted(n for n, versions in self._load_index().items() if versions)

    def versions(self, name: str) -> list[Version]:
        return sorted(self._load_index().get(name, {}))

    def recipe(self, name: str, version: Version) -> Recipe:
        key = (name, version)
        cached = self._recipes.get(key)
        if cached is not None:
            return cached
        path = self._load_index().get(name, {}).get(version)
        if path is None:
            have = ", ".join(str(v) for v in self.versions(name)) or "none"
            raise UnknownComponentError(f"{name} {version} is not in the component store (have: {have})",
                                        component=name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UnknownComponentError(f"cannot read stored recipe: {exc}", component=name,
                                        path=path) from exc
        recipe = parse_recipe(data, source=str(path), fmt="json")
        self._recipes[key] = recipe
        return recipe

    def _remember(self, recipe: Recipe, path: Path) -> None:
        index = self._load_index()
        index.setdefault(recipe.name, {})[recipe.version] = path
        self._recipes[(recipe.name, recipe.version)] = recipe

    def _load_index(self) -> dict[str, dict[Version, Path]]:
        if self._index is None:
            index: dict[str, dict[Version, Path]] = {}
            directory = self._paths.recipes_dir
            if directory.is_dir():
                for file in directory.glob(f"*@*{_RECIPE_SUFFIX}"):
                    name, _, version_text = file.name[: -len(_RECIPE_SUFFIX)].rpartition("@")
                    try:
                        version = Version.parse(version_text)
                    except VersionError:
                        log.warning("store.recipe_file_ignored", path=str(file), reason="bad version")
                        continue
                    index.setdefault(name, {})[version] = file
            self._index = index
        return self._index

    # --- artifacts ---------------------------------------------------------------------------

    def artifacts_path(self, name: str, version: Version | str) -> Path:
        return self._paths.artifacts(name, _version_text(version))

    def decompressed_path(self, name: str, version: Version | str) -> Path:
        return self._paths.unarchived(name, _version_text(version))

    def has_artifacts(self, recipe: Recipe, platform: Mapping[str, str]) -> bool:
        """Whether every artifact of the manifest for ``platform`` is in place (not re-hashed)."""
        manifest = recipe.select(platform)
        if manifest is None:
            return False
        files = self.artifacts_path(recipe.name, recipe.version)
        folders = self.decompressed_path(recipe.name, recipe.version)
        for artifact in manifest.artifacts:
            name = art.safe_file_name(artifact, component=recipe.name)
            if not (files / name).is_file():
                return False
            if artifact.unarchive == "ZIP" and not (folders / art.archive_folder(name)).is_dir():
                return False
        return True

    async def prepare(
        self,
        recipe: Recipe,
        artifacts: Sequence[Artifact],
        *,
        artifact_dirs: Sequence[Path] = (),
        http_timeout_s: float = 60.0,
    ) -> None:
        """Fetch, verify, unpack and set permissions on every artifact; all or nothing.

        Already-present files whose digest matches are reused. On any failure an ArtifactError
        (DigestMismatchError for a wrong digest) names the component and URI, and the store is
        exactly as before, staging removed. Nothing is written past ``self.limits`` (an artifact's
        size, what a ZIP unpacks to) or into the disk reserve they keep free for the rest of the
        device. Runs in a worker thread: hashing and downloads must not stall the loop.
        """
        await asyncio.to_thread(
            self._prepare_blocking, recipe, list(artifacts), [Path(d) for d in artifact_dirs], http_timeout_s
        )

    def _prepare_blocking(self, recipe: Recipe, artifacts: list[Artifact], artifact_dirs: list[Path],
                          http_timeout_s: float) -> None:
        name, version = recipe.name, str(recipe.version)
        _check_name(name)
        _check_unique(name, artifacts)
        if not artifacts:
            return
        self._paths.staging_dir.mkdir(parents=True, exist_ok=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{name}@{version}.", dir=self._paths.staging_dir))
        except OSError as exc:  # a disk without a free inode
            raise ArtifactError(f"cannot create a staging folder in {self._paths.staging_dir}: "
                                f"{exc.strerror or exc}", component=name, path=self._paths.staging_dir) from exc
        space = art.DiskSpace(self._paths.staging_dir, self.limits)
        try:
            staged = [
                self._stage(a, staging, name=name, version=version, artifact_dirs=artifact_dirs,
                            http_timeout_s=http_timeout_s, space=space)
                for a in artifacts
            ]
            self._commit(staged, staging, name, version)
        except OSError as exc:  # disk full, permissions: still an artifact problem of this component
            raise ArtifactError(f"cannot prepare artifacts: {exc}", component=name,
                                path=getattr(exc, "filename", None)) from exc
        finally:
            _remove_tree(staging)
        log.info("store.artifacts_ready", component=name, version=version, artifacts=len(artifacts))

    def _stage(self, artifact: Artifact, staging: Path, *, name: str, version: str,
               artifact_dirs: list[Path], http_timeout_s: float, space: art.DiskSpace) -> _Staged:
        file_name = art.safe_file_name(artifact, component=name)
        final_file = self.artifacts_path(name, version) / file_name
        staged_file: Path | None = None
        if art.matches(final_file, artifact, component=name):
            log.debug("store.artifact_reused", component=name, version=version, uri=artifact.uri)
        else:
            staged_file = staging / "files" / file_name
            actual = art.fetch(artifact, staged_file, component=name, version=version,
                               artifact_dirs=artifact_dirs, timeout_s=http_timeout_s,
                               max_bytes=self.limits.max_artifact_bytes, space=space)
            art.verify(artifact, actual, component=name)
        staged_folder: Path | None = None
        if artifact.unarchive == "ZIP":
            folder = art.archive_folder(file_name)
            final_folder = self.decompressed_path(name, version) / folder
            if staged_file is not None or not final_folder.is_dir():
                staged_folder = staging / "unarchived" / folder
                source = staged_file if staged_file is not None else final_file
                with art.readable(source):  # an archive may be Read NONE
                    art.unarchive_zip(source, staged_folder, component=name, uri=artifact.uri,
                                      limits=self.limits, space=space)
                art.apply_tree_permission(staged_folder, artifact.permission)
        if staged_file is not None:
            art.apply_permission(staged_file, artifact.permission)
        return _Staged(artifact, file_name, staged_file, staged_folder)

    def _commit(self, staged: list[_Staged], staging: Path, name: str, version: str) -> None:
        files = self.artifacts_path(name, version)
        folders = self.decompressed_path(name, version)
        old = staging / "replaced"
        try:
            for item in staged:
                if item.staged_file is not None:
                    files.mkdir(parents=True, exist_ok=True)
                    item.staged_file.replace(files / item.file_name)
                else:  # reused: the recipe's permission may have changed for this version
                    art.apply_permission(files / item.file_name, item.artifact.permission)
                if item.staged_folder is not None:
                    folders.mkdir(parents=True, exist_ok=True)
                    final_folder = folders / item.staged_folder.name
                    if final_folder.exists() or final_folder.is_symlink():
                        old.mkdir(exist_ok=True)
                        final_folder.rename(old / item.staged_folder.name)
                    item.staged_folder.rename(final_folder)
        except OSError as exc:
            raise ArtifactError(f"cannot move verified artifacts into the store: {exc}", component=name,
                                path=files) from exc

    # --- cleanup -----------------------------------------------------------------------------

    def remove_unused(self, keep: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Delete recipes and artifacts of every name@version not in ``keep``; return what went.

        Work directories are never touched (they hold component state across versions).
        """
        wanted = {(n, _normalize(v)) for n, v in keep}
        present: set[tuple[str, str]] = set()
        for name, versions in self._load_index().items():
            present.update((name, str(v)) for v in versions)
        for base in (self._paths.artifacts_dir, self._paths.unarchived_dir):
            if base.is_dir():
                for comp in base.iterdir():
                    if comp.is_dir():
                        present.update((comp.name, v.name) for v in comp.iterdir() if v.is_dir())
        removed: list[tuple[str, str]] = []
        for name, version in sorted(present - wanted):
            self._remove_version(name, version)
            removed.append((name, version))
        if removed:
            log.info("store.versions_removed", count=len(removed))
        return removed

    def _remove_version(self, name: str, version: str) -> None:
        self._paths.recipe_file(name, version).unlink(missing_ok=True)
        for folder in (self._paths.artifacts(name, version), self._paths.unarchived(name, version)):
            _remove_tree(folder)
            parent = folder.parent
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        index = self._load_index()
        for v in [v for v in index.get(name, {}) if str(v) == version]:
            del index[name][v]
            self._recipes.pop((name, v), None)
        if name in index and not index[name]:
            del index[name]

    def clear_staging(self) -> None:
        """Remove leftovers of a prepare() interrupted by a crash (call at daemon start)."""
        staging = self._paths.staging_dir
        if staging.is_dir():
            for child in staging.iterdir():
                _remove_tree(child)


def _normalize(version: str) -> str:
    try:
        return str(Version.parse(version))
    except VersionError:
        return version


def _check_unique(name: str, artifacts: Sequence[Artifact]) -> None:
    seen: dict[str, str] = {}
    for a in artifacts:
        file_name = art.safe_file_name(a, component=name)
        if file_name in seen:
            raise ArtifactError(
                f"artifacts {seen[file_name]} and {a.uri} have the same file name {file_name!r}; "
                "each artifact of a manifest needs a unique file name", component=name, field="Uri")
        seen[file_name] = a.uri


def _remove_tree(path: Path) -> None:
    """rmtree that also copes with read-only folders left by unpacked archives."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return

    def on_error(func: Callable[[str], object], failed: str, _exc: object) -> None:
        Path(failed).parent.chmod(0o755)  # a folder someone made read-only: make it writable, retry
        func(failed)

    shutil.rmtree(path, onerror=on_error)


