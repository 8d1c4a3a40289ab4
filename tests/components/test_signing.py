"""Model signatures: a good package verifies; each kind of tampering fails naming component and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from anomaly_models import build
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from components.anomaly import signing
from components.anomaly.errors import DigestMismatchError, SignatureError, UntrustedKeyError

NAME = "com.nucleus.TurbineModel"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> signing.VerifiedModel | object:
    return build(tmp_path_factory.mktemp("sig"), "1.0.0")


def fresh_copy(package: object, tmp: Path) -> Path:
    src = package.model_dir  # type: ignore[attr-defined]
    dst = tmp / "m"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def trusted(package: object) -> dict[str, object]:
    return signing.trusted_key_map([package.public_key])  # type: ignore[attr-defined]


def test_key_created_once_with_public_key_beside(tmp_path: Path) -> None:
    key, created = signing.load_or_create_key(tmp_path / "k" / "model.key")
    assert created and (tmp_path / "k" / "model.key").stat().st_mode & 0o077 == 0
    pub = (tmp_path / "k" / "model.key.pub").read_text().strip()
    again, created2 = signing.load_or_create_key(tmp_path / "k" / "model.key")
    assert not created2 and signing.public_key_text(again.public_key()) == pub
    assert signing.key_id(signing.parse_public_key(pub)) == signing.key_id(key.public_key())


def test_good_package_verifies_and_returns_the_bytes(package: object, tmp_path: Path) -> None:
    d = fresh_copy(package, tmp_path)
    v = signing.verify_model(d, component=NAME, version="1.0.0", trusted=trusted(package))
    assert v.files["model.onnx"] == (d / "model.onnx").read_bytes()
    assert v.key_id == package.key_id  # type: ignore[attr-defined]


@pytest.mark.parametrize("victim", ["model.onnx", "model_card.json"])
def test_tampered_file_is_a_digest_mismatch(package: object, tmp_path: Path, victim: str) -> None:
    d = fresh_copy(package, tmp_path)
    data = bytearray((d / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / victim).write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError) as e:
        signing.verify_model(d, component=NAME, version="1.0.0", trusted=trusted(package))
    assert e.value.component == NAME and e.value.key_id == package.key_id  # type: ignore[attr-defined]
    assert e.value.field == victim and victim in str(e.value)


def test_unsigned_untrusted_altered_and_replayed(package: object, tmp_path: Path) -> None:
    d = fresh_copy(package, tmp_path)
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(UntrustedKeyError) as e:
        signing.verify_model(d, component=NAME, version="1.0.0", trusted={signing.key_id(other): other})
    assert e.value.key_id == package.key_id and e.value.component == NAME  # type: ignore[attr-defined]
    with pytest.raises(SignatureError, match="is for"):  # a valid signature of another version
        signing.verify_model(d, component=NAME, version="9.9.9", trusted=trusted(package))
    doc = json.loads((d / "model.sig").read_text())
    doc["manifest"]["files"]["model.onnx"] = "0" * 64  # attacker edits the manifest to match a new file
    (d / "model.sig").write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not verify") as e2:
        signing.verify_model(d, component=NAME, version="1.0.0", trusted=trusted(package))
    assert e2.value.code == "MODEL_SIGNATURE_INVALID"
    (d / "model.sig").unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        signing.verify_model(d, component=NAME, version="1.0.0", trusted=trusted(package))


def test_trusted_key_formats() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    from cryptography.hazmat.primitives import serialization

    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert signing.key_id(signing.parse_public_key(pem)) == signing.key_id(key)
    with pytest.raises(SignatureError, match="32"):
        signing.parse_public_key("AAAA")
    with pytest.raises(SignatureError, match="neither"):
        signing.parse_public_key("not base64 !")
