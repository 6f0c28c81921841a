"""Pure logic through the Python API: no Docker needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ms2m
from ms2m.cli import main as cli_main
from ms2m.experiment import format_table


def _history(n: int, drop: int | None = None) -> dict:
    published = [
        {"seq": s, "t_sched_ns": s * 100, "t_pub_ns": s * 100, "outcome": "confirmed"}
        for s in range(1, n + 1)
    ]
    events = [
        {
            "instance": "a",
            "seq": s,
            "mode": "live",
            "t_pub_ns": s * 100,
            "t_start_ns": s * 100 + 10,
            "t_end_ns": s * 100 + 50,
            "chain": "",
        }
        for s in range(1, n + 1)
        if s != drop
    ]
    return {"published": published, "events": events, "message_bytes": 8, "state_bytes": 64}


def test_strategies_are_listed_with_their_phases():
    assert set(ms2m.STRATEGIES) == {"ms2m", "stop_and_copy", "ms2m_cutoff", "ms2m_sequential"}
    assert ms2m.STRATEGY_PHASES["ms2m"][-2:] == ("replay", "finalize")
    assert ms2m.STRATEGY_PHASES["stop_and_copy"][0] == "stop"


def test_offline_checker_accepts_a_clean_history_and_catches_a_lost_message():
    ok = ms2m.check_history(_history(10))
    assert ok["lost"]["count"] == 0
    assert ok["result"] == "unknown"  # no final state given
    bad = ms2m.check_history(_history(10, drop=4))
    assert bad["result"] == "invalid"
    assert bad["lost"] == {"count": 1, "examples": [4]}


def test_bad_history_is_a_configuration_error():
    with pytest.raises(ms2m.ConfigurationError, match="history"):
        ms2m.check_history({"published": "nope"})


def test_hosts_must_be_a_sequence_of_names():
    with pytest.raises(ms2m.ConfigurationError, match="sequence"):
        ms2m.Testbed(hosts="edge-1")


def test_unstarted_testbed_says_how_to_start_it():
    with pytest.raises(ms2m.Ms2mError, match="not started"):
        ms2m.Testbed().deploy("x", host="edge-1")


def test_exception_hierarchy():
    for cls in (
        ms2m.ConfigurationError,
        ms2m.RuntimeUnavailable,
        ms2m.MigrationFailed,
        ms2m.BrokerError,
        ms2m.OperationTimeout,
        ms2m.InvariantViolated,
    ):
        assert issubclass(cls, ms2m.Ms2mError)


def test_report_refuses_other_documents():
    with pytest.raises(ms2m.ConfigurationError, match="schema"):
        ms2m.Report({"schema": "something/else"})


def test_comparison_is_validated_before_anything_starts():
    with pytest.raises(ms2m.ConfigurationError, match="unknown strategy"):
        ms2m.compare_strategies(ms2m.Comparison(strategies=("teleport",)))
    with pytest.raises(ms2m.ConfigurationError, match="runs"):
        ms2m.compare_strategies(ms2m.Comparison(runs=0))


def test_summarize_on_an_empty_folder_fails_clearly(tmp_path, capsys):
    assert cli_main(["summarize", str(tmp_path)]) == 1
    assert "no ms2m reports" in capsys.readouterr().err


def test_table_formats_rows():
    row = {
        "strategy": "ms2m",
        "runs": 1,
        "downtime_median_ms": 1.0,
        "downtime_max_ms": 2.0,
        "baseline_median_ms": 0.5,
        "control_plane_median_ms": 1.5,
        "total_median_ms": 300.0,
        "lost": 0,
        "duplicated": 0,
        "reordered": 0,
        "state_consistent": "1/1",
    }
    table = format_table([row])
    assert "ms2m" in table and "1.000 / 2.000" in table
    json.dumps(row)


NO_RUNTIME = """
import sys
import ms2m
try:
    ms2m.Testbed(runtime=sys.argv[1]).start()
except ms2m.RuntimeUnavailable as e:
    print(e)
"""


def _start_without(runtime: str, **env: str) -> str:
    # A separate process: the Docker connection is chosen once per process.
    out = subprocess.run(
        [sys.executable, "-c", NO_RUNTIME, runtime],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout + out.stderr


def test_no_docker_daemon_gives_a_clear_error():
    out = _start_without("docker", DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert "no Docker daemon answers at /nonexistent/docker.sock" in out, out
    assert "apt-get install docker.io" in out


def test_auto_without_any_runtime_says_what_each_one_misses():
    out = _start_without(
        "auto",
        DOCKER_HOST="unix:///nonexistent/docker.sock",
        MS2M_RABBITMQ_SERVER="/nonexistent/rabbitmq-server",
    )
    assert "no runtime can start here" in out, out
    assert "apt-get install docker.io" in out
    assert "/nonexistent/rabbitmq-server is not installed" in out
    assert "apt-get install rabbitmq-server" in out


def test_bad_runtime_and_broker_url_are_refused_before_anything_starts():
    with pytest.raises(ms2m.ConfigurationError, match="runtime must be one of"):
        ms2m.Testbed(runtime="kubernetes")
    with pytest.raises(ms2m.ConfigurationError, match="must start with amqp://"):
        ms2m.Testbed(amqp_url="http://127.0.0.1:5672").start()
    with pytest.raises(ms2m.ConfigurationError, match="docker runtime's containers cannot reach"):
        ms2m.Testbed(runtime="docker", amqp_url="amqp://guest:guest@localhost:5672/%2f").start()


def test_timeline_csv_has_a_row_per_processing_and_per_unprocessed_message(tmp_path):
    h = _history(4, drop=2)
    text = ms2m.timeline_csv(h, tmp_path / "t.csv")
    rows = text.splitlines()
    assert rows[0].startswith("seq,outcome,t_sched_ns,t_pub_ns,instance,mode")
    assert len(rows) == 1 + 4
    assert rows[2] == "2,confirmed,200,200,,,,,"
    assert (tmp_path / "t.csv").read_text() == text


def test_report_schema_is_a_json_schema():
    schema = ms2m.report_schema()
    assert schema["title"] == "Report"
    assert "verdict" in schema["required"]


def test_profiles_build_what_the_engine_reads():
    assert ms2m.profiles.steps([(0, 1), (5, 10)])["steps"][1] == {"at_s": 5, "rate": 10}
    assert ms2m.profiles.poisson(3)["kind"] == "poisson"


def test_testbed_files_are_checked_before_anything_starts(tmp_path):
    from ms2m.testbed_file import load

    root = Path(__file__).parents[2] / "testbeds"
    assert load(root / "quickstart.toml")["service"]["name"] == "counter"
    assert load(root / "paper-2025.toml")["sweep"]["repetitions"] == 5
    bad = tmp_path / "bad.toml"
    bad.write_text('[service]\nname = "x"\nprocesing_ms = 5\n[workload]\nrate = 1\n')
    with pytest.raises(ms2m.ConfigurationError, match=r"\[service\] has unknown keys"):
        load(bad)
    bad.write_text('[service]\nname = "x"\n[workload]\nrate = 1\n')
    with pytest.raises(ms2m.ConfigurationError, match="either"):
        load(bad)
    bad.write_text("[service\n")
    with pytest.raises(ms2m.ConfigurationError, match="not valid TOML"):
        load(bad)


def test_sweep_runtime_is_checked_and_old_folders_still_resume(tmp_path):
    from dataclasses import asdict

    from ms2m.sweeps import Grid, _check_folder

    with pytest.raises(ms2m.ConfigurationError, match="runtime must be one of"):
        Grid(strategies=("ms2m",), rates=(1.0,), runtime="kubernetes").validate()
    grid = Grid(strategies=("ms2m",), rates=(1.0,))
    # A folder written before the runtime was part of a sweep holds the default.
    old = {k: v for k, v in asdict(grid).items() if k != "runtime"}
    (tmp_path / "sweep.json").write_text(json.dumps(old))
    _check_folder(tmp_path, grid)
    with pytest.raises(ms2m.ConfigurationError, match="other parameters"):
        _check_folder(tmp_path, Grid(strategies=("ms2m",), rates=(1.0,), runtime="local"))
