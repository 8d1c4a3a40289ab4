"""The loader against 213 real public Greengrass recipes (../shared/corpus/greengrass-recipes).

MANIFEST.tsv tags each file. The contract:

* a file tagged ``invalid`` (does not parse as YAML/JSON) raises RecipeError naming the
  file, a field and the reason;
* a file tagged ``templated`` (placeholders such as ``{COMPONENT_NAME}`` a build tool fills
  in) either loads or raises RecipeError - never anything else;
* every other file loads, except the two listed in ``LIMIT_VIOLATIONS``: they are well-formed
  but break a Greengrass limit the issue names explicitly, and Greengrass rejects them too
  (they are the component-common parser's own negative tests).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from nucleus.errors import RecipeError
from nucleus.interpolation import find_variables
from nucleus.recipe import Recipe, load_recipe, parse_recipe

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "greengrass-recipes"
LINUX = {"os": "linux", "architecture": "amd64", "architecture.detail": "x86_64", "runtime": "nucleus"}

_PREFIX = "aws-greengrass__aws-greengrass-component-common__src__test__resources__recipes__"
LIMIT_VIOLATIONS = {
    # ComponentName "aws.greengrass.foo bar service": spaces are outside [A-Za-z0-9-_.].
    f"{_PREFIX}sample-recipe-with-illegal-component-name.yaml": "ComponentName",
    # ComponentVersion of 84 characters (limit 64), with an em dash that semver does not allow.
    f"{_PREFIX}sample-recipe-with-long-component-version.yaml": "ComponentVersion",
}


@dataclass(frozen=True)
class Row:
    file: str
    tags: frozenset[str]
    runnable: bool


def _rows() -> list[Row]:
    manifest = CORPUS / "MANIFEST.tsv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="", encoding="utf-8") as fh:
        return [
            Row(r["file"], frozenset(t for t in r["features"].split(",") if t),
                r["runnable_locally"] == "yes")
            for r in csv.DictReader(fh, delimiter="\t")
        ]


ROWS = _rows()


def _need_corpus() -> None:
    if not ROWS:
        pytest.skip(f"recipe corpus not found at {CORPUS.resolve()} (../shared is not checked out)")


def _params() -> list[Row | None]:
    return list(ROWS) if ROWS else [None]


def _id(row: Row | None) -> str:
    return "corpus-missing" if row is None else row.file


def test_manifest_counts() -> None:
    _need_corpus()
    assert len(ROWS) == 213
    assert sum("invalid" in r.tags for r in ROWS) == 11
    assert all((CORPUS / r.file).is_file() for r in ROWS)


@pytest.mark.parametrize("row", _params(), ids=_id)
def test_corpus_file(row: Row | None) -> None:
    _need_corpus()
    assert row is not None
    path = CORPUS / row.file
    if "invalid" in row.tags:
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        err = info.value
        assert err.path == str(path)
        assert err.field
        assert err.message
        assert str(err).startswith(f"{path}: {err.field}: ")
        return
    if row.file in LIMIT_VIOLATIONS:
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        assert info.value.field == LIMIT_VIOLATIONS[row.file]
        assert info.value.path == str(path)
        return
    if "templated" in row.tags:
        try:
            recipe = load_recipe(path)
        except RecipeError as exc:
            assert exc.path == str(path) and exc.field
            return
    else:
        recipe = load_recipe(path)
    _check_loaded(row, recipe)


def _check_loaded(row: Row, recipe: Recipe) -> None:
    assert recipe.source == str(CORPUS / row.file)
    if "yamldate" in row.tags:
        assert recipe.format_version == "2020-01-25"
    if "deps" in row.tags:
        assert recipe.dependencies
    resolved = recipe.select(LINUX)
    if row.runnable:
        assert resolved is not None, "a runnable recipe must have a Linux manifest"
    if "vars" in row.tags or "crossvars" in row.tags:
        # Variables survive parsing verbatim, for the interpolation step to fill in.
        assert find_variables(json.dumps(recipe.to_document()))
    # The store writes recipes back in documented spelling: it must load to the same recipe.
    assert parse_recipe(recipe.to_document(), source=recipe.source) == recipe


def test_limit_violations_are_exactly_the_listed_files() -> None:
    """Guard against the list going stale: those two files exist and are not tagged invalid."""
    _need_corpus()
    listed = {r.file: r for r in ROWS if r.file in LIMIT_VIOLATIONS}
    assert set(listed) == set(LIMIT_VIOLATIONS)
    assert not any("invalid" in r.tags or "templated" in r.tags for r in listed.values())


def test_self_dependency_loads_and_is_kept() -> None:
    """ComponentWithCircularDependency depends on itself; it is not tagged invalid, so it loads
    and the resolver reports the cycle (see test_resolver)."""
    _need_corpus()
    [path] = list(CORPUS.glob("*ComponentWithCircularDependency-1.0.0.yaml"))
    recipe = load_recipe(path)
    assert recipe.name in recipe.dependencies
