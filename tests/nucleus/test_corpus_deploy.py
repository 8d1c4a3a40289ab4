"""Deploy the corpus recipes that run locally (MANIFEST `runnable_locally = yes`) on a real daemon.

Recipes that fail on purpose in the Greengrass nucleus's own tests must fail here too — with
a rollback and without touching what already runs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import pytest

from nucleus.recipe import load_recipe

pytestmark = pytest.mark.slow

# From the corpus README: these fail or are meant to break, as in the Java nucleus's tests.
FAIL_ON_PURPOSE = {
    "BreakingApp", "BreakingService", "BreakingService2", "ComponentWithBrokenInstall", "BrokenRun",
    "DependencyOnBreak", "DependencyOnDependency", "SoftDependencyOnBreak",
}
# Too slow for the suite (sleeps 100 s / 15 s); still parsed and resolved below.
SLOW = {"ServiceName", "ComponentTakesLongToStartup"}


@pytest.fixture(scope="module")
def runnable(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    corpus = shared_dir / "corpus" / "greengrass-recipes"
    rows = list(csv.DictReader((corpus / "MANIFEST.tsv").open(), delimiter="\t"))
    target = tmp_path_factory.mktemp("runnable")
    recipes = {}
    for row in rows:
        if row["runnable_locally"] != "yes" or "benchmark" in row["path"]:
            continue
        shutil.copy(corpus / row["file"], target / row["file"])
        recipe = load_recipe(target / row["file"])
        recipes[recipe.name] = recipe
    assert len(recipes) >= 25
    return target, recipes


def test_runnable_corpus_recipes_deploy(daemon: Any, runnable: tuple[Path, dict[str, Any]]) -> None:
    directory, recipes = runnable
    good = sorted(n for n in recipes if n not in FAIL_ON_PURPOSE | SLOW)
    merges = [a for n in good for a in ("--merge", f"{n}={recipes[n].version}")]
    out = daemon.cli("deploy", "--recipe-dir", str(directory), *merges, timeout=240)
    assert "SUCCEEDED" in out.stdout, out.stdout + out.stderr
    comps = daemon.components()
    for name in good:
        assert comps[name]["state"] in ("RUNNING", "FINISHED"), (name, comps[name])
    # Cross-component variables were interpolated before the script ran.
    log = daemon.cli("logs", "aws.iot.gg.test.integ.ComponentConfigTestMain", "-n", "20").stdout
    assert "{aws.iot.gg.test.integ.ComponentConfigTestService:configuration" not in log
    assert "Value for /singleLevelKey" in log

    before = {n: (c["version"], c["pids"]) for n, c in comps.items()}
    for name in ("BrokenRun", "BreakingService", "ComponentWithBrokenInstall", "DependencyOnBreak"):
        out = daemon.cli("deploy", "--recipe-dir", str(directory), "--merge",
                         f"{name}={recipes[name].version}", check=False, timeout=240)
        assert out.returncode == 1, (name, out.stdout)
        assert "FAILED_ROLLBACK_COMPLETE" in out.stderr, (name, out.stderr)
        after = daemon.components()
        assert name not in after
        for other, (version, pids) in before.items():
            assert after[other]["version"] == version
            if after[other]["state"] == "RUNNING":
                assert after[other]["pids"] == pids, other
