"""``python3 -m components.sensor_ingest`` — run by the nucleus (recipe com.nucleus.SensorIngest).

``--config FILE`` (JSON or YAML) replaces the nucleus configuration, for development against a
bare bus (``python -m ipc.devserver``), which has no configuration service.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import yaml

from components.configuration import ConfigError, component_name
from components.sensor_ingest.config import load_config
from components.sensor_ingest.service import COMPONENT, run
from ipc import run_component


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m components.sensor_ingest")
    parser.add_argument("--config", type=Path, help="configuration file instead of the nucleus configuration")
    args = parser.parse_args(argv)
    cfg = None
    if args.config is not None:
        # One line naming the file, not a traceback: a YAML error said only "<unicode string>", line 2.
        try:
            text = args.config.read_text()
            raw = json.loads(text) if args.config.suffix == ".json" else yaml.safe_load(text)
            cfg = load_config(raw, component_name(COMPONENT))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, ConfigError) as exc:
            parser.error(f"--config {args.config}: {exc}")
    run_component(functools.partial(run, cfg=cfg))


if __name__ == "__main__":
    main()
