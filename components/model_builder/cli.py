"""``nucleus model build ...`` (also ``python -m components.model_builder build ...``).

``main(argv)`` receives everything after ``nucleus model``; it returns the exit status: 0 success,
2 bad arguments or data (one ``error:`` line naming the file/field), 1 verification failure.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
from pydantic import ValidationError

from components.anomaly import alarm, signing
from components.anomaly.errors import AnomalyError, FeatureSpecError, SignatureError, TrainingError
from components.anomaly.features import (
    Calendar,
    FeatureExtractor,
    FeatureSpec,
    channel_of,
    default_spec,
    shape_spec,
    spectral_spec,
    surprise_spec,
    univariate_spec,
)
from components.anomaly.model_card import ONLINE_CAPACITY
from components.anomaly.shift import HISTORY as SHIFT_HISTORY
from components.anomaly.shift import RECENT as SHIFT_RECENT
from components.anomaly.shift import TAIL_PROBABILITY as SHIFT_TAIL
from components.model_builder import data as datamod
from components.model_builder.package import make_card, write_package
from components.model_builder.training import (
    AUTOENCODER_MAX_ITER,
    MIN_WINDOWS,
    ONLINE_MERGE_FRACTION,
    TrainParams,
    train,
)

PRESETS = ("vibration", "spectral", "univariate", "surprise", "shape")
SLOW_CHANNELS = "temp"  # the vibration and spectral presets' default --slow-channels


class _Parser(argparse.ArgumentParser):
    """A bad argument is one ``error:`` line naming the flag and exit status 2, like every other bad
    input main() reports, not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    return parse


def _real(*, above: float | None = None, at_least: float | None = None,
          below: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if above is not None and below is not None and not above < value < below:
            raise argparse.ArgumentTypeError(f"must be between {above:g} and {below:g} (exclusive), got {value:g}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be > {above:g}, got {value:g}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be >= {at_least:g}, got {value:g}")
        return value
    return parse


def _rows(text: str) -> tuple[int, int]:
    """``START:END`` (either may be left out), rows counted from 0 after the header, END exclusive."""
    start, colon, end = text.partition(":")
    try:
        first, last = int(start) if start.strip() else 0, int(end) if end.strip() else 1 << 62
    except ValueError:
        colon = ""
    if not colon:
        raise argparse.ArgumentTypeError(f"expected START:END row numbers (e.g. 0:50000), got {text!r}")
    if first < 0 or last <= first:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return first, last


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(h) for h in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes >= 1 (e.g. 16,4,16), got {text!r}")
    return sizes


POSITIVE = _real(above=0)

# The nucleus's recipe rules (nucleus/recipe.py; components do not import the nucleus): both become
# path parts of <out>/artifacts/<name>/<version>, which '../..' or a '/' walked out of.
_NAME = re.compile(r"^[A-Za-z0-9\-_.]{1,128}$")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")


def _component_name(text: str) -> str:
    if not _NAME.match(text) or set(text) == {"."}:
        raise argparse.ArgumentTypeError(f"{text!r} is not a component name (letters, digits, - _ . ; e.g. "
                                         "com.example.PumpModel)")
    return text


def _version(text: str) -> str:
    if not _SEMVER.match(text) or len(text) > 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    return text


def _channel_list(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty channel name")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a channel twice")
    return names


def _shift_pair(text: str) -> tuple[int, int]:
    """--shift RECENT,HISTORY: two whole numbers of samples, each at least 2."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 2 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give RECENT,HISTORY as two whole numbers >= 2, e.g. 16,400")
    return int(parts[0]), int(parts[1])


def _rearm(text: str) -> tuple[float, int, float | None]:
    """--rearm QUIET_TAIL,QUIET_WINDOWS[,RATIO]: a tail probability in (0, 1), a whole number >= 1, and
    optionally a ratio above 1 (omitted: no exception while disarmed)."""
    parts = [p.strip() for p in text.split(",")]
    bad = argparse.ArgumentTypeError(
        f"{text!r}: give QUIET_TAIL,QUIET_WINDOWS[,RATIO]: a tail probability between 0 and 1, a whole "
        "number of windows >= 1 and a finite ratio above 1, e.g. 1e-3,288,2")
    if len(parts) not in (2, 3):
        raise bad
    try:
        tail, windows = float(parts[0]), int(parts[1])
        ratio = float(parts[2]) if len(parts) == 3 else None
    except ValueError:
        raise bad from None
    if not (0 < tail < 1) or windows < 1 or (ratio is not None and not (1 < ratio < float("inf"))):
        raise bad
    return tail, windows, ratio


FRACTION = _real(above=0, below=1)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nucleus model", description="Train, export, sign and package anomaly models.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train on healthy data and write a signed, deployable model component")
    b.add_argument("--data", action="append", required=True, type=Path,
                   help="training file: .csv/.csv.gz (numeric columns) or .npz recording; repeatable")
    b.add_argument("--out", required=True, type=Path, help="output dir: recipes/, artifacts/, detector-config.json")
    b.add_argument("--name", type=_component_name, default="com.nucleus.TurbineModel", help="model component name")
    b.add_argument("--version", type=_version, default="1.0.0", help="model component version (semver)")
    b.add_argument("--kind", choices=["isolation_forest", "pca", "autoencoder", "knn"], default="isolation_forest",
                   help="knn: distance to the nearest training window (add --online to keep learning at run time)")
    b.add_argument("--channels", type=_channel_list,
                   help="comma-separated channel (column) names; default: every numeric column")
    b.add_argument("--label-column", help="CSV: train only on rows whose label is a --normal-value")
    b.add_argument("--normal-value", action="append", default=None,
                   help="label value meaning normal (default 0; repeatable; needs --label-column)")
    b.add_argument("--rows", type=_rows, help="START:END row range of each CSV to train on (e.g. 0:50000)")
    b.add_argument("--time-column", help="CSV column with each row's time (ISO 8601, UTC if no zone, or epoch "
                   "seconds); needed for --calendar")
    b.add_argument("--calendar", help="add the window's place in the day and/or week as features: day, week or "
                   "day,week (not standardized; needs --time-column)")
    b.add_argument("--rate-hz", type=POSITIVE, help="sample rate of CSV data (recordings carry their own; a "
                   "different --rate-hz for one is refused)")
    b.add_argument("--window", type=int, default=1024, help="window length in samples")
    b.add_argument("--hop", type=_whole(1), default=256, help="samples between window starts")
    b.add_argument("--features", default="vibration",
                   help=f"feature preset ({', '.join(PRESETS)}) or a JSON FeatureSpec file")
    b.add_argument("--samples", type=_whole(1), default=None,
                   help="shape preset: the newest N values of the channel are the features (default: the window)")
    b.add_argument("--bands", type=_whole(0), default=None,
                   help="spectral bands per fast channel (vibration preset: 8, 0 = none; spectral preset: 16)")
    b.add_argument("--slow-channels", default=None,
                   help=f"comma-separated channels given level+trend only (vibration and spectral presets; "
                   f"default: {SLOW_CHANNELS})")
    b.add_argument("--quantile", type=FRACTION, default=0.999, help="threshold quantile of held-out healthy scores")
    b.add_argument("--false-alarms-per-hour", type=POSITIVE, help="threshold from a false-alarm budget (needs rate)")
    b.add_argument("--margin", type=POSITIVE, default=1.0, help="threshold multiplier")
    b.add_argument("--spread-margin", type=POSITIVE, default=None,
                   help="threshold = median + K * (quantile - median) of held-out scores, before --margin")
    b.add_argument("--alarm", choices=["threshold", "likelihood"], default="threshold",
                   help="how the detector turns scores into alarms: the fixed threshold, or the tail probability of "
                   "the averaged score under a normal fitted online to recent scores (docs/anomaly.md)")
    b.add_argument("--tail-probability", type=FRACTION, default=alarm.TAIL_PROBABILITY,
                   help="alarm level for --alarm likelihood (nupic's red zone: 1e-5)")
    b.add_argument("--holdoff-windows", type=_whole(0), default=0,
                   help="after an alarm, no new alarm for this many windows (0 = none)")
    b.add_argument("--averaging-windows", type=_whole(1), default=alarm.AVERAGING_WINDOWS,
                   help="likelihood: scores averaged (nupic: 10)")
    b.add_argument("--history-windows", type=_whole(1), default=alarm.HISTORY_WINDOWS,
                   help="likelihood: averaged scores the online normal is fitted to (nupic: 8640)")
    b.add_argument("--season-samples", type=_whole(0), default=None,
                   help="surprise preset: samples per season (e.g. one day) for the zseason feature; 0 = none")
    b.add_argument("--online", action="store_true",
                   help="knn: the detector remembers what it scores, so a new normal alarms when it starts, not "
                   "for as long as it lasts (docs/anomaly.md)")
    b.add_argument("--online-capacity", type=_whole(1), default=None,
                   help=f"knn --online: windows remembered per asset (default {ONLINE_CAPACITY})")
    b.add_argument("--online-merge", type=_real(at_least=0), default=None,
                   help="knn --online: a window nearer than this x the median held-out distance to a remembered one "
                   f"is not stored (default {ONLINE_MERGE_FRACTION:g})")
    b.add_argument("--shift", type=_shift_pair, default=None, metavar="RECENT,HISTORY",
                   help="with --alarm likelihood: a second alarm stage on the first channel, the newest RECENT "
                   "samples against the HISTORY before them in mean and spread (docs/anomaly.md; dev-set choice "
                   f"{SHIFT_RECENT},{SHIFT_HISTORY}); off by default")
    b.add_argument("--shift-tail", type=FRACTION, default=None,
                   help=f"--shift: its alarm level (default {SHIFT_TAIL:g})")
    b.add_argument("--rearm", type=_rearm, default=None, metavar="QUIET_TAIL,QUIET_WINDOWS[,RATIO]",
                   help="with --alarm likelihood: after an alarm, none until QUIET_WINDOWS windows in a row had a "
                   "tail probability >= QUIET_TAIL, except a red-zone window scoring above RATIO x the alarm's "
                   "score (docs/anomaly.md, 'Re-arm after quiet'; dev-set choice 1e-3,288,2); off by default")
    b.add_argument("--calibration-fraction", type=FRACTION, default=0.25,
                   help="held-out tail for the threshold, between 0 and 1")
    b.add_argument("--seed", type=_whole(0, 2**32 - 1), default=0)
    b.add_argument("--n-estimators", type=_whole(1), default=100)
    b.add_argument("--max-samples", type=_whole(1), default=256)
    b.add_argument("--pca-variance", type=POSITIVE, default=0.95,
                   help="pca: explained variance to keep (below 1) or a number of components (1 and more)")
    b.add_argument("--hidden", type=_sizes, help="autoencoder hidden layer sizes, e.g. 16,4,16")
    b.add_argument("--max-iter", type=_whole(1), default=AUTOENCODER_MAX_ITER,
                   help="autoencoder: at most this many training epochs (it stops earlier once the held-out loss "
                   "stops improving)")
    b.add_argument("--key", type=Path, help="Ed25519 private key (PEM); created if absent "
                   "(default <out>/keys/model-signing.key); public key written to <key>.pub")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    r = sub.add_parser("record", help="record sensor batches from the bus into a .npz training recording")
    r.add_argument("--topic", required=True, help="sensor topic, e.g. sensors/turbine-1/raw")
    r.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    r.add_argument("--seconds", type=POSITIVE, help="stop after this long (with --batches: whichever comes first)")
    r.add_argument("--batches", type=_whole(1), help="stop after this many batches")
    r.add_argument("--socket", type=Path, help="IPC socket (default $NUCLEUS_IPC_SOCKET)")
    r.add_argument("--token-file", type=Path, help="file holding an IPC token (default $SVCUID)")
    v = sub.add_parser("verify", help="verify a model directory's signature and digests")
    v.add_argument("model_dir", type=Path)
    v.add_argument("--component", required=True)
    v.add_argument("--version", required=True)
    v.add_argument("--trusted-key", action="append", required=True, help="base64 public key or a file holding one")
    return p


def _one_line(exc: ValidationError) -> str:
    """pydantic's errors as 'field: message'; a whole-document check has no field, and its message is
    the validator's own (not 'value: Value error, ...')."""
    parts = []
    for e in exc.errors():
        msg = e["msg"].removeprefix("Value error, ")
        where = ".".join(str(x) for x in e["loc"])
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


# Column names that usually hold labels, not measurements: taken as channels, the model would be trained on
# the anomalous rows too, with the label as a feature (every numeric column is a channel by default).
_LABEL_NAMES = frozenset({"label", "labels", "anomaly", "is_anomaly", "anomalous", "fault", "class", "target",
                          "y", "outlier"})


# The flags only some presets read; giving one to a preset that ignores it is refused, not dropped.
_PRESET_FLAGS = {"--bands": ("bands", ("vibration", "spectral")),
                 "--slow-channels": ("slow_channels", ("vibration", "spectral")),
                 "--season-samples": ("season_samples", ("surprise",)),
                 "--samples": ("samples", ("shape",))}


# The flags only load_csv reads; given with a recording each would be dropped without a word. They are
# refused rather than made to work: a recording has no label column (every channel is data), carries
# its own times (segment_t0), and --rows counts lines after a CSV header, which a recording (samples in
# segments split at sequence gaps) does not have.
_CSV_FLAGS = {"--rows": "rows", "--label-column": "label_column", "--time-column": "time_column"}


def _spec_file(args: argparse.Namespace) -> FeatureSpec | None:
    """The JSON FeatureSpec --features names (None for a preset), read before the data: the channels
    it uses are the ones to load, and the only ones the model card may list."""
    if args.features in PRESETS:
        return None
    path = Path(args.features)
    if not path.exists():
        raise TrainingError(f"--features {args.features!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                            "existing JSON FeatureSpec file")
    try:
        return FeatureSpec.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise TrainingError(f"--features {path}: unreadable: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        raise TrainingError(f"--features {path}: not a JSON FeatureSpec: {_one_line(exc)}") from exc


def _spec(args: argparse.Namespace, channels: list[str], spec_file: FeatureSpec | None) -> FeatureSpec:
    preset = args.features if args.features in PRESETS else None
    for flag, (attr, presets) in _PRESET_FLAGS.items():
        if getattr(args, attr) is not None and preset not in presets:
            used = " and ".join(f"--features {p}" for p in presets)
            given = f"--features {preset}" if preset else "a feature-spec file"
            raise TrainingError(f"{flag} is read by {used} only; {given} would ignore it")
    if spec_file is not None:
        return spec_file
    slow = tuple(s for s in (args.slow_channels or SLOW_CHANNELS).split(",") if s)
    if args.slow_channels is not None and (unknown := [c for c in slow if c not in channels]):
        raise TrainingError(f"--slow-channels {args.slow_channels}: no channel {', '.join(unknown)} "
                            f"(channels: {', '.join(channels)})")
    if preset in ("univariate", "surprise", "shape") and len(channels) != 1:
        raise TrainingError(f"the {preset} preset needs one channel, have {channels}", field="features")
    try:
        if preset == "vibration":
            return default_spec(channels, bands=8 if args.bands is None else args.bands, slow=slow)
        if preset == "spectral":
            if args.bands == 0:
                raise TrainingError("--bands 0: the spectral preset's features are the bands; give at least 1")
            return spectral_spec(channels, bands=16 if args.bands is None else args.bands, slow=slow)
        if preset == "univariate":
            return univariate_spec(channels[0])
        if preset == "surprise":
            return surprise_spec(channels[0], season=args.season_samples or 0)
        if preset == "shape":
            samples = args.samples or args.window
            if samples > args.window:
                raise TrainingError(f"--samples {samples} is more than the --window of {args.window} samples")
            return shape_spec(channels[0], samples=samples)
    except ValidationError as exc:
        raise TrainingError(f"--features {preset}: {_one_line(exc)}") from exc
    raise AssertionError(f"unhandled preset {preset}")


def _check_rate(args: argparse.Namespace, loaded: list[datamod.Dataset]) -> None:
    """A recording carries the rate it was recorded at; a different --rate-hz would make every
    time-based figure (band frequencies, false alarms per hour, the card's rate) wrong."""
    if args.rate_hz is None:
        return
    for d in loaded:
        if d.rate_hz is not None and not math.isclose(d.rate_hz, args.rate_hz, rel_tol=1e-9):
            raise TrainingError(f"--rate-hz {args.rate_hz:g} disagrees with the recording's own rate "
                                f"{d.rate_hz:g} Hz; leave --rate-hz out for recordings", path=d.sources[0])


def _data_path(dataset: datamod.Dataset) -> str | None:
    return dataset.sources[0] if len(dataset.sources) == 1 else None


def _check_window_count(args: argparse.Namespace, dataset: datamod.Dataset, n: int) -> None:
    """Too few windows, said in the terms the user can change (rows, --window, --hop), not train()'s."""
    if n >= MIN_WINDOWS:
        return
    segments = len(dataset.segments)
    longest = max((s.shape[1] for s in dataset.segments), default=0)
    rows_needed = args.window + (MIN_WINDOWS - 1) * args.hop
    raise TrainingError(
        f"{dataset.rows} usable rows in {segments} contiguous stretch(es) (longest {longest}) give {n} windows of "
        f"--window {args.window} --hop {args.hop}; at least {MIN_WINDOWS} are needed (one stretch of "
        f"{rows_needed} rows, or a smaller --window/--hop)", path=_data_path(dataset), field="window")


def _check_finite(features: np.ndarray, spec: FeatureSpec, dataset: datamod.Dataset) -> None:
    """Features that overflowed (values beyond what float arithmetic holds: a unit error, a sensor's
    error code) are named with their channels and the largest value there, instead of train()'s
    "training features contain NaN or inf" after a page of numpy warnings."""
    bad = ~np.isfinite(features)
    if not bad.any():
        return
    names = spec.feature_names()
    cols = [int(i) for i in np.flatnonzero(bad.any(axis=0))]
    channels = list(dict.fromkeys(channel_of(names[i]) for i in cols))
    largest = {c: max(float(np.abs(s[dataset.channels.index(c)]).max()) for s in dataset.segments)
               for c in channels if c in dataset.channels}
    shown = ", ".join(names[i] for i in cols[:6]) + (f" (and {len(cols) - 6} more)" if len(cols) > 6 else "")
    values = ", ".join(f"{c} up to {v:.3g}" for c, v in largest.items())
    raise TrainingError(f"features {shown} are not finite in {int(bad.any(axis=1).sum())} of {len(features)} "
                        f"windows: the values are too large to compute with ({values}); check the channels' "
                        "units or drop the rows", path=_data_path(dataset), field="channels")


def _check_rate_against_times(args: argparse.Namespace, dataset: datamod.Dataset) -> None:
    """--rate-hz against the time column's own spacing: a rate the rows do not have made every time-based
    figure wrong (false alarms per hour, the card's rate the detector checks batches against)."""
    if args.rate_hz is None or args.time_column is None or dataset.times is None:
        return
    steps = np.concatenate([np.diff(t) for t in dataset.times if len(t) > 1] or [np.zeros(0)])
    if not steps.size:
        return
    step = float(np.median(steps))
    if not math.isclose(step * args.rate_hz, 1.0, rel_tol=0.01):
        raise TrainingError(f"--rate-hz {args.rate_hz:g} disagrees with --time-column {args.time_column}: its rows "
                            f"are {step:g} s apart ({1 / step:.6g} Hz)", path=_data_path(dataset), field="rate_hz")


def build(args: argparse.Namespace) -> dict[str, object]:
    spec_file = _spec_file(args)
    # A spec file names its channels: only those are loaded (an unused column's blank or text cell
    # would otherwise drop rows or stop the build), unless --channels says otherwise.
    channels = args.channels if args.channels else spec_file.channels() if spec_file else None
    if args.hop > args.window:
        raise TrainingError(f"--hop {args.hop} is longer than --window {args.window}: the samples between windows "
                            "would never be looked at")
    if args.normal_value and not args.label_column:
        raise TrainingError("--normal-value needs --label-column (the column holding the labels)")
    if args.hidden is not None and args.kind != "autoencoder":
        raise TrainingError(f"--hidden is for --kind autoencoder; --kind {args.kind} would ignore it")
    if args.shift_tail is not None and args.shift is None:
        raise TrainingError("--shift-tail is for --shift; without --shift it would be ignored")
    if args.shift is not None and args.alarm != "likelihood":
        raise TrainingError("--shift is judged like the likelihood alarm: it needs --alarm likelihood", field="shift")
    if args.rearm is not None and args.alarm != "likelihood":
        raise TrainingError("--rearm judges quiet by tail probability: it needs --alarm likelihood", field="rearm")
    for flag, value in (("--online-capacity", args.online_capacity), ("--online-merge", args.online_merge)):
        if value is not None and not args.online:
            raise TrainingError(f"{flag} is for --online (a learning knn model); without --online it would be ignored")
    seen: dict[Path, Path] = {}
    for path in args.data:
        # the same file twice: its second copy is the held-out tail, windows the model was fitted on, so
        # the threshold came from in-sample scores (too low: false alarms)
        if (real := path.resolve()) in seen:
            raise TrainingError(f"--data names this file twice (also as {seen[real]}); the held-out windows would "
                                "be copies of fitted ones", path=path)
        seen[real] = path
    loaded: list[datamod.Dataset] = []
    for path in args.data:
        if path.suffix == ".npz":
            for flag, attr in _CSV_FLAGS.items():
                if getattr(args, attr) is not None:
                    raise TrainingError(f"{flag} is for CSV files; a recording (.npz) would ignore it", path=path)
            loaded.append(datamod.load_recording(path))
        else:
            loaded.append(datamod.load_csv(path, channels, label_column=args.label_column,
                                           normal_values=tuple(args.normal_value or ["0"]), row_range=args.rows,
                                           time_column=args.time_column))
    _check_rate(args, loaded)
    dataset = datamod.merge(loaded, channels)
    rate = args.rate_hz if args.rate_hz is not None else dataset.rate_hz
    _check_rate_against_times(args, dataset)
    spec = _spec(args, dataset.channels, spec_file)
    warnings = _constant_channels(dataset, spec)
    if dataset.nonfinite_rows:
        warnings.append(f"{dataset.nonfinite_rows} row(s) left out for a missing, NaN or infinite value (no window "
                        "spans them)")
    if not args.channels and spec_file is None and (
            labels := [c for c in dataset.channels if c.lower() in _LABEL_NAMES and c in spec.channels()]):
        warnings.append(f"column(s) {', '.join(labels)} became channel(s), trained on as measurements: if they hold "
                        "labels, give --label-column (and --normal-value) so only normal rows are trained on")
    if dataset.skipped_columns and not args.channels and spec_file is None:
        warnings.append(f"CSV column(s) {', '.join(dataset.skipped_columns)} left out: not a number in the first "
                        f"data row (channels: {', '.join(dataset.channels)}); name the channels with --channels")
    if rate is None:
        warnings.append("no sample rate (--rate-hz): the model card states none, so the detector cannot refuse "
                        "batches at another rate (rate_mismatch) and scores them as they come")
    existing = args.out / "artifacts" / args.name / args.version
    replaced = existing.is_dir() and any(existing.iterdir())
    if replaced:
        warnings.append(f"{existing} held a build of {args.name} {args.version}; it is replaced. A device that "
                        "runs that version gets the new files only when they are deployed again: give a new "
                        "--version to tell the models apart in events and logs")
    if args.calendar:
        try:
            spec = spec.model_copy(update={"calendar": Calendar(periods=args.calendar.split(","))})
        except ValueError as exc:
            raise TrainingError(f"--calendar {args.calendar!r}: use day, week or day,week", field="calendar") from exc
    ends = datamod.window_ends(dataset, args.window, args.hop)
    if spec.calendar is not None and ends is None:
        raise TrainingError("calendar features need each row's time: give --time-column for a CSV (recordings "
                            "made by `nucleus model record` carry their times)", field="calendar")
    try:
        extractor = FeatureExtractor(spec, dataset.channels, args.window)
    except FeatureSpecError as exc:  # e.g. a season longer than the window allows: say which flag set it
        where = f"{exc.field}: " if exc.field else ""
        raise TrainingError(f"--features {args.features}: {where}{exc.message} (--window {args.window})") from exc
    windows = datamod.windows(dataset, args.window, args.hop)
    _check_window_count(args, dataset, len(windows))
    with np.errstate(all="ignore"):  # overflow is reported below, naming the features and channels
        features = extractor.extract(windows, ends)
    _check_finite(features, spec, dataset)
    params = TrainParams(kind=args.kind, quantile=args.quantile, false_alarms_per_hour=args.false_alarms_per_hour,
                         margin=args.margin, spread_margin=args.spread_margin,
                         calibration_fraction=args.calibration_fraction, seed=args.seed,
                         n_estimators=args.n_estimators, max_samples=args.max_samples, pca_variance=args.pca_variance,
                         hidden=args.hidden, max_iter=args.max_iter,
                         alarm_mode=args.alarm, tail_probability=args.tail_probability,
                         holdoff_windows=args.holdoff_windows, averaging_windows=args.averaging_windows,
                         history_windows=args.history_windows, online=args.online,
                         online_capacity=ONLINE_CAPACITY if args.online_capacity is None else args.online_capacity,
                         online_merge_fraction=(ONLINE_MERGE_FRACTION if args.online_merge is None
                                                else args.online_merge),
                         # windows that share a sample with the newest one never count as "seen before"
                         online_exclude_windows=-(-args.window // args.hop) - 1, unscaled=tuple(spec.unscaled()),
                         shift=args.shift, shift_tail=SHIFT_TAIL if args.shift_tail is None else args.shift_tail,
                         rearm=args.rearm)
    model = train(features, params, rate_hz=rate, hop=args.hop)
    label_filter = f"{args.label_column} in {args.normal_value or ['0']}" if args.label_column else None
    # The detector drops every batch that lacks a channel the card lists (windowing.py, missing_channel),
    # so the card lists only the channels the features read (in the data's order: the extractor finds
    # each channel by name in whatever list it is given, here and in the detector alike).
    used = set(spec.channels())
    card = make_card(model, component=args.name, version=args.version,
                     channels=[c for c in dataset.channels if c in used], spec=spec,
                     window=args.window, hop=args.hop, rate_hz=rate, sources=dataset.sources, rows=dataset.rows,
                     label_filter=label_filter)
    alarming = card.metrics.get("calibration_alarm_fraction", 0.0)
    if alarming > 0.5:  # the threshold is below the median healthy score: the model alarms on normal operation
        warnings.append(f"the threshold {card.threshold.value:.6g} is at or below the scores of "
                        f"{100 * alarming:.0f}% of the held-out healthy windows (median "
                        f"{card.score_scale.median:.6g}): deployed, it would alarm on most normal windows "
                        "(--margin/--spread-margin/--quantile)")
    key_path = args.key or args.out / "keys" / "model-signing.key"
    try:
        key, created = signing.load_or_create_key(key_path)
        pkg = write_package(model, card, args.out, key)
    except OSError as exc:
        raise TrainingError(f"cannot write the model (--out {args.out}): {exc.strerror or exc}",
                            path=exc.filename) from exc
    return {
        "component": card.component, "version": card.version, "kind": card.kind, "recipe": str(pkg.recipe),
        "artifacts": str(pkg.artifacts), "threshold": card.threshold.value, "windows": card.training.windows,
        "features": len(card.feature_names), "key": str(key_path), "key_created": created, "key_id": pkg.key_id,
        "public_key": pkg.public_key, "detector_config": str(pkg.detector_config), "metrics": card.metrics,
        "warnings": warnings, "channels": card.channels,
    }


def _constant_channels(dataset: datamod.Dataset, spec: FeatureSpec) -> list[str]:
    """A channel the features read that never changes in the training data (a dead or disconnected
    sensor, a column of zeros): its features get a spread of 1 in the card, so when it comes alive the
    model barely notices. Built anyway (a constant channel can be right), but said."""
    used = set(spec.channels())
    out = []
    for i, c in enumerate(dataset.channels):
        if c in used and dataset.segments and all(float(np.ptp(s[i])) == 0.0 for s in dataset.segments):
            out.append(f"channel {c} is constant ({float(dataset.segments[0][i, 0]):g}) in all the training data: "
                       "its features carry nothing, and a change there later weighs little in the score "
                       "(a dead sensor? leave it out with --channels)")
    return out


def _print_build(result: dict[str, object]) -> None:
    m = result["metrics"]
    assert isinstance(m, dict)
    print(f"built {result['component']} {result['version']} ({result['kind']}): {result['windows']} windows x "
          f"{result['features']} features, threshold {result['threshold']:.6g}")
    channels = result["channels"]
    assert isinstance(channels, list)
    print(f"  channels:  {', '.join(channels)}")
    print(f"  ONNX vs scikit-learn: max |diff| {m['onnx_max_abs_diff']:.2e}, "
          f"same decision on {100 * m['onnx_label_agreement']:.2f}% of check windows")
    if m.get("training_converged") == 0.0:
        print(f"  training:  stopped at --max-iter {int(m['training_iterations'])} before the held-out loss settled; "
              "the model works, but a larger --max-iter would usually fit better")
    print(f"  recipe:    {result['recipe']}")
    print(f"  artifacts: {result['artifacts']}")
    print(f"  signed by  {result['key_id']} ({'new key ' if result['key_created'] else ''}{result['key']})")
    print(f"  deploy:    nucleus deploy {result['recipe']} --artifacts {result['artifacts']}")
    print(f"  trust:     nucleus deploy --update-config @{result['detector_config']}")


def _record(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from components.model_builder.record import record

    if args.seconds is None and args.batches is None:
        raise TrainingError("give --seconds and/or --batches", field="record")
    if args.out.suffix != ".npz":
        # numpy would write <out>.npz while the summary named <out>, and build reads a recording by its suffix
        raise TrainingError(f"--out {args.out}: a recording's name ends in .npz (e.g. {args.out.name}.npz)")
    socket = args.socket or (Path(os.environ["NUCLEUS_IPC_SOCKET"]) if "NUCLEUS_IPC_SOCKET" in os.environ else None)
    token = os.environ.get("SVCUID", "")
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise TrainingError(f"--token-file {args.token_file}: {exc.strerror or exc}") from exc
    if socket is None or not token:
        raise TrainingError("no IPC socket/token: give --socket and --token-file (nucleus model record "
                            "fills them in from --root)", field="record")
    rec = asyncio.run(record(socket, token, args.topic, args.out, seconds=args.seconds, batches=args.batches))
    print(f"recorded {rec.batches} batches, {rec.samples} samples x {len(rec.channels)} channels "
          f"({', '.join(rec.channels)}) at {rec.rate_hz:g} Hz, {rec.gaps} gap(s)"
          + (f", {rec.duplicates} duplicate or late batch(es) dropped" if rec.duplicates else "") + f" -> {args.out}")
    return 0


def _trusted_key(value: str) -> str:
    """A --trusted-key: the file holding a key if one exists at that path, else the key itself."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            text = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TrainingError(f"--trusted-key {value}: cannot read the key file: {exc}") from exc
        if "PRIVATE KEY-----" in text:
            raise TrainingError(f"--trusted-key {value}: this is a private key; give the public key written "
                                f"beside it ({signing.public_key_path(path).name})")
        try:
            signing.parse_public_key(text)
        except SignatureError as exc:
            raise TrainingError(f"--trusted-key {value}: {exc.message}") from exc
        return text
    if path.exists():
        raise TrainingError(f"--trusted-key {value}: not a file")
    try:
        signing.parse_public_key(value)
    except SignatureError as exc:
        if "/" in value or "." in value or value.startswith("~"):  # a path ('.' is not base64)
            raise TrainingError(f"--trusted-key {value}: no such file (nor is it a base64 or PEM public key)") from exc
        raise TrainingError(f"--trusted-key: {exc.message}") from exc
    return value


def _verify(args: argparse.Namespace) -> int:
    if not args.model_dir.is_dir():
        what = "is not a directory" if args.model_dir.exists() else "does not exist"
        raise TrainingError(f"model directory {what}", path=args.model_dir)
    from components.anomaly_detector.scoring import load_model  # onnxruntime: only verify needs it here

    keys = [_trusted_key(k) for k in args.trusted_key]
    # The detector's own load: signature, digests, card, ONNX session, input width, warm-up. Signature and
    # card alone said 'ok' for a signed model.onnx that does not load or whose width is not the card's,
    # which the detector then refused.
    model = load_model(args.model_dir, component=args.component, version=args.version,
                       trusted=signing.trusted_key_map(keys))
    print(f"ok: {args.component} {args.version} signed by {model.key_id}: {model.card.kind}, "
          f"{len(model.card.feature_names)} features over {', '.join(model.card.channels)}, threshold "
          f"{model.threshold:.6g}; loads and scores as the detector will")
    return 0


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument, already reported in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "record":
            return _record(args)
        if args.command == "build":
            result = build(args)
            warnings = result["warnings"]
            assert isinstance(warnings, list)
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                _print_build(result)
            return 0
        return _verify(args)
    except TrainingError as exc:
        where = ": ".join(str(x) for x in (exc.path, exc.field) if x)
        print(f"error: {where + ': ' if where else ''}{exc.message}", file=sys.stderr)
        return 2
    except AnomalyError as exc:
        where = ": ".join(str(x) for x in (exc.path, exc.field, exc.key_id) if x)
        print(f"error: {where + ': ' if where else ''}{exc.message}", file=sys.stderr)
        return 1 if args.command == "verify" else 2
    except ValidationError as exc:  # a value no flag check caught, refused by a model's own field limits
        for e in exc.errors():
            print(f"error: {'.'.join(str(x) for x in e['loc'])}: {e['msg']} (got {e.get('input')!r})",
                  file=sys.stderr)
        return 2
