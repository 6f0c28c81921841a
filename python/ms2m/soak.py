"""A soak: a long chain of migrations of one service across hosts, strategies and rates drawn
from a seed, with faults injected at a given rate, checking after every one that nothing was
lost or duplicated and that the state is right, and at the end that nothing was left behind and
that the harness did not grow.

    python -m ms2m soak --migrations 1000 --seed 7 --out results/soak-7

Resumable: the folder holds the plan's parameters and one row per migration done
(``soak.jsonl``); running the same command again goes on from the next migration (the plan is a
function of the seed, so the rest is what it would have been). Faults kill the migration's
*target* in its transfer, restore or replay phase (drawn from the seed; where it exists and has
not taken over yet): the migration must roll back with the source serving and every message
accounted for. (Killing a source loses what it was
processing, by design; the fault table's tests cover it.)
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
                step["fault"] = rng.choice(self.phases[strategy])
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


def _row(step: dict[str, Any], report: Report) -> dict[str, Any]:
    state = report.verdict["state"]
    return {
        **step,
        "status": report.status,
        "downtime_ms": report.downtime_ms,
        "lost": report.lost,
        "duplicated": report.duplicated,
        "state_consistent": state["consistent"],
        "valid": report.valid,
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
    # Where killing the target must roll back: it exists and has not taken over yet.
    phases = {
        s: tuple(p for p in STRATEGY_PHASES[s] if p in ("transfer", "restore", "replay"))
        for s in chosen
    }
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
        svc = tb.deploy("soak", host=host, processing_ms=processing_ms, state_bytes=state_bytes)
        rate = None
        # Measured with the testbed up and the service deployed, so that the end compares like
        # with like: what grew is what the migrations left.
        start = _harness()
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
                fault = Fault(kill="target", at_phase=step["fault"]) if step["fault"] else None
                try:
                    report = tb.migrate(svc, to=step["to"], strategy=step["strategy"], fault=fault)
                except _native.MigrationFailed as e:
                    failed: Report | None = getattr(e, "report", None)
                    if failed is None:
                        raise
                    report = failed
                row = _row(step, report)
                rows.write(json.dumps(row) + "\n")
                rows.flush()
                done.append(row)
                bar.update({**step, "repetition": step["index"]}, report)
        end = _harness()
        tb.stop_workload(svc)
        queues = tb.broker_queues()
        left_queues = sorted(q for q in queues if not q.startswith("soak."))
        tb.remove(svc)
        left_after_remove = sorted(tb.broker_queues())
    bar.close()
    summary = {
        "migrations": len(done),
        "completed": sum(r["status"] == "completed" for r in done),
        "rolled_back": sum(r["status"] != "completed" for r in done),
        "faults": sum(r["fault"] is not None for r in done),
        "lost": sum(r["lost"] for r in done),
        "duplicated": sum(r["duplicated"] for r in done),
        "state_mismatches": sum(r["state_consistent"] is False for r in done),
        "invalid": sum(not r["valid"] for r in done),
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
        ("completed", s["completed"]),
        ("rolled back", f"{s['rolled_back']} ({s['faults']} faults injected)"),
        ("lost", s["lost"]),
        ("duplicated", s["duplicated"]),
        ("state mismatches", s["state_mismatches"]),
        ("invalid verdicts", s["invalid"]),
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
