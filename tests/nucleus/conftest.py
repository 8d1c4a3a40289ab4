"""Fixtures shared by the nucleus tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from runner_harness import WAIT, Harness

from nucleus.states import TRANSITIONS


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    for r in harness.runners:
        await asyncio.wait_for(r.close(), WAIT)
    # every change any runner made was an allowed edge
    for _, old, new, _ in harness.changes:
        assert new in TRANSITIONS[old], (old, new)
