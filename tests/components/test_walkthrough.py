"""examples/wind_turbine/README.md's "The same, by hand" runs as written: its shell blocks and its
Python snippet, in order, with only /tmp/wt moved into a test directory. A walkthrough that nobody
runs drifts: `nucleus run --root X` was refused for a long time while the README said to type it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "examples" / "wind_turbine" / "README.md"


def walkthrough(root: Path, work: Path) -> str:
    """The section's blocks as one bash script; the Python snippet is written beside it."""
    text = README.read_text()
    section = text[text.index("## The same, by hand"):text.index("## Files")]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash", "bash"], "the walkthrough's shape changed"
    lines = ["set -euo pipefail"]
    for lang, block in blocks:
        code = block.replace("/tmp/wt", str(root))
        if lang == "python":
            (work / "snippet.py").write_text(code)
            lines.append(f"timeout 120 python {work / 'snippet.py'}")
            continue
        for line in code.splitlines():
            if line.startswith(". .venv/bin/activate"):  # the test's interpreter is the venv's
                continue
            lines.append(line)
            if line.startswith("NUCLEUS_PID=$!"):  # a failing step must not leave the daemon running
                lines.append('trap \'kill "$NUCLEUS_PID" 2>/dev/null || true\' EXIT')
    return "\n".join(lines) + "\n"


def test_the_wind_turbine_walkthrough_runs_as_written(short_tmp: Path) -> None:
    work = short_tmp / "w"
    work.mkdir()
    for d in ("examples", "recipes"):  # the walkthrough's relative paths, without writing build/ into the repo
        (work / d).symlink_to(REPO / d)
    script = work / "walk.sh"
    script.write_text(walkthrough(short_tmp / "wt", work))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(["bash", str(script)], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        with contextlib.suppress(ProcessLookupError):  # last resort; the script's trap stopped the daemon
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert out.count(": SUCCEEDED") == 2, out[-4000:]  # the stack, then model 2.0.0 alone
    assert "latched ['engage_brake', 'pitch_to_feather']" in out
    assert "'ok': True, 'state': 'normal'" in out  # the reset went through once the windows were clean
    last_listing = out[out.rindex("NAME "):]  # after model 2.0.0 alone: the detector is still the one it was
    assert re.search(r"com\.nucleus\.TurbineModel +2\.0\.0 +FINISHED", last_listing)
    assert re.search(r"com\.nucleus\.AnomalyDetector +1\.0\.0 +RUNNING", last_listing)
    assert not (short_tmp / "wt").exists() and not (work / "build").exists()  # its clean-up step ran
