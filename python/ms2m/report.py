"""Migration reports: the versioned JSON document of one run, with typed accessors.

The engine writes every field; this module only reads. The format is ``ms2m.report/1``
(``REPORT_SCHEMA``).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from . import _native
from .report_types import (
    CheckpointStats,
    Counts,
    CutoffReport,
    Environment,
    LinkReport,
    LinkTraffic,
    Metrics,
    MigrationOptions,
    MigrationStatus,
    MigrationSummary,
    Phase,
    Placement,
    ReportDocument,
    ServiceSpec,
    StrategyName,
    Verdict,
    WorkloadSpec,
)

if TYPE_CHECKING:
    import pandas as pd

REPORT_SCHEMA: str = _native.REPORT_SCHEMA

_WINDOWS: tuple[Literal["before", "during", "after"], ...] = ("before", "during", "after")
"""The latency windows of a report, relative to the migration."""


class InvariantViolated(_native.Ms2mError):
    """A report's checker verdict is not valid (lost, duplicated, reordered or state)."""

    def __init__(self, report: Report) -> None:
        self.report = report
        v = report.verdict
        super().__init__(
            f"run {report.run_id} ({report.strategy}) broke an invariant: "
            f"lost={v['lost']['count']} {v['lost']['examples']}, "
            f"duplicated={v['duplicated']['count']} {v['duplicated']['examples']}, "
            f"reordered={v['reordered']['count']} {v['reordered']['examples']}, "
            f"state_consistent={v['state']['consistent']}"
        )


class Report:
    """One migration's report. ``to_dict()`` gives the whole document; the properties give its
    parts, typed (:mod:`ms2m.report_types`) and copied, and its headline figures."""

    def __init__(self, data: ReportDocument | dict[str, Any]) -> None:
        schema = data.get("schema")
        if schema != REPORT_SCHEMA:
            raise _native.ConfigurationError(
                f"not an ms2m report of format {REPORT_SCHEMA} (schema field: {schema!r})"
            )
        self._d = cast(ReportDocument, data)

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Reads a report written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())

    def save(self, path: str | Path) -> Path:
        """Writes the report as JSON and returns where. A directory (one that exists, a path
        ending in ``/``, or one without a suffix) gets ``<run_id>.json`` inside it,
        created if need be, so that saving many reports to one folder never overwrites."""
        p = Path(path)
        if p.is_dir() or str(path).endswith(("/", os.sep)) or not p.suffix:
            p = p / f"{self.run_id}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    def to_dict(self) -> ReportDocument:
        """A copy of the whole document."""
        return cast(ReportDocument, json.loads(json.dumps(self._d)))

    def to_json(self) -> str:
        return json.dumps(self._d, indent=2)

    # -- the document's parts (copies) -----------------------------------------------------

    @property
    def service(self) -> ServiceSpec:
        """The service's parameters."""
        return copy.deepcopy(self._d["service"])

    @property
    def workload(self) -> WorkloadSpec | None:
        """The workload that ran during the migration (None: none was running)."""
        return copy.deepcopy(self._d["workload"])

    @property
    def options(self) -> MigrationOptions:
        """The options the migration ran with."""
        return copy.deepcopy(self._d["options"])

    @property
    def source(self) -> Placement:
        return copy.deepcopy(self._d["source"])

    @property
    def target(self) -> Placement:
        return copy.deepcopy(self._d["target"])

    @property
    def environment(self) -> Environment:
        """The machine and software that produced the report."""
        return copy.deepcopy(self._d["environment"])

    @property
    def phase_spans(self) -> list[Phase]:
        """The phases in order, with their start and end on the host clock (ns)."""
        return copy.deepcopy(self._d["phases"])

    @property
    def migration(self) -> MigrationSummary:
        """The migration as the manager saw it: status, times, the strategy's outcome."""
        return copy.deepcopy(self._d["migration"])

    @property
    def metrics(self) -> Metrics:
        """Downtime (and its baseline), latencies, the workload's pacing error."""
        return copy.deepcopy(self._d["metrics"])

    @property
    def counts(self) -> Counts:
        """Messages published, confirmed and processed (live and in replay)."""
        return copy.deepcopy(self._d["counts"])

    @property
    def verdict(self) -> Verdict:
        """The checker's verdict (:attr:`valid`, :attr:`lost`... are its headlines)."""
        return copy.deepcopy(self._d["verdict"])

    @property
    def links(self) -> dict[str, LinkReport]:
        """The shaped hosts' links, and links between two hosts (``a<->b``): configured, how
        emulated, measured at testbed start (empty: every host reached the broker directly).
        Reports older than links: empty."""
        return copy.deepcopy(self._d.get("links", {}))

    @property
    def link_traffic(self) -> dict[str, LinkTraffic]:
        """Bytes each shaped link carried during the migration, per direction."""
        return copy.deepcopy(self._d.get("link_traffic", {}))

    @property
    def leftovers(self) -> list[str]:
        """Broker resources of the migration still present after it (empty: it cleaned up)."""
        return list(self._d["leftovers"])

    # -- headline figures ------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return str(self._d["run_id"])

    @property
    def strategy(self) -> StrategyName:
        return self._d["strategy"]

    @property
    def status(self) -> MigrationStatus:
        """The migration's end: "completed", or "aborted" (rolled back)."""
        return self._d["migration"]["status"]

    @property
    def cutoff(self) -> CutoffReport | None:
        """What the ``ms2m_cutoff`` strategy decided (None for the other strategies)."""
        return copy.deepcopy(self._d["migration"].get("cutoff"))

    @property
    def downtime_ms(self) -> float:
        """Longest gap in the migration window while a message waited and nothing served."""
        return float(self._d["metrics"]["downtime"]["ms"])

    @property
    def baseline_downtime_ms(self) -> float:
        """The same figure over an equal window before the migration (the noise floor)."""
        return float(self._d["metrics"]["baseline_downtime"]["ms"])

    @property
    def control_plane_downtime_ms(self) -> float | None:
        """From the source leaving live service to the target entering it."""
        v = self._d["migration"]["control_plane_downtime_ms"]
        return None if v is None else float(v)

    @property
    def total_ms(self) -> float:
        return float(self._d["migration"]["total_ms"])

    @property
    def checkpoint_bytes(self) -> int:
        return int(self._d["migration"]["checkpoint_bytes"])

    @property
    def checkpoint(self) -> CheckpointStats | None:
        """How the checkpoint travelled: chunks, write and fetch times and MiB/s (None: no
        checkpoint was taken, as in a migration aborted before)."""
        return self._d["migration"].get("checkpoint")

    @property
    def messages_replayed(self) -> int:
        return int(self._d["migration"]["messages_replayed"])

    @property
    def phases(self) -> dict[str, float]:
        """Phase name to duration in milliseconds, in order."""
        return {p["name"]: float(p["duration_ms"]) for p in self._d["phases"]}

    @property
    def lost(self) -> int:
        return int(self._d["verdict"]["lost"]["count"])

    @property
    def duplicated(self) -> int:
        return int(self._d["verdict"]["duplicated"]["count"])

    @property
    def reordered(self) -> int:
        return int(self._d["verdict"]["reordered"]["count"])

    @property
    def state_consistent(self) -> bool | None:
        """Whether the final state equals the fold of the confirmed log (None: unknown)."""
        v = self._d["verdict"]["state"]["consistent"]
        return None if v is None else bool(v)

    @property
    def processing_achieved_ms(self) -> float:
        """Median time an instance spent on a live message (compare ``service.processing_ms``;
        ``metrics["processing"]["off_target"]`` says when they differ by more than 5%)."""
        return float(self._d["metrics"]["processing"]["p50_ms"])

    @property
    def valid(self) -> bool:
        return self._d["verdict"]["result"] == "valid"

    def assert_valid(self) -> Report:
        """Raises :class:`InvariantViolated` unless every invariant held."""
        if not self.valid:
            raise InvariantViolated(self)
        return self

    @property
    def rate(self) -> float | None:
        """The workload's mean rate, msg/s."""
        r = self._d.get("workload_rate")
        return None if r is None else float(r)

    @property
    def completed(self) -> bool:
        """False for a migration that was aborted and rolled back."""
        return self.status == "completed"

    def write_interval_log(self, history: dict[str, Any], path: str | Path) -> Path:
        """Writes the latencies before, during and after this migration as an HdrHistogram
        interval log (readable by HdrHistogram's tools), from ``Testbed.history``."""
        m = self._d["migration"]
        text = _native.interval_log(json.dumps(history), m["t_start_ns"], m["t_end_ns"])
        p = Path(path)
        p.write_text(text)
        return p

    def summary(self) -> dict[str, Any]:
        """One flat row: configuration, headline metrics and verdicts."""
        d = self._d
        cp = self.checkpoint
        row: dict[str, Any] = {
            "run_id": self.run_id,
            "strategy": self.strategy,
            "status": self.status,
            "error": d["migration"]["error"],
            "rate": self.rate,
            "processing_ms": d["service"]["processing_ms"],
            "state_bytes": d["service"]["state_bytes"],
            "source_host": d["source"]["host"],
            "target_host": d["target"]["host"],
            "downtime_ms": self.downtime_ms,
            "baseline_downtime_ms": self.baseline_downtime_ms,
            "control_plane_downtime_ms": self.control_plane_downtime_ms,
            "total_ms": self.total_ms,
            "checkpoint_bytes": self.checkpoint_bytes,
            "messages_replayed": self.messages_replayed,
            "checkpoint_write_mib_s": None if cp is None else cp["write_mib_s"],
            "checkpoint_fetch_mib_s": None if cp is None else cp["fetch_mib_s"],
            "transfer": d["options"].get("transfer", "broker"),
            "lost": self.lost,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "state_consistent": self.state_consistent,
            "valid": self.valid,
        }
        for name, ms in self.phases.items():
            row[f"phase_{name}_ms"] = ms
        links = d.get("links", {})
        for role in ("source", "target"):
            link = links.get(d[role]["host"])
            spec = link["configured"] if link else None
            row[f"{role}_link_mbit"] = None if spec is None else spec["up_mbit"]
            row[f"{role}_link_delay_ms"] = None if spec is None else spec["delay_ms"]
        row["pacing_p99_us"] = d["metrics"]["pacing_error"]["p99_us"]
        row["processing_achieved_ms"] = self.processing_achieved_ms
        row["processing_off_target"] = d["metrics"]["processing"]["off_target"]
        row["recorder_lag_p99_ms"] = d["metrics"]["recorder_lag"]["p99_ms"]
        for when in _WINDOWS:
            lat = d["metrics"]["latency"][when]
            row[f"latency_{when}_p50_ms"] = lat["p50_ms"]
            row[f"latency_{when}_p99_ms"] = lat["p99_ms"]
        return row

    def __repr__(self) -> str:
        return (
            f"<Report {self.run_id} {self.strategy}: downtime {self.downtime_ms:.3f} ms, "
            f"lost {self.lost}, duplicated {self.duplicated}, "
            f"state_consistent {self.state_consistent}>"
        )


def report_schema() -> dict[str, Any]:
    """The JSON Schema every report validates against (also shipped as report.schema.json)."""
    return dict(json.loads(_native.report_schema()))


def timeline_csv(history: dict[str, Any], path: str | Path | None = None) -> str:
    """The per-message timeline of a history (``Testbed.history``) as CSV: one row per live
    processing, one per run of replayed messages (under the run's last seq) and one per message
    nobody processed; written to ``path`` when given."""
    text = _native.timeline_csv(json.dumps(history))
    if path is not None:
        Path(path).write_text(text)
    return text


def load_reports(paths: str | Path | Iterable[str | Path]) -> list[Report]:
    """Loads reports from files, or every ``*.json`` report in a folder (recursively)."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
    else:
        files = [Path(x) for x in paths]
    out = []
    for f in files:
        data = json.loads(f.read_text())
        if isinstance(data, dict) and data.get("schema") == REPORT_SCHEMA:
            out.append(Report(data))
    return out


def to_dataframe(reports: Iterable[Report] | str | Path) -> pd.DataFrame:
    """One row per report (see :meth:`Report.summary`). Needs pandas (``ms2m[analysis]``)."""
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_dataframe needs pandas: pip install 'ms2m[analysis]'") from e
    if isinstance(reports, (str, Path)):
        reports = load_reports(reports)
    return pd.DataFrame([r.summary() for r in reports])
