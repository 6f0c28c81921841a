"""The suite runs on the ms2m pytest plugin's session testbed (``ms2m_testbed``)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

import ms2m

pytest_plugins = ["pytester"]

_testbed_ids: list[str] = []


@pytest.fixture(scope="session")
def testbed(ms2m_testbed: ms2m.Testbed) -> Iterator[ms2m.Testbed]:
    _testbed_ids.append(ms2m_testbed.id)
    yield ms2m_testbed


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Nothing left behind: no container of the session's testbeds may survive it."""
    for tb in _testbed_ids:
        out = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=ms2m.testbed={tb}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.stdout.split():
            print(f"\nms2m: testbed {tb} left containers behind: {out.stdout.split()}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
