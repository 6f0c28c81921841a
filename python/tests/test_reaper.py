"""Nothing left behind when the driver is killed: a Python process that starts a testbed and
is SIGKILLed in the middle of a migration leaves no container, network or process 30 s later
(its reaper removes them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DRIVER = """
import sys, threading, time
import ms2m

slow = ms2m.Link(mbit=10)
tb = ms2m.Testbed(runtime=sys.argv[1], hosts={"edge-1": slow, "edge-2": slow}).start()
svc = tb.deploy("victim", host="edge-1", processing_ms=5, state_bytes=8 << 20)
tb.start_workload(svc, rate=20)
# 8 MiB over two 10 Mbit/s links: the migration takes seconds, the kill comes in the middle.
threading.Thread(
    target=lambda: tb.migrate(svc, to="edge-2", strategy="stop_and_copy"), daemon=True
).start()
time.sleep(1.0)
print(tb.id, flush=True)
time.sleep(600)
"""


def _processes_of(testbed: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MS2M_TESTBED={testbed}".encode() in env:
            found.append(int(entry.name))
    return found


def _containers_of(testbed: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=ms2m.testbed={testbed}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.split()


def _networks_of(testbed: str) -> list[str]:
    out = subprocess.run(
        ["docker", "network", "ls", "-q", "--filter", f"name=ms2m-{testbed}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.split()


@pytest.mark.parametrize(
    "runtime",
    [
        pytest.param("docker", marks=pytest.mark.docker),
        pytest.param("local", marks=pytest.mark.local),
    ],
)
def test_a_sigkilled_driver_leaves_nothing_30_s_later(runtime: str, tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "TESTCONTAINERS_COMMAND"}
    driver = subprocess.Popen(
        [sys.executable, str(script), runtime], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert driver.stdout is not None
        testbed = driver.stdout.readline().strip()
        assert testbed, f"the driver printed no testbed id (exit {driver.poll()})"
        if runtime == "docker":
            assert _containers_of(testbed), "the driver's testbed should be running"
        else:
            assert _processes_of(testbed), "the driver's testbed should be running"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    left: list[object] = []
    while time.monotonic() < deadline:
        left = [*_processes_of(testbed)]
        if runtime == "docker":
            left += [*_containers_of(testbed), *_networks_of(testbed)]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"30 s after SIGKILL, testbed {testbed} left {left}"


KEEPER = """
import ms2m
tb = ms2m.Testbed(runtime="docker").start()
svc = tb.deploy("kept", host="edge-1", processing_ms=5, state_bytes=10_000)
try:
    tb.migrate(svc, to="edge-2", fault=ms2m.Fault(kill="target", at_phase="restore"))
except ms2m.MigrationFailed:
    pass
tb.keep()
print(tb.id, flush=True)
"""


@pytest.mark.docker
def test_a_kept_testbed_never_closed_exits_cleanly(tmp_path: Path) -> None:
    """No panic ends a user's process: a testbed left unclosed (here kept, after a failed
    migration) is dropped at the interpreter's exit without aborting it."""
    script = tmp_path / "keeper.py"
    script.write_text(KEEPER)
    env = {**os.environ, "TESTCONTAINERS_COMMAND": "keep"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    testbed = out.stdout.strip()
    try:
        assert out.returncode == 0 and "panic" not in out.stderr, out.stderr[-2000:]
        assert _containers_of(testbed), "keep() should have kept the containers"
    finally:
        subprocess.run(["docker", "rm", "-f", *_containers_of(testbed)], capture_output=True)
        subprocess.run(["docker", "network", "rm", *_networks_of(testbed)], capture_output=True)
