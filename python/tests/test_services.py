"""Services of one's own: the Python SDK (``ms2m.service``), the examples under
``examples/services/``, the conformance kit run on them, and their migrations checked by the
twin: on the local runtime as a Python module and a Rust binary, and on docker as an image
built on ``ms2m/python:dev``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ms2m
from ms2m.service import Params, _Adapter, _output, load

ROOT = Path(__file__).parents[2]
WORDCOUNT = [
    sys.executable,
    "-m",
    "ms2m.service",
    f"{ROOT}/examples/services/wordcount.py:WordCount",
]
LARGE_MAP = [str(ROOT / "target" / "release" / "large-map")]

# A service whose state depends on the clock: equal messages, different states.
CLOCKED = """
import time
from ms2m.service import Service

class Clocked(Service):
    def __init__(self):
        self.total = 0
    def handle(self, payload):
        self.total += time.monotonic_ns() % 1000
    def snapshot(self):
        return str(self.total).encode()
    def restore(self, data):
        self.total = int(data)
"""

# A service whose snapshot forgets part of the state: every rule of the contract holds on a
# state that was never migrated, and only a migration shows the loss.
FORGETFUL = """
from ms2m.service import Service

class Forgetful(Service):
    def __init__(self):
        self.count = 0
        self.mixed = 0
    def handle(self, payload):
        self.count += 1
        self.mixed = (self.mixed * 31 + ord(payload[0])) % 1_000_003
        return str(self.count)
    def snapshot(self):
        return str(self.count).encode()
    def restore(self, data):
        self.count = int(data)
    def digest(self):
        return f"{self.count}:{self.mixed}"
"""


# -- the SDK, offline ----------------------------------------------------------------------


def test_load_takes_a_module_or_a_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.py"
    f.write_text(CLOCKED)
    assert load(f"{f}:Clocked").__name__ == "Clocked"
    assert load("ms2m.service:Service") is ms2m.service.Service
    with pytest.raises(ValueError, match="module:Class"):
        load("no_colon")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(f"{tmp_path}/absent.py:X")
    with pytest.raises(AttributeError, match="has no 'Nope'"):
        load(f"{f}:Nope")


def test_a_file_imports_its_neighbours_and_shadows_nothing(tmp_path: Path) -> None:
    (tmp_path / "helpers.py").write_text("BASE = 41\n")
    (tmp_path / "json.py").write_text(
        "import helpers\n\nclass Mine:\n    base = helpers.BASE + 1\n"
    )
    assert load(f"{tmp_path}/json.py:Mine").base == 42
    import json

    assert json.dumps([1]) == "[1]"


def test_outputs_become_strings() -> None:
    assert _output(None) is None
    assert _output("x") == "x"
    assert _output(b"caf\xc3\xa9") == "café"
    assert _output({"b": 1, "a": [2]}) == '{"a": [2], "b": 1}'


def test_an_object_without_the_methods_is_refused_by_name() -> None:
    class Half:
        def handle(self, payload: str) -> None:
            return None

    with pytest.raises(TypeError, match="lacks snapshot, restore"):
        _Adapter(Half())


def test_the_default_digest_is_the_snapshots_sha256() -> None:
    import hashlib

    class Plain:
        def handle(self, payload: str) -> None:
            return None

        def snapshot(self) -> bytes:
            return b"abc"

        def restore(self, data: bytes) -> None:
            pass

    assert _Adapter(Plain()).digest() == hashlib.sha256(b"abc").hexdigest()


def test_params_come_from_the_testbeds_variables() -> None:
    p = Params.from_env({"MS2M_SERVICE": "s", "MS2M_LIVE": "1", "MS2M_STATE_BYTES": "64"})
    assert (p.service, p.live, p.state_bytes, p.prefetch) == ("s", True, 64, 1)


def test_a_bad_configuration_is_a_clear_error() -> None:
    out = subprocess.run(
        [*WORDCOUNT], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=False
    )
    assert out.returncode == 2, out
    assert "missing --amqp-url (or MS2M_AMQP_URL)" in out.stderr


# -- on a broker ------------------------------------------------------------------------------


def _migrate_with_every_strategy(tb: ms2m.Testbed, svc: ms2m.Service) -> None:
    """Under 40 msg/s, one migration per strategy between edge-1 and edge-2, each completed
    with 0 lost, 0 duplicated and the twin agreeing; removes the service."""
    try:
        host = "edge-1"
        with tb.workload(svc, rate=40):
            for strategy in ms2m.STRATEGIES:
                time.sleep(0.5)
                host = "edge-2" if host == "edge-1" else "edge-1"
                r = tb.migrate(svc, to=host, strategy=strategy)
                state = r.verdict["state"]
                assert (r.status, r.lost, r.duplicated) == ("completed", 0, 0), strategy
                assert (state["oracle"], state["consistent"]) == ("twin", True), (strategy, state)
    finally:
        tb.remove(svc)


@pytest.fixture(scope="module")
def local() -> Iterator[ms2m.Testbed]:
    if not Path(LARGE_MAP[0]).exists():
        pytest.fail(f"{LARGE_MAP[0]} is missing: cargo build --release -p large-map", pytrace=False)
    try:
        tb = ms2m.Testbed(runtime="local").start()
    except ms2m.RuntimeUnavailable as e:
        pytest.fail(f"the local runtime must work where the suite runs: {e}", pytrace=False)
    yield tb
    tb.close()


@pytest.mark.local
@pytest.mark.parametrize("command", [WORDCOUNT, LARGE_MAP], ids=["wordcount", "large-map"])
def test_the_examples_keep_every_rule(local: ms2m.Testbed, command: list[str]) -> None:
    rules = local.conformance(command=command)
    assert len(rules) == 6 and all(r["passed"] for r in rules), rules


@pytest.mark.local
def test_the_kit_names_the_rule_a_clocked_service_breaks(
    local: ms2m.Testbed, tmp_path: Path
) -> None:
    f = tmp_path / "clocked.py"
    f.write_text(CLOCKED)
    rules = local.conformance(command=[sys.executable, "-m", "ms2m.service", f"{f}:Clocked"])
    broken = [r for r in rules if not r["passed"]]
    assert [r["rule"] for r in broken] == [
        "replay skips what the snapshot holds and has no side effects"
    ], rules
    assert "digest" in broken[0]["detail"], broken


@pytest.mark.local
@pytest.mark.parametrize("command", [WORDCOUNT, LARGE_MAP], ids=["wordcount", "large-map"])
def test_the_examples_migrate_with_every_strategy(local: ms2m.Testbed, command: list[str]) -> None:
    svc = local.deploy("own", host="edge-1", command=command, processing_ms=5, state_bytes=1 << 20)
    _migrate_with_every_strategy(local, svc)


@pytest.mark.local
def test_the_twin_sees_a_snapshot_that_forgets(local: ms2m.Testbed, tmp_path: Path) -> None:
    f = tmp_path / "forgetful.py"
    f.write_text(textwrap.dedent(FORGETFUL))
    command = [sys.executable, "-m", "ms2m.service", f"{f}:Forgetful"]
    svc = local.deploy("forgetful", host="edge-1", command=command, processing_ms=2)
    try:
        with local.workload(svc, rate=40):
            time.sleep(1.0)
            r = local.migrate(svc, to="edge-2", strategy="stop_and_copy")
        state = r.verdict["state"]
        assert (r.lost, r.duplicated) == (0, 0)
        assert (state["oracle"], state["consistent"]) == ("twin", False), state
    finally:
        local.remove(svc)


# -- on docker: an image of one's own on the SDK's image ---------------------------------------

WORDCOUNT_IMAGE = "ms2m-test/wordcount:dev"


@pytest.fixture(scope="module")
def wordcount_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What a user does: ``FROM ms2m/python:dev``, the service's file, its class as ``CMD``."""
    ctx = tmp_path_factory.mktemp("wordcount-image")
    (ctx / "wordcount.py").write_text((ROOT / "examples/services/wordcount.py").read_text())
    (ctx / "Dockerfile").write_text(
        'FROM ms2m/python:dev\nCOPY wordcount.py /srv/\nCMD ["wordcount:WordCount"]\n'
    )
    built = subprocess.run(
        ["docker", "build", "-q", "-t", WORDCOUNT_IMAGE, str(ctx)],
        capture_output=True,
        text=True,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        check=False,
    )
    if built.returncode != 0:
        pytest.fail(
            f"building {WORDCOUNT_IMAGE} (needs ms2m/python:dev, make images): {built.stderr}"
        )
    return WORDCOUNT_IMAGE


@pytest.mark.docker
def test_a_python_service_image_keeps_every_rule_and_migrates(
    testbed: ms2m.Testbed, wordcount_image: str
) -> None:
    if testbed.runtime != "docker":
        pytest.skip("an image needs the docker runtime")
    rules = testbed.conformance(image=wordcount_image)
    assert all(r["passed"] for r in rules), rules
    svc = testbed.deploy("own-image", host="edge-1", image=wordcount_image, processing_ms=5)
    _migrate_with_every_strategy(testbed, svc)
