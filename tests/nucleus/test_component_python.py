"""Components' own Python (nucleus.component_python): the Install step of AWS's Greengrass tutorial,
`python3 -m pip install --user awsiotsdk`, works unchanged, a plain `pip install` does not touch the
daemon's packages, and `import ipc` still works. Real daemon, real pip, offline (local wheels)."""

from __future__ import annotations

import base64
import hashlib
import json
import site
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_daemon_ipc import wait_file

MAIN = """
import json, sys
import ipc, nucleus_demo_plain, nucleus_demo_user
json.dump({"user": nucleus_demo_user.__file__, "plain": nucleus_demo_plain.__file__, "ipc": ipc.__file__,
           "python": sys.executable}, open(sys.argv[1], "w"))
"""


def wheel(directory: Path, name: str) -> Path:
    """A minimal pure-Python wheel, so pip installs without an index or a build backend."""
    files = {f"{name}.py": b"VALUE = 1\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n"}

    def digest(b: bytes) -> str:
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()

    record = "".join(f"{p},{digest(b)},{len(b)}\n" for p, b in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    path = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, b in files.items():
            z.writestr(p, b)
        z.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return path


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the daemon runs on a system interpreter here: "
                    "components get it as is, there is no environment of their own to test")
def test_the_greengrass_tutorials_pip_install_user_works_and_leaves_the_daemon_alone(
        daemon_factory: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_base = short_tmp / "userbase"
    monkeypatch.setenv("PYTHONUSERBASE", str(user_base))  # `--user` goes here, not to this machine's ~/.local
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")  # pip stays offline
    daemon = daemon_factory("pyenv")
    art = short_tmp / "artifacts" / "com.example.PipUser" / "1.0.0"
    art.mkdir(parents=True)
    wheel(art, "nucleus_demo_user")
    wheel(art, "nucleus_demo_plain")
    (art / "main.py").write_text(MAIN)
    out = short_tmp / "pyenv.json"
    recipe = short_tmp / "com.example.PipUser-1.0.0.yaml"
    recipe.write_text(yaml.safe_dump({
        "RecipeFormatVersion": "2020-01-25", "ComponentName": "com.example.PipUser", "ComponentVersion": "1.0.0",
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {
            "Install": "python3 -m pip install --user --no-index "
                       "{artifacts:path}/nucleus_demo_user-1.0-py3-none-any.whl"
                       " && python3 -m pip install --no-index "
                       "{artifacts:path}/nucleus_demo_plain-1.0-py3-none-any.whl",
            "Run": f"python3 -u {{artifacts:path}}/main.py {out}"},
            "Artifacts": [{"URI": f"s3://bucket/{f.name}"} for f in sorted(art.iterdir())]}]}))
    component_python = Path(sys.prefix) / "component-python"
    try:
        daemon.cli("deploy", str(recipe), "--artifacts", str(short_tmp / "artifacts"))
        found = json.loads(wait_file(out, timeout=60))
        assert found["user"].startswith(str(user_base))  # `--user` as on Greengrass
        assert found["plain"].startswith(str(component_python))  # the components' environment ...
        for daemon_site in site.getsitepackages():  # ... never the daemon's packages
            assert not found["plain"].startswith(daemon_site + "/")
        assert found["python"].startswith(str(component_python)) and Path(found["ipc"]).name == "__init__.py"
        probe = subprocess.run([sys.executable, "-c", "import nucleus_demo_plain"], capture_output=True, timeout=60)
        assert probe.returncode != 0  # the daemon's interpreter does not see what a component installed
    finally:
        subprocess.run([str(component_python / "bin" / "python3"), "-m", "pip", "uninstall", "-y", "-q",
                        "nucleus_demo_plain"], capture_output=True, timeout=120, check=False)
