"""ms2m: live migration of stateful, message-driven microservices, measured at the message level.

    import ms2m
    with ms2m.Testbed() as tb:
        svc = tb.deploy("counter", host="edge-1", processing_ms=50, state_bytes=1_000_000)
        with tb.workload(svc, rate=10):
            report = tb.migrate(svc, to="edge-2", strategy="ms2m")
    report.downtime_ms, report.lost, report.duplicated, report.state_consistent

The engine and every measurement live in Rust (``ms2m._native``); this package adds the
context managers, typed reports and the command line.
"""

import json as _json

from . import profiles, report_types
from ._native import (
    BrokerError,
    ConfigurationError,
    DockerError,
    HostError,
    InstanceError,
    MigrationFailed,
    Ms2mError,
    OperationTimeout,
    RuntimeUnavailable,
    __version__,
)
from ._native import strategies as _strategies
from ._native import strategy_phases as _strategy_phases
from .defaults import MIGRATION_DEFAULTS
from .experiment import Comparison, compare_strategies, summarize
from .links import Link
from .report import (
    REPORT_SCHEMA,
    InvariantViolated,
    Report,
    load_reports,
    report_schema,
    timeline_csv,
    to_dataframe,
)
from .sweeps import sweep
from .testbed import Fault, RuleOutcome, Service, Testbed

STRATEGIES: tuple[str, ...] = tuple(_strategies())
"""Names of the migration strategies this build implements."""

STRATEGY_PHASES: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in _strategy_phases().items()}
"""Each strategy's phases, in order (the names a :class:`Fault` can aim at)."""


def cleanup(all: bool = False) -> dict[str, list[str]]:
    """Removes containers, networks and local processes left by crashed ms2m runs (``all``:
    every ms2m one), and the queues and exchanges a dead driver's testbed left on an external
    broker; returns their names under "containers", "networks" and "processes", and what was
    repaired under "repaired".

    A testbed kept (``keep()``, ``TESTCONTAINERS_COMMAND=keep``) whose driver died is not
    removed but repaired, unless ``all``: a migration it was in the middle of is rolled back
    (or finished, if the target already served), so that each service has one instance
    serving and no migration queue is left."""
    from ._native import cleanup as _cleanup

    return dict(_json.loads(_cleanup(all=all)))


def check_history(
    history: dict, cut_ns: int = 2**64 - 1, observed: dict | None = None
) -> report_types.Verdict:
    """Checks a saved history (``Testbed.history``) offline; returns the checker's verdict
    (``observed``: the final state, as :class:`~ms2m.report_types.ObservedState`)."""
    from ._native import check_history as _check

    obs = None if observed is None else _json.dumps(observed)
    verdict: report_types.Verdict = _json.loads(_check(_json.dumps(history), cut_ns, obs))
    return verdict


__all__ = [
    "MIGRATION_DEFAULTS",
    "REPORT_SCHEMA",
    "STRATEGIES",
    "STRATEGY_PHASES",
    "BrokerError",
    "Comparison",
    "ConfigurationError",
    "DockerError",
    "Fault",
    "HostError",
    "InstanceError",
    "InvariantViolated",
    "Link",
    "MigrationFailed",
    "Ms2mError",
    "OperationTimeout",
    "Report",
    "RuleOutcome",
    "RuntimeUnavailable",
    "Service",
    "Testbed",
    "__version__",
    "check_history",
    "cleanup",
    "compare_strategies",
    "load_reports",
    "profiles",
    "report_schema",
    "report_types",
    "summarize",
    "sweep",
    "timeline_csv",
    "to_dataframe",
]
