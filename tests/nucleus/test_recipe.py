"""Recipe parsing, validation, platform matching and manifest selection."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from nucleus.errors import RecipeError
from nucleus.platforms import current_platform, normalize_architecture, platform_matches
from nucleus.recipe import (
    Artifact,
    Lifecycle,
    Permission,
    Step,
    find_recipes,
    load_recipe,
    parse_recipe,
)
from nucleus.versions import Version

LINUX = {"os": "linux", "architecture": "amd64", "architecture.detail": "x86_64", "runtime": "nucleus"}
WINDOWS = {"os": "windows", "architecture": "amd64", "runtime": "nucleus"}


def y(text: str, source: str | None = "test.yaml") -> Any:
    return parse_recipe(textwrap.dedent(text), source=source, fmt="yaml")


def ym(body: str, source: str | None = "test.yaml") -> Any:
    """MINIMAL plus an indented body."""
    return parse_recipe(MINIMAL + textwrap.dedent(body), source=source, fmt="yaml")


MINIMAL = """\
RecipeFormatVersion: 2020-01-25
ComponentName: com.example.Hello
ComponentVersion: '1.0.0'
"""


# --- platform matching -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "platform", "expected"),
    [
        (None, LINUX, True),
        ({}, LINUX, True),
        ({"os": "linux"}, LINUX, True),
        ({"os": "Linux"}, LINUX, True),
        ({"OS": "linux"}, LINUX, True),
        ({"os": "windows"}, LINUX, False),
        ({"os": "*"}, LINUX, True),
        ({"os": "all"}, LINUX, True),
        ({"os": "any"}, LINUX, True),
        ({"os": "/darwin|linux/"}, LINUX, True),
        ({"os": "/linux|windows/"}, WINDOWS, True),
        ({"os": "/darwin|windows/"}, LINUX, False),
        ({"os": "/lin/"}, LINUX, False),  # fullmatch, not search
        ({"architecture": "/x86|aarch64|amd64|arm/"}, LINUX, True),
        ({"os": "linux", "architecture": "aarch64"}, LINUX, False),
        ({"os": "linux", "architecture.detail": "x86_64"}, LINUX, True),
        ({"runtime": "aws_nucleus_lite"}, LINUX, False),
        ({"runtime": "*"}, LINUX, True),
        ({"random": "/list|of|options/"}, LINUX, False),  # unknown key: wildcards only
        ({"random": "*"}, LINUX, True),
        ({"os": "raspbian"}, LINUX, False),
        ({"os": "testOs"}, LINUX, False),
        ({"os": "linux", "gpu": "nvidia"}, {**LINUX, "gpu": "NVIDIA"}, True),
        ({"os": "/[/"}, LINUX, False),  # a broken regex matches nothing
    ],
)
def test_platform_matches(spec: dict[str, str] | None, platform: dict[str, str], expected: bool) -> None:
    assert platform_matches(spec, platform) is expected


def test_current_platform_shape_and_extra() -> None:
    p = current_platform({"gpu": "none", "runtime": "custom"})
    assert {"os", "architecture", "architecture.detail", "runtime"} <= set(p)
    assert p["gpu"] == "none" and p["runtime"] == "custom"
    assert current_platform()["runtime"] == "nucleus"


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "amd64"), ("AMD64", "amd64"), ("aarch64", "aarch64"), ("arm64", "aarch64"), ("armv7l", "arm"),
     ("i686", "x86"), ("riscv64", "riscv64")],
)
def test_normalize_architecture(machine: str, arch: str) -> None:
    assert normalize_architecture(machine) == arch


# --- basic fields ----------------------------------------------------------------------------


def test_minimal_recipe_defaults() -> None:
    r = y(MINIMAL)
    assert r.format_version == "2020-01-25"  # YAML date kept as text
    assert r.name == "com.example.Hello"
    assert r.version == Version.parse("1.0.0")
    assert r.type == "aws.greengrass.generic"
    assert (r.description, r.publisher) == ("", "")
    assert r.default_configuration == {} and r.dependencies == {} and r.manifests == []
    assert r.source == "test.yaml"
    resolved = r.select(LINUX)
    assert resolved is not None and resolved.lifecycle == Lifecycle() and resolved.artifacts == []


def test_all_fields_and_case_insensitive_keys() -> None:
    r = y("""\
        recipeFormatVersion: '2020-01-25'
        componentName: com.example.All
        COMPONENTVERSION: '2.1.0-beta.1+build.7'
        componenttype: aws.greengrass.generic
        ComponentDescription: desc
        componentPublisher: me
        componentConfiguration:
          defaultConfiguration:
            Message: hi
            Nested: {When: 2020-01-25, List: [1, true]}
        ComponentDependencies:
          dep.A: {versionRequirement: ^1.1, dependencyType: Soft}
          dep.B: {VersionRequirement: '>= 0.1.3', DependencyType: hard}
          dep.C: {}
          dep.D:
        Manifests:
          - name: linux manifest
            platform: {os: linux, Architecture: /amd64|aarch64/}
            lifecycle:
              setEnv: {GLOBAL: g, NUM: 3, FLAG: true}
              INSTALL: {script: echo install, Timeout: '900', Requiresprivilege: 'true', skipIf: onpath git}
              startUp: echo startup
              run:
                Script: echo run
                SetEnv: {A: b}
                timeout: 60
              shutdown: {Script: echo bye, RequiresPrivilege: false}
              Recover: echo recover
              bootstrap: {script: echo boot, timeout: 120}
              Uninstall: {Script: echo un, Timeout: 10}
            artifacts:
              - URI: s3://bucket/path/hello.zip
                unarchive: zip
                digest: abc=
                algorithm: SHA-256
                Permission: {read: all, execute: Owner}
              - Uri: s3://bucket/run.sh
                Permission: {Execute: ALL}
        """)
    assert r.format_version == "2020-01-25"
    assert str(r.version) == "2.1.0-beta.1+build.7"
    assert r.description == "desc" and r.publisher == "me"
    assert r.default_configuration == {"Message": "hi", "Nested": {"When": "2020-01-25", "List": [1, True]}}
    deps = {k: (str(d.requirement), d.type) for k, d in r.dependencies.items()}
    assert deps == {"dep.A": ("^1.1", "SOFT"), "dep.B": (">= 0.1.3", "HARD"), "dep.C": ("*", "HARD"),
                    "dep.D": ("*", "HARD")}
    m = r.manifests[0]
    assert m.name == "linux manifest"
    assert m.platform == {"os": "linux", "Architecture": "/amd64|aarch64/"}
    lc = m.lifecycle
    assert lc is not None
    assert lc.setenv == {"GLOBAL": "g", "NUM": "3", "FLAG": "true"}
    assert list(lc.steps) == ["bootstrap", "install", "startup", "run", "shutdown", "recover", "uninstall"]
    assert lc.steps["install"] == Step("echo install", timeout=900.0, skipif="onpath git",
                                       requires_privilege=True)
    assert lc.steps["startup"] == Step("echo startup")
    assert lc.steps["run"] == Step("echo run", timeout=60.0, setenv={"A": "b"})
    assert lc.steps["shutdown"].requires_privilege is False
    assert lc.steps["uninstall"].timeout == 10.0
    a0, a1 = m.artifacts
    assert a0 == Artifact("s3://bucket/path/hello.zip", digest="abc=", algorithm="SHA-256", unarchive="ZIP",
                          permission=Permission(read="ALL", execute="OWNER"))
    assert a0.file_name == "hello.zip"
    assert a1.permission == Permission(read="OWNER", execute="ALL")  # partial Permission keeps defaults
    assert a1.unarchive == "NONE" and a1.digest is None


def test_json_and_guessed_format() -> None:
    doc = {"RecipeFormatVersion": "2020-01-25", "ComponentName": "J", "ComponentVersion": "1.0.0",
           "Manifests": [{"Lifecycle": {"Run": "echo hi"}}]}
    text = json.dumps(doc)
    for r in (parse_recipe(text, fmt="json"), parse_recipe(text), parse_recipe(text.encode()),
              parse_recipe(doc)):
        assert r.name == "J"
        resolved = r.select(LINUX)
        assert resolved is not None and resolved.lifecycle.steps["run"].script == "echo hi"
    # JSON with trailing commas in a .yaml file: YAML flow syntax reads it.
    r = parse_recipe('{"RecipeFormatVersion": "2020-01-25", "ComponentName": "T", '
                     '"ComponentVersion": "1.0.0",}')
    assert r.name == "T"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("s3://b/p/file.py", "file.py"), ("s3//some-bucket/hello-world2.py", "hello-world2.py"),
     ("greengrass:artifact.zip", "artifact.zip"), ("docker:repo/image:tag", "image:tag"),
     ("docker://docker-uri", "docker-uri"), ("hello.py", "hello.py"), ("file:///tmp/a/b.sh", "b.sh")],
)
def test_artifact_file_name(value: str, expected: str) -> None:
    assert Artifact(value).file_name == expected


# --- tolerated shapes --------------------------------------------------------------------------


def test_null_shapes_are_tolerated() -> None:
    with capture_logs() as logs:
        r = ym("""\
            Manifests:
              -
              - Platform:
                Artifacts:
                  -
                  - Uri: s3://b/x.py
                Lifecycle:
                  run:
                  install: echo hi
              - Lifecycle: {}
                Artifacts:
            """)
    assert len(r.manifests) == 2
    first = r.manifests[0]
    assert first.platform is None and [a.uri for a in first.artifacts] == ["s3://b/x.py"]
    assert first.lifecycle is not None and list(first.lifecycle.steps) == ["install"]
    assert r.manifests[1].lifecycle == Lifecycle() and r.manifests[1].artifacts == []
    events = {e["event"] for e in logs}
    assert {"recipe.item_null", "recipe.step_empty"} <= events
    assert any(e.get("field") == "Manifests[1].Lifecycle.Run" for e in logs)


def test_manifests_only_null_uses_recipe_level_lifecycle() -> None:
    r = parse_recipe({"RecipeFormatVersion": "2020-01-25", "ComponentName": "P", "ComponentVersion": "1.1.0",
                      "Manifests": [None], "Lifecycle": {"Install": "apt-get install python3.7"}})
    assert r.manifests == []
    resolved = r.select(LINUX)
    assert resolved is not None and resolved.lifecycle.steps["install"].script == "apt-get install python3.7"


def test_unknown_keys_warn_and_are_ignored() -> None:
    with capture_logs() as logs:
        r = ym("""\
            Parameters: [1]
            Manifests:
              - Platform: {os: all}
                Dependencies: {X: {VersionRequirement: 1.0.0}}
                Lifecycle:
                  Start: echo start
                  RequiresPrivilege: true
                  Run: {Script: echo run, Bogus: 1}
            """)
    assert r.dependencies == {}
    lc = r.manifests[0].lifecycle
    assert lc is not None and list(lc.steps) == ["run"]
    unknown = sorted(e["field"] for e in logs if e["event"] == "recipe.key_unknown")
    assert unknown == sorted(["Manifests[0].Dependencies", "Manifests[0].Lifecycle.RequiresPrivilege",
                              "Manifests[0].Lifecycle.Start", "Manifests[0].Lifecycle.Run.Bogus",
                              "Parameters"])


def test_variables_in_timeout_and_requires_privilege_stay_text() -> None:
    r = ym("""\
        Manifests:
          - Lifecycle:
              Startup:
                Script: start
                Timeout: "{configuration:/startupTimeoutSeconds}"
                RequiresPrivilege: "{configuration:/requiresPrivilege}"
        """)
    lc = r.manifests[0].lifecycle
    assert lc is not None
    step = lc.steps["startup"]
    assert step.timeout == "{configuration:/startupTimeoutSeconds}"
    assert step.requires_privilege == "{configuration:/requiresPrivilege}"


def test_first_matching_manifest_wins_and_none_when_nothing_matches() -> None:
    r = ym("""\
        Manifests:
          - Platform: {os: windows}
            Lifecycle: {Run: win}
          - Platform: {os: linux, architecture: amd64}
            Lifecycle: {Run: linux-amd64}
          - Platform: {os: linux}
            Lifecycle: {Run: linux}
        """)
    for plat, script in ((LINUX, "linux-amd64"), ({**LINUX, "architecture": "aarch64"}, "linux"),
                         (WINDOWS, "win")):
        resolved = r.select(plat)
        assert resolved is not None and resolved.lifecycle.steps["run"].script == script
    assert r.select({"os": "darwin", "architecture": "amd64"}) is None


SELECTIONS_RECIPE = """\
RecipeFormatVersion: 2020-01-25
ComponentName: FooService
ComponentVersion: '1.0.0'
Manifests:
  - Name: Platform 1
    Platform: {os: windows}
    Selections: [one, two, three, four]
  - Platform: {os: linux}
    Selections: [two, three]
  - Platform: {os: darwin}
    Selections: [four]
  - Lifecycle: {}
Lifecycle:
  one:
    Install: {Skipif: onpath git, Script: install-one}
  two:
    Install:
      three: {Skipif: onpath git, Script: install-two-three}
  any:
    Install:
      Skipif: {four: onpath git}
      Script: install-any
"""


def test_selections_pick_from_recipe_level_lifecycle() -> None:
    r = y(SELECTIONS_RECIPE)
    win = r.select(WINDOWS)
    assert win is not None and win.lifecycle.steps["install"] == Step("install-one", skipif="onpath git")
    lin = r.select(LINUX)
    assert lin is not None and lin.lifecycle.steps["install"].script == "install-two-three"
    # "four" is a selection keyword but not at the top level here; "any" is not a keyword
    # and is ignored next to keywords, as the Java nucleus does: nothing selected.
    darwin = r.select({"os": "darwin"})
    assert darwin is not None and darwin.lifecycle == Lifecycle()
    other = r.select({"os": "freebsd"})
    assert other is not None and other.lifecycle == Lifecycle()


def test_selection_default_all_and_nested_selectors() -> None:
    r = ym("""\
        Manifests:
          - Platform: {os: testOs}
            Selections: [testPlatform]
          - {}
        lifecycle:
          install:
            testPlatform: echo install
            all: echo "default install"
          Run:
            Script: run
            Skipif:
              testPlatform: onpath x
              all: onpath y
        """)
    assert r.lifecycle["Install"] == {"testPlatform": "echo install", "all": 'echo "default install"'}
    special = r.select({"os": "testOs"})
    assert special is not None
    assert special.lifecycle.steps["install"].script == "echo install"
    assert special.lifecycle.steps["run"].skipif == "onpath x"
    default = r.select(LINUX)
    assert default is not None
    assert default.lifecycle.steps["install"].script == 'echo "default install"'
    assert default.lifecycle.steps["run"].skipif == "onpath y"


def test_recipe_level_lifecycle_as_list_and_platform_value_selector() -> None:
    r = ym("""\
        Manifests:
          - Platform: {os: linux, runtime: "*"}
            Lifecycle: {}
          - Platform: {os: darwin}
        Lifecycle:
          - linux:
              run: {RequiresPrivilege: true, Script: "python3 {artifacts:path}/a.py"}
          - all:
              Setenv: {TEST_VALUE: "{configuration:/containerMode}"}
              run: {Script: everywhere, Timeout: 200, Setenv: {TEST_VALUE: sample}}
        """)
    lin = r.select(LINUX)
    assert lin is not None
    assert lin.lifecycle.steps["run"] == Step("python3 {artifacts:path}/a.py", requires_privilege=True)
    mac = r.select({"os": "darwin"})
    assert mac is not None
    assert mac.lifecycle.setenv == {"TEST_VALUE": "{configuration:/containerMode}"}
    assert mac.lifecycle.steps["run"] == Step("everywhere", timeout=200.0, setenv={"TEST_VALUE": "sample"})


def test_manifest_lifecycle_wins_over_recipe_level() -> None:
    r = ym("""\
        Manifests:
          - Platform: {os: linux}
            Lifecycle: {Run: own}
        Lifecycle:
          Run: global
        """)
    resolved = r.select(LINUX)
    assert resolved is not None and resolved.lifecycle.steps["run"].script == "own"


def test_recipe_level_lifecycle_canonical_keys_keep_env_names() -> None:
    r = ym("""\
        Lifecycle:
          setenv: {script: keep-me, run: too}
          INSTALL: {script: x, requiresprivilege: "true"}
        """)
    assert r.lifecycle == {"Setenv": {"script": "keep-me", "run": "too"},
                           "Install": {"Script": "x", "RequiresPrivilege": "true"}}
    resolved = r.select(LINUX)
    assert resolved is not None
    assert resolved.lifecycle.setenv == {"script": "keep-me", "run": "too"}
    assert resolved.lifecycle.steps["install"].requires_privilege is True


def test_has_lifecycle() -> None:
    assert not y(MINIMAL).has_lifecycle
    assert y(MINIMAL + "Manifests:\n  - Lifecycle: {Run: echo}\n").has_lifecycle
    assert not y(MINIMAL + "Manifests:\n  - Lifecycle: {}\n").has_lifecycle


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fld", "reason"),
    [
        ("Manifests:\n  - Lifecycle:\n      Run: {Script: x, Timeout: soon}\n",
         "Manifests[0].Lifecycle.Run.Timeout", "number of seconds"),
        ("Manifests:\n  - Lifecycle:\n      Run: {Script: x, Timeout: -1}\n",
         "Manifests[0].Lifecycle.Run.Timeout", "positive"),
        ("Manifests:\n  - Lifecycle:\n      Run: {Script: x, Timeout: true}\n",
         "Manifests[0].Lifecycle.Run.Timeout", "boolean"),
        ("Manifests:\n  - Lifecycle:\n      install: {Script: x, RequiresPrivilege: maybe}\n",
         "Manifests[0].Lifecycle.Install.RequiresPrivilege", "true or false"),
        ("Manifests:\n  - Lifecycle:\n      run: {Timeout: 5}\n",
         "Manifests[0].Lifecycle.Run.Script", "required"),
        ("Manifests:\n  - Lifecycle:\n      run: [a, b]\n", "Manifests[0].Lifecycle.Run", "script string"),
        # refused when read, not found out at run time (a Skipif that would be ignored, an algorithm the
        # deployment cannot check, a digest YAML turned into a number)
        ("Manifests:\n  - Lifecycle:\n      run: {Script: x, Skipif: whenever foo}\n",
         "Manifests[0].Lifecycle.Run.Skipif", "expected 'onpath <executable>' or 'exists <file>'"),
        ("Manifests:\n  - Lifecycle:\n      install: {Script: x, Skipif: onpath}\n",
         "Manifests[0].Lifecycle.Install.Skipif", "needs an argument"),
        ("Manifests:\n  - Artifacts:\n      - {URI: s3://b/x, Digest: abc, Algorithm: MD5}\n",
         "Manifests[0].Artifacts[0].Algorithm", "unsupported digest algorithm 'MD5'"),
        ("Manifests:\n  - Artifacts:\n      - {URI: s3://b/x, Digest: " + "0" * 63 + "1}\n",
         "Manifests[0].Artifacts[0].Digest", "quote it"),
        ("Manifests:\n  - Lifecycle:\n      run: {Script: [a]}\n",
         "Manifests[0].Lifecycle.Run.Script", "string"),
        ("Manifests:\n  - Lifecycle: echo\n", "Manifests[0].Lifecycle", "mapping"),
        ("Manifests: {a: 1}\n", "Manifests", "list"),
        ("Manifests:\n  - 7\n", "Manifests[0]", "mapping"),
        ("ComponentDependencies:\n  foo: {VersionRequirement: '>=banana'}\n",
         "ComponentDependencies.foo.VersionRequirement", "banana"),
        ("ComponentDependencies:\n  foo: {DependencyType: MAYBE}\n",
         "ComponentDependencies.foo.DependencyType", "HARD or SOFT"),
        ("ComponentDependencies: [a]\n", "ComponentDependencies", "mapping"),
        ("Manifests:\n  - Artifacts:\n      - {Uri: s3://a/b, Unarchive: TAR}\n",
         "Manifests[0].Artifacts[0].Unarchive", "NONE or ZIP"),
        ("Manifests:\n  - Artifacts:\n      - {Uri: s3://a/b, Permission: {Read: EVERYONE}}\n",
         "Manifests[0].Artifacts[0].Permission.Read", "NONE, OWNER or ALL"),
        ("Manifests:\n  - Artifacts: s3://a/b\n", "Manifests[0].Artifacts", "list"),
        ("Manifests:\n  - Platform: linux\n", "Manifests[0].Platform", "mapping"),
        ("Manifests:\n  - Lifecycle:\n      Setenv: [A]\n", "Manifests[0].Lifecycle.Setenv", "mapping"),
        ('Manifests:\n  - Lifecycle:\n      Setenv: {A: "x\\0y"}\n', "Manifests[0].Lifecycle.Setenv.A", "NUL"),
        ('Manifests:\n  - Lifecycle:\n      Run: {Script: x, Setenv: {"A=B": y}}\n',
         "Manifests[0].Lifecycle.Run.Setenv.A=B", "environment variable name"),
        ("ComponentConfiguration:\n  DefaultConfiguration: [1]\n",
         "ComponentConfiguration.DefaultConfiguration", "mapping"),
        ("Lifecycle: 5\n", "Lifecycle", "mapping"),
        ("Lifecycle:\n  Run: {Script: x, Timeout: later}\n", "Lifecycle", "Timeout"),
        ("Manifests:\n  - Lifecycle: {Run: a, run: b}\n",
         "Manifests[0].Lifecycle.run", "differ only in case"),
    ],
)
def test_errors_name_file_field_and_reason(body: str, fld: str, reason: str) -> None:
    with pytest.raises(RecipeError) as info:
        y(MINIMAL + body, source="recipes/bad.yaml")
    err = info.value
    assert err.path == "recipes/bad.yaml"
    assert err.field is not None and err.field.startswith(fld)
    assert reason in str(err)
    assert str(err).startswith(f"recipes/bad.yaml: {err.field}: ")
    assert err.code == "RECIPE_INVALID"


@pytest.mark.parametrize(
    ("name", "ok"),
    [("a", True), ("com.example.Hello_World-2", True), ("x" * 128, True), ("x" * 129, False),
     ("aws.greengrass.foo bar service", False), ("{COMPONENT_NAME}", False), ("ünï", False), ("", False)],
)
def test_component_name_limits(name: str, ok: bool) -> None:
    doc = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": "1.0.0"}
    if ok:
        assert parse_recipe(doc).name == name
    else:
        with pytest.raises(RecipeError) as info:
            parse_recipe(doc, source="r.json")
        assert info.value.field == "ComponentName"


@pytest.mark.parametrize(
    ("version", "ok"),
    [("1.0.0", True), ("1.0.0-" + "a" * 58, True), ("1.0.0-" + "a" * 59, False), ("1.0", False),
     ("NEXT_PATCH", False), (1.0, False), (None, False),
     ("1.0.0-alpha.beta.gamma.alpha.beta.gamma+21AF26D3—-117B344092BD21AF26D3—-117B344092BD", False)],
)
def test_component_version_limits(version: Any, ok: bool) -> None:
    doc = {"RecipeFormatVersion": "2020-01-25", "ComponentName": "n", "ComponentVersion": version}
    if ok:
        assert str(parse_recipe(doc).version) == version
    else:
        with pytest.raises(RecipeError) as info:
            parse_recipe(doc, source="r.json")
        assert info.value.field == "ComponentVersion"


def test_missing_required_fields_and_non_mapping_document() -> None:
    with pytest.raises(RecipeError, match="is required") as info:
        parse_recipe({"ComponentName": "n", "ComponentVersion": "1.0.0"})
    assert info.value.field == "RecipeFormatVersion"
    with pytest.raises(RecipeError, match="must be a mapping") as info:
        parse_recipe("- a\n- b\n", source="list.yaml")
    assert info.value.field == "(document)"


def test_odd_format_version_loads_with_warning() -> None:
    with capture_logs() as logs:
        r = parse_recipe({"RecipeFormatVersion": "2020-05-25", "ComponentName": "n",
                          "ComponentVersion": "1.0.0"})
    assert r.format_version == "2020-05-25"
    assert any(e["event"] == "recipe.format_version_unknown" for e in logs)


def test_syntax_errors_name_file_and_location(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("ComponentName: @@NAME@@\n")
    with pytest.raises(RecipeError, match=r"YAML syntax error at line 1") as info:
        load_recipe(bad_yaml)
    assert info.value.path == str(bad_yaml) and info.value.field == "(document)"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{\n  // comment\n  "a": 1\n}\n')
    with pytest.raises(RecipeError, match=r"JSON syntax error at line 2") as info:
        load_recipe(bad_json)
    assert info.value.path == str(bad_json)


def test_load_recipe_and_find_recipes(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "b.yaml").write_text(MINIMAL)
    (tmp_path / "a.json").write_text(json.dumps({"RecipeFormatVersion": "2020-01-25", "ComponentName": "J",
                                                 "ComponentVersion": "1.0.0"}))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "recipes" / "c.yml").write_text(MINIMAL.replace("Hello", "C"))
    (tmp_path / "recipes" / "deeper").mkdir()
    (tmp_path / "recipes" / "deeper" / "d.yaml").write_text(MINIMAL)
    found = find_recipes(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.json", "b.yaml", "recipes/c.yml"]
    assert find_recipes(tmp_path / "b.yaml") == [tmp_path / "b.yaml"]
    assert [load_recipe(p).name for p in found] == ["J", "com.example.Hello", "com.example.C"]
    assert load_recipe(found[1]).source == str(found[1])
    with pytest.raises(RecipeError, match="unknown recipe file type"):
        load_recipe(tmp_path / "notes.txt")
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="no such file"):
        find_recipes(tmp_path / "nowhere")


def test_to_document_round_trips() -> None:
    r = y(SELECTIONS_RECIPE)
    again = parse_recipe(r.to_document(), source=r.source)
    assert again == r
    full = ym("""\
        ComponentDependencies: {d: {VersionRequirement: ^1.0.0, DependencyType: SOFT}}
        ComponentConfiguration: {DefaultConfiguration: {a: {b: [1, 2]}}}
        Manifests:
          - Platform: {os: linux}
            Lifecycle:
              Setenv: {X: y}
              Run: {Script: r, Timeout: 1.5, RequiresPrivilege: true, Skipif: onpath a, Setenv: {Q: w}}
            Artifacts: [{Uri: s3://a/b.zip, Unarchive: ZIP, Digest: d, Permission: {Read: ALL}}]
        """)
    doc = full.to_document()
    assert doc["Manifests"][0]["Lifecycle"]["Run"]["Timeout"] == 1.5
    assert doc["ComponentDependencies"] == {"d": {"VersionRequirement": "^1.0.0", "DependencyType": "SOFT"}}
    assert parse_recipe(json.loads(json.dumps(doc)), source="test.yaml") == full


def test_a_yaml_alias_bomb_or_deep_nesting_is_refused_before_it_is_walked() -> None:
    """A few hundred bytes of YAML aliases are a billion values to the recipe builder, which hung on
    them (a recipe also reaches the daemon over IPC, by CreateLocalDeployment)."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb = MINIMAL + "ComponentConfiguration:\n  DefaultConfiguration:\n" + "".join(f"    {line}\n" for line in lines)
    with pytest.raises(RecipeError, match="holds more than 250000 values") as info:
        y(bomb, source="recipes/bomb.yaml")
    assert info.value.path == "recipes/bomb.yaml"
    deep = '{"RecipeFormatVersion": "2020-01-25", "ComponentName": "a", "ComponentVersion": "1.0.0", "x": ' + \
        "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(RecipeError, match="nested deeper than 64 levels"):
        parse_recipe(deep, source="deep.json", fmt="json")
