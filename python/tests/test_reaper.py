"""Nothing left behind when the driver is killed: a Python process that starts a testbed and
is SIGKILLed in the middle of a migration leaves no container, network or process 30 s later
(its reaper removes them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ms2m

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


def _containers_of(testbed: str, *labels: str, running: bool = False) -> list[str]:
    """The testbed's containers (running ones only with ``running``), those with every label
    ``key=value`` in ``labels`` if any."""
    filters = [f"label=ms2m.testbed={testbed}", *(f"label={label}" for label in labels)]
    out = subprocess.run(
        ["docker", "ps", "-q" if running else "-aq"]
        + [arg for f in filters for arg in ("--filter", f)],
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


KEPT_DRIVER = """
import threading, time
import ms2m

tb = ms2m.Testbed(runtime="docker").start()
svc = tb.deploy("victim", host="edge-1", processing_ms=5, state_bytes=128 << 20)
tb.start_workload(svc, rate=20)
time.sleep(1.0)
threading.Thread(target=lambda: tb.migrate(svc, to="edge-2", strategy="ms2m"), daemon=True).start()
# Killed once the migration's replay queue exists: the 128 MiB checkpoint is on its way.
while not any(".replay." in q for q in tb.broker_queues()):
    time.sleep(0.01)
print(tb.id, flush=True)
time.sleep(600)
"""


def _broker_queues(testbed: str) -> dict[str, int]:
    """The kept testbed's queues and their consumers, as its broker lists them."""
    broker = _containers_of(testbed, "ms2m.role=broker", running=True)
    assert broker, "the kept testbed's broker should run"
    out = subprocess.run(
        [
            "docker",
            "exec",
            broker[0],
            "rabbitmqctl",
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "consumers",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {name: int(n) for name, n in (line.split() for line in out.splitlines() if line)}


@pytest.mark.docker
def test_cleanup_leaves_a_kept_testbed_whose_driver_died_mid_migration_serving(
    tmp_path: Path,
) -> None:
    """A kept testbed outlives its SIGKILLed driver with two instances of a service, mid-
    migration: ``python -m ms2m cleanup`` rolls the migration back and leaves it running,
    one instance serving, no migration queue left."""
    script = tmp_path / "kept_driver.py"
    script.write_text(KEPT_DRIVER)
    env = {**os.environ, "TESTCONTAINERS_COMMAND": "keep"}
    driver = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    testbed = ""
    try:
        assert driver.stdout is not None
        testbed = driver.stdout.readline().strip()
        assert testbed, f"the driver printed no testbed id (exit {driver.poll()})"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    clean_env = {k: v for k, v in os.environ.items() if k != "TESTCONTAINERS_COMMAND"}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "ms2m", "cleanup"],
            capture_output=True,
            text=True,
            env=clean_env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"testbed {testbed}: the migration of victim was rolled back" in out.stdout, (
            out.stdout
        )
        instances = _containers_of(testbed, "ms2m.service=victim", running=True)
        assert len(instances) == 1, f"one instance should serve, not {instances}"
        queues = _broker_queues(testbed)
        assert queues.get("victim.primary") == 1, queues
        assert not [q for q in queues if ".replay." in q or ".ckpt." in q], queues
    finally:
        # By its label: `cleanup --all` would remove the session's own testbeds too.
        subprocess.run(["docker", "rm", "-f", *_containers_of(testbed)], capture_output=True)
        subprocess.run(["docker", "network", "rm", *_networks_of(testbed)], capture_output=True)
    # Its journal goes with it: the next cleanup finds its broker gone and forgets it.
    subprocess.run(
        [sys.executable, "-m", "ms2m", "cleanup"], capture_output=True, env=clean_env, timeout=120
    )
    journal = Path(tempfile.gettempdir()) / f"ms2m-journal-{os.getuid()}" / f"{testbed}.json"
    assert not journal.exists()


EXTERNAL_DRIVER = """
import sys, time
import ms2m

tb = ms2m.Testbed(runtime="local", amqp_url=sys.argv[1]).start()
svc = tb.deploy("victim-ext", host="edge-1", processing_ms=5, state_bytes=10_000)
tb.start_workload(svc, rate=20)
time.sleep(0.5)
print(tb.id, flush=True)
time.sleep(600)
"""


def test_a_sigkilled_driver_leaves_no_queue_on_an_external_broker(
    testbed: ms2m.Testbed, tmp_path: Path
) -> None:
    """The queues and exchanges a testbed declared on a broker it did not start outlive its
    instances: its journal lets the reaper delete them too."""
    script = tmp_path / "external_driver.py"
    script.write_text(EXTERNAL_DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "TESTCONTAINERS_COMMAND"}
    driver = subprocess.Popen(
        [sys.executable, str(script), testbed.amqp_url], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert driver.stdout is not None
        assert driver.stdout.readline().strip(), f"the driver did not start (exit {driver.poll()})"
        assert [q for q in testbed.broker_queues() if q.startswith("victim-ext.")]
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    left: list[str] = []
    while time.monotonic() < deadline:
        left = [q for q in testbed.broker_queues() if q.startswith("victim-ext.")]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"30 s after SIGKILL, the external broker still holds {left}"
