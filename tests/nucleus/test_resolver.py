"""Dependency resolution over the whole target set: versions, backtracking, conflicts, cycles."""

from __future__ import annotations

from pathlib import Path

import pytest

from nucleus.errors import DependencyCycleError, ResolutionError, UnknownComponentError, VersionError
from nucleus.recipe import Dependency, Recipe, load_recipe, parse_recipe
from nucleus.resolver import MemoryCatalog, Resolution, dependency_order, resolve
from nucleus.versions import Version

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "greengrass-recipes"

Deps = dict[str, str | tuple[str, str]]


def mk(name: str, version: str, deps: Deps | None = None) -> Recipe:
    dependencies = {}
    for dep, spec in (deps or {}).items():
        req, kind = (spec, "HARD") if isinstance(spec, str) else spec
        dependencies[dep] = {"VersionRequirement": req, "DependencyType": kind}
    return parse_recipe({"RecipeFormatVersion": "2020-01-25", "ComponentName": name,
                         "ComponentVersion": version, "ComponentDependencies": dependencies})


def chosen(res: Resolution) -> dict[str, str]:
    return {n: str(r.version) for n, r in res.components.items()}


def test_highest_satisfying_version() -> None:
    cat = MemoryCatalog([mk("A", v) for v in ("1.0.0", "1.2.0", "1.10.0", "2.0.0", "1.11.0-rc.1")])
    assert chosen(resolve({"g": {"A": "^1.0.0"}}, cat)) == {"A": "1.10.0"}
    assert chosen(resolve({"g": {"A": ""}}, cat)) == {"A": "2.0.0"}
    assert chosen(resolve({"g": {"A": "~1.2"}}, cat)) == {"A": "1.2.0"}
    assert chosen(resolve({"g": {"A": ">=1.11.0-rc.0 <1.12.0"}}, cat)) == {"A": "1.11.0-rc.1"}


def test_dependencies_follow_and_come_first() -> None:
    cat = MemoryCatalog([
        mk("app", "1.0.0", {"lib": "^1.0.0", "log": ("*", "SOFT")}),
        mk("lib", "1.0.0", {"base": ">=0.1.0"}),
        mk("lib", "1.3.0", {"base": ">=0.2.0"}),
        mk("base", "0.1.0"),
        mk("base", "0.2.5"),
        mk("log", "3.0.0"),
    ])
    res = resolve({"g": {"app": "1.0.0"}}, cat)
    assert chosen(res) == {"base": "0.2.5", "lib": "1.3.0", "log": "3.0.0", "app": "1.0.0"}
    assert res.order == ["base", "lib", "log", "app"] == list(res.components)
    assert res.dependents("lib") == {"app"}
    assert res.dependents("log") == set()
    assert res.dependents("log", hard_only=False) == {"app"}
    assert res.dependents("app") == set()
    assert res.version("lib") == Version.parse("1.3.0")


def test_backtracks_when_the_newest_choice_conflicts_later() -> None:
    cat = MemoryCatalog([
        mk("A", "1.0.0", {"C": "^1.0.0"}),
        mk("A", "2.0.0", {"C": "^2.0.0"}),
        mk("C", "1.4.0"),
        mk("C", "2.1.0"),
    ])
    res = resolve({"g1": {"A": ">=1.0.0"}, "g2": {"C": "1.x"}}, cat)
    assert chosen(res) == {"C": "1.4.0", "A": "1.0.0"}


def test_backtracks_through_two_levels() -> None:
    # The newest B pulls a D that needs an E nobody else allows; the older B does not.
    cat = MemoryCatalog([
        mk("A", "1.0.0", {"B": "*", "E": "<2.0.0"}),
        mk("B", "1.0.0", {"D": "1.0.0"}),
        mk("B", "2.0.0", {"D": "2.0.0"}),
        mk("D", "1.0.0", {"E": "^1.0.0"}),
        mk("D", "2.0.0", {"E": "^2.0.0"}),
        mk("E", "1.5.0"),
        mk("E", "2.5.0"),
    ])
    assert chosen(resolve({"g": {"A": "*"}}, cat)) == {"E": "1.5.0", "D": "1.0.0", "B": "1.0.0", "A": "1.0.0"}


def test_conflict_names_the_whole_chain() -> None:
    cat = MemoryCatalog([
        mk("A", "1.0.0", {"C": "^1.0.0"}),
        mk("B", "2.0.0", {"C": "^2.0.0"}),
        mk("C", "1.4.0"),
        mk("C", "2.1.0"),
    ])
    with pytest.raises(ResolutionError) as info:
        resolve({"g1": {"A": "*", "B": "*"}}, cat)
    err = info.value
    assert type(err) is ResolutionError
    assert err.message == "A 1.0.0 needs C ^1.0.0, B 2.0.0 needs C ^2.0.0; have C 1.4.0, 2.1.0"
    assert err.component == "C" and err.code == "DEPENDENCY_CONFLICT"


def test_conflict_with_a_group_requirement() -> None:
    cat = MemoryCatalog([mk("C", "1.4.0"), mk("C", "2.1.0")])
    with pytest.raises(ResolutionError) as info:
        resolve({"g1": {"C": ">=3.0.0"}}, cat)
    assert info.value.message == 'group "g1" needs C >=3.0.0; have C 1.4.0, 2.1.0'


def test_conflict_between_groups_and_a_deep_chain() -> None:
    cat = MemoryCatalog([
        mk("X", "1.0.0", {"A": "^1.0.0"}),
        mk("A", "1.0.0", {"C": "^1.0.0"}),
        mk("C", "1.4.0"),
        mk("C", "2.1.0"),
    ])
    with pytest.raises(ResolutionError) as info:
        resolve({"g1": {"X": "*"}, "g2": {"C": "^2.0.0"}}, cat)
    msg = info.value.message
    assert msg.startswith('group "g2" needs C ^2.0.0, A 1.0.0 needs C ^1.0.0; have C 1.4.0, 2.1.0')
    assert msg.endswith('(A 1.0.0 via group "g1" -> X 1.0.0)')


def test_conflict_with_an_already_chosen_component() -> None:
    # C is chosen for the root first; B's requirement arrives later and cannot be met.
    cat = MemoryCatalog([mk("B", "1.0.0", {"C": "<1.0.0"}), mk("C", "1.0.0"), mk("C", "0.5.0")])
    with pytest.raises(ResolutionError) as info:
        resolve({"g": {"C": ">=1.0.0", "B": "*"}}, cat)
    assert info.value.message == 'group "g" needs C >=1.0.0, B 1.0.0 needs C <1.0.0; have C 0.5.0, 1.0.0'


def test_multiple_groups_combine_requirements() -> None:
    cat = MemoryCatalog([mk("C", v) for v in ("1.0.0", "1.2.0", "1.3.7", "1.4.0", "2.0.0")]
                        + [mk("A", "1.0.0", {"D": "*"}), mk("B", "1.0.0", {"D": "^1.0.0"}),
                           mk("D", "1.1.0"), mk("D", "2.0.0")])
    res = resolve({"g1": {"C": "^1.0.0", "A": "*"}, "g2": {"C": ">=1.2 <1.4", "B": "*"}}, cat)
    assert chosen(res) == {"C": "1.3.7", "D": "1.1.0", "A": "1.0.0", "B": "1.0.0"}
    assert res.order == ["C", "D", "A", "B"]
    assert res.dependents("D") == {"A", "B"}


def test_unknown_component_names_who_asked() -> None:
    cat = MemoryCatalog([mk("A", "1.0.0", {"Missing": "^1.0.0"})])
    with pytest.raises(UnknownComponentError) as info:
        resolve({"g1": {"A": "*"}}, cat)
    assert info.value.component == "Missing"
    assert "Missing" in str(info.value) and "A 1.0.0" in str(info.value)
    with pytest.raises(UnknownComponentError) as info:
        resolve({"g1": {"Nope": "1.0.0"}}, cat)
    assert 'group "g1"' in str(info.value) and info.value.code == "COMPONENT_NOT_FOUND"


def test_unknown_dependency_of_newest_version_is_avoided_by_backtracking() -> None:
    cat = MemoryCatalog([mk("A", "2.0.0", {"Gone": "*"}), mk("A", "1.0.0")])
    assert chosen(resolve({"g": {"A": "*"}}, cat)) == {"A": "1.0.0"}


def test_cycle_names_its_members() -> None:
    cat = MemoryCatalog([mk("A", "1.0.0", {"B": "*"}), mk("B", "1.0.0", {"A": "*"}), mk("Z", "1.0.0")])
    with pytest.raises(DependencyCycleError) as info:
        resolve({"g": {"A": "*", "Z": "*"}}, cat)
    assert info.value.message == "cycle: A -> B -> A"
    assert isinstance(info.value, ResolutionError)


def test_self_dependency_is_a_cycle() -> None:
    cat = MemoryCatalog([mk("Self", "1.0.0", {"Self": "1.0.0"})])
    with pytest.raises(DependencyCycleError, match=r"cycle: Self -> Self"):
        resolve({"g": {"Self": "*"}}, cat)


def test_corpus_self_dependency_is_a_cycle() -> None:
    paths = list(CORPUS.glob("*ComponentWithCircularDependency-1.0.0.yaml"))
    if not paths:
        pytest.skip(f"recipe corpus not found at {CORPUS.resolve()}")
    cat = MemoryCatalog([load_recipe(paths[0])])
    with pytest.raises(DependencyCycleError,
                       match=r"cycle: ComponentWithCircularDependency -> ComponentWithCircularDependency"):
        resolve({"local": {"ComponentWithCircularDependency": "1.0.0"}}, cat)


def test_dependency_order_is_stable_and_ignores_outside_names() -> None:
    recipes = {r.name: r for r in [mk("b", "1.0.0", {"a": "*", "external": "*"}), mk("a", "1.0.0"),
                                   mk("c", "1.0.0"), mk("d", "1.0.0", {"c": "*", "b": "*"})]}
    assert dependency_order(recipes) == ["a", "b", "c", "d"]
    assert dependency_order({}) == []
    long_cycle = {r.name: r for r in [mk("p", "1.0.0", {"q": "*"}), mk("q", "1.0.0", {"r": "*"}),
                                      mk("r", "1.0.0", {"p": "*"}), mk("s", "1.0.0", {"p": "*"})]}
    with pytest.raises(DependencyCycleError, match=r"^cycle: p -> q -> r -> p$"):
        dependency_order(long_cycle)


def test_bad_root_requirement_is_a_version_error() -> None:
    with pytest.raises(VersionError, match='group "g" asks for A'):
        resolve({"g": {"A": ">=banana"}}, MemoryCatalog([mk("A", "1.0.0")]))


def test_memory_catalog() -> None:
    cat = MemoryCatalog()
    assert cat.versions("A") == [] and len(cat) == 0
    cat.add(mk("A", "2.0.0"))
    cat.add(mk("A", "1.0.0"))
    cat.add(mk("A", "1.0.0"))  # same version replaces
    assert cat.versions("A") == [Version.parse("1.0.0"), Version.parse("2.0.0")] and len(cat) == 2
    with pytest.raises(UnknownComponentError):
        cat.recipe("A", Version.parse("3.0.0"))


def test_empty_roots_resolve_to_nothing() -> None:
    res = resolve({}, MemoryCatalog())
    assert res.components == {} and res.order == []


# --- the 30 benchmark recipes of the Greengrass nucleus ----------------------------------------


def _benchmark() -> MemoryCatalog:
    paths = sorted(CORPUS.glob("*greengrass-nucleus-benchmark*"))
    if not paths:
        pytest.skip(f"recipe corpus not found at {CORPUS.resolve()}")
    assert len(paths) == 30
    return MemoryCatalog(load_recipe(p) for p in paths)


def _check_consistent(res: Resolution, roots: dict[str, dict[str, str]], cat: MemoryCatalog) -> None:
    """Every requirement holds, dependencies come first, and no component could be newer."""
    position = {n: i for i, n in enumerate(res.order)}
    requirements: dict[str, list[Dependency]] = {}
    for group in roots.values():
        for name, text in group.items():
            requirements.setdefault(name, []).append(mk("root", "0.0.0", {name: text}).dependencies[name])
    for name, recipe in res.components.items():
        for dep, spec in recipe.dependencies.items():
            assert dep in res.components, f"{name} needs {dep}"
            assert spec.requirement.allows(res.version(dep)), f"{name} needs {dep} {spec.requirement}"
            assert position[dep] < position[name]
            requirements.setdefault(dep, []).append(spec)
    for name in res.components:
        reqs = requirements.get(name, [])
        newer = [v for v in cat.versions(name) if v > res.version(name)
                 and all(r.requirement.allows(v) for r in reqs)]
        # A newer version that satisfies everyone could only be skipped if its own
        # dependencies conflict; in this set they never do.
        assert not newer, f"{name}: {newer} also satisfy {reqs}"


def test_benchmark_recipes_resolve_from_awscli() -> None:
    cat = _benchmark()
    roots = {"benchmark": {"awscli": "1.16.144"}}
    res = resolve(roots, cat)
    got = chosen(res)
    assert got["awscli"] == "1.16.144"
    assert got["botocore"] == "1.12.134"  # ==1.12.134
    assert got["s3transfer"] == "0.2.1"  # >=0.2.0 <0.3.0
    assert got["colorama"] == "0.3.9"  # >=0.2.5 <=0.3.9
    assert len(got) == 12
    _check_consistent(res, roots, cat)


def test_benchmark_recipes_resolve_all_at_once() -> None:
    cat = _benchmark()
    names = sorted(["awscli", "boto3", "botocore", "colorama", "docutils", "jmespath", "pyasn1",
                    "python-dateutil", "rsa", "s3transfer", "six", "urllib3", "PyYAML"])
    assert all(cat.versions(n) for n in names)
    roots = {"g1": dict.fromkeys(names[:6], "*"), "g2": dict.fromkeys(names[6:], "")}
    res = resolve(roots, cat)
    assert set(res.components) == set(names)
    _check_consistent(res, roots, cat)
