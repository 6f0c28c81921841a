"""The papers' evaluation matrix (a :mod:`ms2m.sweeps` grid) and its summary table.

python -m ms2m matrix --out results/matrix --repetitions 5
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from . import stats
from .experiment import configurations, footnotes, median_with_ci, runs_cell
from .report import Report
from .sweeps import Grid, cell_status

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


def table(
    reports: Sequence[Report], until_ci: float | None = None, max_repetitions: int = 30
) -> list[dict[str, Any]]:
    """Per (strategy, rate): runs, downtime median with its 95% confidence interval and max,
    total time median, the downtime's ratio to stop_and_copy's at the same rate with its
    interval and a Mann-Whitney p-value, runs that lost or duplicated anything, aborted runs
    (:mod:`ms2m.stats` says how); with ``until_ci``, whether the cell stopped at
    ``max_repetitions`` with its interval still wider (``capped``)."""
    by: dict[tuple[str, float], list[Report]] = {}
    for r in reports:
        rate = r.rate or 0.0
        by.setdefault((r.strategy, rate), []).append(r)
    cold = {
        rate: [x.downtime_ms for x in rs] for (s, rate), rs in by.items() if s == "stop_and_copy"
    }
    # A sweep over states or links is not one experiment repeated.
    mixed = configurations(reports) > 1
    rows = []
    for (strategy, rate), rs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        down = [x.downtime_ms for x in rs]
        ci = None if mixed else stats.median_ci(down)
        ref = cold.get(rate) if strategy != "stop_and_copy" and not mixed else None
        ratio = stats.ratio_of_medians(down, ref) if ref else None
        test = stats.mann_whitney(down, ref) if ref else None
        rows.append(
            {
                "strategy": strategy,
                "rate": rate,
                "runs": len(rs),
                "mixed": mixed,
                "capped": cell_status(rs, until_ci, max_repetitions)["capped"],
                "downtime_median_ms": statistics.median(down),
                "downtime_ci_lo_ms": None if ci is None else ci["lo"],
                "downtime_ci_hi_ms": None if ci is None else ci["hi"],
                "downtime_max_ms": max(down),
                "total_median_ms": statistics.median(x.total_ms for x in rs),
                "ratio_to_stop_and_copy": None if ratio is None else ratio["ratio"],
                "ratio_ci_lo": None if ratio is None else ratio["lo"],
                "ratio_ci_hi": None if ratio is None else ratio["hi"],
                "p_value": None if test is None else test["p"],
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
    """Markdown table of :func:`table`'s rows: medians with their 95% confidence intervals
    (none under 6 runs), ratios to stop_and_copy with theirs and a Mann-Whitney p-value."""
    lines = [
        "| rate | strategy | runs | downtime median ms [95% CI] | max | total median ms | "
        "ratio to stop_and_copy [95% CI] | p | lost/dup runs | aborted | cutoff fired |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        down = median_with_ci(
            r["downtime_median_ms"], r["downtime_ci_lo_ms"], r["downtime_ci_hi_ms"]
        )
        ratio, p = "", ""
        if r["ratio_to_stop_and_copy"] is not None:
            ratio = median_with_ci(
                r["ratio_to_stop_and_copy"], r["ratio_ci_lo"], r["ratio_ci_hi"], 4
            )
            p = f"{r['p_value']:.2g}"
        lines.append(
            f"| {r['rate']:g} | {r['strategy']} | {runs_cell(r)} | {down} | "
            f"{r['downtime_max_ms']:.3f} | {r['total_median_ms']:.1f} | {ratio} | {p} | "
            f"{r['runs_with_loss_or_dup']} | {r['aborted']} | {r['cutoff_fired']} |"
        )
    notes = footnotes(rows)
    if notes:
        lines.append("")
        lines += [n.replace("*", "\\*", 1) for n in notes]
    return "\n".join(lines)
