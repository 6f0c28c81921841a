"""The papers' evaluation matrix (a :mod:`ms2m.sweeps` grid) and its summary table.

python -m ms2m matrix --out results/matrix --repetitions 5
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .report import Report
from .sweeps import Grid

PAPER_STRATEGIES = ("stop_and_copy", "ms2m", "ms2m_cutoff", "ms2m_sequential")
PAPER_RATES = (1.0, 4.0, 7.0, 10.0, 13.0, 16.0, 19.0)
"""Message rates of the 2025 follow-up paper (capacity 20 msg/s at 50 ms per message)."""


def paper_grid(repetitions: int = 5, **overrides: Any) -> Grid:
    """The papers' matrix: four strategies, 50 ms per message, rates 1 to 19 msg/s."""
    params: dict[str, Any] = {
        "strategies": PAPER_STRATEGIES,
        "rates": PAPER_RATES,
        "repetitions": repetitions,
        "processing_ms": (50.0,),
    }
    params.update(overrides)
    return Grid(**params)


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
                "aborted": sum(1 for x in rs if not x.completed),
                "cutoff_fired": sum(1 for x in rs if _cutoff_fired(x)),
            }
        )
    return rows


def _cutoff_fired(report: Report) -> bool:
    cutoff = report.cutoff
    return cutoff is not None and cutoff["fired"]


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
