"""Detached Ed25519 signatures over a model's files.

The builder signs a canonical manifest (component, version, SHA-256 of ``model.onnx`` and of
``model_card.json``) and writes it with the signature to ``model.sig``. The detector verifies the
signature against its configured trusted keys, then the digests of the bytes it actually read, and
hands back exactly those bytes: what gets loaded is what was verified (no re-read after the check).

Keys: the private key is a PKCS#8 PEM file; the public key is written next to it (``<key>.pub``) as
one base64 line of the raw 32 bytes, which is what goes into the detector's ``trustedKeys``. A key id
(``ed25519:`` + 16 hex digits of the SHA-256 of the raw public key) names the key in errors and logs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from components.anomaly.errors import DigestMismatchError, SignatureError, UntrustedKeyError
from components.anomaly.model_card import CARD_FILE, MODEL_FILE, SIGNATURE_FILE

SIGNATURE_FORMAT = "nucleus.model_signature/1"
SIGNED_FILES = (MODEL_FILE, CARD_FILE)


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return "ed25519:" + hashlib.sha256(raw_public(key)).hexdigest()[:16]


def public_key_text(key: Ed25519PublicKey) -> str:
    """The one-line form that goes into ``trustedKeys``."""
    return base64.b64encode(raw_public(key)).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A trusted key as configured: base64 of the raw 32 bytes, or a PEM ``PUBLIC KEY`` block."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode("ascii"))
        except ValueError as exc:
            raise SignatureError(f"trusted key is not a valid PEM public key: {exc}", field="trustedKeys") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError("trusted key is not an Ed25519 key", field="trustedKeys")
        return key
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"trusted key {stripped[:12]!r}... is neither base64 nor PEM",
                             field="trustedKeys") from exc
    if len(raw) != 32:
        raise SignatureError(f"trusted key has {len(raw)} bytes, an Ed25519 public key has 32", field="trustedKeys")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_path(private_key_path: Path) -> Path:
    return private_key_path.with_name(private_key_path.name + ".pub")


def _is_raw_public(text: bytes) -> bool:
    """One base64 line of 32 bytes: a ``.pub`` file as the builder writes it."""
    try:
        return len(base64.b64decode(text.strip(), validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


def load_or_create_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The signing key at ``path``; generated (mode 0600, public key beside it) if the file is absent."""
    if path.exists():
        try:
            mode = path.stat().st_mode
            text = path.read_bytes()
        except OSError as exc:
            raise SignatureError(f"signing key unreadable: {exc.strerror or exc}", path=path) from exc
        if text.lstrip().startswith(b"-----BEGIN PUBLIC KEY") or _is_raw_public(text):
            raise SignatureError("this is a public key; --key takes the private key (PEM), the file the .pub "
                                 "beside it was written from", path=path, field="key")
        if stat.S_ISREG(mode) and mode & 0o077:
            # as ssh does: a private key others can read may already be someone else's; refuse, do not sign
            raise SignatureError(f"signing key is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
                                 f"make it private: chmod 600 {path}", path=path, field="key")
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"signing key unreadable: {str(exc).split('. See https')[0]}", path=path) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError("signing key is not an Ed25519 private key", path=path)
        pub = public_key_path(path)
        if not pub.exists():
            pub.write_text(public_key_text(key.public_key()) + "\n")
        return key, False
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_key_path(path).write_text(public_key_text(key.public_key()) + "\n")
    return key, True


def canonical(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def manifest_for(component: str, version: str, contents: Mapping[str, bytes]) -> dict[str, Any]:
    return {
        "component": component,
        "version": version,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(contents.items())},
    }


def sign_model(directory: Path, *, component: str, version: str, key: Ed25519PrivateKey) -> Path:
    """Write ``model.sig`` for the files of ``directory`` (which must already hold them)."""
    contents = {name: (directory / name).read_bytes() for name in SIGNED_FILES}
    manifest = manifest_for(component, version, contents)
    document = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "ed25519",
        "key_id": key_id(key.public_key()),
        "manifest": manifest,
        "signature": base64.b64encode(key.sign(canonical(manifest))).decode("ascii"),
    }
    out = directory / SIGNATURE_FILE
    out.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return out


@dataclass(frozen=True, slots=True)
class VerifiedModel:
    """The bytes that were verified; load these, not the files again."""

    component: str
    version: str
    key_id: str
    files: dict[str, bytes]


def trusted_key_map(keys: Iterable[str | Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    out: dict[str, Ed25519PublicKey] = {}
    for k in keys:
        pub = parse_public_key(k) if isinstance(k, str) else k
        out[key_id(pub)] = pub
    return out


def verify_model(directory: Path, *, component: str, version: str,
                 trusted: Mapping[str, Ed25519PublicKey]) -> VerifiedModel:
    """Check ``model.sig`` against the trusted keys and the files' digests; raise a SignatureError
    subclass naming the component, version and key id otherwise."""
    where = {"component": component, "version": version}
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise SignatureError(f"model directory {what}", path=directory, **where)
    sig_path = directory / SIGNATURE_FILE
    try:
        document = json.loads(sig_path.read_bytes())
    except FileNotFoundError as exc:
        raise SignatureError("model is unsigned: no model.sig", path=sig_path, **where) from exc
    except (OSError, ValueError) as exc:
        raise SignatureError(f"model.sig unreadable: {exc}", path=sig_path, **where) from exc
    if not isinstance(document, dict) or document.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(f"model.sig is not a {SIGNATURE_FORMAT} document", path=sig_path, **where)
    kid = document.get("key_id")
    manifest = document.get("manifest")
    signature = document.get("signature")
    if not isinstance(kid, str) or not isinstance(manifest, dict) or not isinstance(signature, str):
        raise SignatureError("model.sig lacks key_id, manifest or signature", path=sig_path, **where)
    key = trusted.get(kid)
    if key is None:
        raise UntrustedKeyError(f"model signed with key {kid}, which is not in trustedKeys "
                                f"({', '.join(sorted(trusted)) or 'none configured'})", path=sig_path,
                                key_id=kid, **where)
    try:
        key.verify(base64.b64decode(signature, validate=True), canonical(manifest))
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise SignatureError(f"signature by {kid} does not verify (manifest or signature altered)",
                             path=sig_path, key_id=kid, **where) from exc
    signed_component, signed_version = manifest.get("component"), manifest.get("version")
    if signed_component != component:
        raise SignatureError(f"component mismatch: expected {component}, the signature is for {signed_component} "
                             f"{signed_version}", path=sig_path, key_id=kid, field="component", **where)
    if signed_version != version:
        raise SignatureError(f"version mismatch: expected {version}, the signature is for version {signed_version}",
                             path=sig_path, key_id=kid, field="version", **where)
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(SIGNED_FILES):
        raise SignatureError(f"signed manifest must list exactly {SIGNED_FILES}", path=sig_path, key_id=kid, **where)
    contents: dict[str, bytes] = {}
    for name in SIGNED_FILES:
        path = directory / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DigestMismatchError(f"{name} unreadable: {exc}", path=path, key_id=kid, **where) from exc
        if hashlib.sha256(data).hexdigest() != files[name]:
            raise DigestMismatchError(f"{name} does not match its signed SHA-256 (tampered or corrupt)",
                                      path=path, key_id=kid, field=name, **where)
        contents[name] = data
    return VerifiedModel(component=component, version=version, key_id=kid, files=contents)
