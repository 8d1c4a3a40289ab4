"""Artifacts must not fill the device's disk, and a full disk during a deployment loses nothing.

Real daemons, real files, a real HTTP server on 127.0.0.1 and, for the disk itself, a real small
tmpfs mounted on the daemon's ``packages/`` (root only; skipped elsewhere). A digest is only known
to be right once every byte is written, so before these limits a wrong or hostile artifact (a
huge download, a ZIP bomb with the right digest) filled the disk that the cloud spool, the journal
and every component's logs share.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import os
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_artifacts import serve_directory
from test_daemon import write_recipe

from nucleus import artifacts as art
from nucleus.errors import ArtifactError, ConfigurationError
from nucleus.settings import load_settings
from tests.conftest import FAST_SETTINGS

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
RUN = "exec sleep 600"
NAME = "test.Big"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the server's directory; under /stream/ without a Content-Length (HTTP/1.0, the
    end is the close), as a chunked or misbehaving server would send them."""

    def do_GET(self) -> None:
        if not self.path.startswith("/stream/"):
            super().do_GET()
            return
        path = Path(self.directory) / self.path.removeprefix("/stream/")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        with contextlib.suppress(OSError), path.open("rb") as src:  # the client hangs up at its limit
            while chunk := src.read(256 * 1024):
                self.wfile.write(chunk)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def http_dir(short_tmp: Path) -> Iterator[tuple[str, Path]]:
    with serve_directory(short_tmp / "www", _Handler) as base:
        yield base, short_tmp / "www"


@contextlib.contextmanager
def small_disk(where: Path, size_mib: int) -> Iterator[Path]:
    """A real filesystem of ``size_mib`` at ``where`` (tmpfs): a disk that really fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@contextlib.contextmanager
def daemon_on_small_disk(daemon_factory: Any, size_mib: int) -> Iterator[tuple[Any, Path]]:
    """A started daemon whose whole root (journal, logs, sockets, store) is a ``size_mib`` tmpfs, with
    no disk reserve: the disk really fills."""
    daemon = daemon_factory(settings=_settings(disk_reserve_bytes=0, disk_reserve_percent=0), start=False)
    settings = (daemon.root / "nucleus.yaml").read_text()
    with small_disk(daemon.root, size_mib) as disk:
        (daemon.root / "nucleus.yaml").write_text(settings)  # the mount hid it
        try:
            daemon.start()
            yield daemon, disk
        finally:
            daemon.stop()


def _digest(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _artifact(uri: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"URI": uri, "Digest": _digest(data), "Algorithm": "SHA-256", **extra}


def _settings(**deployments: Any) -> dict[str, Any]:
    return {**FAST_SETTINGS, "deployments": {**FAST_SETTINGS["deployments"], **deployments}}


def _deploy_v1(daemon: Any, short_tmp: Path) -> list[int]:
    """A small first version that runs: what must keep running through every failure below."""
    small = short_tmp / "small.bin"
    small.write_bytes(b"v1")
    daemon.cli("deploy", str(write_recipe(short_tmp / "r1", NAME, "1.0.0", run=RUN,
                                          artifacts=[_artifact(small.as_uri(), b"v1")])))
    return list(daemon.wait_state(NAME, {"RUNNING"})["pids"])


def _fails_cleanly(daemon: Any, recipe: Path, pids: list[int], *words: str) -> str:
    """The deployment fails before anything running changes, saying ``words``; the old version
    runs on in the same process, nothing is left in staging, the failed version is not in the store."""
    out = daemon.cli("deploy", str(recipe), check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 1 and "FAILED_NO_STATE_CHANGE" in out.stderr, text
    for word in words:
        assert word in text, f"{word!r} not in: {text}"
    now = daemon.components()[NAME]  # `nucleus list` answers: the daemon serves on
    assert now["version"] == "1.0.0" and now["state"] == "RUNNING" and now["pids"] == pids, now
    staging = daemon.root / "packages" / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())
    version = recipe.name.removeprefix(f"{NAME}-").removesuffix(".json")
    for kind in ("artifacts", "artifacts-unarchived"):
        assert not (daemon.root / "packages" / kind / NAME / version).exists(), kind
    return text


def _good_deployment_after(daemon: Any, short_tmp: Path) -> None:
    data = b"after the failure"
    ok = short_tmp / "ok.bin"
    ok.write_bytes(data)
    out = daemon.cli("deploy", str(write_recipe(short_tmp / "r9", NAME, "9.0.0", run=RUN,
                                                artifacts=[_artifact(ok.as_uri(), data)])), check=False)
    assert out.returncode == 0 and "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    assert daemon.wait_state(NAME, {"RUNNING"})["version"] == "9.0.0"


def _zeros_zip(path: Path, entries: dict[str, int]) -> bytes:
    """A ZIP of zero-filled files, deflated: a few KiB on the wire for MiBs unpacked (a ZIP bomb)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, size in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=size > 2**31) as out:
                for _ in range(size // MiB):
                    out.write(bytes(MiB))
                out.write(bytes(size % MiB))
    return path.read_bytes()


def test_an_artifact_over_max_artifact_bytes_is_cut_off_and_the_running_version_stays(
        daemon_factory: Any, short_tmp: Path, http_dir: tuple[str, Path]) -> None:
    """A 3 MiB download with a 1 MiB limit: without a Content-Length it is stopped at the limit,
    with one it is refused before the first byte. Before, any size was written in full (and only
    then was the digest compared)."""
    base, www = http_dir
    daemon = daemon_factory(settings=_settings(max_artifact_bytes=MiB))
    pids = _deploy_v1(daemon, short_tmp)
    data = os.urandom(3 * MiB)
    (www / "big.bin").write_bytes(data)
    for version, uri, said in (("2.0.0", f"{base}/stream/big.bin", "stopped there"),
                               ("3.0.0", f"{base}/big.bin", "the server announces 3.0 MiB")):
        recipe = write_recipe(short_tmp / version, NAME, version, run=RUN, artifacts=[_artifact(uri, data)])
        _fails_cleanly(daemon, recipe, pids, NAME, uri, said, "1.0 MiB (1048576 B)", "deployments.max_artifact_bytes")
    shown = daemon.cli("deployments").stdout
    assert shown.count("FAILED_NO_STATE_CHANGE") == 2, shown
    _good_deployment_after(daemon, short_tmp)


def test_a_zip_bomb_is_refused_from_its_central_directory(daemon_factory: Any, short_tmp: Path) -> None:
    """64 MiB of zeros in a ~64 KiB ZIP, and a ZIP of 300 empty files: each refused before
    anything is unpacked, naming the limit. Before, both were unpacked in full."""
    daemon = daemon_factory(settings=_settings(max_unarchived_bytes=8 * MiB, max_archive_entries=200))
    pids = _deploy_v1(daemon, short_tmp)
    bomb = _zeros_zip(short_tmp / "bomb.zip", {"zeros.bin": 64 * MiB})
    assert len(bomb) < MiB
    recipe = write_recipe(short_tmp / "b", NAME, "2.0.0", run=RUN,
                          artifacts=[_artifact((short_tmp / "bomb.zip").as_uri(), bomb, Unarchive="ZIP")])
    _fails_cleanly(daemon, recipe, pids, NAME, "bomb.zip", "unpacks to 64.0 MiB", "8.0 MiB",
                   "deployments.max_unarchived_bytes", "nothing was unpacked")
    many = _zeros_zip(short_tmp / "many.zip", {f"f{i}": 0 for i in range(300)})
    recipe = write_recipe(short_tmp / "m", NAME, "3.0.0", run=RUN,
                          artifacts=[_artifact((short_tmp / "many.zip").as_uri(), many, Unarchive="ZIP")])
    _fails_cleanly(daemon, recipe, pids, NAME, "many.zip", "has 300 entries", "limit of 200",
                   "deployments.max_archive_entries")
    _good_deployment_after(daemon, short_tmp)


def _lying_zip(path: Path, real: int, declared: int) -> bytes:
    """A stored ZIP entry of ``real`` bytes whose local and central headers say ``declared``."""
    _zeros_zip(path, {})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("payload.bin", bytes(real))
    raw = bytearray(path.read_bytes())
    local = raw.find(b"PK\x03\x04")
    central = raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, declared)  # uncompressed size, local header
    struct.pack_into("<I", raw, central + 24, declared)  # uncompressed size, central directory
    path.write_bytes(bytes(raw))
    return bytes(raw)


def test_an_entry_that_writes_more_than_its_header_declares_is_stopped(short_tmp: Path) -> None:
    """The central directory passes the check (1 KiB in all) but the entry holds 2 MiB: the unpacked
    file never exceeds what was declared and checked. (CPython's zipfile already stops at the
    declared size and fails the CRC; the store does not rely on the decompressor for the bound.)"""
    archive = short_tmp / "liar.zip"
    _lying_zip(archive, real=2 * MiB, declared=1024)
    target = short_tmp / "out"
    limits = art.Limits(max_unarchived_bytes=4096)
    with pytest.raises(ArtifactError) as caught:
        art.unarchive_zip(archive, target, component=NAME, uri="s3://b/liar.zip", limits=limits)
    assert "liar.zip" in str(caught.value) and NAME in str(caught.value)
    written = target / "payload.bin"
    assert not written.exists() or written.stat().st_size <= 1024


def test_too_little_free_disk_fails_the_deployment_before_writing(
        daemon_factory: Any, short_tmp: Path) -> None:
    """A 16 MiB disk with 4 MiB kept free: a 14 MiB artifact, and a ZIP that unpacks to 14 MiB,
    are refused up front, naming what they need and what is free. Before, the file was written
    until the disk was nearly full (the cloud spool and logs share it)."""
    daemon = daemon_factory(settings=_settings(disk_reserve_bytes=4 * MiB, disk_reserve_percent=0), start=False)
    with small_disk(daemon.root / "packages", 16) as disk:
        try:
            daemon.start()
            pids = _deploy_v1(daemon, short_tmp)
            used = shutil.disk_usage(disk).used
            data = os.urandom(14 * MiB)
            (short_tmp / "huge.bin").write_bytes(data)
            recipe = write_recipe(short_tmp / "h", NAME, "2.0.0", run=RUN,
                                  artifacts=[_artifact((short_tmp / "huge.bin").as_uri(), data)])
            _fails_cleanly(daemon, recipe, pids, NAME, "huge.bin", "not enough disk space to store it",
                           "needs 14.0 MiB", "free on", "4.0 MiB (4194304 B) stay free",
                           "deployments.disk_reserve_bytes")
            zipped = _zeros_zip(short_tmp / "fat.zip", {"zeros.bin": 14 * MiB})
            recipe = write_recipe(short_tmp / "z", NAME, "3.0.0", run=RUN,
                                  artifacts=[_artifact((short_tmp / "fat.zip").as_uri(), zipped, Unarchive="ZIP")])
            _fails_cleanly(daemon, recipe, pids, NAME, "fat.zip", "not enough disk space to unpack it",
                           "needs 14.0 MiB")
            assert shutil.disk_usage(disk).used <= used + 64 * 1024  # what staging took is back
            _good_deployment_after(daemon, short_tmp)
        finally:
            daemon.stop()


def test_a_disk_that_fills_mid_download_fails_the_deployment_and_loses_nothing(
        daemon_factory: Any, short_tmp: Path, http_dir: tuple[str, Path]) -> None:
    """No reserve, a 40 MiB download of unknown length onto a 24 MiB disk that holds the whole
    root (journal, logs, sockets, store): the write hits ENOSPC. The deployment fails saying the
    disk is full (not 'download failed: [Errno 28]'), staging is removed so the disk is free again,
    the running version runs on, the daemon serves, the journal records the failure, and the next
    good deployment succeeds."""
    base, www = http_dir
    with daemon_on_small_disk(daemon_factory, 24) as (daemon, disk):
        pids = _deploy_v1(daemon, short_tmp)
        used = shutil.disk_usage(disk).used
        data = os.urandom(40 * MiB)
        (www / "fill.bin").write_bytes(data)
        uri = f"{base}/stream/fill.bin"
        recipe = write_recipe(short_tmp / "f", NAME, "2.0.0", run=RUN, artifacts=[_artifact(uri, data)])
        _fails_cleanly(daemon, recipe, pids, NAME, uri, "the disk is full: cannot write 'fill.bin' in",
                       "packages/.staging ([Errno 28]")
        assert shutil.disk_usage(disk).used <= used + MiB  # staging gone (the journal and logs grew a little)
        shown = daemon.cli("deployments").stdout
        assert "FAILED_NO_STATE_CHANGE" in shown, shown
        _good_deployment_after(daemon, short_tmp)


def test_staging_a_crash_left_behind_is_removed_when_the_daemon_starts(daemon_factory: Any) -> None:
    """A daemon killed mid-download left its partial file in packages/.staging for good: nothing
    ever removed it (clear_staging was never called)."""
    daemon = daemon_factory(start=False)
    left = daemon.root / "packages" / ".staging" / f"{NAME}@2.0.0.abc123" / "files"
    left.mkdir(parents=True)
    (left / "big.bin").write_bytes(bytes(MiB))
    daemon.start()
    assert not any((daemon.root / "packages" / ".staging").iterdir())


def test_the_limits_are_settings_and_bad_values_name_the_key(short_tmp: Path) -> None:
    (short_tmp / "nucleus.yaml").write_text("deployments: {max_artifact_bytes: 2048, disk_reserve_percent: 1}\n")
    limits = load_settings(short_tmp).deployments.artifact_limits(spool_min_free_bytes=128 * MiB)
    assert limits.max_artifact_bytes == 2048 and limits.disk_reserve_percent == 1
    assert limits.disk_reserve_bytes == 128 * MiB  # never less than the cloud spool needs free
    assert load_settings(short_tmp / "none").deployments.artifact_limits() == art.Limits()
    (short_tmp / "nucleus.yaml").write_text("deployments: {max_archive_entries: 0}\n")
    with pytest.raises(ConfigurationError) as caught:
        load_settings(short_tmp)
    assert "deployments.max_archive_entries" in str(caught.value) and "nucleus.yaml" in str(caught.value)


def test_an_end_record_that_understates_the_entry_count_does_not_get_the_directory_parsed(short_tmp: Path) -> None:
    """ZipFile reads the central directory by its size, not by the count the end record states: a
    hostile archive saying '1 entry' would still have every entry parsed into memory (20 million in
    a 1 GiB archive). The directory's size is bounded before ZipFile is opened."""
    archive = short_tmp / "understated.zip"
    _zeros_zip(archive, {f"f{i}": 0 for i in range(3000)})
    raw = bytearray(archive.read_bytes())
    end = raw.rfind(b"PK\x05\x06")
    struct.pack_into("<HH", raw, end + 8, 1, 1)  # entries on this disk, entries in all
    archive.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError) as caught:
        art.unarchive_zip(archive, short_tmp / "out", component=NAME, uri="s3://b/understated.zip",
                          limits=art.Limits(max_archive_entries=100))
    assert "central directory of" in str(caught.value) and "deployments.max_archive_entries" in str(caught.value)
    assert not any((short_tmp / "out").iterdir())


def test_a_disk_already_full_refuses_the_request_naming_the_database(daemon_factory: Any, short_tmp: Path) -> None:
    """The disk holding the root is full before the deployment starts: SQLite refused the journal
    write with 'OperationalError: database or disk is full', which named neither the file nor said
    that nothing changed. Now the error names the journal file; the running version runs on, and once
    space is freed the next deployment works."""
    with daemon_on_small_disk(daemon_factory, 16) as (daemon, disk):
        pids = _deploy_v1(daemon, short_tmp)
        filler = disk / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):  # bounded: the disk is 16 MiB
            for _ in range(64):
                f.write(b"\0" * MiB)
                f.flush()
        again = write_recipe(short_tmp / "full", NAME, "2.0.0", run=RUN)
        out = daemon.cli("deploy", str(again), check=False)
        text = out.stdout + out.stderr
        assert out.returncode != 0, text
        assert str(daemon.root / "db") in text and "full" in text and "nothing was changed" in text, text
        now = daemon.components()[NAME]
        assert now["version"] == "1.0.0" and now["state"] == "RUNNING" and now["pids"] == pids, now
        filler.unlink()
        _good_deployment_after(daemon, short_tmp)
