"""The Python interpreter components find first on ``PATH``: an environment of their own.

Why. Greengrass components run on the device's Python and install what they need in their recipe,
most often as AWS's own tutorial writes it: ``python3 -m pip install --user awsiotsdk``. The nucleus
itself runs in a virtual environment. Handing components that environment's ``python3`` (so that
``import ipc`` works) broke that Install step — pip refuses ``--user`` in a virtual environment that
hides the user site — and a plain ``pip install`` would have written into the daemon's own
packages, where a component's version of numpy could break the daemon.

So components get a second virtual environment, made once per daemon installation next to it
(``<daemon venv>/component-python``): it sees the system and user site-packages, so ``--user``
works as on Greengrass, and its own site-packages takes plain installs; a ``.pth`` file adds the
daemon's site-packages after those, so ``import ipc`` (and numpy, onnxruntime for the built-in
components) still work. A daemon that does not run in a virtual environment hands its own
interpreter to components, as before. Made with the standard library's ``venv`` and ``ensurepip``
(offline, ≈ 3 s, once); a file lock serializes daemons that start together.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import structlog

log = structlog.get_logger("nucleus.component_python")

DIR_NAME = "component-python"
MARKER = "nucleus-component-python.json"
PTH = "nucleus-daemon-site.pth"


def _identity() -> dict[str, object]:
    """What the environment was made for: another base interpreter or daemon site means remake it."""
    return {"base": sys.base_prefix, "version": list(sys.version_info[:3]), "daemon_sites": site.getsitepackages()}


def ensure(prefix: Path | None = None, *, fallback: Path | None = None) -> Path | None:
    """The ``bin`` directory of the components' Python (made if missing or stale), or None when the
    daemon runs on a system interpreter or the environment cannot be made (logged; components then get
    the daemon's interpreter, as before).

    ``fallback`` (the daemon passes its root) is where the environment is made when the daemon's
    virtual environment is not writable: a daemon run as a service user from a virtual environment
    root installed. An environment that is already current is used without writing anything (not
    even the lock), so one made by root serves such a daemon too.
    """
    if sys.prefix == sys.base_prefix:
        return None
    homes = [(prefix or Path(sys.prefix)) / DIR_NAME, *([fallback / DIR_NAME] if fallback is not None else [])]
    for home in homes:
        if _current(home):
            return home / "bin"
    problems: list[str] = []
    for home in homes:
        try:
            home.parent.mkdir(parents=True, exist_ok=True)
            with open(home.parent / f".{DIR_NAME}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not _current(home):
                    _make(home)
                return home / "bin"
        except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:  # read-only, no ensurepip
            problems.append(f"{home}: {str(exc)[:300]}")
    log.warning("nucleus.component_python_unavailable", path=str(homes[-1]), error="; ".join(problems))
    return None


def _current(home: Path) -> bool:
    try:
        return bool(json.loads((home / MARKER).read_text()) == _identity() and (home / "bin" / "python3").exists())
    except (OSError, ValueError):
        return False


def _make(home: Path) -> None:
    log.info("nucleus.component_python_creating", path=str(home))
    shutil.rmtree(home, ignore_errors=True)
    venv.EnvBuilder(system_site_packages=True, with_pip=True, symlinks=True, clear=True).create(home)
    purelib = Path(sysconfig.get_path("purelib", "venv", vars={"base": str(home), "platbase": str(home)}))
    # addsitedir (not a plain path line) so the daemon's own .pth files run too: an editable install of
    # nucleus is found through one.
    lines = [f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()]
    (purelib / PTH).write_text("".join(lines))
    (home / MARKER).write_text(json.dumps(_identity()))  # last: a half-made environment is made again
    log.info("nucleus.component_python_created", path=str(home))
