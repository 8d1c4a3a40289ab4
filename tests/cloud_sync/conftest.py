"""Fixtures: a real Mosquitto on 127.0.0.1 (started per test), certificates made once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sync_testkit import Certs, Mosquitto, make_certs, require_mosquitto


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()
