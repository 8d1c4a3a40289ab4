"""What a demanding user found walking the model builder and the detector: bad input on the bus, lying
model cards, keys and training data the builder must name. Each test failed before its fix."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from anomaly_models import BATCH, CHANNELS, RATE, batch, build, healthy

from components.anomaly import signing
from components.anomaly.errors import ModelCardError
from components.anomaly_detector.scoring import load_model
from components.anomaly_detector.windowing import Windower

NAME = "com.nucleus.TurbineModel"

WINDOW, HOP = 2 * BATCH, BATCH


def fresh() -> Windower:
    w = Windower(list(CHANNELS), WINDOW, HOP, RATE)
    assert len(w.push(batch(0, healthy(BATCH)))) == 0
    return w


# --- the bus: batches that are not samples ---------------------------------------------------------

@pytest.mark.parametrize("data", [
    healthy(BATCH).astype("U12"),  # text of digits: was scored as numbers
    np.where(healthy(BATCH) > 0, "x", "y"),  # text: ValueError out of push() stopped the detector
    healthy(BATCH).astype(np.complex64),  # complex: the imaginary part was dropped with a warning
    healthy(BATCH) > 0,  # booleans: scored as 0/1 samples
    np.zeros(BATCH * 2, dtype=[("a", "f4")]).reshape(2, BATCH),  # records
], ids=["digit-text", "text", "complex", "bool", "records"])
def test_a_batch_whose_data_are_not_numbers_is_malformed_not_scored_or_fatal(data: np.ndarray) -> None:
    w = fresh()
    assert w.push(batch(1, data)) == []
    assert w.skipped == {"malformed": 1}
    # ... and the window restarts: the next good batch does not complete a window with the bad one
    assert w.push(batch(2, healthy(BATCH))) == []
    assert len(w.push(batch(3, healthy(BATCH)))) == 1


@pytest.mark.parametrize("field, value", [
    ("rate_hz", math.nan), ("rate_hz", math.inf), ("t0", math.nan), ("t0", math.inf), ("t0", "soon"),
    ("seq", 1.5), ("seq", True), ("seq", "1"), ("channels", [np.array([1, 2]), "temp"]),
])
def test_a_batch_with_a_non_finite_time_or_rate_or_a_non_integer_seq_is_malformed(field: str, value: Any) -> None:
    """A NaN rate_hz passed the rate check (NaN compares false) and a NaN t0 gave windows a NaN t_end;
    a seq of 1.5 was truncated to 1 and "1" parsed; an array among the channel names raised out of push()."""
    w = fresh()
    bad = batch(1, healthy(BATCH))
    bad[field] = value
    assert w.push(bad) == []
    assert w.skipped == {"malformed": 1}, (field, value)
    assert w.push(batch(2, healthy(BATCH))) == []
    out = w.push(batch(3, healthy(BATCH)))
    assert len(out) == 1 and math.isfinite(out[0].t_end)


def test_integer_samples_and_numpy_integer_seq_are_still_taken() -> None:
    w = fresh()
    ints = (healthy(BATCH) * 100).astype(np.int16)
    out = w.push(batch(np.int64(1), ints))  # type: ignore[arg-type]
    assert w.skipped == {} and len(out) == 1 and out[0].seq_last == 1


# --- model cards that lie ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build(tmp_path_factory.mktemp("models"), "1.0.0", kind="pca")


def resigned(pkg: Any, dest: Path, edit: Any) -> Path:
    """A copy of the package whose card ``edit`` changed (text in, text out), signed again by the same,
    trusted key: only the detector's own checks can catch what the card says."""
    shutil.copytree(pkg.model_dir, dest)
    card = dest / "model_card.json"
    card.write_text(edit(card.read_text()))
    key, _ = signing.load_or_create_key(pkg.model_dir.parents[2] / "keys" / "test.key")
    signing.sign_model(dest, component=NAME, version=pkg.card.version, key=key)
    return dest


@pytest.mark.parametrize("value, field", [
    ("NaN", "threshold.value"), ("Infinity", "threshold.value"), ("1e999", "threshold.value"),
    ("-Infinity", "score_scale.median"),
])
def test_a_signed_card_with_a_non_finite_number_is_refused_naming_field_version_and_key(
        v1: Any, tmp_path: Path, value: str, field: str) -> None:
    """A threshold of NaN loaded (the model then never alarmed: no score is >= NaN)."""
    section, name = field.split(".")

    def edit(text: str) -> str:
        card = json.loads(text)
        card[section][name] = "@"
        return json.dumps(card).replace('"@"', value)

    d = resigned(v1, tmp_path / "m", edit)
    with pytest.raises(ModelCardError) as info:
        load_model(d, component=NAME, version="1.0.0", trusted=signing.trusted_key_map([v1.public_key]))
    e = info.value
    assert e.field == field and "finite" in e.message
    assert (e.component, e.version, e.key_id) == (NAME, "1.0.0", v1.key_id)
    assert e.path == str(d / "model_card.json")


def test_a_signed_card_whose_score_scale_is_out_of_order_is_refused(v1: Any, tmp_path: Path) -> None:
    def edit(text: str) -> str:
        card = json.loads(text)
        card["score_scale"]["median"] = card["score_scale"]["max"] * 10 + 1
        return json.dumps(card)

    d = resigned(v1, tmp_path / "m", edit)
    with pytest.raises(ModelCardError, match=r"median .* <= p99") as info:
        load_model(d, component=NAME, version="1.0.0", trusted=signing.trusted_key_map([v1.public_key]))
    assert info.value.field == "score_scale"
