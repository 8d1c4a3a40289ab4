"""nucleus.yaml as an operator gets it wrong: every mistake stops `nucleus run` at once with one
line naming the file and the key (docs/configuration.md, "Daemon settings"), never a traceback
and never a daemon that starts with a value it cannot honour.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CASES: list[tuple[bytes, str]] = [
    # YAML mistakes: one line with the place, not PyYAML's multi-line report
    (b"mqtt: {url: [1}\n", "not valid YAML: line 1, column "),
    (b"a: b\n  c: d\n", "not valid YAML: line 2, column "),
    (b"\xff\xfe: 1\n", "is not UTF-8 text"),
    (b"thing_name: a\nthing_name: b\n", "not valid YAML: line 2, column 1: key 'thing_name' is given twice"),
    (b"mqtt:\n  url: mqtt://127.0.0.1\nthing_name: x\nmqtt:\n  keepalive_s: 60\n",
     "not valid YAML: line 4, column 1: key 'mqtt' is given twice"),
    (b"thing_name: 12345\n", "thing_name: must be a string (YAML read it as another type: put it in quotes)"),
    # values the daemon accepted and then could not honour (or honoured in a way nobody meant)
    (b"logs: {level: loud}\n", "logs.level: must be one of debug, info, warning, error, critical"),
    (b"logs: {max_bytes_per_file: 10}\n", "logs.max_bytes_per_file: Input should be greater than or equal to 64"),
    (b"stop_grace_s: -1\n", "stop_grace_s: Input should be greater than or equal to 0"),
    (b"restart: {backoff_initial_s: -5}\n", "restart.backoff_initial_s: Input should be greater than or equal"),
    (b"restart: {backoff_multiplier: 0.5}\n", "restart.backoff_multiplier: Input should be greater than or equal"),
    (b"deployments: {default_timeout_s: 0}\n", "deployments.default_timeout_s: Input should be greater than 0"),
    (b"ipc: {max_frame_bytes: 0}\n", "ipc.max_frame_bytes: Input should be greater than or equal to 1024"),
    (b"ipc: {handshake_timeout_s: 0}\n", "ipc.handshake_timeout_s: Input should be greater than 0"),
    (b'thing_name: ""\n', "thing_name: must be a non-empty name without '/'"),
    (b"thing_name: site/7\n", "thing_name: must be a non-empty name without '/'"),
    (b'thing_groups: [turbines, "north#"]\n', "thing_groups: must be a non-empty name without '/'"),
    # mqtt: topics the daemon could never use (a traceback at start, or every message failing later)
    (b'mqtt: {status_topic: "s/{thin}"}\n', "mqtt.status_topic: unknown field {thin}: the fields are {thing}"),
    (b'mqtt: {status_topic: "s/#"}\n', "mqtt.status_topic: must be a topic to publish to"),
    (b'mqtt: {forward: [{filter: ""}]}\n', "mqtt.forward.0.filter: must be an MQTT topic filter"),
    (b'mqtt: {forward: [{filter: "a/#/b"}]}\n', "mqtt.forward.0.filter: must be an MQTT topic filter"),
    (b'mqtt: {forward: [{filter: "a/#", cloud_topic: "x/{bogus}"}]}\n',
     "mqtt.forward.0.cloud_topic: unknown field {bogus}: the fields are {topic}, {thing}"),
    (b'mqtt: {forward: [{filter: "a/#", cloud_topic: "x/+/y"}]}\n',
     "mqtt.forward.0.cloud_topic: must be a topic to publish to"),
    (b'mqtt: {client_id: ""}\n', "mqtt.client_id: String should have at least 1 character"),
    # what was refused before, kept refused
    (b"restart: {max_errrors: 2}\n", "restart.max_errrors: unknown key"),
    (b"- a\n", "must be a mapping"),
]


def _run(root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
    return subprocess.run([sys.executable, "-m", "nucleus", "--root", str(root), "run"], capture_output=True,
                          text=True, timeout=30, env={**base, **(env or {})})


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(("text", "words"), CASES, ids=[c[0].decode(errors="replace")[:30] for c in CASES])
def test_bad_settings_stop_the_daemon_in_one_line(short_tmp: Path, text: bytes, words: str) -> None:
    (short_tmp / "nucleus.yaml").write_bytes(text)
    line = _one_line(_run(short_tmp))
    assert line.startswith(f"nucleus: {short_tmp / 'nucleus.yaml'}: {words}"), line
    assert not (short_tmp / "ipc.sock").exists()


def test_unreadable_settings_file_is_named(short_tmp: Path) -> None:
    """A nucleus.yaml that cannot be read (here a directory; as root, mode 000 is readable) was a
    traceback."""
    (short_tmp / "nucleus.yaml").mkdir()
    line = _one_line(_run(short_tmp))
    assert line == f"nucleus: {short_tmp / 'nucleus.yaml'}: cannot be read: Is a directory", line


def test_bad_environment_override_is_named(short_tmp: Path) -> None:
    line = _one_line(_run(short_tmp, {"NUCLEUS_SETTLE_TIME_S": "five"}))
    assert line == "nucleus: NUCLEUS_SETTLE_TIME_S (in the environment): must be a number of seconds, not 'five'"


@pytest.mark.parametrize(("env", "flags", "line"), [
    ({"NUCLEUS_THING_NAME": "site/7"}, [], "nucleus: NUCLEUS_THING_NAME: must be a non-empty name without '/'"),
    ({"NUCLEUS_SETTLE_TIME_S": "-1"}, [], "nucleus: NUCLEUS_SETTLE_TIME_S: Input should be greater than or equal to 0"),
    ({}, ["--thing-name", "a b"], "nucleus: --thing-name: must be a non-empty name without '/'"),
    ({"NUCLEUS_MQTT_URL": "http://broker"}, [],
     "nucleus: NUCLEUS_MQTT_URL (in the environment): broker url 'http://broker' must be mqtt://host[:port]"),
    ({"NUCLEUS_MQTT_URL": "mqtt://dev:s3cret@broker"}, [], "nucleus: NUCLEUS_MQTT_URL must not carry credentials"),
])
def test_a_bad_value_from_the_environment_or_a_flag_names_it(short_tmp: Path, env: dict[str, str],
                                                             flags: list[str], line: str) -> None:
    """These were reported as mistakes of nucleus.yaml, a file that does not hold them (or does not exist)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
    proc = subprocess.run([sys.executable, "-m", "nucleus", "--root", str(short_tmp), "run", *flags],
                          capture_output=True, text=True, timeout=30, env={**base, **env})
    assert _one_line(proc).startswith(line), proc.stderr
    assert "nucleus.yaml" not in proc.stderr and "s3cret" not in proc.stderr


def test_the_daemon_log_rotates_as_the_logs_settings_say(daemon_factory: Any) -> None:
    """logs.max_bytes_per_file and logs.backup_count bounded the components' logs only: the
    daemon's own logs/nucleus.log grew without bound (every CLI call adds two lines)."""
    d = daemon_factory("rot", {"logs": {"max_bytes_per_file": 1500, "backup_count": 1},
                               "deployments": {"settle_time_s": 0.2}})
    log = d.root / "logs" / "nucleus.log"
    for _ in range(40):  # bounded: each call logs a session opened and closed (~300 bytes)
        d.cli("status")
        if (d.root / "logs" / "nucleus.log.1").exists() and log.stat().st_size > 600:
            break
    d.cli("status")
    assert (d.root / "logs" / "nucleus.log.1").exists()
    assert not (d.root / "logs" / "nucleus.log.2").exists()
    for path in (log, d.root / "logs" / "nucleus.log.1"):
        text = path.read_text()
        assert path.stat().st_size <= 1501, path
        assert text.endswith("\n") and not text.startswith("\n"), path  # whole records only
    assert "ipc.session" in log.read_text()
    assert "ipc.session" in d.cli("logs", "nucleus").stdout  # `nucleus logs nucleus` still reads it


def test_a_section_with_every_key_commented_out_means_the_defaults(daemon_factory: Any) -> None:
    """`mqtt:` with nothing under it (YAML's null) was refused as 'Input should be a valid dictionary
    or instance of SyncSettings'; an empty file means the defaults, and so does an empty section.
    YAML merge keys still work with the duplicate-key check."""
    d = daemon_factory("sections", start=False)
    (d.root / "nucleus.yaml").write_text(
        "mqtt:\n#  url: mqtts://broker:8883\nthing_groups:\nfast: &fast {backoff_initial_s: 0.1}\n"
        "restart: {<<: *fast, backoff_initial_s: 0.2}\n".replace("fast: &fast", "x-fast: &fast"))
    proc = _run(d.root)
    assert "x-fast: unknown key" in proc.stderr  # the anchor's own key is still an unknown key
    (d.root / "nucleus.yaml").write_text("mqtt:\n#  url: mqtts://broker:8883\nthing_groups:\nlogs:\n")
    d.start()
    assert "link      disabled" in d.cli("sync", "status").stdout
