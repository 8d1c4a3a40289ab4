"""Artifact fetching, digests, ZIP safety and permissions — real files, a real HTTP server."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import socket
import stat
import threading
import warnings
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from nucleus import artifacts as art
from nucleus.errors import ArtifactError, DigestMismatchError
from nucleus.recipe import Artifact, Permission

PAYLOAD = b"print('hello from an artifact')\n" * 100
SHA_HEX = hashlib.sha256(PAYLOAD).hexdigest()
SHA_B64 = base64.b64encode(hashlib.sha256(PAYLOAD).digest()).decode()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/" + self.path.removeprefix("/redirect/"))
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        return


@contextlib.contextmanager
def serve_directory(root: Path, handler: type[http.server.SimpleHTTPRequestHandler]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``root`` with ``handler``; its base URL."""
    root.mkdir(exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a temporary directory."""
    with serve_directory(tmp_path / "www", _Handler) as base:
        yield base, tmp_path / "www"


def _fetch(artifact: Artifact, dest: Path, **kw: object) -> bytes:
    return art.fetch(artifact, dest, component="com.example.C", version="1.0.0", **kw)  # type: ignore[arg-type]


# --- digests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("digest", [SHA_HEX, SHA_HEX.upper(), SHA_B64])
def test_expected_digest_accepts_hex_and_base64(digest: str) -> None:
    a = Artifact(uri="s3://b/x", digest=digest)
    assert art.expected_digest(a, component="C") == hashlib.sha256(PAYLOAD).digest()
    art.verify(a, hashlib.sha256(PAYLOAD).digest(), component="C")


def test_other_sha_algorithms() -> None:
    a = Artifact(uri="s3://b/x", digest=hashlib.sha512(PAYLOAD).hexdigest(), algorithm="SHA-512")
    assert art.expected_digest(a, component="C") == hashlib.sha512(PAYLOAD).digest()


@pytest.mark.parametrize(
    ("artifact", "field", "words"),
    [
        # the corpus has this 56-hex-digit value labelled SHA-256
        (Artifact(uri="s3://b/x", digest="d14a028c2a3a2bc9476102bb288234c415a2b01f828ea62ac5b3e42f"),
         "Digest", "neither 64 hex digits nor base64"),
        (Artifact(uri="s3://b/x", digest="----"), "Digest", "neither"),
        (Artifact(uri="s3://b/x", digest=SHA_HEX, algorithm="MD4"), "Algorithm",
         "unsupported digest algorithm"),
    ],
)
def test_malformed_digest_or_algorithm(artifact: Artifact, field: str, words: str) -> None:
    with pytest.raises(ArtifactError) as info:
        art.expected_digest(artifact, component="com.example.C")
    assert info.value.field == field and words in str(info.value)
    assert info.value.component == "com.example.C"


@pytest.mark.parametrize(("digest", "shown"), [(SHA_HEX, "hex"), (SHA_B64, "b64")])
def test_mismatch_names_uri_expected_and_actual_in_the_recipes_notation(digest: str, shown: str) -> None:
    wrong = hashlib.sha256(b"tampered").digest()
    a = Artifact(uri="s3://bucket/app.py", digest=digest)
    with pytest.raises(DigestMismatchError) as info:
        art.verify(a, wrong, component="com.example.C")
    text = str(info.value)
    assert "s3://bucket/app.py" in text and "com.example.C" in text
    assert digest in text
    assert (wrong.hex() if shown == "hex" else base64.b64encode(wrong).decode()) in text
    assert info.value.code == "DIGEST_MISMATCH"


# --- sources -------------------------------------------------------------------------------------

def test_artifact_dir_is_searched_first_for_any_scheme(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "empty", tmp_path / "art"
    (d2 / "com.example.C" / "1.0.0").mkdir(parents=True)
    (d2 / "com.example.C" / "1.0.0" / "app.py").write_bytes(PAYLOAD)
    d1.mkdir()
    for uri in ["s3://bucket/some/path/app.py", "greengrass:app.py", "https://unreachable.invalid/app.py"]:
        dest = tmp_path / "out" / uri.replace("/", "_") / "app.py"
        digest = _fetch(Artifact(uri=uri), dest, artifact_dirs=[d1, d2])
        assert dest.read_bytes() == PAYLOAD
        assert digest == hashlib.sha256(PAYLOAD).digest()


def test_file_uri(tmp_path: Path) -> None:
    src = tmp_path / "dir with space" / "app.py"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "app.py"
    uri = src.as_uri()
    assert "%20" in uri
    assert _fetch(Artifact(uri=uri), dest) == hashlib.sha256(PAYLOAD).digest()
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(ArtifactError, match="no such file"):
        _fetch(Artifact(uri=(tmp_path / "missing.py").as_uri()), tmp_path / "o2" / "missing.py")


def test_http_fetch_follows_redirects_and_reports_status(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    (root / "app.py").write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "app.py"
    assert _fetch(Artifact(uri=f"{base}/redirect/app.py"), dest) == hashlib.sha256(PAYLOAD).digest()
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(ArtifactError) as info:
        _fetch(Artifact(uri=f"{base}/nope.py"), tmp_path / "out2" / "nope.py")
    assert "HTTP 404" in str(info.value) and f"{base}/nope.py" in str(info.value)


def test_http_size_limit(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    (root / "big.bin").write_bytes(PAYLOAD)
    with pytest.raises(ArtifactError, match="limit"):
        _fetch(Artifact(uri=f"{base}/big.bin"), tmp_path / "o" / "big.bin", max_bytes=100)


def test_connection_refused_is_an_artifact_error(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: bind, never listen
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(ArtifactError, match="cannot download"):
            _fetch(Artifact(uri=f"http://127.0.0.1:{port}/a.py"), tmp_path / "o" / "a.py", timeout_s=5)


@pytest.mark.parametrize("uri", ["s3://bucket/app.py", "greengrass:app.py", "docker:repo/image:1"])
def test_unknown_scheme_explains_the_artifact_dir_layout(tmp_path: Path, uri: str) -> None:
    with pytest.raises(ArtifactError) as info:
        _fetch(Artifact(uri=uri), tmp_path / "o" / "x", artifact_dirs=[tmp_path / "arts"])
    text = str(info.value)
    assert uri in text
    assert "<dir>/com.example.C/1.0.0/" in text
    assert str(tmp_path / "arts" / "com.example.C" / "1.0.0") in text


@pytest.mark.parametrize("uri", ["s3:", "s3://bucket/..", "file:///"])
def test_uri_without_a_usable_file_name(uri: str) -> None:
    with pytest.raises(ArtifactError, match="usable file name"):
        art.safe_file_name(Artifact(uri=uri), component="C")


# --- permissions -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("read", "execute", "mode"),
    [("OWNER", "NONE", 0o400), ("ALL", "NONE", 0o444), ("NONE", "NONE", 0o000),
     ("OWNER", "OWNER", 0o500), ("ALL", "ALL", 0o555), ("ALL", "OWNER", 0o544), ("NONE", "ALL", 0o111)],
)
def test_file_mode(read: str, execute: str, mode: int) -> None:
    assert art.file_mode(Permission(read=read, execute=execute)) == mode  # type: ignore[arg-type]


def test_hash_file_reads_a_read_none_file_and_restores_its_mode(tmp_path: Path) -> None:
    f = tmp_path / "secret.bin"
    f.write_bytes(PAYLOAD)
    f.chmod(0o000)
    a = Artifact(uri="s3://b/secret.bin", digest=SHA_B64)
    assert art.matches(f, a, component="C")
    assert stat.S_IMODE(f.stat().st_mode) == 0o000


# --- ZIP -------------------------------------------------------------------------------------------

Entry = tuple[str, bytes] | zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]


def _zip(path: Path, entries: list[Entry]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate entry we add on purpose
        for entry in entries:
            if isinstance(entry, zipfile.ZipInfo):
                zf.writestr(entry, b"")
            else:
                name, data = entry
                zf.writestr(name, data)
    return path


def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def test_unarchive_zip_with_folders_and_in_tree_symlinks(tmp_path: Path) -> None:
    z = _zip(tmp_path / "bundle.zip", [
        ("bin/run.sh", b"#!/bin/sh\necho hi\n"),
        ("lib/", b""),
        ("lib/data.txt", b"data"),
        _symlink("bin/data", "../lib/data.txt"),
        ("./dot/./x.txt", b"x"),
    ])
    target = tmp_path / "out" / art.archive_folder(z.name)
    art.unarchive_zip(z, target, component="C", uri="s3://b/bundle.zip")
    assert target.name == "bundle"
    assert (target / "bin" / "run.sh").read_bytes().startswith(b"#!/bin/sh")
    assert (target / "bin" / "data").read_bytes() == b"data"
    assert (target / "dot" / "x.txt").read_bytes() == b"x"
    art.apply_tree_permission(target, Permission(read="ALL", execute="OWNER"))
    assert stat.S_IMODE((target / "bin" / "run.sh").stat().st_mode) == 0o544
    assert stat.S_IMODE((target / "lib").stat().st_mode) == 0o755
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("entries", "entry", "words"),
    [
        ([("../evil", b"x")], "../evil", "'..'"),
        ([("ok/../../evil", b"x")], "ok/../../evil", "'..'"),
        ([("..\\evil", b"x")], "..\\evil", "'..'"),
        ([("/etc/evil", b"x")], "/etc/evil", "absolute path"),
        ([("C:/evil", b"x")], "C:/evil", "absolute path"),
        ([_symlink("link", "/etc/passwd")], "link", "outside the target folder"),
        ([_symlink("link", "../../outside")], "link", "outside the target folder"),
        ([_symlink("dir", "."), _symlink("up", "dir/..")], "up", "resolves outside"),
        ([_symlink("d", "sub"), ("sub/", b""), _symlink("sub/up", ".."), _symlink("esc", "d/up/..")],
         "esc", "outside"),
        ([("a.txt", b"1"), ("a.txt", b"2")], "a.txt", "appears twice"),
    ],
)
def test_unarchive_rejects_escaping_entries(tmp_path: Path, entries: list, entry: str, words: str) -> None:
    z = _zip(tmp_path / "evil.zip", entries)
    target = tmp_path / "deep" / "out" / "evil"
    with pytest.raises(ArtifactError) as info:
        art.unarchive_zip(z, target, component="com.example.C", uri="s3://b/evil.zip")
    text = str(info.value)
    assert repr(entry) in text and words in text and "com.example.C" in text
    assert info.value.field == "Unarchive"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()
    assert not (tmp_path / "deep" / "outside").exists()


def test_not_a_zip(tmp_path: Path) -> None:
    f = tmp_path / "fake.zip"
    f.write_bytes(b"not a zip at all")
    with pytest.raises(ArtifactError, match="not a valid ZIP"):
        art.unarchive_zip(f, tmp_path / "out", component="C", uri="s3://b/fake.zip")
