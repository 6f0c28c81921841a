"""Real migrations through the Python API: broker and instances in Docker."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

import ms2m

pytestmark = pytest.mark.docker


def _assert_clean(report: ms2m.Report) -> None:
    assert report.lost == 0, report.verdict["lost"]
    assert report.duplicated == 0, report.verdict["duplicated"]
    assert report.reordered == 0, report.verdict["reordered"]
    assert report.state_consistent is True, report.verdict["state"]
    report.assert_valid()
    assert report.verdict["expected"] > 0
    assert report.leftovers == []


@pytest.mark.parametrize("strategy", ms2m.STRATEGIES)
def test_migration_loses_nothing(testbed: ms2m.Testbed, strategy: str, tmp_path):
    svc = testbed.deploy(
        f"py-{strategy.replace('_', '-')}", host="edge-1", processing_ms=50, state_bytes=1_000_000
    )
    try:
        with testbed.workload(svc, rate=10):
            time.sleep(1.5)
            report = testbed.migrate(svc, to="edge-2", strategy=strategy, settle_s=0.5)
        _assert_clean(report)
        assert report.strategy == strategy
        assert testbed.service(svc.name).host == "edge-2"
        assert report.checkpoint_bytes > 1_000_000
        cp = report.checkpoint
        assert cp is not None and cp["bytes"] == report.checkpoint_bytes and cp["chunks"] == 1
        assert cp["fetch_mib_s"] is not None and cp["fetch_mib_s"] > 0
        assert report.summary()["checkpoint_write_mib_s"] == cp["write_mib_s"]
        assert report.target["host"] == "edge-2"
        # A saved report loads back equal.
        path = report.save(tmp_path)
        assert ms2m.Report.load(path).to_dict() == report.to_dict()
        assert [r.run_id for r in ms2m.load_reports(tmp_path)] == [report.run_id]
    finally:
        testbed.remove(svc)


def test_service_handle_lets_any_client_find_the_service(testbed: ms2m.Testbed):
    svc = testbed.deploy("py-handle", host="cloud", processing_ms=0, state_bytes=0)
    try:
        assert svc.amqp_url.startswith("amqp://") and svc.amqp_url == testbed.amqp_url
        assert svc.input_exchange == "py-handle.in"
        assert svc.output_exchange == "py-handle.out"
        assert svc.host == "cloud"
    finally:
        testbed.remove(svc)


def test_bad_arguments_are_refused_and_the_service_keeps_serving(testbed: ms2m.Testbed):
    svc = testbed.deploy("py-bad", host="edge-1", processing_ms=5, state_bytes=1000)
    try:
        with pytest.raises(ms2m.ConfigurationError, match="rate"):
            testbed.start_workload(svc, rate=-1)
        with pytest.raises(ms2m.ConfigurationError, match="unknown strategy"):
            testbed.migrate(svc, to="edge-2", strategy="teleport")
        with pytest.raises(ms2m.ConfigurationError, match="unknown host"):
            testbed.migrate(svc, to="mars")
        with pytest.raises(ms2m.ConfigurationError, match="already runs on"):
            testbed.migrate(svc, to="edge-1")
        with pytest.raises(ms2m.ConfigurationError, match="unknown host"):
            testbed.deploy("py-bad-2", host="mars")
        with pytest.raises(ms2m.ConfigurationError, match="already deployed"):
            testbed.deploy("py-bad", host="edge-1")
        with pytest.raises(ms2m.ConfigurationError, match="non-negative integer"):
            testbed.deploy("py-bad-3", host="edge-1", state_bytes=-5)
        with pytest.raises(ms2m.ConfigurationError, match="too large for this machine"):
            testbed.deploy("py-bad-4", host="edge-1", state_bytes=1 << 50)
        with pytest.raises(ms2m.ConfigurationError, match="chunk_bytes must be"):
            testbed.migrate(svc, to="edge-2", chunk_bytes=256 << 20)
        with pytest.raises(ms2m.ConfigurationError, match="after_ms"):
            testbed.migrate(
                svc, to="edge-2", fault=ms2m.Fault(kill="target", at_phase="replay", after_ms=-1)
            )
        with pytest.raises(ms2m.ConfigurationError, match="durable=True"):
            testbed.migrate(svc, to="edge-2", fault=ms2m.Fault(kill="broker", at_phase="replay"))
        # Nothing was disturbed: a real migration still succeeds afterwards.
        with testbed.workload(svc, rate=20):
            time.sleep(0.5)
            report = testbed.migrate(svc, to="edge-2", settle_s=0.2)
        _assert_clean(report)
    finally:
        testbed.remove(svc)


def test_failed_migration_raises_with_the_report_of_the_aborted_run(testbed: ms2m.Testbed):
    svc = testbed.deploy("py-fault", host="edge-1", processing_ms=20, state_bytes=10_000)
    try:
        with testbed.workload(svc, rate=20):
            time.sleep(1.0)
            with pytest.raises(ms2m.MigrationFailed, match="replay") as info:
                testbed.migrate(
                    svc,
                    to="edge-2",
                    strategy="ms2m",
                    fault=ms2m.Fault(kill="target", at_phase="replay"),
                    settle_s=0.3,
                )
        report = info.value.report  # type: ignore[attr-defined]
        assert report.status == "aborted"
        assert report.lost == 0 and report.duplicated == 0 and report.state_consistent
        assert testbed.service(svc.name).host == "edge-1"
        with pytest.raises(ms2m.ConfigurationError, match="not a phase of stop_and_copy"):
            testbed.migrate(
                svc,
                to="edge-2",
                strategy="stop_and_copy",
                fault=ms2m.Fault(kill="target", at_phase="replay"),
            )
    finally:
        testbed.remove(svc)


def test_async_twin_gives_a_valid_report():
    async def run() -> ms2m.Report:
        async with ms2m.Testbed() as tb:
            svc = tb.deploy("py-async", host="edge-1", processing_ms=20, state_bytes=10_000)
            async with tb.workload_async(svc, rate=20):
                await asyncio.sleep(1.0)
                return await tb.migrate_async(svc, to="cloud", strategy="ms2m", settle_s=0.3)

    report = asyncio.run(run())
    _assert_clean(report)
    assert report.target["host"] == "cloud"


def test_history_is_exported_and_checks_again_offline(testbed: ms2m.Testbed):
    svc = testbed.deploy("py-history", host="edge-1", processing_ms=1, state_bytes=100)
    try:
        with testbed.workload(svc, rate=50):
            time.sleep(0.5)
            report = testbed.migrate(svc, to="edge-2", settle_s=0.2)
        history = testbed.history(svc)
        observed = report.verdict["state"]["observed"]
        cut = report.counts["cut_ns"]
        again = ms2m.check_history(history, cut, observed)
        assert again["result"] == "valid", json.dumps(again)[:500]
        assert again["expected"] == report.verdict["expected"]
    finally:
        testbed.remove(svc)


def test_sweep_runs_resumes_and_leaves_the_broker_clean(tmp_path):
    from ms2m.matrix import format_matrix, table
    from ms2m.sweeps import Grid, run_grid

    grid = Grid(
        strategies=("stop_and_copy", "ms2m"),
        rates=(10.0,),
        repetitions=1,
        processing_ms=(20.0,),
        state_bytes=(1_000, 10_000),
        warmup_s=0.5,
        settle_s=0.2,
    )
    reports = run_grid(grid, tmp_path, progress=None)
    assert [r.strategy for r in reports] == ["stop_and_copy", "ms2m"] * 2
    assert sorted(r.service["state_bytes"] for r in reports) == [1000] * 2 + [10_000] * 2
    for r in reports:
        r.assert_valid()
    # Resuming: a finished sweep runs nothing again; a missing report is run again.
    runs = list(grid.runs())
    (tmp_path / grid.report_name(runs[1])).unlink()
    again = run_grid(grid, tmp_path, progress=None)
    assert again[0].run_id == reports[0].run_id
    assert again[1].run_id != reports[1].run_id
    assert "| 10 | ms2m |" in format_matrix(table(again))
    with pytest.raises(ms2m.ConfigurationError, match="other parameters"):
        run_grid(Grid(strategies=("ms2m",), rates=(1.0,)), tmp_path, progress=None)


def test_broker_is_clean_once_services_are_removed(testbed: ms2m.Testbed):
    svc = testbed.deploy("py-clean", host="edge-1", processing_ms=1, state_bytes=10)
    assert "py-clean.primary" in testbed.broker_queues()
    testbed.remove(svc)
    assert not any(q.startswith("py-clean.") for q in testbed.broker_queues())


def test_report_validates_against_the_schema_and_exports(testbed: ms2m.Testbed, tmp_path):
    import jsonschema

    svc = testbed.deploy("py-export", host="edge-1", processing_ms=5, state_bytes=1000)
    try:
        with testbed.workload(svc, profile=ms2m.profiles.poisson(50), seed=7):
            time.sleep(1.0)
            report = testbed.migrate(svc, to="cloud", settle_s=0.3)
        _assert_clean(report)
        jsonschema.validate(report.to_dict(), ms2m.report_schema())
        d = report.to_dict()
        assert d["workload"]["profile"] == {"kind": "poisson", "rate": 50}
        assert d["workload"]["seed"] == 7
        assert d["metrics"]["pacing_error"]["count"] > 0
        assert d["environment"]["broker_version"]
        assert "lapin" in d["environment"]["crates"]
        history = testbed.history(svc)
        csv = ms2m.timeline_csv(history, tmp_path / "timeline.csv").splitlines()
        assert len(csv) > d["counts"]["processed_live"]
        hlog = report.write_interval_log(history, tmp_path / "latency.hlog").read_text()
        assert hlog.startswith("#") and "Tag=during" in hlog
        with pytest.raises(ms2m.ConfigurationError, match="either rate= or profile="):
            testbed.start_workload(svc, rate=1, profile=ms2m.profiles.constant(1))
        with pytest.raises(ms2m.ConfigurationError, match="first step"):
            testbed.start_workload(svc, profile=ms2m.profiles.steps([(1, 5)]))
    finally:
        testbed.remove(svc)


def test_quickstart_testbed_file_runs_from_the_command_line(tmp_path):
    from pathlib import Path

    from ms2m.cli import main

    toml = Path(__file__).parents[2] / "testbeds" / "quickstart.toml"
    assert main(["run", str(toml), "--out", str(tmp_path)]) == 0
    reports = ms2m.load_reports(tmp_path)
    assert [r.strategy for r in reports] == ["ms2m", "stop_and_copy", "ms2m_cutoff"]
    assert (tmp_path / "history.json").exists()
    again = ms2m.check_history(json.loads((tmp_path / "history.json").read_text()))
    assert again["lost"]["count"] == 0 and again["duplicated"]["count"] == 0


def test_edge_links_from_python_with_an_outage():
    """Hosts with links: measured at start, crossed by the checkpoint (through the broker, and
    directly across a link between two hosts), an outage held."""
    hosts = {
        "edge-1": ms2m.Link(mbit=50, delay_ms=5, jitter_ms=1),
        "edge-2": ms2m.Link(up_mbit=20, down_mbit=50, delay_ms=2),
        "cloud": None,
    }
    pair = {("edge-2", "cloud"): ms2m.Link(mbit=40, delay_ms=1)}
    with ms2m.Testbed(hosts=hosts, host_links=pair) as tb:
        assert set(tb.links) == {"edge-1", "edge-2", "edge-2<->cloud"}
        measured = tb.links["edge-1"]["measured"]
        assert measured is not None and measured["rtt_ms_p50"] >= 8
        assert tb.links["edge-1"]["mechanism"] == "relay"
        svc = tb.deploy("linked", host="edge-1", processing_ms=5, state_bytes=500_000)
        with tb.workload(svc, rate=20):
            time.sleep(1)
            with tb.outage("edge-1"):
                time.sleep(0.5)
            report = tb.migrate(svc, to="edge-2", strategy="ms2m", settle_s=0.5)
        _assert_clean(report)
        assert report.link_traffic["edge-1"]["up_bytes"] >= report.checkpoint_bytes
        assert report.link_traffic["edge-2"]["down_bytes"] >= report.checkpoint_bytes
        row = report.summary()
        assert row["source_link_delay_ms"] == 5 and row["target_link_mbit"] == 20
        assert row["transfer"] == "broker"
        assert [(h["from"], h["to"]) for h in report.checkpoint["hops"]] == [
            ("edge-1", "broker"),
            ("broker", "edge-2"),
        ]
        with tb.workload(svc, rate=20):
            time.sleep(0.5)
            direct = tb.migrate(svc, to="cloud", strategy="stop_and_copy", transfer="direct")
        _assert_clean(direct)
        cp = direct.checkpoint
        assert cp is not None and cp["transfer"] == "direct"
        [hop] = cp["hops"]
        assert (hop["from"], hop["to"]) == ("edge-2", "cloud")
        assert hop["mbit_s"] is not None and 0 < hop["mbit_s"] <= 40 * 1.05
        assert direct.link_traffic["edge-2<->cloud"]["up_bytes"] >= direct.checkpoint_bytes
        with tb.outage("edge-2<->cloud"):  # a link between hosts can fail too
            pass
        with pytest.raises(ms2m.ConfigurationError, match="reaches the broker directly"):
            tb.set_link_outage("cloud", True)


def test_a_service_of_ones_own_by_image_and_command(testbed: ms2m.Testbed):
    """Any image or command that keeps the wire contract deploys and migrates (here the
    reference binary, reading the contract's MS2M_* variables); a twin that never migrated
    checks its state. One that is never ready is refused with the wait and its log."""
    if testbed.runtime == "docker":
        where = {"image": "ms2m/service:dev"}
        program = "/usr/local/bin/ms2m-service"
    else:
        where = {}
        program = str(Path(__file__).parents[2] / "target" / "release" / "ms2m-service")
    svc = testbed.deploy(
        "own", host="edge-1", processing_ms=2, command=[program], env={"MY_FLAG": "1"}, **where
    )
    try:
        with testbed.workload(svc, rate=20):
            time.sleep(1)
            report = testbed.migrate(svc, to="edge-2", strategy="ms2m", settle_s=0.3)
        assert report.lost == 0 and report.duplicated == 0 and report.reordered == 0
        assert report.verdict["state"]["oracle"] == "twin"
        assert report.state_consistent is True
        assert report.to_dict()["service"]["env"] == {"MY_FLAG": "1"}
    finally:
        testbed.remove(svc)
    with pytest.raises(ms2m.InstanceError) as e:
        testbed.deploy(
            "never-ready",
            host="edge-1",
            command=["sh", "-c", "echo 'no config file' >&2; exit 1"],
            **where,
        )
    assert "exited before it was ready" in str(e.value)
    assert "no config file" in str(e.value)
    assert testbed.broker_queues() == {}


def test_the_conformance_kit_checks_any_implementation(testbed: ms2m.Testbed, capsys):
    """The reference service keeps every rule; one whose replay has side effects is told which
    rule it breaks, by the API and by ``python -m ms2m conformance`` (exit code 1)."""
    from ms2m.cli import main

    rules = testbed.conformance("conform-ok")
    assert len(rules) >= 6 and all(r["passed"] for r in rules), rules
    if testbed.runtime == "docker":
        where = ["--image", "ms2m/service:dev", "--command", "/usr/local/bin/ms2m-service"]
    else:
        where = ["--command", str(Path(__file__).parents[2] / "target/release/ms2m-service")]
    broken = ["--env", "REFERENCE_SERVICE_BREAKS=replay_side_effects"]
    assert main(["conformance", "--runtime", testbed.runtime, *where, *broken]) == 1
    out = capsys.readouterr().out
    assert "BROKEN replay skips what the snapshot holds and has no side effects" in out
    assert "5 of 6 rules kept" in out


def test_a_durable_service_rides_out_broker_restarts(testbed: ms2m.Testbed):
    """A faster service than the papers' (300 msg/s, 1 ms, prefetch 10): the broker restarts
    while it serves, then as a migration replays; nothing confirmed is lost or doubled."""
    svc = testbed.deploy(
        "py-durable", host="edge-1", processing_ms=1, state_bytes=10_000, prefetch=10, durable=True
    )
    try:
        with testbed.workload(svc, rate=300):
            time.sleep(1.0)
            testbed.restart_broker(down_s=0.5)
            time.sleep(1.0)
            with pytest.raises(ms2m.MigrationFailed, match="the broker restarted") as info:
                testbed.migrate(
                    svc,
                    to="edge-2",
                    strategy="ms2m",
                    fault=ms2m.Fault(kill="broker", at_phase="replay"),
                    settle_s=0.3,
                )
            report = info.value.report  # type: ignore[attr-defined]
            assert report.status == "aborted"
            assert report.lost == 0 and report.duplicated == 0 and report.state_consistent
            assert testbed.service(svc.name).host == "edge-1"
            time.sleep(1.0)
            _assert_clean(testbed.migrate(svc, to="edge-2", strategy="ms2m", settle_s=0.3))
    finally:
        testbed.remove(svc)
