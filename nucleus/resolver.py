"""Which version of every component to run: pure, offline, over the whole target set.

A device runs one version of each component, whatever deployment group asked for it, so the
resolver takes the roots of every group at once and every requirement on a component must
hold together. It picks the highest version in the local catalog that satisfies all of them,
backtracking when a choice made early (the newest ``A``) leaves a later component with no
possible version (``A 2.0.0`` needs ``C ^2`` but group ``g2`` pins ``C 1.x``). The sets are a
few dozen components, so a plain depth-first search with a step budget is enough.

Both HARD and SOFT dependencies are resolved, as Greengrass does: the type only changes how a
dependency's state changes affect the dependent at run time.

A preferred version (``prefer``: what the deployment brings, else what is deployed now) is tried
first when it satisfies every requirement, as the Java nucleus's ``findLocalBestCandidate`` keeps
the active version. Without that, a deployment of anything would move a dependency nobody named to
the newest recipe in the store, including one a failed deployment left there, and fail again on it.

A failure names the whole chain so that an operator can see which group or component to
change: ``A 1.0.0 needs C ^1.0.0, B 2.0.0 needs C ^2.0.0; have C 1.4.0, 2.1.0``. A component
that depends on itself (seen in the Greengrass test corpus) is a one-member cycle.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nucleus.errors import (
    DependencyCycleError,
    ResolutionError,
    UnknownComponentError,
    VersionError,
)
from nucleus.recipe import Recipe
from nucleus.versions import Requirement, Version

__all__ = ["Catalog", "MemoryCatalog", "Resolution", "dependency_order", "resolve"]

MAX_STEPS = 20_000


class Catalog(Protocol):
    def versions(self, name: str) -> Sequence[Version]: ...  # empty if unknown

    def recipe(self, name: str, version: Version) -> Recipe: ...


class MemoryCatalog:
    """A catalog over recipes held in memory (tests, and the store's index)."""

    def __init__(self, recipes: Iterable[Recipe] = ()) -> None:
        self._recipes: dict[str, dict[Version, Recipe]] = {}
        for r in recipes:
            self.add(r)

    def add(self, recipe: Recipe) -> None:
        self._recipes.setdefault(recipe.name, {})[recipe.version] = recipe

    def versions(self, name: str) -> Sequence[Version]:
        return sorted(self._recipes.get(name, {}))

    def recipe(self, name: str, version: Version) -> Recipe:
        try:
            return self._recipes[name][version]
        except KeyError:
            raise UnknownComponentError(f"no recipe for {name} {version} in the catalog",
                                        component=name) from None

    def __len__(self) -> int:
        return sum(len(v) for v in self._recipes.values())


@dataclass(frozen=True)
class Resolution:
    components: dict[str, Recipe]  # dependency order: dependencies first
    order: list[str]

    def dependents(self, name: str, hard_only: bool = True) -> set[str]:
        """Components of this resolution that depend directly on ``name``."""
        return {
            other
            for other, recipe in self.components.items()
            if name in recipe.dependencies and (not hard_only or recipe.dependencies[name].type == "HARD")
        }

    def version(self, name: str) -> Version:
        return self.components[name].version


@dataclass(frozen=True, slots=True)
class _Need:
    who: str  # 'group "g1"' or "A 1.0.0"
    requirement: Requirement
    via: tuple[str, ...] = ()  # how ``who`` itself got into the set, outermost first

    def describe(self, name: str) -> str:
        return f"{self.who} needs {name} {self.requirement}"


def _root_label(group: str) -> str:
    return f'group "{group}"'


@dataclass(slots=True)
class _Search:
    catalog: Catalog
    prefer: Mapping[str, Version] = field(default_factory=dict)
    steps: int = 0
    failure: ResolutionError | None = None
    _versions: dict[str, list[Version]] = field(default_factory=dict)

    def versions(self, name: str) -> list[Version]:
        if name not in self._versions:
            self._versions[name] = sorted(self.catalog.versions(name), reverse=True)
        return self._versions[name]

    def fail(self, err: ResolutionError) -> None:
        # The first dead end of a highest-first search is the most telling one: it is what
        # the newest versions want. Later ones come from older, less interesting choices.
        if self.failure is None:
            self.failure = err

    def conflict(self, name: str, needs: Sequence[_Need]) -> ResolutionError:
        have = sorted(self.versions(name))
        if not have:
            askers = ", ".join(n.who for n in needs)
            hint = ""
            if name.lower().startswith("aws.greengrass."):
                # Real recipes gate on aws.greengrass.Nucleus (or need TokenExchangeService, ...).
                hint = ("; it is a component AWS provides to Greengrass devices and nucleus has no copy of it: "
                        "deploy a recipe named so (with --recipe-dir) if the dependency is only a version "
                        "gate, or drop the dependency")
            return UnknownComponentError(f"no component {name} in the catalog (needed by {askers}){hint}",
                                         component=name)
        reasons = ", ".join(n.describe(name) for n in needs)
        # Say how a non-root requirer got into the set; a root's own group is already named.
        chains = [f"{n.who} via {' -> '.join(n.via)}" for n in needs if len(n.via) > 1]
        text = f"{reasons}; have {name} {', '.join(str(v) for v in have)}"
        if chains:
            text += f" ({'; '.join(chains)})"
        return ResolutionError(text, component=name)

    def solve(self, chosen: dict[str, Version], needs: dict[str, list[_Need]],
              via: dict[str, tuple[str, ...]]) -> dict[str, Version] | None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ResolutionError(f"gave up after {MAX_STEPS} resolution steps; the requirements are too "
                                  "loose or contradictory to search exhaustively")
        name = next((n for n in needs if n not in chosen), None)
        if name is None:
            return chosen
        candidates = [v for v in self.versions(name) if all(n.requirement.allows(v) for n in needs[name])]
        if not candidates:
            self.fail(self.conflict(name, needs[name]))
            return None
        active = self.prefer.get(name)
        if active in candidates:
            candidates.remove(active)
            candidates.insert(0, active)
        for version in candidates:
            recipe = self.catalog.recipe(name, version)
            label = f"{name} {version}"
            new_needs = {k: list(v) for k, v in needs.items()}
            new_via = dict(via)
            ok = True
            for dep_name, dep in recipe.dependencies.items():
                need = _Need(label, dep.requirement, via.get(name, ()))
                new_needs.setdefault(dep_name, []).append(need)
                new_via.setdefault(dep_name, (*via.get(name, ()), label))
                if dep_name in chosen and not dep.requirement.allows(chosen[dep_name]):
                    self.fail(self.conflict(dep_name, new_needs[dep_name]))
                    ok = False
                    break
                if dep_name == name and not dep.requirement.allows(version):
                    self.fail(self.conflict(dep_name, new_needs[dep_name]))
                    ok = False
                    break
            if not ok:
                continue
            found = self.solve({**chosen, name: version}, new_needs, new_via)
            if found is not None:
                return found
        return None


def resolve(roots: Mapping[str, Mapping[str, str]], catalog: Catalog,
            prefer: Mapping[str, Version | str] | None = None) -> Resolution:
    """Versions for every root of every group and all their dependencies, dependencies first.

    ``prefer`` holds a version to try first per component (the deployment engine passes what the
    deployment brings, else what is deployed now); it is kept while it satisfies every requirement
    on it, otherwise (or with no preference) the highest version that does is chosen.
    """
    needs: dict[str, list[_Need]] = {}
    via: dict[str, tuple[str, ...]] = {}
    for group in sorted(roots):
        for name, text in sorted(roots[group].items()):
            try:
                req = Requirement.parse(text)
            except VersionError as exc:
                raise VersionError(f"{_root_label(group)} asks for {name} {text!r}: {exc.message}",
                                   component=name) from exc
            needs.setdefault(name, []).append(_Need(_root_label(group), req))
            via.setdefault(name, (_root_label(group),))
    preferred: dict[str, Version] = {}
    for name, version in (prefer or {}).items():
        try:
            preferred[name] = version if isinstance(version, Version) else Version.parse(version)
        except VersionError:
            continue  # a version the store could not hold either: nothing to keep
    search = _Search(catalog, preferred)
    chosen = search.solve({}, needs, via)
    if chosen is None:
        assert search.failure is not None
        raise search.failure
    recipes = {name: catalog.recipe(name, version) for name, version in chosen.items()}
    order = dependency_order(recipes)
    return Resolution(components={n: recipes[n] for n in order}, order=order)


def dependency_order(recipes: Mapping[str, Recipe]) -> list[str]:
    """Topological order, dependencies first; ties broken by name so that the order (and the
    start-up sequence built on it) is the same on every run. Dependencies outside ``recipes``
    are ignored. A cycle raises :class:`DependencyCycleError` naming its members."""
    deps = {name: {d for d in r.dependencies if d in recipes} for name, r in recipes.items()}
    waiting = {name: len(ds) for name, ds in deps.items()}
    users: dict[str, list[str]] = {name: [] for name in recipes}
    for name, ds in deps.items():
        for d in ds:
            users[d].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for user in users[name]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) < len(recipes):
        cycle = _find_cycle({n: deps[n] for n in recipes if n not in set(order)})
        raise DependencyCycleError(f"cycle: {' -> '.join(cycle)}", component=cycle[0])
    return order


def _find_cycle(deps: Mapping[str, set[str]]) -> list[str]:
    """One cycle among nodes that all sit on or behind a cycle (what Kahn's algorithm left)."""
    start = min(deps)
    path: list[str] = [start]
    seen = {start: 0}
    node = start
    while True:
        node = min(d for d in deps[node] if d in deps)
        if node in seen:
            return [*path[seen[node]:], node]
        seen[node] = len(path)
        path.append(node)
