"""Errors of the anomaly pipeline, with the fields an operator needs to act on them.

Components may not import ``nucleus.errors`` (dependency rule), so this is the pipeline's own small
tree. Every error names what it is about: the model component and version, the key id for signature
problems, the file and field for card problems. ``code`` is stable for logs and tests.
"""

from __future__ import annotations

from pathlib import Path


class AnomalyError(Exception):
    """Base of the anomaly pipeline's errors."""

    code = "ANOMALY_ERROR"

    def __init__(self, message: str, *, component: str | None = None, version: str | None = None,
                 path: Path | str | None = None, field: str | None = None, key_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.component = component
        self.version = version
        self.path = str(path) if path is not None else None
        self.field = field
        self.key_id = key_id

    def fields(self) -> dict[str, str]:
        """The structured fields, for structlog (``log.error(event, **err.fields())``)."""
        out = {"code": self.code, "error": self.message}
        for key in ("component", "version", "path", "field", "key_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class FeatureSpecError(AnomalyError):
    """A feature spec that cannot be computed (unknown feature, bad band count, bad window)."""

    code = "FEATURE_SPEC_INVALID"


class ModelCardError(AnomalyError):
    """A model card that does not parse or contradicts itself."""

    code = "MODEL_CARD_INVALID"


class SignatureError(AnomalyError):
    """Signature missing, malformed, made with an untrusted key, or not matching the manifest."""

    code = "MODEL_SIGNATURE_INVALID"


class DigestMismatchError(SignatureError):
    """A model file differs from the digest the signed manifest promises (tampered or corrupt)."""

    code = "MODEL_DIGEST_MISMATCH"


class UntrustedKeyError(SignatureError):
    """The signature verifies against no trusted key."""

    code = "MODEL_KEY_UNTRUSTED"


class ModelLoadError(AnomalyError):
    """The ONNX file does not load, its shape does not match the card, or warm-up fails."""

    code = "MODEL_LOAD_FAILED"


class TrainingError(AnomalyError):
    """The builder cannot train: no data, too few windows, scores that do not match after export."""

    code = "MODEL_BUILD_FAILED"
