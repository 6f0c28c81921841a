"""Pure logic through the Python API: no Docker needed."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

import ms2m
from ms2m import _native
from ms2m import report_types as rt
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
        ms2m.DockerError,
        ms2m.InstanceError,
        ms2m.OperationTimeout,
        ms2m.HostError,
        ms2m.InvariantViolated,
    ):
        assert issubclass(cls, ms2m.Ms2mError)
        # Tracebacks name the engine's errors where users import them from.
        if cls is not ms2m.InvariantViolated:
            assert cls.__module__ == "ms2m", cls


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
    assert "ms2m" in table and " 1.000 " in table and "2.000" in table
    json.dumps(row)
    ci = {**row, "runs": 6, "downtime_ci_lo_ms": 0.5, "downtime_ci_hi_ms": 1.5}
    versus = {"downtime_ratio": 0.25, "downtime_ratio_ci_lo": 0.2, "downtime_ratio_ci_hi": 0.3}
    table = format_table([{**ci, **versus, "ratio_to": "stop_and_copy", "p_value": 0.002}])
    assert "1.000 [0.500, 1.500]" in table and "0.250 [0.200, 0.300], p=0.002" in table
    assert "over stop_and_copy's" in table
    mixed = format_table([{**row, "runs": 9, "mixed": True}, {**row, "capped": True}])
    assert " 9~ " in mixed and " 1* " in mixed
    assert "~: medians over several configurations" in mixed and "*: stopped at the cap" in mixed


def test_summaries_give_medians_with_intervals_ratios_and_rank_tests():
    from ms2m import stats

    ci = stats.median_ci([float(x) for x in range(1, 11)])
    assert ci is not None
    assert (ci["median"], ci["lo"], ci["hi"], ci["n"]) == (5.5, 2.0, 9.0, 10)
    assert ci["coverage"] is not None and ci["coverage"] >= 0.95
    few = stats.median_ci([1.0, 2.0, 3.0])
    assert few is not None and few["lo"] is None and few["relative_half_width"] is None
    assert stats.median_ci([]) is None
    test = stats.mann_whitney([6, 7, 8, 9, 10], [1, 2, 3, 4, 5])
    assert test is not None and test["method"] == "exact" and abs(test["p"] - 2 / 252) < 1e-12
    ratio = stats.ratio_of_medians([50 + i for i in range(10)], [300 + 2 * i for i in range(10)])
    assert ratio is not None and ratio["lo"] < ratio["ratio"] < ratio["hi"]
    with pytest.raises(ms2m.ConfigurationError, match="between 0 and 1"):
        stats.median_ci([1.0], level=95)


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
    with pytest.raises(ms2m.ConfigurationError, match='runtime "auto" there, "local" now'):
        _check_folder(tmp_path, Grid(strategies=("ms2m",), rates=(1.0,), runtime="local"))


def test_the_warmup_covers_the_baseline_window_of_the_longest_migration_so_far():
    from ms2m.sweeps import WARMUP_S, warmup_for

    assert warmup_for(WARMUP_S, None) == WARMUP_S
    assert warmup_for(1.0, 0.4) == 1.0
    # The baseline window is as long as the migration: a 2 s migration needs 2 s of steady load.
    assert warmup_for(1.0, 2.0) > 2.0


# -- typed reports: the TypedDicts of ms2m.report_types mirror the shipped schema ------------

SCHEMA = json.loads((Path(ms2m.__file__).parent / "report.schema.json").read_text())
DEFS = SCHEMA["$defs"]
JSON_TYPES: dict[object, str] = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
    type(None): "null",
}


def _typeddict(name: str) -> type:
    """The TypedDict mirroring schema definition ``name`` (the root is ReportDocument)."""
    td = getattr(rt, "ReportDocument" if name == "Report" else name, None)
    assert td is not None and typing.is_typeddict(td), f"no TypedDict for schema's {name}"
    return td


def _schema_types(node: dict) -> set[str]:
    """JSON types a schema node allows, through references and alternatives."""
    if "$ref" in node:
        return _schema_types(DEFS[node["$ref"].rsplit("/", 1)[1]])
    alternatives = node.get("anyOf") or node.get("oneOf")
    if alternatives:
        return set().union(*(_schema_types(a) for a in alternatives))
    t = node["type"]
    return {t} if isinstance(t, str) else set(t)


def _hint_types(hint: object) -> set[str]:
    """JSON types a Python annotation allows."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_hint_types(a) for a in typing.get_args(hint)))
    if origin is typing.Literal:
        assert all(isinstance(a, str) for a in typing.get_args(hint)), hint
        return {"string"}
    if typing.is_typeddict(hint):
        return {"object"}
    return {JSON_TYPES[origin or hint]}


def _string_values(d: dict) -> set[str] | None:
    """The values of a closed vocabulary (an enum, or a oneOf of string constants)."""
    if "enum" in d:
        return set(d["enum"])
    branches = d.get("oneOf", [])
    if branches and all(b.get("type") == "string" and "const" in b for b in branches):
        return {b["const"] for b in branches}
    return None


def _schema_refs(node: dict) -> set[str]:
    """Object definitions (TypedDicts, the Profile union) a schema node refers to."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        d = DEFS[name]
        return (
            {name} if "properties" in d or ("oneOf" in d and _string_values(d) is None) else set()
        )
    out: set[str] = set()
    for key in ("anyOf", "oneOf", "prefixItems"):
        for sub in node.get(key, []):
            out |= _schema_refs(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out |= _schema_refs(node[key])
    return out


def _hint_refs(hint: object) -> set[str]:
    if hint == rt.Profile:
        return {"Profile"}
    if typing.is_typeddict(hint):
        return {typing.cast(type, hint).__name__}
    return set().union(set(), *(_hint_refs(a) for a in typing.get_args(hint)))


def _schema_enums(node: dict) -> set[frozenset[str]]:
    """Closed vocabularies a schema node refers to."""
    if "$ref" in node:
        values = _string_values(DEFS[node["$ref"].rsplit("/", 1)[1]])
        return set() if values is None else {frozenset(values)}
    return set().union(set(), *(_schema_enums(a) for a in node.get("anyOf", [])))


def _hint_literals(hint: object) -> set[frozenset[str]]:
    if typing.get_origin(hint) is typing.Literal:
        return {frozenset(typing.get_args(hint))}
    return set().union(set(), *(_hint_literals(a) for a in typing.get_args(hint)))


def _check_object(where: str, schema: dict, td: typing.Any) -> None:
    hints = typing.get_type_hints(td)
    props = schema["properties"]
    assert set(hints) == set(props), (
        f"{where}: only in the schema {sorted(set(props) - set(hints))}, "
        f"only in the TypedDict {sorted(set(hints) - set(props))}"
    )
    # The engine writes every key (None where it has no value).
    assert td.__required_keys__ == set(props), where
    for key, node in props.items():
        hint = hints[key]
        assert _hint_types(hint) == _schema_types(node), f"{where}.{key}: {hint} vs {node}"
        assert _hint_refs(hint) == _schema_refs(node), f"{where}.{key}: {hint} vs {node}"
        assert _schema_enums(node) <= _hint_literals(hint), f"{where}.{key}: {hint} vs {node}"


def test_every_schema_definition_has_a_matching_typeddict():
    _check_object("Report", SCHEMA, rt.ReportDocument)
    for name, d in DEFS.items():
        if "properties" in d:
            # MigrationSummary: its own fields and the strategy's Outcome, flattened.
            _check_object(name, d, _typeddict(name))
        elif _string_values(d) is not None:
            alias = getattr(rt, name, None)
            assert typing.get_origin(alias) is typing.Literal, f"no Literal for schema's {name}"
            assert set(typing.get_args(alias)) == _string_values(d), name
        elif name == "Profile":
            by_kind = {
                typing.get_type_hints(td)["kind"].__args__[0]: td
                for td in typing.get_args(rt.Profile)
            }
            kinds = [branch["properties"]["kind"]["const"] for branch in d["oneOf"]]
            assert sorted(by_kind) == sorted(kinds)
            for branch in d["oneOf"]:
                kind = branch["properties"]["kind"]["const"]
                _check_object(f"Profile[{kind}]", branch, by_kind[kind])
        else:
            raise AssertionError(f"schema definition {name} has no Python counterpart")
    assert set(rt.MigrationSummary.__required_keys__) >= set(rt.Outcome.__required_keys__)


def test_strategy_and_phase_names_are_the_engines():
    assert set(typing.get_args(rt.StrategyName)) == set(ms2m.STRATEGIES)
    phases = {p for ps in ms2m.STRATEGY_PHASES.values() for p in ps}
    assert set(typing.get_args(rt.PhaseName)) == phases | {"abort", "take_over", "restart"}


def _report_doc(strategy: rt.StrategyName = "ms2m_cutoff", fired: bool = True) -> rt.ReportDocument:
    lat: rt.LatencySummary = {
        "count": 3,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "p999_ms": 2.0,
        "max_ms": 2.0,
    }
    none: rt.Finding = {"count": 0, "examples": []}
    cutoff: rt.CutoffReport = {
        "replay_max_s": 2.0,
        "lambda": 10.0,
        "mu": 20.0,
        "t_cutoff_s": 4.0,
        "fired": fired,
        "fired_at_ns": 1_500 if fired else None,
    }
    return {
        "schema": ms2m.REPORT_SCHEMA,
        "run_id": "run-1",
        "strategy": strategy,
        "service": {
            "name": "counter",
            "host": "edge-1",
            "processing_ms": 50.0,
            "state_bytes": 1000,
            "prefetch": 1,
        },
        "workload": {"profile": {"kind": "constant", "rate": 10.0}, "message_bytes": 64, "seed": 0},
        "workload_rate": 10.0,
        "options": ms2m.MIGRATION_DEFAULTS,
        "source": {"instance": "counter-1", "host": "edge-1"},
        "target": {"instance": "counter-2", "host": "edge-2"},
        "environment": {
            "ms2m_version": ms2m.__version__,
            "crates": {},
            "runtime": "local",
            "broker_image": "b",
            "broker_version": None,
            "service_image": "s",
            "docker_version": None,
            "kernel": None,
            "hostname": None,
            "cores": 2,
        },
        "phases": [
            {"name": "prepare", "start_ns": 1_000, "end_ns": 1_400, "duration_ms": 0.0004},
            {"name": "replay", "start_ns": 1_400, "end_ns": 2_000, "duration_ms": 0.0006},
        ],
        "migration": {
            "status": "completed",
            "failed_phase": None,
            "error": None,
            "t_start_ns": 1_000,
            "t_end_ns": 2_000,
            "total_ms": 0.001,
            "control_plane_downtime_ms": 0.0005,
            "checkpoint_bytes": 1000,
            "messages_replayed": 4,
            "replay_skipped": 0,
            "t_source_stop_ns": None,
            "t_target_live_ns": 1_900,
            "lambda": 10.0,
            "mu": 20.0,
            "cutoff": cutoff if strategy == "ms2m_cutoff" else None,
            "fault": None,
        },
        "metrics": {
            "pacing_error": {
                "count": 3,
                "p50_us": 1.0,
                "p99_us": 5.0,
                "p999_us": 5.0,
                "max_us": 5.0,
            },
            "downtime": {"ms": 0.5, "window_ns": [1_000, 2_000], "interval_ns": [1_400, 1_900]},
            "baseline_downtime": {"ms": 0.1, "window_ns": [0, 1_000], "interval_ns": None},
            "latency": {"before": lat, "during": lat, "after": lat},
            "processing": {
                "asked_ms": 50.0,
                "count": 3,
                "p50_ms": 50.1,
                "p99_ms": 50.3,
                "p999_ms": 50.3,
                "max_ms": 50.3,
                "deviation": 0.002,
                "off_target": False,
            },
            "recorder_lag": lat,
        },
        "counts": {
            "published": 3,
            "confirmed": 3,
            "processed_live": 3,
            "processed_replay": 4,
            "malformed_events": 0,
            "cut_ns": 3_000,
        },
        "verdict": {
            "result": "valid",
            "expected": 3,
            "lost": none,
            "duplicated": none,
            "reordered": none,
            "unconfirmed_processed": none,
            "state": {
                "consistent": True,
                "observed": {"instance": "counter-2", "last_seq": 3, "count": 3, "digest": "d"},
                "expected_digest": "d",
            },
        },
        "leftovers": [],
    }


def test_saving_reports_to_a_folder_never_overwrites(tmp_path):
    doc = _report_doc()
    first = ms2m.Report.from_json(json.dumps(doc))
    doc["run_id"] = "another-run"
    second = ms2m.Report.from_json(json.dumps(doc))
    for folder in (f"{tmp_path}/new/", tmp_path / "plain"):
        paths = {first.save(folder), second.save(folder)}
        assert len(paths) == 2 and all(p.parent == Path(folder) for p in paths)
        assert sorted(r.run_id for r in ms2m.load_reports(folder)) == sorted(
            [first.run_id, second.run_id]
        )
    assert first.save(tmp_path / "one.json") == tmp_path / "one.json"


def test_report_accessors_are_typed_copies_of_the_document():
    doc = _report_doc()
    try:
        import jsonschema
    except ImportError:
        pass
    else:
        jsonschema.validate(json.loads(json.dumps(doc)), SCHEMA)
    report = ms2m.Report.from_json(json.dumps(doc))
    assert report.to_dict() == json.loads(json.dumps(doc))
    assert report.strategy == "ms2m_cutoff" and report.status == "completed"
    assert report.options == ms2m.MIGRATION_DEFAULTS
    assert report.phase_spans[1]["name"] == "replay"
    assert report.phases == {"prepare": 0.0004, "replay": 0.0006}
    assert report.metrics["downtime"]["interval_ns"] == [1_400, 1_900]
    assert report.cutoff is not None and report.cutoff["fired"]
    assert report.verdict["state"]["observed"] == doc["verdict"]["state"]["observed"]
    report.verdict["lost"]["count"] = 7  # a copy: the report is unchanged
    assert report.lost == 0 and report.valid
    row = report.summary()
    assert row["latency_during_p99_ms"] == 2.0 and row["phase_replay_ms"] == 0.0006

    from ms2m.matrix import table

    aborted = _report_doc("ms2m", fired=False)
    aborted["migration"]["status"] = "aborted"
    reports = [report, ms2m.Report(aborted), ms2m.Report(_report_doc(fired=False))]
    rows = {r["strategy"]: r for r in table(reports)}
    assert rows["ms2m"]["aborted"] == 1 and rows["ms2m"]["cutoff_fired"] == 0
    assert rows["ms2m_cutoff"]["aborted"] == 0 and rows["ms2m_cutoff"]["cutoff_fired"] == 1


# -- defaults: read once from the engine, used by every signature and the CLI ---------------


def test_migration_defaults_are_the_engines_everywhere(capsys):
    from ms2m.experiment import Comparison
    from ms2m.sweeps import Grid, sweep

    defaults = ms2m.MIGRATION_DEFAULTS
    schema = DEFS["MigrationOptions"]["properties"]
    assert defaults == {k: v["default"] for k, v in schema.items()}
    # Floats, as the literals they replace were: a sweep folder holds them as JSON.
    assert all(
        isinstance(v, float)
        for k, v in defaults.items()
        if k not in ("fault", "chunk_bytes", "transfer")
    )
    assert defaults["transfer"] == "broker"
    assert isinstance(defaults["chunk_bytes"], int)
    for fn in (ms2m.Testbed.migrate, ms2m.Testbed.migrate_async):
        params = inspect.signature(fn).parameters
        for key, value in defaults.items():
            assert params[key].default == value, (fn.__name__, key)
    grid = Grid(strategies=("ms2m",), rates=(1.0,))
    params = inspect.signature(sweep).parameters
    swept = {
        k: v for k, v in defaults.items() if k in ("settle_s", "replay_timeout_s", "replay_max_s")
    }
    for key, value in swept.items():
        assert getattr(grid, key) == value
        assert params[key].default == value
    assert Comparison().settle_s == defaults["settle_s"]
    testbed = json.loads(_native.default_testbed_config())
    params = inspect.signature(ms2m.Testbed).parameters
    assert params["broker_startup_timeout_s"].default == testbed["broker_startup_timeout_s"]
    assert tuple(params["hosts"].default) == tuple(testbed["hosts"])

    with pytest.raises(SystemExit):
        cli_main(["matrix", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for key, value in swept.items():
        assert f"--{key.replace('_', '-')}" in help_text
        assert f"(default {value})" in help_text


# -- links -------------------------------------------------------------------------------------


def test_links_are_read_from_python_the_command_line_and_testbed_files(tmp_path):
    from ms2m.links import parse_host_links, parse_link
    from ms2m.sweeps import Grid
    from ms2m.testbed_file import _grid, _hosts, load

    link = ms2m.Link(mbit=20, delay_ms=20, jitter_ms=5)
    assert link.to_config() == {
        "up_mbit": 20,
        "down_mbit": 20,
        "delay_ms": 20.0,
        "jitter_ms": 5.0,
    }
    assert ms2m.Link(mbit=20, up_mbit=5).to_config()["up_mbit"] == 5
    assert parse_link("20mbit,20ms,jitter=5ms") == link
    assert parse_link("up=5mbit,down=1gbit,delay_ms=3") == ms2m.Link(
        up_mbit=5, down_mbit=1000, delay_ms=3
    )
    assert parse_host_links(["edge-1=512kbit"]) == {"edge-1": ms2m.Link(mbit=0.512)}
    for bad, match in [("20parsecs", "unknown unit"), ("fast", "cannot read")]:
        with pytest.raises(ms2m.ConfigurationError, match=match):
            parse_link(bad)
    with pytest.raises(ms2m.ConfigurationError, match="HOST=SPEC"):
        parse_host_links(["20mbit"])

    # The testbed's configuration: a mapping of hosts to links, None for a direct one.
    tb = ms2m.Testbed(hosts={"edge-1": link, "edge-2": {"delay_ms": 5}, "cloud": None})
    assert tb.config["hosts"] == ["edge-1", "edge-2", "cloud"]
    assert set(tb.config["links"]) == {"edge-1", "edge-2"}
    assert tb.config["links"]["edge-2"]["up_mbit"] is None
    with pytest.raises(ms2m.ConfigurationError, match="unknown keys"):
        ms2m.Testbed(hosts={"edge-1": {"bandwidth": 5}})

    root = Path(__file__).parents[2] / "testbeds"
    data = load(root / "edge-links.toml")
    assert _hosts(data["testbed"])["edge-1"] == link
    assert _hosts(data["testbed"])["cloud"] is None
    sweep = _grid(root / "edge-cloud.toml", load(root / "edge-cloud.toml"))
    sweep.validate()
    assert sweep.varies_links() and len(list(sweep.runs())) == 4 * 3 * 3 * 3
    assert sweep.testbed_hosts() == {"edge-1": ms2m.Link(), "edge-2": ms2m.Link()}
    run = next(sweep.runs())
    assert sweep.run_link(run) == ms2m.Link(mbit=10, delay_ms=2)
    assert "link_mbit10-link_delay_ms2" in sweep.report_name(run)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[testbed]\nhosts = ["a", "b"]\n[testbed.links]\nc = { mbit = 1 }\n'
        '[service]\nname = "x"\n[workload]\nrate = 1\n[[migration]]\nto = "b"\n'
    )
    with pytest.raises(ms2m.ConfigurationError, match="missing from"):
        load(bad)
    with pytest.raises(ms2m.ConfigurationError, match="does not use"):
        Grid(strategies=("ms2m",), rates=(1.0,), links={"cloud": link}).validate()


def test_direct_transfers_and_links_between_hosts_are_configured_everywhere(tmp_path):
    from ms2m.cli import main
    from ms2m.links import parse_pair_links
    from ms2m.sweeps import Grid
    from ms2m.testbed_file import _grid, load

    assert parse_pair_links(["edge-1,edge-2=100mbit,2ms"]) == {
        "edge-1<->edge-2": ms2m.Link(mbit=100, delay_ms=2)
    }
    with pytest.raises(ms2m.ConfigurationError, match="A,B=SPEC"):
        parse_pair_links(["edge-1=100mbit"])
    tb = ms2m.Testbed(host_links={("edge-1", "cloud"): ms2m.Link(up_mbit=5, delay_ms=3)})
    [hl] = tb.config["host_links"]
    assert hl["between"] == ["edge-1", "cloud"] and hl["link"]["up_mbit"] == 5
    with pytest.raises(ms2m.ConfigurationError, match="two host names"):
        ms2m.Testbed(host_links={"edge-1": ms2m.Link()})  # type: ignore[dict-item]
    # The engine refuses what cannot be: unknown hosts, a host linked to itself.
    for pair, match in [
        (("edge-1", "mars"), "not one of the testbed's hosts"),
        (("a", "a"), "to itself"),
    ]:
        with pytest.raises(ms2m.ConfigurationError, match=match):
            ms2m.Testbed(
                hosts=["a", "edge-1"], host_links={pair: ms2m.Link()}, runtime="local"
            ).start()
    with pytest.raises(ms2m.ConfigurationError, match="transfer must be one of"):
        ms2m.Testbed().migrate("x", to="edge-2", transfer="rsync")  # type: ignore[arg-type]
    grid = Grid(strategies=("ms2m",), rates=(1.0,), transfer=("broker", "direct"))
    grid.validate()
    names = [grid.report_name(r) for r in grid.runs()]
    assert names == ["ms2m-r1-broker-1.json", "ms2m-r1-direct-1.json"]
    with pytest.raises(ms2m.ConfigurationError, match="transfer needs"):
        Grid(strategies=("ms2m",), rates=(1.0,), transfer=("rsync",)).validate()
    toml = tmp_path / "pair.toml"
    toml.write_text(
        '[testbed]\nhosts = ["edge-1", "edge-2"]\n'
        '[[testbed.host_links]]\nbetween = ["edge-1", "edge-2"]\nmbit = 100\ndelay_ms = 2\n'
        '[service]\nname = "x"\n[workload]\nrate = 1\n'
        '[sweep]\nstrategies = ["ms2m"]\ntransfer = ["direct"]\n'
    )
    sweep = _grid(toml, load(toml))
    assert sweep.transfer == ("direct",)
    assert sweep.host_links == {"edge-1<->edge-2": ms2m.Link(mbit=100, delay_ms=2)}
    toml.write_text(toml.read_text().replace('between = ["edge-1", "edge-2"]\n', ""))
    with pytest.raises(ms2m.ConfigurationError, match="needs between"):
        load(toml)
    with pytest.raises(SystemExit):
        main(["compare", "--transfer", "rsync"])


def test_a_bad_link_is_refused_before_anything_starts():
    from ms2m.experiment import Comparison

    with pytest.raises(ms2m.ConfigurationError, match="prefetch must be"):
        Comparison(prefetch=0, links={"edge-1": ms2m.Link(mbit=20)}).validate()
    for link, match in [
        (ms2m.Link(mbit=0), "up_mbit must be at least"),
        (ms2m.Link(delay_ms=-1), "delay_ms must be between"),
    ]:
        with pytest.raises(ms2m.ConfigurationError, match=match):
            ms2m.Testbed(hosts={"edge-1": link}, runtime="local").start()


def test_a_command_is_a_list_not_a_string(tmp_path):
    from ms2m.testbed_file import load

    toml = tmp_path / "own.toml"
    toml.write_text(
        '[service]\nname = "mine"\nimage = "my/service:1"\ncommand = ["/bin/my-service"]\n'
        'env = { LOG = "debug" }\n[workload]\nrate = 1\n[[migration]]\nto = "edge-2"\n'
    )
    assert load(toml)["service"]["env"] == {"LOG": "debug"}
    with pytest.raises(ms2m.ConfigurationError, match="list of program and arguments"):
        ms2m.Testbed().deploy("x", host="edge-1", command="ms2m-service --live")  # type: ignore[arg-type]


def test_until_ci_repeats_only_the_cells_whose_interval_is_still_wide(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ms2m import sweeps

    grid = sweeps.Grid(
        strategies=("ms2m", "stop_and_copy"),
        rates=(10.0,),
        repetitions=6,
        until_ci=0.05,
        max_repetitions=8,
    )
    tight = [10.0, 10.1, 9.9, 10.0, 10.05, 9.95]
    wide = [100.0, 150.0, 80.0, 200.0, 120.0, 90.0, 300.0, 60.0]

    def load(path):
        strategy, rep = Path(path).name[: -len(".json")].split("-r10-")
        series = tight if strategy == "ms2m" else wide
        return SimpleNamespace(downtime_ms=series[int(rep) - 1])

    monkeypatch.setattr(sweeps.Report, "load", staticmethod(load))
    runs = list(grid.runs())
    more = grid.more_runs(tmp_path, runs)
    assert [(r["strategy"], r["repetition"]) for r in more] == [("stop_and_copy", 7)]
    at_cap = runs + more + [{**more[0], "repetition": 8}]
    assert grid.more_runs(tmp_path, at_cap) == []
    cell = [load(tmp_path / grid.report_name(r)) for r in at_cap if r["strategy"] != "ms2m"]
    assert sweeps.cell_status(cell, 0.05, 8)["capped"]
    ms2m_cell = [load(tmp_path / grid.report_name(r)) for r in runs if r["strategy"] == "ms2m"]
    assert not sweeps.cell_status(ms2m_cell, 0.05, 8)["capped"]
    assert sweeps.Grid(strategies=("ms2m",), rates=(1.0,)).more_runs(tmp_path, runs[:1]) == []
    for bad in ({"until_ci": 5.0}, {"until_ci": 0.05, "max_repetitions": 3}):
        with pytest.raises(ms2m.ConfigurationError, match=r"until_ci|max_repetitions"):
            sweeps.Grid(strategies=("ms2m",), rates=(1.0,), **bad).validate()


def test_plots_draw_distributions_and_intervals():
    pd = pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from ms2m import plot

    df = pd.DataFrame(
        {
            "strategy": ["ms2m"] * 8 + ["stop_and_copy"] * 8,
            "rate": [10.0] * 16,
            "downtime_ms": [5.0 + i for i in range(8)] + [300.0 + 10 * i for i in range(8)],
        }
    )
    for kind in ("box", "violin", "cdf"):
        ax = plot.distribution(df, kind=kind)
        assert ax.get_title(), kind
    ax = plot.downtime_vs_rate(df)
    assert "95% CI" in ax.get_title()
    with pytest.raises(ValueError, match="kind"):
        plot.distribution(df, kind="pie")
