"""The soak: a seeded chain of migrations with faults, resumable, with its summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ms2m
from ms2m.soak import SoakPlan, soak


def test_the_plan_is_a_function_of_the_seed_and_grows_by_appending() -> None:
    phases = {s: ("checkpoint", "restore") for s in ms2m.STRATEGIES}
    plan = SoakPlan(
        migrations=20, seed=5, fault_rate=0.3, strategies=ms2m.STRATEGIES, phases=phases
    )
    again = SoakPlan(
        migrations=30, seed=5, fault_rate=0.3, strategies=ms2m.STRATEGIES, phases=phases
    )
    assert plan.steps() == again.steps()[:20]
    assert plan.steps() != SoakPlan(**{**plan.__dict__, "seed": 6}).steps()
    assert all(s["to"] != s["from"] for s in again.steps())
    faults = [s["fault"] for s in again.steps() if s["fault"]]
    assert faults and all(f["at_phase"] in ("checkpoint", "restore") for f in faults)
    assert {f["kill"] for f in faults} == {"source", "target"}


def test_bad_parameters_and_a_foreign_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ms2m.ConfigurationError, match="migrations >= 1"):
        soak(tmp_path / "a", migrations=0)
    with pytest.raises(ms2m.ConfigurationError, match="unknown"):
        soak(tmp_path / "a", migrations=1, strategies=["teleport"])
    with pytest.raises(ms2m.ConfigurationError, match="kills"):
        soak(tmp_path / "a", migrations=1, kills=["network"])
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "soak.json").write_text(json.dumps({"seed": 99}))
    with pytest.raises(ms2m.ConfigurationError, match="other parameters"):
        soak(folder, migrations=1, seed=1)


@pytest.mark.docker
def test_a_short_soak_keeps_every_guarantee_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    # Seed 3 draws a fault among the first three migrations.
    first = soak(out, migrations=3, seed=3, fault_rate=0.34, runtime="docker", progress=None)
    assert (first["migrations"], first["faults"] >= 1) == (3, True), first
    counts = ("lost", "duplicated", "reordered", "state_mismatches")
    assert [first[k] for k in counts] == [0, 0, 0, 0], first
    outcomes = ("completed", "rolled_back", "taken_over", "restarted")
    assert sum(first[k] for k in outcomes) == 3
    assert first["leftover_queues"] == [] and first["leftovers_per_migration"] == 0
    rows = (out / "soak.jsonl").read_text().splitlines()
    more = soak(out, migrations=4, seed=3, fault_rate=0.34, runtime="docker", progress=None)
    assert more["migrations"] == 4
    assert (out / "soak.jsonl").read_text().splitlines()[:3] == rows
