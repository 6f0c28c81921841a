"""The local runtime and an external broker, through the Python API and the pytest plugin."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ms2m

pytestmark = pytest.mark.local


def _processes_of(testbed_id: str) -> list[int]:
    """Processes the local runtime started for a testbed (it marks their environment)."""
    mark = f"MS2M_TESTBED={testbed_id}".encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if mark in (p / "environ").read_bytes().split(b"\0"):
                found.append(int(p.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def local_testbed() -> Iterator[ms2m.Testbed]:
    try:
        tb = ms2m.Testbed(runtime="local").start()
    except ms2m.RuntimeUnavailable as e:
        pytest.fail(f"the local runtime must work where the suite runs: {e}", pytrace=False)
    yield tb
    tb.close()
    assert _processes_of(tb.id) == []


def test_local_runtime_migrates_real_processes(local_testbed: ms2m.Testbed):
    assert local_testbed.runtime == "local"
    assert local_testbed.amqp_url.startswith("amqp://ms2m:")
    assert "@127.0.0.1:" in local_testbed.amqp_url
    svc = local_testbed.deploy("py-local", host="edge-1", processing_ms=50, state_bytes=100_000)
    try:
        with local_testbed.workload(svc, rate=10):
            time.sleep(1.0)
            report = local_testbed.migrate(svc, to="edge-2", strategy="ms2m", settle_s=0.3)
        report.assert_valid()
        assert report.lost == 0 and report.duplicated == 0 and report.state_consistent
        env = report.environment
        assert env["runtime"] == "local"
        assert env["broker_version"], env
        assert env["docker_version"] is None
        # Two instance processes ran: the source's is gone, the target's serves.
        assert len(_processes_of(local_testbed.id)) >= 2
    finally:
        local_testbed.remove(svc)
    assert local_testbed.broker_queues() == {}


EXPERIMENT = """
import time

import pytest


@pytest.mark.ms2m(processing_ms=20, state_bytes=10_000)
def test_migrates_on_the_chosen_runtime_and_broker(ms2m_testbed, ms2m_service):
    assert ms2m_testbed.runtime == "local"
    assert ms2m_testbed.amqp_url == "{url}"
    with ms2m_testbed.workload(ms2m_service, rate=10):
        time.sleep(0.5)
        report = ms2m_testbed.migrate(ms2m_service, to="edge-2", strategy="ms2m", settle_s=0.3)
    report.assert_valid()
    assert report.environment["broker_image"].startswith("external amqp://")
"""


def test_plugin_options_choose_the_runtime_and_an_external_broker(
    local_testbed: ms2m.Testbed, pytester: pytest.Pytester
):
    pytester.makepyfile(EXPERIMENT.format(url=local_testbed.amqp_url))
    result = pytester.runpytest_subprocess(
        "-p",
        "no:cacheprovider",
        "--ms2m-runtime=local",
        f"--ms2m-amqp-url={local_testbed.amqp_url}",
        "--ms2m-require",
    )
    result.assert_outcomes(passed=1)
    # The plugin's testbed removed what it declared on the broker it borrowed.
    assert local_testbed.broker_queues() == {}


def test_plugin_refuses_a_bad_broker_url(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(ms2m_testbed):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ms2m-amqp-url=http://x")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ms2m: the testbed options are invalid*must start with amqp://*"])


def test_plugin_refuses_a_bad_link(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(ms2m_testbed):\n    pass\n")
    for link, says in [("edge-1=20parsecs", "unknown unit"), ("edge-9=20mbit", "missing from")]:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--ms2m-link={link}")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([f"*testbed options are invalid*{says}*"])


def test_plugin_skip_reason_says_what_is_missing(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(ms2m_testbed):\n    pass\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--ms2m-runtime=docker", "-rs"
        )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no Docker daemon answers at /nonexistent/docker.sock*"])
