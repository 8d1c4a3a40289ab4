"""Getting one artifact onto disk: locate, fetch, hash, verify, unarchive, set permissions.

Every function here is blocking and meant to run in a worker thread (``ComponentStore.prepare``
calls them through ``asyncio.to_thread``). None of them touches the store's final layout: they
write where they are told (a staging directory), so that a failure leaves the store unchanged.

Sources, in order: a local artifact directory laid out as ``<dir>/<Component>/<Version>/<file>``
(what ``greengrass-cli --artifactDir`` reads — this is how a local deployment supplies an
``s3://`` artifact), then the URI itself for ``file://``, ``http://`` and ``https://``.

Digests are checked on the bytes as they are written (hashing while streaming) and compared
before anything is used. Greengrass writes SHA-256 digests in base64; real recipes also carry hex,
so both are accepted.

The digest is only known to be right once the last byte is in, so it cannot protect the disk: a
compromised artifact server, a wrong URL or a ZIP bomb with the right digest would fill the device
before any check failed, and with it the cloud spool and every component's logs. So every write is
bounded before it happens (:class:`Limits`: an artifact's size, what a ZIP unpacks to, its entry
count) and keeps :class:`DiskSpace`'s reserve free while it happens.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Final

import structlog

from nucleus.errors import ArtifactError, DigestMismatchError
from nucleus.recipe import Artifact, Permission, canonical_algorithm

log = structlog.get_logger(__name__)

CHUNK: Final = 1024 * 1024
DIR_MODE: Final = 0o755
_HEX = re.compile(r"[0-9a-fA-F]+")
_DRIVE = re.compile(r"^[A-Za-z]:")
FETCHED_SCHEMES: Final = frozenset({"file", "http", "https"})
MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB
BLOCK: Final = 4096  # what an unpacked file costs at least on the usual filesystems, however small


# --- limits -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Limits:
    """What one artifact may put on the disk: ``deployments.*`` in nucleus.yaml (nucleus.settings).

    The defaults fit an edge device: a model or a bundled application is well under a GiB; more is
    a wrong URL or an attack until the operator says otherwise.
    """

    max_artifact_bytes: int = 1 * GiB
    max_unarchived_bytes: int = 4 * GiB
    max_archive_entries: int = 50_000
    disk_reserve_bytes: int = 64 * MiB
    disk_reserve_percent: float = 5.0


def show_size(n: int) -> str:
    """Bytes as an operator compares them with ``df -h``, with the exact count for the settings."""
    if n >= GiB:
        return f"{n / GiB:.1f} GiB ({n} B)"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB ({n} B)"
    return f"{n} B"


class DiskSpace:
    """Free space on the store's filesystem, less the reserve a deployment must leave to the rest
    of the device: the cloud spool, the journal, logs, the components' own files.

    The reserve is ``disk_reserve_bytes`` or ``disk_reserve_percent`` of the filesystem, whichever
    is larger. It is checked before each write from what the write will need (a file's size, a
    ZIP's unpacked size) and again after every chunk written, for a download of unknown length and
    for whatever else fills the disk meanwhile.
    """

    def __init__(self, where: Path, limits: Limits) -> None:
        self.where = where
        self.limits = limits

    def _usage(self) -> tuple[int, int]:
        usage = shutil.disk_usage(self.where)
        reserve = max(self.limits.disk_reserve_bytes, int(usage.total * self.limits.disk_reserve_percent / 100))
        return usage.free, reserve

    def check(self, need: int, *, component: str, uri: str, what: str) -> None:
        """Refuse to start a write of ``need`` bytes that would eat into the reserve."""
        free, reserve = self._usage()
        if free - need < reserve:
            raise ArtifactError(
                f"artifact {uri}: not enough disk space to {what}: needs {show_size(need)}, "
                f"{show_size(free)} free on {self.where}, of which {show_size(reserve)} stay free "
                "(deployments.disk_reserve_bytes / disk_reserve_percent); free some space or lower the reserve",
                component=component, field="Uri")

    def still_enough(self, *, component: str, uri: str, written: int) -> None:
        """Stop a write in progress once the free space is down to the reserve."""
        free, reserve = self._usage()
        if free < reserve:
            raise ArtifactError(
                f"artifact {uri}: stopped after {show_size(written)}: only {show_size(free)} left free on "
                f"{self.where}, below the {show_size(reserve)} kept free "
                "(deployments.disk_reserve_bytes / disk_reserve_percent)", component=component, field="Uri")


def _write_failed(exc: OSError, dest: Path, *, component: str, uri: str, field: str) -> ArtifactError:
    """A failed write to the staging folder, said as such: disk full is the operator's to fix,
    not a problem of the artifact's source. The folder shown is the store's staging folder (the
    filesystem to look at), not this deployment's temporary one, which is gone when this is read."""
    why = "the disk is full" if exc.errno == errno.ENOSPC else \
        "the file size limit of the daemon's process (ulimit -f) is reached" if exc.errno == errno.EFBIG else \
        exc.strerror or str(exc)
    parts = dest.parts
    folder = Path(*parts[: parts.index(".staging") + 1]) if ".staging" in parts[:-1] else dest.parent
    what = "unpack" if field == "Unarchive" else "write"
    return ArtifactError(f"artifact {uri}: {why}: cannot {what} {dest.name!r} in {folder} "
                         f"([Errno {exc.errno}] {exc.strerror})", component=component, field=field)


# --- names and digests --------------------------------------------------------------------------

def safe_file_name(artifact: Artifact, *, component: str) -> str:
    """The artifact's file name, refused if it could leave the artifact directory."""
    name = artifact.file_name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ArtifactError(f"artifact URI {artifact.uri!r} does not end in a usable file name",
                            component=component, field="Uri")
    return name


def archive_folder(file_name: str) -> str:
    """Greengrass unpacks ``my_archive.zip`` into a folder named ``my_archive``.

    ``...zip`` and ``..zip`` have the stems ``..`` and ``.``: path syntax, not a folder (the first
    named the component's folder of all versions, the second the version's own); they keep their
    whole file name.
    """
    stem = PurePosixPath(file_name).stem
    return stem if stem not in ("", ".", "..") else file_name


def _hash_name(algorithm: str, *, component: str, uri: str) -> str:
    try:
        return canonical_algorithm(algorithm).replace("-", "").lower()  # hashlib's name: sha256
    except ValueError as exc:
        raise ArtifactError(f"artifact {uri}: {exc}", component=component, field="Algorithm") from None


def new_hasher(artifact: Artifact, *, component: str) -> hashlib._Hash:
    return hashlib.new(_hash_name(artifact.algorithm, component=component, uri=artifact.uri))


def expected_digest(artifact: Artifact, *, component: str) -> bytes | None:
    """The raw digest the recipe promises (hex or base64), ``None`` if it gives none."""
    if artifact.digest is None or not artifact.digest.strip():
        return None
    text = artifact.digest.strip()
    size = new_hasher(artifact, component=component).digest_size
    if len(text) == 2 * size and _HEX.fullmatch(text):
        return bytes.fromhex(text)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(text.encode("ascii"), validate=True) if decode is base64.b64decode else decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == size:
            return raw
    raise ArtifactError(
        f"artifact {artifact.uri}: Digest {text!r} is neither {2 * size} hex digits nor base64 of a "
        f"{size}-byte {artifact.algorithm} digest", component=component, field="Digest",
    )


def render_digest(raw: bytes, like: str | None) -> str:
    """Show a digest in the same notation as the recipe wrote the expected one."""
    if like is not None and _HEX.fullmatch(like.strip()) and len(like.strip()) == 2 * len(raw):
        return raw.hex()
    return base64.b64encode(raw).decode("ascii")


def verify(artifact: Artifact, actual: bytes, *, component: str) -> None:
    """Raise DigestMismatchError unless ``actual`` is the digest the recipe promises."""
    expected = expected_digest(artifact, component=component)
    if expected is None or expected == actual:
        return
    raise DigestMismatchError(
        f"artifact {artifact.uri}: {artifact.algorithm} digest mismatch: expected "
        f"{render_digest(expected, artifact.digest)}, got {render_digest(actual, artifact.digest)}",
        component=component, field="Digest",
    )


def hash_file(path: Path, artifact: Artifact, *, component: str) -> bytes:
    """Digest of a file; readable even when its permission is Read NONE (we own it)."""
    hasher = new_hasher(artifact, component=component)
    with readable(path), path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
    return hasher.digest()


@contextlib.contextmanager
def readable(path: Path) -> Iterator[None]:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & stat.S_IRUSR:
        yield
        return
    path.chmod(mode | stat.S_IRUSR)
    try:
        yield
    finally:
        path.chmod(mode)


def matches(path: Path, artifact: Artifact, *, component: str) -> bool:
    """Whether an already-present file is the promised artifact (only provable with a digest)."""
    expected = expected_digest(artifact, component=component)
    if expected is None or not path.is_file() or path.is_symlink():
        return False
    return hash_file(path, artifact, component=component) == expected


# --- fetching -----------------------------------------------------------------------------------

def locate_local(artifact: Artifact, *, component: str, version: str,
                 artifact_dirs: Sequence[Path]) -> Path | None:
    """The file for this artifact in a local artifact directory, if one has it."""
    name = safe_file_name(artifact, component=component)
    for directory in artifact_dirs:
        candidate = Path(directory) / component / version / name
        if candidate.is_file():
            return candidate
    return None


def fetch(
    artifact: Artifact,
    dest: Path,
    *,
    component: str,
    version: str,
    artifact_dirs: Sequence[Path] = (),
    timeout_s: float = 60.0,
    max_bytes: int | None = None,
    space: DiskSpace | None = None,
) -> bytes:
    """Write the artifact to ``dest`` and return the digest of exactly the bytes written.

    Nothing is written for an artifact known to be over ``max_bytes`` (a file's size, an HTTP
    ``Content-Length``) or to need more than ``space`` has; a download without a length stops at
    the first chunk past ``max_bytes`` or past the free space.
    """
    uri = artifact.uri
    hasher = new_hasher(artifact, component=component)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sink = _Sink(dest, hasher, component=component, uri=uri, max_bytes=max_bytes, space=space)
    local = locate_local(artifact, component=component, version=version, artifact_dirs=artifact_dirs)
    if local is not None:
        _copy_file(local, sink)
        log.debug("artifact.copied", component=component, uri=uri, source=str(local))
        return hasher.digest()
    parsed = urllib.parse.urlsplit(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ArtifactError(f"artifact {uri}: file:// URIs must name a local absolute path",
                                component=component, field="Uri")
        source = Path(urllib.parse.unquote(parsed.path))
        if not source.is_absolute() or not source.is_file():
            raise ArtifactError(f"artifact {uri}: no such file {str(source)!r}", component=component,
                                path=source, field="Uri")
        _copy_file(source, sink)
        return hasher.digest()
    if scheme in ("http", "https"):
        _download(uri, sink, timeout_s=timeout_s)
        return hasher.digest()
    where = ", ".join(str(Path(d) / component / version) for d in artifact_dirs)
    where = where or "no --artifacts directory given"
    kind = f"{scheme}: URIs are" if scheme else "a URI without a scheme (use file:///absolute/path) is"
    raise ArtifactError(
        f"artifact {uri}: {kind} not fetched by the nucleus; supply the file "
        f"from a local artifact directory as <dir>/{component}/{version}/{artifact.file_name} "
        f"(looked in: {where})",
        component=component, field="Uri",
    )


@dataclass(slots=True)
class _Sink:
    """Where fetched bytes go: the staging file, hashed, bounded in size and in disk space."""

    dest: Path
    hasher: hashlib._Hash
    component: str
    uri: str
    max_bytes: int | None
    space: DiskSpace | None

    def expect(self, size: int, *, declared: str) -> None:
        """Refuse before writing a byte: over the size limit, or more than the disk can spare."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise ArtifactError(
                f"artifact {self.uri}: {declared} {show_size(size)}, over the limit of {show_size(self.max_bytes)} "
                "(deployments.max_artifact_bytes); nothing was written", component=self.component, field="Uri")
        if self.space is not None:
            self.space.check(size, component=self.component, uri=self.uri, what="store it")

    def copy(self, src: BinaryIO) -> int:
        """Copy ``src`` to the staging file. Unbuffered writes: a full disk fails the write that hit
        it, not a later close() that would hide which file it was."""
        written = 0
        try:
            fd = os.open(self.dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise _write_failed(exc, self.dest, component=self.component, uri=self.uri, field="Uri") from exc
        try:
            while chunk := src.read(CHUNK):  # a read error stays an OSError: the caller names the source
                written += len(chunk)
                if self.max_bytes is not None and written > self.max_bytes:
                    raise ArtifactError(
                        f"artifact {self.uri}: larger than the limit of {show_size(self.max_bytes)} "
                        "(deployments.max_artifact_bytes); stopped there", component=self.component, field="Uri")
                self.hasher.update(chunk)
                _write_all(fd, chunk, self.dest, component=self.component, uri=self.uri, field="Uri")
                if self.space is not None:
                    self.space.still_enough(component=self.component, uri=self.uri, written=written)
            try:
                os.fsync(fd)
            except OSError as exc:
                raise _write_failed(exc, self.dest, component=self.component, uri=self.uri, field="Uri") from exc
        finally:
            os.close(fd)
        return written


def _write_all(fd: int, data: bytes, dest: Path, *, component: str, uri: str, field: str) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as exc:
        raise _write_failed(exc, dest, component=component, uri=uri, field=field) from exc


def _copy_file(source: Path, sink: _Sink) -> None:
    try:
        size = source.stat().st_size
        sink.expect(size, declared="the file is")
        with source.open("rb") as src:
            sink.copy(src)
    except OSError as exc:
        raise ArtifactError(f"artifact {sink.uri}: cannot copy {source}: {exc.strerror or exc}",
                            component=sink.component, path=source, field="Uri") from exc


def _download(uri: str, sink: _Sink, *, timeout_s: float) -> None:
    request = urllib.request.Request(uri, headers={"User-Agent": "nucleus-edge"})
    component = sink.component
    try:
        # urlopen follows redirects (up to 10) and applies the timeout to every socket operation.
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            # Without a length the download is still bounded: chunk by chunk (Sink.copy).
            sink.expect(int(length) if length is not None else 0, declared="the server announces")
            written = sink.copy(response)
            if length is not None and written != int(length):
                raise ArtifactError(f"artifact {uri}: connection closed after {written} of {length} bytes",
                                    component=component, field="Uri")
    except urllib.error.HTTPError as exc:
        raise ArtifactError(f"artifact {uri}: HTTP {exc.code} {exc.reason}", component=component,
                            field="Uri") from exc
    except urllib.error.URLError as exc:
        raise ArtifactError(f"artifact {uri}: cannot download: {exc.reason}", component=component,
                            field="Uri") from exc
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed headers
        raise ArtifactError(f"artifact {uri}: download failed: {exc}", component=component,
                            field="Uri") from exc
    log.debug("artifact.downloaded", component=component, uri=uri, bytes=sink.dest.stat().st_size)


# --- permissions --------------------------------------------------------------------------------

def file_mode(permission: Permission) -> int:
    """Recipe ``Permission`` as chmod bits. Never writable: components must not edit artifacts."""
    mode = {"NONE": 0, "OWNER": 0o400, "ALL": 0o444}[permission.read]
    mode |= {"NONE": 0, "OWNER": 0o100, "ALL": 0o111}[permission.execute]
    return mode


def apply_permission(path: Path, permission: Permission) -> None:
    path.chmod(file_mode(permission))


def apply_tree_permission(root: Path, permission: Permission) -> None:
    """Unpacked files get the artifact's permission; folders are readable and searchable by all."""
    mode = file_mode(permission)
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in filenames:
            p = base / name
            if not p.is_symlink():
                p.chmod(mode)
        for name in dirnames:
            p = base / name
            if not p.is_symlink():
                p.chmod(DIR_MODE)
    root.chmod(DIR_MODE)


def share_with_group(root: Path, gid: int) -> None:
    """Give a version's artifact tree to the component user's group, read-only.

    Under a component user (``run_with_default``), ``Permission`` OWNER means that user, as in
    Greengrass; the files stay the daemon's so that the component can neither write them nor
    chmod them writable, and the group gets what the owner has (read, execute, never write).
    """
    if not root.is_dir():
        return
    for dirpath, _dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        os.chown(base, -1, gid)
        base.chmod(0o750)
        for name in filenames:
            p = base / name
            if p.is_symlink():
                continue
            os.chown(p, -1, gid)
            mode = stat.S_IMODE(p.stat().st_mode) & 0o555
            p.chmod(mode | (mode & 0o500) >> 3)


# --- unarchiving --------------------------------------------------------------------------------

def _entry_parts(entry: str, *, component: str, uri: str) -> list[str]:
    def reject(reason: str) -> ArtifactError:
        return ArtifactError(f"artifact {uri}: archive entry {entry!r} {reason}; refusing to unpack",
                             component=component, field="Unarchive")

    if "\0" in entry:
        raise reject("contains a NUL byte")
    if entry.startswith(("/", "\\")) or _DRIVE.match(entry):
        raise reject("is an absolute path")
    parts = [p for p in re.split(r"[/\\]", entry) if p not in ("", ".")]
    if ".." in parts:
        raise reject("climbs out of the target folder with '..'")
    return parts


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def _check_entry_count(archive: Path, limits: Limits, *, component: str, uri: str) -> None:
    """The end-of-central-directory record, before ZipFile builds an object per entry: a 1 GiB
    archive of empty entries would be 20 million of them, gigabytes of memory. ZipFile reads the
    central directory by its size, not by the count the record states, so the size is bounded too:
    an entry's record is 46 bytes and its name; more than 1 KiB per allowed entry is no real archive."""
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:  # a Python without it: ZipFile's own parse, then check_zip
        return
    with archive.open("rb") as fp:
        end = end_record(fp)
    if end is None:
        return  # not a ZIP: ZipFile says so
    count = int(end[getattr(zipfile, "_ECD_ENTRIES_TOTAL", 4)])
    size = int(end[getattr(zipfile, "_ECD_SIZE", 5)])
    if count > limits.max_archive_entries or size > limits.max_archive_entries * 1024:
        shown = f"{count} entries" if count > limits.max_archive_entries else \
            f"a central directory of {show_size(size)} (more than 1 KiB for each entry allowed)"
        raise ArtifactError(
            f"artifact {uri}: the archive has {shown}, over the limit of {limits.max_archive_entries} entries "
            "(deployments.max_archive_entries); nothing was unpacked", component=component, field="Unarchive")


def check_zip(zf: zipfile.ZipFile, *, limits: Limits, space: DiskSpace | None, component: str,
              uri: str) -> None:
    """Refuse, from the central directory alone, an archive that unpacks to too much: more entries
    than ``max_archive_entries``, more bytes than ``max_unarchived_bytes``, or more than the disk
    can spare (each file costs at least a block). Nothing is unpacked before this passes."""
    infos = zf.infolist()
    if len(infos) > limits.max_archive_entries:
        raise ArtifactError(
            f"artifact {uri}: the archive has {len(infos)} entries, over the limit of {limits.max_archive_entries} "
            "(deployments.max_archive_entries); nothing was unpacked", component=component, field="Unarchive")
    total = sum(info.file_size for info in infos)
    if total > limits.max_unarchived_bytes:
        raise ArtifactError(
            f"artifact {uri}: the archive unpacks to {show_size(total)}, over the limit of "
            f"{show_size(limits.max_unarchived_bytes)} (deployments.max_unarchived_bytes); nothing was unpacked",
            component=component, field="Unarchive")
    if space is not None:
        need = sum(-(-info.file_size // BLOCK) * BLOCK or BLOCK for info in infos)
        space.check(need, component=component, uri=uri, what="unpack it")


def unarchive_zip(archive: Path, target: Path, *, component: str, uri: str, limits: Limits | None = None,
                  space: DiskSpace | None = None) -> None:
    """Unpack a ZIP into ``target`` (created), refusing entries that could escape it.

    Refused: absolute names, ``..`` components, symlinks pointing outside ``target``, entries that
    would be written through a symlink, and duplicate entries. An archive that would unpack to
    more than ``limits`` (default :class:`Limits`) or ``space`` allow (:func:`check_zip`) is
    refused before anything is written, and while unpacking no entry may write more than its
    header declares, so a lying header cannot get past the check.
    """
    limits = limits or Limits()
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    links: list[tuple[str, Path]] = []
    try:
        _check_entry_count(archive, limits, component=component, uri=uri)
        with zipfile.ZipFile(archive) as zf:
            check_zip(zf, limits=limits, space=space, component=component, uri=uri)
            for info in zf.infolist():
                _extract_entry(zf, info, root, links, space, component=component, uri=uri)
        # Symlinks through other symlinks can escape where the lexical check saw none
        # ("a/.." with a -> "."): once everything exists, resolve each for real.
        for entry, link_path in links:
            try:
                real = link_path.resolve()
            except RuntimeError:  # a symlink loop
                real = root.parent
            if not _inside(root, real):
                raise ArtifactError(
                    f"artifact {uri}: archive entry {entry!r} is a symlink that resolves outside the "
                    "target folder; refusing to unpack", component=component, field="Unarchive")
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"artifact {uri}: not a valid ZIP archive: {exc}", component=component,
                            field="Unarchive") from exc
    except OSError as exc:  # mkdir, symlink, open in the staging folder: disk full, no inodes left
        where = Path(exc.filename) if isinstance(exc.filename, str) else target
        raise _write_failed(exc, where, component=component, uri=uri, field="Unarchive") from exc


def _extract_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, links: list[tuple[str, Path]],
                   space: DiskSpace | None, *, component: str, uri: str) -> None:
    parts = _entry_parts(info.filename, component=component, uri=uri)
    if not parts:
        return
    dest = root.joinpath(*parts)

    def reject(reason: str) -> ArtifactError:
        return ArtifactError(f"artifact {uri}: archive entry {info.filename!r} {reason}; refusing to unpack",
                             component=component, field="Unarchive")

    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not _inside(root, parent.resolve()):
        raise reject("would be written through a symlink that leaves the target folder")
    if dest.is_symlink() or (dest.exists() and not info.is_dir()):
        raise reject("appears twice in the archive")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        if info.file_size > 4096:
            raise reject(f"is a symlink of {info.file_size} bytes, longer than any path")
        link = zf.read(info).decode("utf-8", errors="strict")
        resolved = Path(os.path.normpath(parent / link))
        if Path(link).is_absolute() or not _inside(root, resolved):
            raise reject(f"is a symlink to {link!r}, outside the target folder")
        dest.symlink_to(link)
        links.append((info.filename, dest))
        return
    if info.is_dir():
        dest.mkdir(exist_ok=True)
        return
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    written = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                if written > info.file_size:  # the declared sizes are what check_zip summed
                    raise reject(f"unpacks to more than the {info.file_size} bytes its header declares")
                _write_all(fd, chunk, dest, component=component, uri=uri, field="Unarchive")
                if space is not None:
                    space.still_enough(component=component, uri=uri, written=written)
    finally:
        os.close(fd)
