"""The main job: migrate the reference service with each strategy, several times, on one testbed,
and compare what each migration cost."""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import _native, stats
from .defaults import MIGRATION_DEFAULTS
from .links import Link
from .report import Report
from .report_types import Transfer
from .stats import MedianCi
from .sweeps import WARMUP_S, Grid, cell_status, run_grid


@dataclass(frozen=True)
class Comparison:
    """Parameters of :func:`compare_strategies`; every report carries them too."""

    strategies: tuple[str, ...] = ("ms2m", "stop_and_copy")
    runs: int = 5
    rate: float = 10.0
    processing_ms: float = 50.0
    state_bytes: int = 1_000_000
    #: Messages an instance keeps in flight; above 1 behind a link (each message otherwise
    #: waits two of its round trips).
    prefetch: int = 1
    message_bytes: int = 64
    #: Steady load before each migration, at least (see :func:`ms2m.sweeps.warmup_for`).
    warmup_s: float = WARMUP_S
    settle_s: float = MIGRATION_DEFAULTS["settle_s"]
    runtime: str = "auto"
    #: Links of edge-1 and edge-2 to the broker's host (see :class:`~ms2m.Link`).
    links: dict[str, Link] = field(default_factory=dict)
    #: How the checkpoint travels: "broker" or "direct" (host to host).
    transfer: Transfer = "broker"
    #: Links between two hosts by name (``edge-1<->edge-2``), for direct transfers.
    host_links: dict[str, Link] = field(default_factory=dict)
    #: Beyond ``runs``: repeat until each strategy's median downtime has its 95% confidence
    #: interval within this fraction of it (None: ``runs`` only), at most ``max_runs``.
    until_ci: float | None = None
    max_runs: int = 30

    def validate(self) -> None:
        known = set(_native.strategies())
        for s in self.strategies:
            if s not in known:
                raise _native.ConfigurationError(
                    f"unknown strategy {s!r}; choose from {sorted(known)}"
                )
        if self.runs < 1:
            raise _native.ConfigurationError(f"runs must be at least 1, got {self.runs}")
        if not self.rate >= 0:
            raise _native.ConfigurationError(f"rate must be >= 0, got {self.rate}")
        if not 1 <= self.prefetch <= 65535:
            raise _native.ConfigurationError(f"prefetch must be 1..65535, got {self.prefetch}")
        if not self.warmup_s >= 0 or not self.settle_s >= 0:
            raise _native.ConfigurationError("warmup_s and settle_s must be >= 0")


def compare_strategies(
    params: Comparison = Comparison(),
    *,
    out_dir: str | Path | None = None,
    progress: TextIO | None = sys.stderr,
    amqp_url: str | None = None,
) -> list[Report]:
    """Runs ``params.runs`` migrations per strategy, interleaved, each of a freshly deployed
    service from edge-1 to edge-2 under the same open-loop workload, on one broker; returns
    the reports. With ``out_dir`` each report is written there as soon as it is done, and an
    interrupted comparison resumes."""
    params.validate()
    grid = Grid(
        strategies=params.strategies,
        rates=(params.rate,),
        repetitions=params.runs,
        processing_ms=(params.processing_ms,),
        state_bytes=(params.state_bytes,),
        prefetch=(params.prefetch,),
        message_bytes=(params.message_bytes,),
        warmup_s=params.warmup_s,
        settle_s=params.settle_s,
        runtime=params.runtime,
        links=dict(params.links),
        transfer=(params.transfer,),
        host_links=dict(params.host_links),
        until_ci=params.until_ci,
        max_repetitions=params.max_runs,
    )
    grid.validate()
    if out_dir is not None:
        return run_grid(grid, out_dir, progress=progress, amqp_url=amqp_url)
    with tempfile.TemporaryDirectory(prefix="ms2m-compare-") as tmp:
        return run_grid(grid, tmp, progress=progress, amqp_url=amqp_url)


_CONFIGURATION = (
    "processing_ms",
    "state_bytes",
    "transfer",
    "source_link_mbit",
    "source_link_delay_ms",
    "target_link_mbit",
    "target_link_delay_ms",
)


def configurations(reports: Sequence[Report]) -> int:
    """How many configurations (service, links, transfer; not strategy or rate) ``reports``
    span: an interval or a rank test over more than one would take different experiments
    for repetitions of one."""
    keys = set()
    for r in reports:
        row = r.summary()
        keys.add((*(row[k] for k in _CONFIGURATION), r.service.get("prefetch")))
    return len(keys)


MIXED = "medians over several configurations: no interval, ratio or p (see ms2m.stats.describe)"
"""What a ``~`` after a number of runs says."""


def _ci(ci: MedianCi | None) -> tuple[float | None, float | None]:
    return (None, None) if ci is None else (ci["lo"], ci["hi"])


def summarize(
    reports: Sequence[Report], until_ci: float | None = None, max_runs: int = 30
) -> list[dict[str, Any]]:
    """Per strategy: runs, downtime median with its 95% confidence interval and max, baseline,
    control-plane downtime, total time with its interval, the downtime's ratio to the reference
    strategy (stop_and_copy if present, else the first) with its interval and a Mann-Whitney
    p-value, and the invariant counts summed over runs (:mod:`ms2m.stats` says how). With
    ``until_ci``, ``capped`` says whether a strategy stopped at ``max_runs`` with its interval
    still wider."""
    strategies = list(dict.fromkeys(r.strategy for r in reports))
    ref = "stop_and_copy" if "stop_and_copy" in strategies else strategies[0] if strategies else ""
    downtimes = {s: [r.downtime_ms for r in reports if r.strategy == s] for s in strategies}
    # A folder of a sweep over states or links is not one experiment repeated.
    mixed = configurations(reports) > 1
    rows = []
    for strategy in strategies:
        rs = [r for r in reports if r.strategy == strategy]
        down, ref_down = downtimes[strategy], downtimes[ref]
        ci = None if mixed else stats.median_ci(down)
        total = None if mixed else stats.median_ci([r.total_ms for r in rs])
        cp = [r.control_plane_downtime_ms or 0.0 for r in rs]
        versus = strategy != ref and not mixed
        ratio = stats.ratio_of_medians(down, ref_down) if versus else None
        test = stats.mann_whitney(down, ref_down) if versus else None
        rows.append(
            {
                "strategy": strategy,
                "runs": len(rs),
                "mixed": mixed,
                "capped": cell_status(rs, until_ci, max_runs)["capped"],
                "downtime_median_ms": statistics.median(down),
                "downtime_ci_lo_ms": _ci(ci)[0],
                "downtime_ci_hi_ms": _ci(ci)[1],
                "downtime_max_ms": max(down),
                "baseline_median_ms": statistics.median(r.baseline_downtime_ms for r in rs),
                "control_plane_median_ms": statistics.median(cp),
                "total_median_ms": statistics.median(r.total_ms for r in rs),
                "total_ci_lo_ms": _ci(total)[0],
                "total_ci_hi_ms": _ci(total)[1],
                "ratio_to": ref if versus else None,
                "downtime_ratio": None if ratio is None else ratio["ratio"],
                "downtime_ratio_ci_lo": None if ratio is None else ratio["lo"],
                "downtime_ratio_ci_hi": None if ratio is None else ratio["hi"],
                "p_value": None if test is None else test["p"],
                "lost": sum(r.lost for r in rs),
                "duplicated": sum(r.duplicated for r in rs),
                "reordered": sum(r.reordered for r in rs),
                "state_consistent": f"{sum(bool(r.state_consistent) for r in rs)}/{len(rs)}",
            }
        )
    return rows


CAPPED = "stopped at the cap on runs with the interval still wider than asked"
"""What a ``*`` after a number of runs says (``--until-ci``)."""


def runs_cell(row: dict[str, Any]) -> str:
    """A row's number of runs, marked ``*`` when it stopped at the cap (:data:`CAPPED`) and
    ``~`` when its runs span several configurations (:data:`MIXED`)."""
    mark = "~" if row.get("mixed") else "*" if row.get("capped") else ""
    return f"{row['runs']}{mark}"


def footnotes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What the marks of :func:`runs_cell` in ``rows`` say."""
    notes = [f"*: {CAPPED}"] if any(r.get("capped") for r in rows) else []
    return notes + ([f"~: {MIXED}"] if any(r.get("mixed") for r in rows) else [])


def median_with_ci(median: float, lo: float | None, hi: float | None, digits: int = 3) -> str:
    """``median [lo, hi]``, or the median alone when there is no interval (under 6 runs)."""
    if lo is None or hi is None:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize`'s rows: medians with their 95% confidence
    intervals (none under 6 runs), and each strategy's downtime against the reference's."""
    header = (
        f"{'strategy':<16} {'runs':>4} {'downtime ms median [95% CI]':>34} {'max':>9} "
        f"{'baseline':>9} {'ctl-plane':>10} {'total ms median [95% CI]':>30} "
        f"{'downtime ratio [95% CI], p':>32} {'lost':>5} {'dup':>4} {'reord':>5} "
        f"{'state ok':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        down = median_with_ci(
            r["downtime_median_ms"], r.get("downtime_ci_lo_ms"), r.get("downtime_ci_hi_ms")
        )
        total = median_with_ci(
            r["total_median_ms"], r.get("total_ci_lo_ms"), r.get("total_ci_hi_ms"), 1
        )
        versus = ""
        if r.get("downtime_ratio") is not None:
            ratio = median_with_ci(
                r["downtime_ratio"], r["downtime_ratio_ci_lo"], r["downtime_ratio_ci_hi"]
            )
            versus = f"{ratio}, p={r['p_value']:.2g}"
        lines.append(
            f"{r['strategy']:<16} {runs_cell(r):>4} {down:>34} {r['downtime_max_ms']:>9.3f} "
            f"{r['baseline_median_ms']:>9.3f} {r['control_plane_median_ms']:>10.3f} "
            f"{total:>30} {versus:>32} {r['lost']:>5} {r['duplicated']:>4} "
            f"{r['reordered']:>5} {r['state_consistent']:>8}"
        )
    lines += footnotes(rows)
    refs = {r["ratio_to"] for r in rows if r.get("ratio_to")}
    if refs:
        lines.append(
            f"ratio: downtime median over {', '.join(sorted(refs))}'s (bootstrap interval); "
            "p: two-sided Mann-Whitney U"
        )
    return "\n".join(lines)


def describe(params: Comparison) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(params).items())
