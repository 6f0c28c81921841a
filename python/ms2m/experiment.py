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

from . import _native
from .defaults import MIGRATION_DEFAULTS
from .links import Link
from .report import Report
from .report_types import Transfer
from .sweeps import Grid, run_grid


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
    warmup_s: float = 2.0
    settle_s: float = MIGRATION_DEFAULTS["settle_s"]
    runtime: str = "auto"
    #: Links of edge-1 and edge-2 to the broker's host (see :class:`~ms2m.Link`).
    links: dict[str, Link] = field(default_factory=dict)
    #: How the checkpoint travels: "broker" or "direct" (host to host).
    transfer: Transfer = "broker"
    #: Links between two hosts by name (``edge-1<->edge-2``), for direct transfers.
    host_links: dict[str, Link] = field(default_factory=dict)

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
    )
    if out_dir is not None:
        return run_grid(grid, out_dir, progress=progress, amqp_url=amqp_url)
    with tempfile.TemporaryDirectory(prefix="ms2m-compare-") as tmp:
        return run_grid(grid, tmp, progress=progress, amqp_url=amqp_url)


def summarize(reports: Sequence[Report]) -> list[dict[str, Any]]:
    """Per strategy: runs, downtime median and max, control-plane downtime, total time, and
    the invariant counts summed over runs."""
    rows = []
    for strategy in dict.fromkeys(r.strategy for r in reports):
        rs = [r for r in reports if r.strategy == strategy]
        down = [r.downtime_ms for r in rs]
        cp = [r.control_plane_downtime_ms or 0.0 for r in rs]
        rows.append(
            {
                "strategy": strategy,
                "runs": len(rs),
                "downtime_median_ms": statistics.median(down),
                "downtime_max_ms": max(down),
                "baseline_median_ms": statistics.median(r.baseline_downtime_ms for r in rs),
                "control_plane_median_ms": statistics.median(cp),
                "total_median_ms": statistics.median(r.total_ms for r in rs),
                "lost": sum(r.lost for r in rs),
                "duplicated": sum(r.duplicated for r in rs),
                "reordered": sum(r.reordered for r in rs),
                "state_consistent": f"{sum(bool(r.state_consistent) for r in rs)}/{len(rs)}",
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`summarize`'s rows."""
    header = (
        f"{'strategy':<14} {'runs':>4} {'downtime ms':>22} {'baseline':>9} "
        f"{'ctl-plane':>10} {'total ms':>9} {'lost':>5} {'dup':>4} {'reord':>5} {'state ok':>8}"
    )
    lines = [header, " " * 19 + f"{'median / max':>22}", "-" * len(header)]
    for r in rows:
        down = f"{r['downtime_median_ms']:.3f} / {r['downtime_max_ms']:.3f}"
        lines.append(
            f"{r['strategy']:<14} {r['runs']:>4} {down:>22} {r['baseline_median_ms']:>9.3f} "
            f"{r['control_plane_median_ms']:>10.3f} {r['total_median_ms']:>9.1f} "
            f"{r['lost']:>5} {r['duplicated']:>4} {r['reordered']:>5} {r['state_consistent']:>8}"
        )
    return "\n".join(lines)


def describe(params: Comparison) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(params).items())
