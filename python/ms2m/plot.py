"""Standard figures (matplotlib; ``pip install 'ms2m[analysis]'``).

- :func:`downtime_vs_rate`: a metric against the message rate, one line per strategy, median
  with its 95% confidence interval as error bars, the interquartile range shaded and min/max
  as whiskers.
- :func:`distribution`: a metric's distribution per group (box, violin or empirical CDF), every
  run drawn, each median with its 95% confidence interval.
- :func:`phase_breakdown`: median duration of every phase, stacked, one bar per strategy.
- :func:`latency_cdf`: distribution of end-to-end latency before, during and after a migration.
- :func:`timeline`: the per-message timeline of one migration, its phases and its downtime.

Every function takes an optional ``ax`` and returns the Axes it drew on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import stats
from .report import Report, to_dataframe

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("ms2m.plot needs matplotlib: pip install 'ms2m[analysis]'") from e
    return plt.subplots(figsize=(7, 4))[1]


def _frame(data: pd.DataFrame | Iterable[Report]) -> pd.DataFrame:
    import pandas as pd

    return data if isinstance(data, pd.DataFrame) else to_dataframe(list(data))


def downtime_vs_rate(
    data: pd.DataFrame | Iterable[Report],
    *,
    metric: str = "downtime_ms",
    ax: Axes | None = None,
    log: bool = True,
) -> Axes:
    """``metric`` (a column of :meth:`Report.summary`) against the rate, per strategy."""
    df = _frame(data)
    ax = _axes(ax)
    for strategy, g in df.groupby("strategy", sort=False):
        s = g.groupby("rate")[metric]
        q = s.quantile([0.0, 0.25, 0.5, 0.75, 1.0]).unstack()
        (line,) = ax.plot(q.index, q[0.5], marker="o", label=str(strategy))
        ax.fill_between(q.index, q[0.25], q[0.75], alpha=0.2, color=line.get_color())
        ax.vlines(q.index, q[0.0], q[1.0], color=line.get_color(), alpha=0.5, linewidth=1)
        _ci_bars(ax, s, line.get_color())
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("message rate (msg/s)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{metric.replace('_', ' ')}: median with 95% CI, IQR and range")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax


def _ci_bars(ax: Axes, groups: Any, color: str) -> None:
    """Error bars of each group's median: its 95% confidence interval (6 runs at least)."""
    for x, values in groups:
        ci = stats.median_ci(values.dropna().tolist())
        if ci is not None and ci["lo"] is not None and ci["hi"] is not None:
            err = [[ci["median"] - ci["lo"]], [ci["hi"] - ci["median"]]]
            ax.errorbar([x], [ci["median"]], yerr=err, color=color, capsize=4, linewidth=2)


def distribution(
    data: pd.DataFrame | Iterable[Report],
    *,
    metric: str = "downtime_ms",
    by: str = "strategy",
    kind: str = "box",
    ax: Axes | None = None,
    log: bool = True,
) -> Axes:
    """The distribution of ``metric`` per value of ``by``: ``kind`` ``"box"`` or ``"violin"``
    (every run drawn as a point, each median with its 95% confidence interval as a bar), or
    ``"cdf"`` (the empirical distribution function of each group)."""
    if kind not in ("box", "violin", "cdf"):
        raise ValueError(f"kind must be 'box', 'violin' or 'cdf', not {kind!r}")
    df = _frame(data)
    ax = _axes(ax)
    groups = [(str(k), g[metric].dropna().to_numpy()) for k, g in df.groupby(by, sort=False)]
    label = metric.replace("_", " ")
    if kind == "cdf":
        for name, values in groups:
            xs = sorted(values)
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of runs")
        ax.set_title(f"{label}: empirical distribution per {by}")
        ax.legend()
    else:
        positions = list(range(1, len(groups) + 1))
        values = [v for _, v in groups]
        if kind == "box":
            ax.boxplot(values, positions=positions, showfliers=False)
        else:
            ax.violinplot(values, positions=positions, showmedians=True)
        for x, v in zip(positions, values):
            jitter = [x + 0.08 * ((i % 5) - 2) / 2 for i in range(len(v))]
            ax.scatter(jitter, v, s=10, alpha=0.6, color="black", zorder=3)
        import pandas as pd

        _ci_bars(ax, ((x, pd.Series(v)) for x, v in zip(positions, values)), "tab:red")
        ax.set_xticks(positions, [name for name, _ in groups])
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per {by}: every run, median with 95% CI (red)")
    ax.grid(True, which="both", alpha=0.3)
    return ax


def phase_breakdown(data: pd.DataFrame | Iterable[Report], *, ax: Axes | None = None) -> Axes:
    """Median duration of each phase, stacked, one bar per strategy."""
    df = _frame(data)
    ax = _axes(ax)
    cols = [c for c in df.columns if c.startswith("phase_") and c.endswith("_ms")]
    med = df.groupby("strategy", sort=False)[cols].median().fillna(0.0)
    order = [c for c in _phase_order(cols) if c in med.columns]
    bottom = None
    for c in order:
        values = med[c]
        ax.bar(med.index, values, bottom=bottom, label=c[len("phase_") : -len("_ms")])
        bottom = values if bottom is None else bottom + values
    ax.set_ylabel("median duration (ms)")
    ax.set_title("migration phases")
    ax.legend(title="phase", fontsize="small")
    return ax


def _phase_order(cols: Sequence[str]) -> list[str]:
    known = [
        "stop",
        "prepare",
        "checkpoint",
        "transfer",
        "restore",
        "replay",
        "finalize",
        "abort",
        "take_over",
        "restart",
    ]
    rank = {f"phase_{p}_ms": i for i, p in enumerate(known)}
    return sorted(cols, key=lambda c: rank.get(c, len(known)))


def _latencies(history: dict[str, Any], report: Report) -> dict[str, list[float]]:
    m = report.migration
    start, end = m["t_start_ns"], m["t_end_ns"]
    first: dict[int, dict[str, Any]] = {}
    for e in history["events"]:
        if e["mode"] == "live" and (
            e["seq"] not in first or e["t_start_ns"] < first[e["seq"]]["t_start_ns"]
        ):
            first[e["seq"]] = e
    out: dict[str, list[float]] = {"before": [], "during": [], "after": []}
    for e in first.values():
        when = "before" if e["t_pub_ns"] < start else "during" if e["t_pub_ns"] < end else "after"
        out[when].append((e["t_end_ns"] - e["t_pub_ns"]) / 1e6)
    return out


def latency_cdf(history: dict[str, Any], report: Report, *, ax: Axes | None = None) -> Axes:
    """CDF of end-to-end latency (ms, log scale) of messages sent before, during and after the
    migration of ``report``; ``history`` from ``Testbed.history``."""
    ax = _axes(ax)
    for when, values in _latencies(history, report).items():
        if not values:
            continue
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{when} (n={len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency (ms)")
    ax.set_ylabel("fraction of messages")
    ax.set_title(f"latency, {report.strategy}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax


def timeline(history: dict[str, Any], report: Report, *, ax: Axes | None = None) -> Axes:
    """Every message of one migration: when it was sent and when each instance processed it
    (live: dots, replay: crosses), over the shaded phases and the measured downtime (red)."""
    ax = _axes(ax)
    t0 = report.migration["t_start_ns"]

    def s(ns: int) -> float:
        return (ns - t0) / 1e9

    for i, p in enumerate(report.phase_spans):
        ax.axvspan(s(p["start_ns"]), s(p["end_ns"]), alpha=0.12, color=f"C{i % 10}")
        ax.text(
            s(p["start_ns"]),
            1.0,
            p["name"],
            transform=ax.get_xaxis_transform(),
            rotation=90,
            va="top",
            fontsize="x-small",
        )
    interval = report.metrics["downtime"]["interval_ns"]
    if interval:
        ax.axvspan(s(interval[0]), s(interval[1]), color="red", alpha=0.35, label="downtime")
    pub = history["published"]
    ax.scatter(
        [s(p["t_pub_ns"]) for p in pub], [p["seq"] for p in pub], s=4, c="grey", label="sent"
    )
    instances = sorted({e["instance"] for e in history["events"]})
    for i, inst in enumerate(instances):
        color = f"C{(i + 3) % 10}"
        ev = [e for e in history["events"] if e["instance"] == inst and e["mode"] == "live"]
        if ev:
            ax.scatter(
                [s(e["t_start_ns"]) for e in ev],
                [e["seq"] for e in ev],
                s=10,
                marker="o",
                color=color,
                label=f"{inst} live",
            )
        # A replay event reports a run of messages: a segment from its first to its last.
        runs = [e for e in history["events"] if e["instance"] == inst and e["mode"] == "replay"]
        for k, e in enumerate(runs):
            ax.plot(
                [s(e["t_start_ns"]), s(e["t_end_ns"])],
                [e.get("first_seq", e["seq"]), e["seq"]],
                marker="x",
                markersize=3,
                color=color,
                label=f"{inst} replay" if k == 0 else None,
            )
    ax.set_xlabel("seconds since the migration started")
    ax.set_ylabel("message sequence number")
    ax.set_title(f"{report.strategy}: {report.downtime_ms:.3f} ms downtime")
    ax.legend(fontsize="x-small", loc="upper left")
    return ax
