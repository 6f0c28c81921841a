"""Shared fixtures: one testbed for the whole session (a broker takes seconds to start)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

import ms2m


def _leftover_containers(testbed_id: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=ms2m.testbed={testbed_id}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


@pytest.fixture(scope="session")
def testbed() -> Iterator[ms2m.Testbed]:
    with ms2m.Testbed() as tb:
        yield tb
    assert _leftover_containers(tb.id) == [], "the testbed left containers behind"


@pytest.fixture
def leftovers():
    """Lists the containers of a testbed id still present."""
    return _leftover_containers
