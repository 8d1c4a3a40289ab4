"""A trained model as a deployable component: artifacts, model card, signature, recipe.

Layout (what ``nucleus deploy <out>/recipes/<recipe> --artifacts <out>/artifacts`` expects)::

    <out>/recipes/<name>-<version>.yaml
    <out>/artifacts/<name>/<version>/model.onnx
    <out>/artifacts/<name>/<version>/model_card.json
    <out>/artifacts/<name>/<version>/model.sig
    <out>/detector-config.json     # --update-config document: trustedKeys + modelComponent

The recipe lists each artifact with its base64 SHA-256 digest (Greengrass style), so the nucleus
refuses a file that changed between build and deployment; the signature covers the same files for
the detector, which trusts keys, not the deployment channel.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from components.anomaly import signing
from components.anomaly.announce import topic_for
from components.anomaly.features import FeatureSpec
from components.anomaly.model_card import CARD_FILE, MODEL_FILE, SIGNATURE_FILE, ModelCard, TrainingSummary
from components.model_builder.training import TrainedModel

DETECTOR = "com.nucleus.AnomalyDetector"


@dataclass(slots=True)
class Package:
    recipe: Path
    artifacts: Path  # <out>/artifacts (the --artifacts directory)
    model_dir: Path  # <out>/artifacts/<name>/<version>
    card: ModelCard
    key_id: str
    public_key: str
    detector_config: Path


def make_card(model: TrainedModel, *, component: str, version: str, channels: list[str], spec: FeatureSpec,
              window: int, hop: int, rate_hz: float | None, sources: list[str], rows: int,
              label_filter: str | None = None, description: str = "") -> ModelCard:
    return ModelCard(
        component=component, version=version, kind=model.kind, description=description, channels=channels,
        sample_rate_hz=rate_hz, window=window, hop=hop, features=spec, feature_names=spec.feature_names(),
        feature_stats=model.feature_stats, onnx=model.onnx_io, threshold=model.threshold,
        score_scale=model.score_scale,
        training=TrainingSummary(sources=sources, rows=rows, windows=model.fit_windows + model.calibration_windows,
                                 fit_windows=model.fit_windows, calibration_windows=model.calibration_windows,
                                 seed=model.params.seed, created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                                 label_filter=label_filter, params=model.params.summary()),
        metrics=model.metrics, alarm=model.alarm, online=model.online, shift=model.shift,
    )


def _digest(path: Path) -> str:
    return base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode("ascii")


def recipe_document(card: ModelCard, model_dir: Path) -> dict[str, object]:
    name, version = card.component, card.version
    return {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": name,
        "ComponentVersion": version,
        "ComponentType": "aws.greengrass.generic",
        "ComponentDescription": (f"Anomaly model ({card.kind}) over {', '.join(card.channels)}: window {card.window}, "
                                 f"hop {card.hop}, threshold {card.threshold.value:.6g}"),
        "ComponentPublisher": "nucleus model builder",
        "ComponentConfiguration": {"DefaultConfiguration": {"accessControl": {"aws.greengrass.ipc.pubsub": {
            f"{name}:pubsub:1": {
                "policyDescription": "Announce this model version to the anomaly detector.",
                "operations": ["aws.greengrass#PublishToTopic"],
                "resources": [topic_for(name)],
            }}}}},
        "Manifests": [{
            "Platform": {"os": "linux"},
            "Lifecycle": {"Run": (f"python3 -m components.anomaly.announce --component {name} --version {version} "
                                  "--artifacts {artifacts:path}")},
            "Artifacts": [{"URI": f"s3://nucleus-models/{name}/{version}/{f}", "Digest": _digest(model_dir / f),
                           "Algorithm": "SHA-256"} for f in (MODEL_FILE, CARD_FILE, SIGNATURE_FILE)],
        }],
    }


def write_package(model: TrainedModel, card: ModelCard, out: Path, key: Ed25519PrivateKey) -> Package:
    model_dir = out / "artifacts" / card.component / card.version
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_FILE).write_bytes(model.proto.SerializeToString())
    (model_dir / CARD_FILE).write_text(card.to_json())
    signing.sign_model(model_dir, component=card.component, version=card.version, key=key)
    recipes = out / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    recipe = recipes / f"{card.component}-{card.version}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_document(card, model_dir), sort_keys=False, width=200))
    public = signing.public_key_text(key.public_key())
    detector_config = out / "detector-config.json"
    detector_config.write_text(json.dumps({DETECTOR: {"MERGE": {"modelComponent": card.component,
                                                                "trustedKeys": [public]}}}, indent=2) + "\n")
    return Package(recipe=recipe, artifacts=out / "artifacts", model_dir=model_dir, card=card,
                   key_id=signing.key_id(key.public_key()), public_key=public, detector_config=detector_config)
