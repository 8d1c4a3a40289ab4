"""Model signatures: a good package verifies; each kind of tampering fails naming component and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from anomaly_models import build
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from components.anomaly import signing
from components.anomaly.errors import DigestMismatchError, SignatureError, UntrustedKeyError
from components.model_builder.cli import main

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


def trusted(package: object) -> dict[str, Ed25519PublicKey]:
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
    with pytest.raises(SignatureError) as ev:  # a valid signature of another version
        signing.verify_model(d, component=NAME, version="9.9.9", trusted=trusted(package))
    assert str(ev.value) == "version mismatch: expected 9.9.9, the signature is for version 1.0.0"
    assert ev.value.field == "version"
    with pytest.raises(SignatureError) as ec:
        signing.verify_model(d, component="com.other", version="1.0.0", trusted=trusted(package))
    assert str(ec.value) == f"component mismatch: expected com.other, the signature is for {NAME} 1.0.0"
    assert ec.value.field == "component"
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


def test_missing_model_directory_is_named_as_such(package: object, tmp_path: Path) -> None:
    """It said "model is unsigned: no model.sig" for a directory that is not there."""
    with pytest.raises(SignatureError) as e:
        signing.verify_model(tmp_path / "gone", component=NAME, version="1.0.0", trusted=trusted(package))
    assert str(e.value) == "model directory does not exist" and e.value.path == str(tmp_path / "gone")


def test_cli_verify_names_what_is_wrong(package: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = fresh_copy(package, tmp_path)
    pub = tmp_path / "model.key.pub"
    pub.write_text(package.public_key + "\n")  # type: ignore[attr-defined]

    def verify(model_dir: Path, version: str, key: str) -> tuple[int, str]:
        rc = main(["verify", str(model_dir), "--component", NAME, "--version", version, "--trusted-key", key])
        out = capsys.readouterr()
        assert "Traceback" not in out.err and out.err.count("\n") <= 1
        return rc, out.err + out.out

    rc, said = verify(d, "1.0.0", str(pub))
    assert rc == 0 and said.startswith(f"ok: {NAME} 1.0.0 signed by {package.key_id}: ")  # type: ignore[attr-defined]
    rc, said = verify(d, "2.0.0", str(pub))  # was "signature is for ... 1.0.0, not this component"
    assert rc == 1 and "version mismatch: expected 2.0.0, the signature is for version 1.0.0" in said
    rc, said = verify(tmp_path / "nodir", "1.0.0", str(pub))  # was "model is unsigned: no model.sig"
    assert (rc, said) == (2, f"error: {tmp_path / 'nodir'}: model directory does not exist\n")
    rc, said = verify(d, "1.0.0", str(tmp_path / "nokey.pub"))  # was "... is neither base64 nor PEM"
    assert rc == 2 and said.startswith(f"error: --trusted-key {tmp_path / 'nokey.pub'}: no such file")
    rc, said = verify(d, "1.0.0", "garbage")  # not a path: the key itself is what is wrong
    assert rc == 2 and said.startswith("error: --trusted-key: trusted key 'garbage'... is neither base64 nor PEM")
