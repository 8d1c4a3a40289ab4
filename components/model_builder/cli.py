"""``nucleus model build ...`` (also ``python -m components.model_builder build ...``).

``main(argv)`` receives everything after ``nucleus model``; it returns the exit status: 0 success,
2 bad arguments or data (one ``error:`` line naming the file/field), 1 verification failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from components.anomaly import alarm, signing
from components.anomaly.errors import AnomalyError, TrainingError
from components.anomaly.features import (
    Calendar,
    FeatureExtractor,
    FeatureSpec,
    default_spec,
    shape_spec,
    spectral_spec,
    surprise_spec,
    univariate_spec,
)
from components.anomaly.model_card import ONLINE_CAPACITY, load_card
from components.model_builder import data as datamod
from components.model_builder.package import make_card, write_package
from components.model_builder.training import AUTOENCODER_MAX_ITER, ONLINE_MERGE_FRACTION, TrainParams, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nucleus model", description="Train, export, sign and package anomaly models.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train on healthy data and write a signed, deployable model component")
    b.add_argument("--data", action="append", required=True, type=Path,
                   help="training file: .csv/.csv.gz (numeric columns) or .npz recording; repeatable")
    b.add_argument("--out", required=True, type=Path, help="output dir: recipes/, artifacts/, detector-config.json")
    b.add_argument("--name", default="com.nucleus.TurbineModel", help="model component name")
    b.add_argument("--version", default="1.0.0", help="model component version")
    b.add_argument("--kind", choices=["isolation_forest", "pca", "autoencoder", "knn"], default="isolation_forest",
                   help="knn: distance to the nearest training window (add --online to keep learning at run time)")
    b.add_argument("--channels", help="comma-separated channel (column) names; default: every numeric column")
    b.add_argument("--label-column", help="train only on rows whose label is a --normal-value")
    b.add_argument("--normal-value", action="append", default=None, help="label value meaning normal (default 0)")
    b.add_argument("--rows", help="START:END row range of each CSV to train on (e.g. 0:50000)")
    b.add_argument("--time-column", help="CSV column with each row's time (ISO 8601, UTC if no zone, or epoch "
                   "seconds); needed for --calendar")
    b.add_argument("--calendar", help="add the window's place in the day and/or week as features: day, week or "
                   "day,week (not standardized; needs --time-column)")
    b.add_argument("--rate-hz", type=float, help="sample rate (recordings carry their own)")
    b.add_argument("--window", type=int, default=1024, help="window length in samples")
    b.add_argument("--hop", type=int, default=256, help="samples between window starts")
    b.add_argument("--features", default="vibration",
                   help="feature preset (vibration, spectral, univariate, surprise, shape) or a JSON feature-spec file")
    b.add_argument("--samples", type=int, default=None,
                   help="shape preset: the newest N values of the channel are the features (default: the window)")
    b.add_argument("--bands", type=int, default=None,
                   help="spectral bands per fast channel (vibration preset: 8, spectral preset: 16)")
    b.add_argument("--slow-channels", default="temp", help="channels given level+trend only (vibration preset)")
    b.add_argument("--quantile", type=float, default=0.999, help="threshold quantile of held-out healthy scores")
    b.add_argument("--false-alarms-per-hour", type=float, help="threshold from a false-alarm budget (needs rate)")
    b.add_argument("--margin", type=float, default=1.0, help="threshold multiplier")
    b.add_argument("--spread-margin", type=float, default=None,
                   help="threshold = median + K * (quantile - median) of held-out scores, before --margin")
    b.add_argument("--alarm", choices=["threshold", "likelihood"], default="threshold",
                   help="how the detector turns scores into alarms: the fixed threshold, or the tail probability of "
                   "the averaged score under a normal fitted online to recent scores (docs/anomaly.md)")
    b.add_argument("--tail-probability", type=float, default=alarm.TAIL_PROBABILITY,
                   help="alarm level for --alarm likelihood (nupic's red zone: 1e-5)")
    b.add_argument("--holdoff-windows", type=int, default=0,
                   help="after an alarm, no new alarm for this many windows (0 = none)")
    b.add_argument("--averaging-windows", type=int, default=alarm.AVERAGING_WINDOWS,
                   help="likelihood: scores averaged (nupic: 10)")
    b.add_argument("--history-windows", type=int, default=alarm.HISTORY_WINDOWS,
                   help="likelihood: averaged scores the online normal is fitted to (nupic: 8640)")
    b.add_argument("--season-samples", type=int, default=0,
                   help="surprise preset: samples per season (e.g. one day) for the zseason feature; 0 = none")
    b.add_argument("--online", action="store_true",
                   help="knn: the detector remembers what it scores, so a new normal alarms when it starts, not "
                   "for as long as it lasts (docs/anomaly.md)")
    b.add_argument("--online-capacity", type=int, default=ONLINE_CAPACITY,
                   help="knn --online: windows remembered per asset")
    b.add_argument("--online-merge", type=float, default=ONLINE_MERGE_FRACTION,
                   help="knn --online: a window nearer than this x the median held-out distance to a remembered one "
                   "is not stored")
    b.add_argument("--calibration-fraction", type=float, default=0.25, help="held-out tail for the threshold")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--n-estimators", type=int, default=100)
    b.add_argument("--max-samples", type=int, default=256)
    b.add_argument("--pca-variance", type=float, default=0.95)
    b.add_argument("--hidden", help="autoencoder hidden layer sizes, e.g. 16,4,16")
    b.add_argument("--max-iter", type=int, default=AUTOENCODER_MAX_ITER,
                   help="autoencoder: at most this many training epochs (it stops earlier once the held-out loss "
                   "stops improving)")
    b.add_argument("--key", type=Path, help="Ed25519 private key (PEM); created if absent "
                   "(default <out>/keys/model-signing.key); public key written to <key>.pub")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    r = sub.add_parser("record", help="record sensor batches from the bus into a .npz training recording")
    r.add_argument("--topic", required=True, help="sensor topic, e.g. sensors/turbine-1/raw")
    r.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    r.add_argument("--seconds", type=float, help="stop after this long")
    r.add_argument("--batches", type=int, help="stop after this many batches")
    r.add_argument("--socket", type=Path, help="IPC socket (default $NUCLEUS_IPC_SOCKET)")
    r.add_argument("--token-file", type=Path, help="file holding an IPC token (default $SVCUID)")
    v = sub.add_parser("verify", help="verify a model directory's signature and digests")
    v.add_argument("model_dir", type=Path)
    v.add_argument("--component", required=True)
    v.add_argument("--version", required=True)
    v.add_argument("--trusted-key", action="append", required=True, help="base64 public key or a file holding one")
    return p


def _spec(args: argparse.Namespace, channels: list[str]) -> FeatureSpec:
    slow = tuple(s for s in args.slow_channels.split(",") if s)
    if args.features == "vibration":
        return default_spec(channels, bands=8 if args.bands is None else args.bands, slow=slow)
    if args.features == "spectral":
        return spectral_spec(channels, bands=16 if args.bands is None else args.bands, slow=slow)
    if args.features == "univariate":
        if len(channels) != 1:
            raise TrainingError(f"the univariate preset needs one channel, have {channels}", field="features")
        return univariate_spec(channels[0])
    if args.features == "surprise":
        if len(channels) != 1:
            raise TrainingError(f"the surprise preset needs one channel, have {channels}", field="features")
        return surprise_spec(channels[0], season=args.season_samples)
    if args.features == "shape":
        if len(channels) != 1:
            raise TrainingError(f"the shape preset needs one channel, have {channels}", field="features")
        return shape_spec(channels[0], samples=args.samples or args.window)
    path = Path(args.features)
    try:
        return FeatureSpec.model_validate_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"feature spec unreadable: {exc}", path=path, field="features") from exc


def build(args: argparse.Namespace) -> dict[str, object]:
    channels = args.channels.split(",") if args.channels else None
    rows = None
    if args.rows:
        start, _, end = args.rows.partition(":")
        rows = (int(start or 0), int(end) if end else 1 << 62)
    loaded: list[datamod.Dataset] = []
    for path in args.data:
        if path.suffix == ".npz":
            loaded.append(datamod.load_recording(path))
        else:
            loaded.append(datamod.load_csv(path, channels, label_column=args.label_column,
                                           normal_values=tuple(args.normal_value or ["0"]), row_range=rows,
                                           time_column=args.time_column))
    dataset = datamod.merge(loaded, channels)
    rate = args.rate_hz if args.rate_hz is not None else dataset.rate_hz
    spec = _spec(args, dataset.channels)
    if args.calendar:
        try:
            spec = spec.model_copy(update={"calendar": Calendar(periods=args.calendar.split(","))})
        except ValueError as exc:
            raise TrainingError(f"--calendar {args.calendar!r}: use day, week or day,week", field="calendar") from exc
    ends = datamod.window_ends(dataset, args.window, args.hop)
    if spec.calendar is not None and ends is None:
        raise TrainingError("calendar features need each row's time: give --time-column for a CSV (recordings "
                            "made by `nucleus model record` carry their times)", field="calendar")
    extractor = FeatureExtractor(spec, dataset.channels, args.window)
    features = extractor.extract(datamod.windows(dataset, args.window, args.hop), ends)
    params = TrainParams(kind=args.kind, quantile=args.quantile, false_alarms_per_hour=args.false_alarms_per_hour,
                         margin=args.margin, spread_margin=args.spread_margin,
                         calibration_fraction=args.calibration_fraction, seed=args.seed,
                         n_estimators=args.n_estimators, max_samples=args.max_samples, pca_variance=args.pca_variance,
                         hidden=tuple(int(h) for h in args.hidden.split(",")) if args.hidden else None,
                         max_iter=args.max_iter,
                         alarm_mode=args.alarm, tail_probability=args.tail_probability,
                         holdoff_windows=args.holdoff_windows, averaging_windows=args.averaging_windows,
                         history_windows=args.history_windows, online=args.online,
                         online_capacity=args.online_capacity, online_merge_fraction=args.online_merge,
                         # windows that share a sample with the newest one never count as "seen before"
                         online_exclude_windows=-(-args.window // args.hop) - 1, unscaled=tuple(spec.unscaled()))
    model = train(features, params, rate_hz=rate, hop=args.hop)
    label_filter = f"{args.label_column} in {args.normal_value or ['0']}" if args.label_column else None
    card = make_card(model, component=args.name, version=args.version, channels=dataset.channels, spec=spec,
                     window=args.window, hop=args.hop, rate_hz=rate, sources=dataset.sources, rows=dataset.rows,
                     label_filter=label_filter)
    key_path = args.key or args.out / "keys" / "model-signing.key"
    key, created = signing.load_or_create_key(key_path)
    pkg = write_package(model, card, args.out, key)
    return {
        "component": card.component, "version": card.version, "kind": card.kind, "recipe": str(pkg.recipe),
        "artifacts": str(pkg.artifacts), "threshold": card.threshold.value, "windows": card.training.windows,
        "features": len(card.feature_names), "key": str(key_path), "key_created": created, "key_id": pkg.key_id,
        "public_key": pkg.public_key, "detector_config": str(pkg.detector_config), "metrics": card.metrics,
    }


def _print_build(result: dict[str, object]) -> None:
    m = result["metrics"]
    assert isinstance(m, dict)
    print(f"built {result['component']} {result['version']} ({result['kind']}): {result['windows']} windows x "
          f"{result['features']} features, threshold {result['threshold']:.6g}")
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
    socket = args.socket or (Path(os.environ["NUCLEUS_IPC_SOCKET"]) if "NUCLEUS_IPC_SOCKET" in os.environ else None)
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("SVCUID", "")
    if socket is None or not token:
        raise TrainingError("no IPC socket/token: give --socket and --token-file (nucleus model record "
                            "fills them in from --root)", field="record")
    rec = asyncio.run(record(socket, token, args.topic, args.out, seconds=args.seconds, batches=args.batches))
    print(f"recorded {rec.batches} batches, {rec.samples} samples x {len(rec.channels)} channels "
          f"({', '.join(rec.channels)}) at {rec.rate_hz:g} Hz, {rec.gaps} gap(s) -> {args.out}")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "record":
            return _record(args)
        if args.command == "build":
            result = build(args)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                _print_build(result)
            return 0
        keys = [Path(k).read_text().strip() if Path(k).is_file() else k for k in args.trusted_key]
        verified = signing.verify_model(args.model_dir, component=args.component, version=args.version,
                                        trusted=signing.trusted_key_map(keys))
        load_card(args.model_dir / "model_card.json", component=args.component)
        print(f"ok: {args.component} {args.version} signed by {verified.key_id}")
        return 0
    except TrainingError as exc:
        where = ": ".join(str(x) for x in (exc.path, exc.field) if x)
        print(f"error: {where + ': ' if where else ''}{exc.message}", file=sys.stderr)
        return 2
    except AnomalyError as exc:
        where = ": ".join(str(x) for x in (exc.path, exc.field, exc.key_id) if x)
        print(f"error: {where + ': ' if where else ''}{exc.message}", file=sys.stderr)
        return 1 if args.command == "verify" else 2
