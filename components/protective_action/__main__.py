"""``python3 -m components.protective_action`` — run by the nucleus (recipe com.nucleus.ProtectiveAction).

``--audit-dir`` is where a relative ``auditPath`` lives (the recipe passes ``{work:path}``);
``--config FILE`` (JSON or YAML) replaces the nucleus configuration, for development against a
bare bus (``python -m ipc.devserver``).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import yaml

from components.configuration import component_name
from components.protective_action.config import load_config
from components.protective_action.service import COMPONENT, run
from ipc import run_component


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m components.protective_action")
    parser.add_argument("--audit-dir", type=Path, help="directory of a relative auditPath (default: cwd)")
    parser.add_argument("--config", type=Path, help="configuration file instead of the nucleus configuration")
    args = parser.parse_args(argv)
    cfg = None
    if args.config is not None:
        text = args.config.read_text()
        raw = json.loads(text) if args.config.suffix == ".json" else yaml.safe_load(text)
        cfg = load_config(raw, component_name(COMPONENT))
    run_component(functools.partial(run, cfg=cfg, audit_dir=args.audit_dir))


if __name__ == "__main__":
    main()
