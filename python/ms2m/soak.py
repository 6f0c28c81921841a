"""A soak: a long chain of migrations of one service across hosts, strategies and rates drawn
from a seed, with faults injected at a given rate, checking after every one that nothing was
lost or duplicated and that the state is right, and at the end that nothing was left behind and
that the harness did not grow.

    python -m ms2m soak --migrations 1000 --seed 7 --out results/soak-7

Resumable: the folder holds the plan's parameters and one row per migration done
(``soak.jsonl``); running the same command again goes on from the next migration (the plan is a
function of the seed, so the rest is what it would have been). A fault kills the migration's
source or target (``kills``) as one of its strategy's phases begins, both drawn from the seed,
or restarts the broker (``kills`` naming ``broker``; the service is then deployed durable);
each outcome is one of the README's fault table: completed, rolled back, taken over by the
target, or restarted empty in place of a source that died with its state. What a dead source
costs by design (the messages a taking-over target held ahead of it, the one output it may have
sent twice) is counted apart from what nothing explains, which must stay 0.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import _native
from .report import Report
from .sweeps import _Progress, _write_atomically
from .testbed import Fault, Testbed


@dataclass(frozen=True)
class SoakPlan:
    """What a soak draws its migrations from."""

    migrations: int
    seed: int = 0
    fault_rate: float = 0.1
    strategies: tuple[str, ...] = ()
    rates: tuple[float, ...] = (5.0, 10.0, 20.0)
    hosts: tuple[str, ...] = ("edge-1", "edge-2", "cloud")
    processing_ms: float = 20.0
    state_bytes: int = 1 << 20
    runtime: str = "auto"
    settle_between_s: float = 0.5
    phases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kills: tuple[str, ...] = ("target", "source")

    def steps(self) -> list[dict[str, Any]]:
        """Every migration of the soak, in order: a function of the parameters alone."""
        rng = random.Random(self.seed)
        host, steps = self.hosts[0], []
        for i in range(self.migrations):
            to = rng.choice([h for h in self.hosts if h != host])
            strategy = rng.choice(self.strategies)
            step: dict[str, Any] = {
                "index": i,
                "from": host,
                "to": to,
                "strategy": strategy,
                "rate": rng.choice(self.rates),
                "fault": None,
            }
            if rng.random() < self.fault_rate:
                step["fault"] = {
                    "kill": rng.choice(self.kills),
                    "at_phase": rng.choice(self.phases[strategy]),
                }
            steps.append(step)
            host = to if step["fault"] is None else host
        return steps


def _harness() -> dict[str, float]:
    """This process's resident memory (MiB) and open files."""
    rss = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return {"rss_mib": round(rss, 1), "open_files": len(os.listdir("/proc/self/fd"))}


def _check_folder(out: Path, plan: SoakPlan) -> list[dict[str, Any]]:
    spec, rows = out / "soak.json", out / "soak.jsonl"
    # The number of migrations may grow: the plan's first steps do not depend on it.
    mine = json.dumps({**asdict(plan), "migrations": None}, sort_keys=True)
    if spec.exists():
        held = {**json.loads(spec.read_text()), "migrations": None}
        if json.dumps(held, sort_keys=True) != mine:
            raise _native.ConfigurationError(
                f"{out} holds a soak with other parameters ({spec}); resume it with the same "
                "parameters or choose another folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomically(spec, json.dumps(asdict(plan), indent=2, sort_keys=True))
    if not rows.exists():
        return []
    return [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]


def _outcome(report: Report) -> str:
    """Which row of the README's fault table the migration ended in."""
    m = report.migration
    if m.get("takeover"):
        return "taken_over"
    if m.get("restarted"):
        return "restarted"
    return "completed" if report.status == "completed" else "rolled_back"


def _status(row: dict[str, Any]) -> str:
    """A migration's outcome for the progress line, from its own counts: a report's verdict
    covers the service's whole history, so one dead source's explained cost would mark every
    later migration invalid."""
    exact = not (row["lost"] or row["duplicated"] or row["reordered"] or row["leftovers"])
    exact = exact and row["state_consistent"] is not False
    status = row["outcome"].replace("_", " ") if exact else "INVALID"
    if row["lost_by_dead_source"] or row["duplicated_by_dead_source"]:
        status += (
            f" ({row['lost_by_dead_source']} lost, {row['duplicated_by_dead_source']} "
            "duplicated by the dead source, by design)"
        )
    return status


def _row(step: dict[str, Any], report: Report, before: dict[str, int]) -> dict[str, Any]:
    """The migration's row; ``before``: the service's totals so far (a verdict covers the whole
    history), updated to include this one."""
    v = report.verdict
    totals = {
        "lost": report.lost,
        "duplicated": report.duplicated,
        "reordered": v["reordered"]["count"],
    }
    # Differences, not clamped: a message counted lost once and processed later counts -1, so
    # the rows add up to the service's totals.
    new = {k: totals[k] - before.get(k, 0) for k in totals}
    before.update(totals)
    outcome = _outcome(report)
    takeover = report.migration.get("takeover") or {}
    # What a dead source costs by design (README, "Faults and their outcomes"): the messages a
    # taking-over target held ahead of it, and the one output it may have sent before dying.
    # A completed or rolled-back migration is exact: nothing is forgiven there.
    lost_by_design = max(0, min(new["lost"], takeover.get("replayed_ahead", 0)))
    dies = outcome in ("taken_over", "restarted")
    dup_by_design = max(0, min(new["duplicated"], 1 if dies else 0))
    return {
        **step,
        "status": report.status,
        "outcome": outcome,
        "downtime_ms": report.downtime_ms,
        "lost": new["lost"] - lost_by_design,
        "duplicated": new["duplicated"] - dup_by_design,
        "reordered": new["reordered"],
        "lost_by_dead_source": lost_by_design,
        "duplicated_by_dead_source": dup_by_design,
        "state_consistent": v["state"]["consistent"],
        "leftovers": len(report.leftovers),
    }


def soak(
    out: str | Path,
    *,
    migrations: int,
    seed: int = 0,
    fault_rate: float = 0.1,
    strategies: Sequence[str] | None = None,
    rates: Sequence[float] = (5.0, 10.0, 20.0),
    hosts: Sequence[str] = ("edge-1", "edge-2", "cloud"),
    processing_ms: float = 20.0,
    state_bytes: int = 1 << 20,
    runtime: str = "auto",
    kills: Sequence[str] = ("target", "source"),
    progress: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """Runs (or resumes) a soak into folder ``out`` and returns its summary (see the module)."""
    from . import STRATEGIES, STRATEGY_PHASES

    chosen = tuple(strategies or STRATEGIES)
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or migrations < 1 or not 0 <= fault_rate <= 1 or len(set(hosts)) < 2:
        raise _native.ConfigurationError(
            "a soak needs migrations >= 1, fault_rate in [0, 1], two hosts or more and known "
            f"strategies (unknown: {unknown}; known: {list(STRATEGIES)})"
        )
    bad_kills = [k for k in kills if k not in ("source", "target", "broker")]
    if bad_kills or not kills:
        raise _native.ConfigurationError(
            f"kills must name 'source', 'target' and/or 'broker', not {list(kills) or 'nothing'}"
        )
    phases = {s: tuple(STRATEGY_PHASES[s]) for s in chosen}
    plan = SoakPlan(
        migrations=migrations,
        seed=seed,
        fault_rate=fault_rate,
        strategies=chosen,
        rates=tuple(float(r) for r in rates),
        hosts=tuple(hosts),
        processing_ms=processing_ms,
        state_bytes=state_bytes,
        runtime=runtime,
        phases=phases,
        kills=tuple(kills),
    )
    folder = Path(out)
    done = _check_folder(folder, plan)
    steps = plan.steps()
    bar = _Progress(len(steps), len(done), progress)
    t0 = time.monotonic()
    with Testbed(runtime=runtime, hosts=list(hosts)) as tb:
        host = steps[0]["from"]
        if done:
            host = done[-1]["to"] if done[-1]["status"] == "completed" else done[-1]["from"]
        svc = tb.deploy(
            "soak",
            host=host,
            processing_ms=processing_ms,
            state_bytes=state_bytes,
            durable="broker" in kills,
        )
        rate = None
        # Measured with the testbed up and the service deployed, so that the end compares like
        # with like: what grew is what the migrations left.
        start = _harness()
        # The service is new in every session: its verdicts count from 0 again.
        totals: dict[str, int] = {}
        with (folder / "soak.jsonl").open("a") as rows:
            for step in steps[len(done) :]:
                if step["rate"] != rate:
                    if rate is not None:
                        tb.stop_workload(svc)
                    tb.start_workload(svc, rate=step["rate"])
                    rate = step["rate"]
                time.sleep(plan.settle_between_s)
                # The plan assumed every migration without a fault completes; where one did not,
                # the service is elsewhere: go on from where it is.
                here = tb.service(svc).host
                if step["from"] != here:
                    step = {**step, "from": here}
                    if step["to"] == here:
                        step["to"] = next(h for h in hosts if h != here)
                fault = Fault(**step["fault"]) if step["fault"] else None
                try:
                    report = tb.migrate(svc, to=step["to"], strategy=step["strategy"], fault=fault)
                except _native.MigrationFailed as e:
                    failed: Report | None = getattr(e, "report", None)
                    if failed is None:
                        raise
                    report = failed
                row = _row(step, report, totals)
                rows.write(json.dumps(row) + "\n")
                rows.flush()
                done.append(row)
                bar.update({**step, "repetition": step["index"]}, report, _status(row))
        end = _harness()
        tb.stop_workload(svc)
        queues = tb.broker_queues()
        left_queues = sorted(q for q in queues if not q.startswith("soak."))
        tb.remove(svc)
        left_after_remove = sorted(tb.broker_queues())
    bar.close()
    outcomes = [r["outcome"] for r in done]
    summary = {
        "migrations": len(done),
        "completed": outcomes.count("completed"),
        "rolled_back": outcomes.count("rolled_back"),
        "taken_over": outcomes.count("taken_over"),
        "restarted": outcomes.count("restarted"),
        "faults": sum(r["fault"] is not None for r in done),
        "lost": sum(r["lost"] for r in done),
        "duplicated": sum(r["duplicated"] for r in done),
        "reordered": sum(r["reordered"] for r in done),
        "lost_by_dead_source": sum(r["lost_by_dead_source"] for r in done),
        "duplicated_by_dead_source": sum(r["duplicated_by_dead_source"] for r in done),
        "state_mismatches": sum(r["state_consistent"] is False for r in done),
        "leftovers_per_migration": sum(r["leftovers"] for r in done),
        "leftover_queues": left_queues + left_after_remove,
        "harness_start": start,
        "harness_end": end,
        "seconds": round(time.monotonic() - t0, 1),
    }
    _write_atomically(folder / "summary.json", json.dumps(summary, indent=2))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    rows = [
        ("migrations", s["migrations"]),
        ("faults injected", s["faults"]),
        ("completed", s["completed"]),
        ("rolled back", s["rolled_back"]),
        ("taken over (source died)", s["taken_over"]),
        ("restarted (source died with its state)", s["restarted"]),
        ("lost", s["lost"]),
        ("duplicated", s["duplicated"]),
        ("reordered", s["reordered"]),
        ("state mismatches", s["state_mismatches"]),
        (
            "counted cost of dead sources (lost / dup)",
            f"{s['lost_by_dead_source']} / {s['duplicated_by_dead_source']}",
        ),
        ("leftovers (per migration)", s["leftovers_per_migration"]),
        ("leftover queues at the end", len(s["leftover_queues"])),
        (
            "harness RSS MiB start -> end",
            f"{s['harness_start']['rss_mib']} -> {s['harness_end']['rss_mib']}",
        ),
        (
            "harness open files start -> end",
            f"{s['harness_start']['open_files']} -> {s['harness_end']['open_files']}",
        ),
        ("wall time s (this session)", s["seconds"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
