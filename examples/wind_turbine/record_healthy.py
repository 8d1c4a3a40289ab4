"""Record healthy training data from the simulated turbine, as a `nucleus model build` recording (.npz).

The simulator is the same pure model the SensorIngest component runs (components/sensor_ingest/
simulator.py), built from the same configuration keys, so the model learns the machine it will watch.
Two choices keep the model honest:

* a different noise seed from the deployed ingest (seed 0 there, 1 here): the model never sees the
  exact samples it will score;
* segments spread over a whole temperature-drift period (600 s) instead of one contiguous minute,
  so a model trained here does not call the normal slow drift of the nacelle temperature an anomaly.
  Each segment is a contiguous run; the builder never cuts a window across two segments.

    python examples/wind_turbine/record_healthy.py --out build/healthy.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from components.model_builder.data import save_recording
from components.sensor_ingest.config import SimulatorConfig
from components.sensor_ingest.simulator import TurbineSimulator


def record(out: Path, *, seconds: float, segments: int, span_s: float, rate_hz: float, seed: int,
           simulator: dict[str, object] | None = None) -> dict[str, object]:
    cfg = SimulatorConfig.model_validate({**(simulator or {}), "seed": seed})
    sim = TurbineSimulator(cfg.params(rate_hz), cfg.channels, seed=cfg.seed)
    per_segment = int(seconds * rate_hz / segments)
    stride = max(per_segment, int(span_s * rate_hz / segments))  # where each segment starts in machine time
    parts, starts = [], []
    for i in range(segments):
        sim.skip(i * stride - sim.sample_index)
        starts.append(i * per_segment)
        parts.append(sim.generate(per_segment))
    data = np.concatenate(parts, axis=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_recording(out, list(cfg.channels), data, rate_hz, starts)
    return {"path": str(out), "channels": list(cfg.channels), "samples": int(data.shape[1]), "rate_hz": rate_hz,
            "segments": segments, "seconds": data.shape[1] / rate_hz, "span_s": stride * segments / rate_hz}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", type=Path, required=True, help="recording to write (.npz)")
    p.add_argument("--seconds", type=float, default=240.0, help="healthy seconds to record in total")
    p.add_argument("--segments", type=int, default=8, help="contiguous segments the seconds are split into")
    p.add_argument("--span-s", type=float, default=600.0, help="machine time the segments are spread over")
    p.add_argument("--rate-hz", type=float, default=1000.0)
    p.add_argument("--seed", type=int, default=1, help="noise seed (the deployed ingest uses 0)")
    p.add_argument("--simulator", default="{}", help="JSON of SensorIngest simulator.* keys (as deployed)")
    args = p.parse_args(argv)
    result = record(args.out, seconds=args.seconds, segments=args.segments, span_s=args.span_s,
                    rate_hz=args.rate_hz, seed=args.seed, simulator=json.loads(args.simulator))
    print(f"recorded {result['seconds']:.0f} s of healthy data ({result['segments']} segments over "
          f"{result['span_s']:.0f} s of machine time, {', '.join(result['channels'])}) -> {result['path']}")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
