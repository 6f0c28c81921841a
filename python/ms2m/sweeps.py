"""Sweeps: run a grid of migrations (strategies x rates x repetitions x service parameters) on
one reused broker, resumable from its output folder, as a pandas DataFrame with one row per run.

Every run deploys a fresh service, warms it up under an open-loop workload, migrates it between
two hosts, removes it, and checks that the broker holds no queue any more before the next run.
Each report is written to the folder as soon as its run ends (atomically), so an interrupted
sweep resumes where it stopped: runs whose report exists are not run again. The folder also
keeps ``sweep.json``, the parameters, and refuses to resume with other ones.

    df = ms2m.sweep("results/prefetch", strategies=["ms2m", "stop_and_copy"],
                    rates=[5, 10, 15], prefetch=[1, 10], repetitions=3)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import _native, stats
from .defaults import MIGRATION_DEFAULTS
from .links import Link, split_pair
from .report import Report, to_dataframe
from .testbed import RUNTIMES, TRANSFERS, Testbed

if TYPE_CHECKING:
    import pandas as pd

SERVICE_AXES = ("processing_ms", "state_bytes", "prefetch", "message_bytes")
"""Service parameters a sweep can vary besides strategy and rate."""

WARMUP_S = 1.0
"""The default warm-up before each migration of a sweep (at least; see :func:`warmup_for`)."""

#: The baseline window (as long as the migration) is planned this much longer than the longest
#: migration of the same strategy so far.
_BASELINE_MARGIN = 1.25


def warmup_for(warmup_s: float, longest_s: float | None) -> float:
    """How long a run's workload runs before its migration: ``warmup_s``, or longer where the
    baseline window needs it. The baseline downtime is measured over a window as long as the
    migration, just before it, and from the workload's start at the earliest; ``longest_s``
    (the longest migration of the same strategy so far, None before any) sizes it."""
    if longest_s is None:
        return warmup_s
    return max(warmup_s, longest_s * _BASELINE_MARGIN)


LINK_AXES = ("link_mbit", "link_delay_ms")
"""Link figures a sweep can vary: both hosts' links to the broker's host get them."""


@dataclass(frozen=True)
class Grid:
    """What a sweep runs: every combination of the axes, ``repetitions`` times."""

    strategies: tuple[str, ...]
    rates: tuple[float, ...]
    repetitions: int = 1
    processing_ms: tuple[float, ...] = (50.0,)
    state_bytes: tuple[int, ...] = (1_000_000,)
    prefetch: tuple[int, ...] = (1,)
    message_bytes: tuple[int, ...] = (64,)
    #: Steady load before each migration, at least: a run waits longer where its baseline
    #: window (as long as the migration) needs it (see :func:`warmup_for`).
    warmup_s: float = WARMUP_S
    settle_s: float = MIGRATION_DEFAULTS["settle_s"]
    replay_timeout_s: float = MIGRATION_DEFAULTS["replay_timeout_s"]
    replay_max_s: float = MIGRATION_DEFAULTS["replay_max_s"]
    chunk_bytes: int = MIGRATION_DEFAULTS["chunk_bytes"]
    hosts: tuple[str, str] = field(default=("edge-1", "edge-2"))
    #: "auto", "docker" or "local" (see :class:`~ms2m.Testbed`); part of what a folder holds.
    runtime: str = "auto"
    #: Links of the two hosts to the broker's host (see :class:`~ms2m.Link`); a host not
    #: named reaches the broker directly.
    links: dict[str, Link] = field(default_factory=dict)
    #: Both hosts' link bandwidth (None: unshaped) and one-way delay per run; values other
    #: than the defaults override ``links`` and make the testbed relay both hosts.
    link_mbit: tuple[float | None, ...] = (None,)
    link_delay_ms: tuple[float, ...] = (0.0,)
    link_jitter_ms: float = 0.0
    #: How each run's checkpoint travels: "broker" and/or "direct" (an axis).
    transfer: tuple[str, ...] = ("broker",)
    #: Links between two hosts by name (``edge-1<->edge-2``), for direct transfers.
    host_links: dict[str, Link] = field(default_factory=dict)
    #: A service of one's own (see :meth:`~ms2m.Testbed.deploy`); None: the reference service.
    image: str | None = None
    command: tuple[str, ...] | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: Repeat a cell (beyond ``repetitions``) until the 95% confidence interval of its median
    #: downtime is within this fraction of the median on either side (None: ``repetitions``
    #: runs and no more); at most ``max_repetitions`` runs per cell.
    until_ci: float | None = None
    max_repetitions: int = 30

    def validate(self) -> None:
        known = set(_native.strategies())
        bad = [s for s in self.strategies if s not in known]
        if bad or not self.strategies:
            raise _native.ConfigurationError(
                f"unknown or no strategies {bad}; choose from {sorted(known)}"
            )
        if self.repetitions < 1:
            raise _native.ConfigurationError("repetitions must be at least 1")
        if self.until_ci is not None and not 0 < self.until_ci < 1:
            raise _native.ConfigurationError(
                f"until_ci is a fraction of the median between 0 and 1 (0.05: within 5%), "
                f"not {self.until_ci}"
            )
        if self.until_ci is not None and self.max_repetitions < max(6, self.repetitions):
            raise _native.ConfigurationError(
                f"max_repetitions must be at least 6 (the fewest runs with a 95% interval) and "
                f"at least repetitions, got {self.max_repetitions}"
            )
        if not self.rates or any(not r >= 0 for r in self.rates):
            raise _native.ConfigurationError(f"rates must be >= 0, got {self.rates}")
        for axis in SERVICE_AXES:
            values = getattr(self, axis)
            if not values or any(v < 0 for v in values):
                raise _native.ConfigurationError(f"{axis} needs values >= 0, got {values}")
        if self.runtime not in RUNTIMES:
            raise _native.ConfigurationError(
                f"runtime must be one of {RUNTIMES}, got {self.runtime!r}"
            )
        if len(self.hosts) != 2 or self.hosts[0] == self.hosts[1]:
            raise _native.ConfigurationError(f"hosts must be two different names: {self.hosts}")
        if not self.link_mbit or any(m is not None and not m > 0 for m in self.link_mbit):
            raise _native.ConfigurationError(
                f"link_mbit needs values > 0 (or None: unshaped), got {self.link_mbit}"
            )
        if not self.link_delay_ms or any(not d >= 0 for d in self.link_delay_ms):
            raise _native.ConfigurationError(
                f"link_delay_ms needs values >= 0, got {self.link_delay_ms}"
            )
        if not self.link_jitter_ms >= 0:
            raise _native.ConfigurationError("link_jitter_ms must be >= 0")
        if not self.transfer or any(t not in TRANSFERS for t in self.transfer):
            raise _native.ConfigurationError(
                f"transfer needs values among {TRANSFERS}, got {self.transfer}"
            )
        for name in self.host_links:
            stray_pair = set(split_pair(name)) - set(self.hosts)
            if stray_pair:
                raise _native.ConfigurationError(
                    f"host link {name} names hosts {sorted(stray_pair)} that the sweep does not "
                    f"use {self.hosts}"
                )
        stray = set(self.links) - set(self.hosts)
        if stray:
            raise _native.ConfigurationError(
                f"links name hosts {sorted(stray)} that the sweep does not use {self.hosts}"
            )

    def varies_links(self) -> bool:
        return (self.link_mbit, self.link_delay_ms, self.link_jitter_ms) != ((None,), (0.0,), 0)

    def testbed_hosts(self) -> dict[str, Link | None]:
        """The two hosts with their links, as :class:`~ms2m.Testbed` takes them."""
        if self.varies_links():
            return {h: Link() for h in self.hosts}
        return {h: self.links.get(h) for h in self.hosts}

    def run_link(self, run: dict[str, Any]) -> Link | None:
        """Both hosts' link in ``run``, when the sweep varies links."""
        if not self.varies_links():
            return None
        return Link(
            mbit=run["link_mbit"], delay_ms=run["link_delay_ms"], jitter_ms=self.link_jitter_ms
        )

    def runs(self) -> Iterator[dict[str, Any]]:
        """Every run's parameters, repetition-major so that a partial sweep is balanced."""
        names = SERVICE_AXES + LINK_AXES + ("transfer",)
        axes = [getattr(self, a) for a in names]
        for rep in range(1, self.repetitions + 1):
            for values in itertools.product(*axes):
                for rate in self.rates:
                    for strategy in self.strategies:
                        yield {
                            "repetition": rep,
                            "rate": rate,
                            "strategy": strategy,
                            **dict(zip(names, values)),
                        }

    def more_runs(self, out: Path, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """With ``until_ci``: the next repetition of every cell whose median downtime's interval
        is not yet within ``until_ci`` of the median and that has runs left under
        ``max_repetitions`` (the reports of ``runs`` are in ``out``)."""
        if self.until_ci is None:
            return []
        cells: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            cells.setdefault(_cell_key(run), []).append(run)
        more = []
        for cell in cells.values():
            if len(cell) >= self.max_repetitions:
                continue
            downtimes = [Report.load(out / self.report_name(r)).downtime_ms for r in cell]
            ci = stats.median_ci(downtimes)
            width = None if ci is None else ci["relative_half_width"]
            if width is None or width > self.until_ci:
                last = max(cell, key=lambda r: r["repetition"])
                more.append({**last, "repetition": last["repetition"] + 1})
        return more

    def report_name(self, run: dict[str, Any]) -> str:
        """File name of a run's report: the axes that vary, then the repetition."""
        parts = [run["strategy"], f"r{_fmt(run['rate'])}"]
        for axis in SERVICE_AXES + LINK_AXES:
            if len(getattr(self, axis)) > 1:
                parts.append(f"{axis}{_fmt(run[axis])}")
        if len(self.transfer) > 1:
            parts.append(run["transfer"])
        parts.append(str(run["repetition"]))
        return "-".join(parts) + ".json"


def _cell_key(run: dict[str, Any]) -> str:
    """A run's cell: all its parameters but the repetition."""
    return json.dumps({k: v for k, v in run.items() if k != "repetition"}, sort_keys=True)


def cell_status(
    reports: Sequence[Report], until_ci: float | None, max_repetitions: int
) -> dict[str, Any]:
    """Whether a cell's runs (``reports``) met ``until_ci`` or stopped at the cap: ``n``,
    ``relative_half_width`` and ``capped``."""
    ci = stats.median_ci([r.downtime_ms for r in reports])
    width = None if ci is None else ci["relative_half_width"]
    tight = width is not None and until_ci is not None and width <= until_ci
    return {
        "n": len(reports),
        "relative_half_width": width,
        "capped": until_ci is not None and not tight and len(reports) >= max_repetitions,
    }


def _fmt(value: float | None) -> str:
    """An axis value in a file name: whole numbers in full (``1048576``, not ``1.04858e+06``,
    which two states could share)."""
    if value is None:
        return "none"
    return str(int(value)) if float(value).is_integer() else format(value, "g")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_folder(out: Path, grid: Grid) -> None:
    spec = out / "sweep.json"
    mine = json.dumps(asdict(grid), sort_keys=True)
    if spec.exists():
        # Folders written before a field existed hold its default.
        held = {**asdict(Grid(strategies=(), rates=())), **json.loads(spec.read_text())}
        if json.dumps(held, sort_keys=True) != mine:
            asked = json.loads(mine)
            differ = ", ".join(
                f"{k} {json.dumps(held.get(k))} there, {json.dumps(asked.get(k))} now"
                for k in sorted(set(held) | set(asked))
                if held.get(k) != asked.get(k)
            )
            raise _native.ConfigurationError(
                f"{out} holds a sweep with other parameters ({spec}: {differ}); resume it with "
                "the same parameters or choose another folder"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomically(spec, json.dumps(asdict(grid), indent=2, sort_keys=True))


class _Progress:
    """A progress bar on a terminal (tqdm when installed), plain lines elsewhere."""

    def __init__(self, total: int, done: int, stream: TextIO | None) -> None:
        self.stream, self.total, self.done = stream, total, done
        self.started = time.monotonic()
        self.new = 0
        self.bar: Any = None
        if stream is not None:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=done, file=stream, unit="run")
            except ImportError:
                self.bar = None

    def update(self, run: dict[str, Any], report: Report, status: str | None = None) -> None:
        """Counts one run; ``status`` overrides the one read from the report."""
        self.done += 1
        self.new += 1
        if self.stream is None:
            return
        if status is None:
            status = "ok" if report.valid else "INVALID"
            if not report.completed:
                status = "aborted"
        line = (
            f"{run['strategy']} {run['rate']:g} msg/s rep {run['repetition']}: {status}, "
            f"downtime {report.downtime_ms:.3f} ms"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(line)
            self.bar.update(1)
            return
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.new * (self.total - self.done)
        print(
            f"[{self.done}/{self.total}] {line}  ({elapsed:.0f} s, ~{eta:.0f} s left)",
            file=self.stream,
            flush=True,
        )

    def grow(self, more: int, done: int) -> None:
        """``more`` runs were added to the sweep, ``done`` of them already done."""
        self.total += more
        self.done += done
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_grid(
    grid: Grid,
    out_dir: str | Path,
    *,
    progress: TextIO | None = sys.stderr,
    amqp_url: str | None = None,
) -> list[Report]:
    """Runs (or resumes) a grid; returns every report of the grid, old and new. ``amqp_url``
    runs it on an existing broker (see :class:`~ms2m.Testbed`)."""
    grid.validate()
    out = Path(out_dir)
    _check_folder(out, grid)
    runs = list(grid.runs())
    missing = [r for r in runs if not (out / grid.report_name(r)).exists()]
    bar = _Progress(len(runs), len(runs) - len(missing), progress)
    try:
        with contextlib.ExitStack() as stack:
            testbed: list[Testbed] = []
            # The longest migration of each strategy so far, seconds: it sizes the warm-up.
            longest: dict[str, float] = {}

            def run_all(batch: Sequence[dict[str, Any]]) -> None:
                for run in batch:
                    if (out / grid.report_name(run)).exists():
                        continue
                    if not testbed:
                        # Started on the first run that needs it: a finished sweep starts nothing.
                        testbed.append(
                            stack.enter_context(
                                Testbed(
                                    hosts=grid.testbed_hosts(),
                                    runtime=grid.runtime,
                                    amqp_url=amqp_url,
                                    host_links={
                                        split_pair(n): link for n, link in grid.host_links.items()
                                    },
                                )
                            )
                        )
                    tb = testbed[0]
                    warmup = warmup_for(grid.warmup_s, longest.get(run["strategy"]))
                    report = _one_run(tb, grid, run, warmup)
                    took = report.total_ms / 1e3
                    longest[run["strategy"]] = max(longest.get(run["strategy"], 0.0), took)
                    _write_atomically(out / grid.report_name(run), report.to_json())
                    left = tb.broker_queues()
                    if left:
                        raise _native.Ms2mError(
                            f"the broker is not clean after run {report.run_id}: {left}"
                        )
                    bar.update(run, report)

            run_all(runs)
            # Until the intervals are tight: one more repetition of every cell that needs it.
            while more := grid.more_runs(out, runs):
                runs += more
                bar.grow(len(more), sum((out / grid.report_name(r)).exists() for r in more))
                run_all(more)
    finally:
        bar.close()
    return [Report.load(out / grid.report_name(r)) for r in runs]


def _one_run(tb: Testbed, grid: Grid, run: dict[str, Any], warmup_s: float) -> Report:
    link = grid.run_link(run)
    if link is not None:
        for host in grid.hosts:
            if tb.links[host]["configured"] != link.to_config():
                tb.set_link(host, link)
    stem = grid.report_name(run)[: -len(".json")]
    # Service names are at most 48 characters: long ones keep a digest of the whole name.
    name = "sw-" + stem.replace("_", "-").replace(".", "p")
    if len(name) > 48:
        name = name[:39] + "-" + hashlib.sha256(stem.encode()).hexdigest()[:8]
    svc = tb.deploy(
        name,
        host=grid.hosts[0],
        processing_ms=run["processing_ms"],
        state_bytes=int(run["state_bytes"]),
        prefetch=int(run["prefetch"]),
        image=grid.image,
        command=grid.command,
        env=grid.env,
    )
    try:
        with tb.workload(svc, rate=run["rate"], message_bytes=int(run["message_bytes"])):
            time.sleep(warmup_s)
            try:
                return tb.migrate(
                    svc,
                    to=grid.hosts[1],
                    strategy=run["strategy"],
                    settle_s=grid.settle_s,
                    replay_timeout_s=grid.replay_timeout_s,
                    replay_max_s=grid.replay_max_s,
                    chunk_bytes=grid.chunk_bytes,
                    transfer=run["transfer"],
                )
            except _native.MigrationFailed as e:
                # An aborted migration is a result too: its report says what happened.
                report: Report | None = getattr(e, "report", None)
                if report is None:
                    raise
                return report
    finally:
        tb.remove(svc)


def _tuple(v: Any) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else (v,)


def sweep(
    out_dir: str | Path,
    *,
    strategies: Sequence[str],
    rates: Sequence[float],
    repetitions: int = 1,
    processing_ms: float | Sequence[float] = 50.0,
    state_bytes: int | Sequence[int] = 1_000_000,
    prefetch: int | Sequence[int] = 1,
    message_bytes: int | Sequence[int] = 64,
    warmup_s: float = WARMUP_S,
    settle_s: float = MIGRATION_DEFAULTS["settle_s"],
    replay_timeout_s: float = MIGRATION_DEFAULTS["replay_timeout_s"],
    replay_max_s: float = MIGRATION_DEFAULTS["replay_max_s"],
    chunk_bytes: int = MIGRATION_DEFAULTS["chunk_bytes"],
    runtime: str = "auto",
    links: dict[str, Link] | None = None,
    link_mbit: float | Sequence[float | None] | None = None,
    link_delay_ms: float | Sequence[float] = 0.0,
    link_jitter_ms: float = 0.0,
    transfer: str | Sequence[str] = "broker",
    host_links: dict[str, Link] | None = None,
    until_ci: float | None = None,
    max_repetitions: int = 30,
    amqp_url: str | None = None,
    progress: TextIO | None = sys.stderr,
) -> pd.DataFrame:
    """Runs every combination of ``strategies`` x ``rates`` x the service parameters given as
    lists, ``repetitions`` times (with ``until_ci``, then more, one at a time, until each cell's
    median downtime has its 95% confidence interval within that fraction of it, at most
    ``max_repetitions`` runs); returns one row per run (needs pandas). Resumable: call it again
    with the same arguments after an interruption."""
    grid = Grid(
        strategies=tuple(strategies),
        rates=tuple(float(r) for r in rates),
        repetitions=repetitions,
        processing_ms=tuple(float(v) for v in _tuple(processing_ms)),
        state_bytes=tuple(int(v) for v in _tuple(state_bytes)),
        prefetch=tuple(int(v) for v in _tuple(prefetch)),
        message_bytes=tuple(int(v) for v in _tuple(message_bytes)),
        warmup_s=warmup_s,
        settle_s=settle_s,
        replay_timeout_s=replay_timeout_s,
        replay_max_s=replay_max_s,
        chunk_bytes=chunk_bytes,
        runtime=runtime,
        links=dict(links or {}),
        link_mbit=tuple(None if v is None else float(v) for v in _tuple(link_mbit)),
        link_delay_ms=tuple(float(v) for v in _tuple(link_delay_ms)),
        link_jitter_ms=float(link_jitter_ms),
        transfer=tuple(str(t) for t in _tuple(transfer)),
        host_links=dict(host_links or {}),
        until_ci=until_ci,
        max_repetitions=max_repetitions,
    )
    return to_dataframe(run_grid(grid, out_dir, progress=progress, amqp_url=amqp_url))
