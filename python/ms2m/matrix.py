"""The papers' evaluation matrix: strategies x rates x repetitions on one reused broker.

Every run deploys a fresh service on edge-1, warms it up under an open-loop workload, migrates
it to edge-2, removes it, and checks that the broker holds no queue any more before the next
run. Each report is written to the output folder as soon as its run ends, so an interrupted
matrix resumes where it stopped: runs whose report exists are not run again.

    python -m ms2m matrix --out results/matrix --repetitions 5
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import _native
from .report import Report
from .testbed import Testbed

PAPER_RATES = (1.0, 4.0, 7.0, 10.0, 13.0, 16.0, 19.0)
"""Message rates of the 2025 follow-up paper (capacity 20 msg/s at 50 ms per message)."""


@dataclass(frozen=True)
class Matrix:
    """Parameters of an evaluation matrix; stored as ``matrix.json`` in its folder."""

    strategies: tuple[str, ...] = ("stop_and_copy", "ms2m", "ms2m_cutoff", "ms2m_sequential")
    rates: tuple[float, ...] = PAPER_RATES
    repetitions: int = 5
    processing_ms: float = 50.0
    state_bytes: int = 1_000_000
    message_bytes: int = 64
    warmup_s: float = 2.0
    settle_s: float = 1.0
    replay_timeout_s: float = 60.0
    replay_max_s: float = 2.0
    hosts: tuple[str, str] = field(default=("edge-1", "edge-2"))

    def validate(self) -> None:
        known = set(_native.strategies())
        bad = [s for s in self.strategies if s not in known]
        if bad:
            raise _native.ConfigurationError(
                f"unknown strategies {bad}; choose from {sorted(known)}"
            )
        if self.repetitions < 1:
            raise _native.ConfigurationError("repetitions must be at least 1")
        if not self.rates or any(not r >= 0 for r in self.rates):
            raise _native.ConfigurationError(f"rates must be >= 0, got {self.rates}")

    def runs(self) -> list[tuple[int, float, str]]:
        """(repetition, rate, strategy), repetition-major so that a partial matrix is balanced."""
        return [
            (rep, rate, s)
            for rep in range(1, self.repetitions + 1)
            for rate in self.rates
            for s in self.strategies
        ]


def report_name(rep: int, rate: float, strategy: str) -> str:
    return f"{strategy}-r{rate:g}-{rep}.json"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_folder(out: Path, m: Matrix) -> None:
    spec = out / "matrix.json"
    mine = json.dumps(asdict(m), indent=2, sort_keys=True)
    if spec.exists():
        theirs = json.dumps(json.loads(spec.read_text()), indent=2, sort_keys=True)
        if theirs != mine:
            raise _native.ConfigurationError(
                f"{out} holds a matrix with other parameters ({spec}); resume it with the same "
                "parameters or choose another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomically(spec, mine)


def run_matrix(
    m: Matrix, out_dir: str | Path, *, progress: TextIO | None = sys.stderr
) -> list[Report]:
    """Runs (or resumes) the matrix; returns every report, old and new."""
    m.validate()
    out = Path(out_dir)
    _check_folder(out, m)
    todo = [r for r in m.runs() if not (out / report_name(*r)).exists()]
    total, done = len(m.runs()), len(m.runs()) - len(todo)
    if progress is not None and done:
        print(f"resuming: {done} of {total} runs already in {out}", file=progress)
    started = time.monotonic()
    if todo:
        with Testbed(hosts=m.hosts) as tb:
            for i, (rep, rate, strategy) in enumerate(todo, 1):
                report = _one_run(tb, m, rep, rate, strategy)
                _write_atomically(out / report_name(rep, rate, strategy), report.to_json())
                left = tb.broker_queues()
                if left:
                    raise _native.Ms2mError(
                        f"the broker is not clean after run {report.run_id}: {left}"
                    )
                if progress is not None:
                    elapsed = time.monotonic() - started
                    eta = elapsed / i * (len(todo) - i)
                    status = report.to_dict()["migration"]["status"]
                    print(
                        f"[{done + i}/{total}] {strategy:<16} {rate:>5g} msg/s rep {rep}: "
                        f"{status:<9} downtime {report.downtime_ms:9.3f} ms  "
                        f"total {report.total_ms:9.1f} ms  lost {report.lost} "
                        f"dup {report.duplicated}  ({elapsed:.0f} s, ~{eta:.0f} s left)",
                        file=progress,
                        flush=True,
                    )
    return [Report.load(out / report_name(*r)) for r in m.runs()]


def _one_run(tb: Testbed, m: Matrix, rep: int, rate: float, strategy: str) -> Report:
    name = f"mx-{strategy.replace('_', '-')}-{rate:g}-{rep}".replace(".", "p")
    svc = tb.deploy(name, host=m.hosts[0], processing_ms=m.processing_ms, state_bytes=m.state_bytes)
    try:
        with tb.workload(svc, rate=rate, message_bytes=m.message_bytes):
            time.sleep(m.warmup_s)
            try:
                return tb.migrate(
                    svc,
                    to=m.hosts[1],
                    strategy=strategy,
                    settle_s=m.settle_s,
                    replay_timeout_s=m.replay_timeout_s,
                    replay_max_s=m.replay_max_s,
                )
            except _native.MigrationFailed as e:
                report = getattr(e, "report", None)
                if report is None:
                    raise
                return report
    finally:
        tb.remove(svc)


def table(reports: Sequence[Report]) -> list[dict[str, Any]]:
    """Per (strategy, rate): medians of downtime and total time, ms2m / stop_and_copy ratio,
    runs that lost or duplicated anything, aborted runs."""
    by: dict[tuple[str, float], list[Report]] = {}
    for r in reports:
        rate = r.rate or 0.0
        by.setdefault((r.strategy, rate), []).append(r)
    cold = {
        rate: statistics.median(x.downtime_ms for x in rs)
        for (s, rate), rs in by.items()
        if s == "stop_and_copy"
    }
    rows = []
    for (strategy, rate), rs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        down = statistics.median(x.downtime_ms for x in rs)
        rows.append(
            {
                "strategy": strategy,
                "rate": rate,
                "runs": len(rs),
                "downtime_median_ms": down,
                "total_median_ms": statistics.median(x.total_ms for x in rs),
                "ratio_to_stop_and_copy": down / cold[rate] if cold.get(rate) else None,
                "runs_with_loss_or_dup": sum(1 for x in rs if x.lost or x.duplicated),
                "aborted": sum(1 for x in rs if x.to_dict()["migration"]["status"] != "completed"),
                "cutoff_fired": sum(
                    1 for x in rs if (x.to_dict()["migration"].get("cutoff") or {}).get("fired")
                ),
            }
        )
    return rows


def format_matrix(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`table`'s rows."""
    lines = [
        "| rate | strategy | runs | downtime median ms | total median ms | "
        "ratio to stop_and_copy | lost/dup runs | aborted | cutoff fired |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "" if r["ratio_to_stop_and_copy"] is None else f"{r['ratio_to_stop_and_copy']:.4f}"
        lines.append(
            f"| {r['rate']:g} | {r['strategy']} | {r['runs']} | {r['downtime_median_ms']:.3f} | "
            f"{r['total_median_ms']:.1f} | {ratio} | {r['runs_with_loss_or_dup']} | "
            f"{r['aborted']} | {r['cutoff_fired']} |"
        )
    return "\n".join(lines)
