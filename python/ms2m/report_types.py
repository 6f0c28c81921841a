"""Typed views of a report (format ``ms2m.report/1``) and of its parts.

One TypedDict per definition of ``report.schema.json``, the JSON Schema the engine generates
from its Rust types, under the same name (the document itself is :class:`ReportDocument`).
``tests/test_offline.py`` checks every definition's properties against its TypedDict's keys,
their JSON types and nullability, so these cannot drift from the engine.

Every key is present in a report the engine writes; a value the engine could not know is
``None``. Closed vocabularies are ``Literal`` types.
"""

from __future__ import annotations

from typing import Literal, Optional, TypedDict, Union

StrategyName = Literal["stop_and_copy", "ms2m", "ms2m_cutoff", "ms2m_sequential"]
"""The strategies (``ms2m.STRATEGIES``; a plain string in the schema, as test builds of the
engine know one more)."""

PhaseName = Literal[
    "prepare",
    "stop",
    "checkpoint",
    "transfer",
    "restore",
    "replay",
    "finalize",
    "abort",
    "take_over",
    "restart",
]
"""The phases of a migration (``ms2m.STRATEGY_PHASES``), ``abort`` (the rollback of a failed
one), ``take_over`` (the target serving in place of a source that died once its checkpoint
was complete) and ``restart`` (an empty instance serving in place of a source that died
before)."""

MigrationStatus = Literal["completed", "aborted"]
"""How a migration ended; ``aborted``: rolled back (see ``failed_phase`` and ``error``), or,
when the source died with its state, an empty instance serves in its place (``restarted``)."""

CheckResult = Literal["valid", "invalid", "unknown"]
"""The overall result of a check; ``unknown``: nothing is broken, but the final state could not
be observed."""

Role = Literal["source", "target", "broker"]
"""What a fault hits: the source or target instance (killed, or its host's link cut), or the
broker (restarted)."""

Transfer = Literal["broker", "direct"]
"""How a checkpoint goes from the source's host to the target's: through the broker (a queue),
or directly from host to host (as the paper's rsync)."""


# -- configuration -----------------------------------------------------------------------------


class ServiceSpec(TypedDict):
    """A service to deploy: the reference service's parameters, or (``image`` and/or
    ``command``) any implementation of the wire contract, which gets them as ``MS2M_*``
    environment variables besides its own ``env``."""

    name: str
    host: str
    processing_ms: float
    state_bytes: int
    prefetch: int
    #: How far past the next seq an input may be and still be applied (1: only the next).
    max_seq_gap: int
    #: Survives a broker restart (durable queues, persistent messages, reconnecting clients).
    durable: bool
    image: str | None
    command: list[str] | None
    env: dict[str, str]


class Step(TypedDict):
    """One step of a ``steps`` profile: ``rate`` msg/s from ``at_s`` seconds on."""

    at_s: float
    rate: float


class ConstantProfile(TypedDict):
    kind: Literal["constant"]
    rate: float


class StepsProfile(TypedDict):
    kind: Literal["steps"]
    steps: list[Step]


class PoissonProfile(TypedDict):
    kind: Literal["poisson"]
    rate: float


class BurstsProfile(TypedDict):
    kind: Literal["bursts"]
    base_rate: float
    burst_rate: float
    burst_s: float
    period_s: float


Profile = Union[ConstantProfile, StepsProfile, PoissonProfile, BurstsProfile]
"""How the send rate evolves (``ms2m.profiles`` builds them)."""


class WorkloadSpec(TypedDict):
    """An open-loop workload: messages sent on an absolute schedule."""

    profile: Profile
    message_bytes: int
    seed: int


class Fault(TypedDict):
    """A fault to inject: kill the ``kill`` instance (SIGKILL) ``after_ms`` into phase
    ``at_phase`` (0: as it begins), or with ``outage_s`` cut its host's link that long."""

    kill: Role
    at_phase: PhaseName
    after_ms: float
    outage_s: float | None


class MigrationOptions(TypedDict):
    """Knobs of one migration (``ms2m.defaults.MIGRATION_DEFAULTS``: the engine's defaults)."""

    reply_timeout_s: float
    replay_timeout_s: float
    settle_s: float
    drain_timeout_s: float
    replay_max_s: float
    fault: Fault | None
    chunk_bytes: int
    transfer: Transfer


class Placement(TypedDict):
    """Where an instance ran."""

    instance: str
    host: str


class Environment(TypedDict):
    """The machine and software that produced a report."""

    ms2m_version: str
    crates: dict[str, str]
    runtime: str
    broker_image: str
    broker_version: str | None
    service_image: str
    docker_version: str | None
    kernel: str | None
    hostname: str | None
    cores: int


# -- links -------------------------------------------------------------------------------------


class LinkSpec(TypedDict):
    """One host's link to the broker's host, as the engine takes it (None: unshaped)."""

    up_mbit: float | None
    down_mbit: float | None
    delay_ms: float
    jitter_ms: float


class LinkProbe(TypedDict):
    """What the probe measured on one link at testbed start."""

    rtt_ms_p50: float
    rtt_ms_p99: float
    up_mbit: float
    down_mbit: float
    bytes: int


class LinkReport(TypedDict):
    """A shaped host's link: configured, emulated how, measured."""

    configured: LinkSpec
    #: ``relay``: a TCP relay in the harness paces, delays and holds each direction.
    mechanism: str
    measured: LinkProbe | None
    #: Measured figures beyond 10% of the configured ones (round trips: or 0.5 ms).
    deviations: list[str]


class LinkTraffic(TypedDict):
    """Bytes one shaped link carried during a migration, and their mean rate."""

    up_bytes: int
    down_bytes: int
    up_mbit: float
    down_mbit: float


# -- the migration -----------------------------------------------------------------------------


class Phase(TypedDict):
    """One phase of a migration, on the host clock."""

    name: PhaseName
    start_ns: int
    end_ns: int
    duration_ms: float


# ``lambda`` is a keyword, hence the functional syntax.
CutoffReport = TypedDict(
    "CutoffReport",
    {
        "replay_max_s": float,
        "lambda": float,
        "mu": float,
        "t_cutoff_s": Optional[float],
        "fired": bool,
        "fired_at_ns": Optional[int],
    },
)
"""What the ``ms2m_cutoff`` strategy decided: ``lambda`` and ``mu`` (msg/s) when the replay
began, T_cutoff = ``replay_max_s`` * mu / lambda, and whether the cutoff ended the replay."""


HopStats = TypedDict(
    "HopStats",
    {"from": str, "to": str, "bytes": int, "ms": Optional[float], "mbit_s": Optional[float]},
)
"""One stretch of a checkpoint's way: ``from`` and ``to`` are hosts or ``broker``; ``ms`` and
``mbit_s`` (payload) are None for a stretch not crossed. (``from`` is a Python keyword, hence
the functional form.)"""


class CheckpointStats(TypedDict):
    """How the checkpoint travelled: written by the source to its queue in ``chunks`` chunks
    (``write_ms``, from the snapshot to the broker's last confirm; direct: to serving it), then
    fetched and checked by the target (``fetch_ms``; None when it never was), each stretch in
    ``hops``. Throughputs in MiB/s."""

    transfer: Transfer
    hops: list[HopStats]
    bytes: int
    chunks: int
    chunk_bytes: int
    sha256: str
    write_ms: float
    write_mib_s: float
    fetch_ms: float | None
    fetch_mib_s: float | None


class TakeOver(TypedDict):
    """The source died once its checkpoint was complete, and the target took over:
    it replayed up to ``until_seq`` (what the source had acked) and went live after it.
    ``replayed_ahead``: messages it had replayed past that before it could be paused (in its
    state, without a live output event)."""

    source_died_in: PhaseName | None
    until_seq: int
    replayed_ahead: int


class Restarted(TypedDict):
    """The source died before its checkpoint was complete, its state with it: ``instance``, a
    new one started empty on the source's host, serves in its place, from the message after
    ``after_seq`` (``None``: nothing was queued; from the next message). Everything before is
    missing from the state (the verdict's ``state.restarted_after``)."""

    source_died_in: PhaseName | None
    instance: str
    after_seq: int | None


Outcome = TypedDict(
    "Outcome",
    {
        "checkpoint_bytes": int,
        "checkpoint": Optional[CheckpointStats],
        "messages_replayed": int,
        "replay_skipped": int,
        "t_source_stop_ns": Optional[int],
        "t_target_live_ns": Optional[int],
        "lambda": float,
        "mu": Optional[float],
        "cutoff": Optional[CutoffReport],
        "fault": Optional[str],
        "takeover": Optional[TakeOver],
        "restarted": Optional[Restarted],
    },
)
"""What a strategy found out while it ran (flattened into :class:`MigrationSummary`)."""


class MigrationSummary(Outcome):
    """The migration itself, as the manager saw it (with the strategy's :data:`Outcome`)."""

    status: MigrationStatus
    failed_phase: PhaseName | None
    error: str | None
    t_start_ns: int
    t_end_ns: int
    total_ms: float
    control_plane_downtime_ms: float | None


# -- measurements ------------------------------------------------------------------------------


class PacingSummary(TypedDict):
    """How late the workload sent its messages (actual minus scheduled), microseconds."""

    count: int
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float


class ProcessingSummary(TypedDict):
    """Processing time asked of the service against what its instances spent per live
    message (``t_end - t_start`` of its output event), milliseconds."""

    asked_ms: float
    count: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    #: (p50 - asked) / asked; None when nothing was asked or processed.
    deviation: float | None
    #: The median is off what was asked by more than 5% (and more than 2 us).
    off_target: bool


class Downtime(TypedDict):
    """The longest stretch of a window in which a message waited and no instance processed
    one; ``interval_ns`` is where it lies (``None``: there was none). Both are ``[start, end]``
    on the host clock."""

    ms: float
    window_ns: list[int]
    interval_ns: list[int] | None


class LatencySummary(TypedDict):
    """Percentiles of one latency histogram, milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


class LatencyReport(TypedDict):
    """Latency percentiles by when the message was sent relative to the migration."""

    before: LatencySummary
    during: LatencySummary
    after: LatencySummary


class Metrics(TypedDict):
    pacing_error: PacingSummary
    downtime: Downtime
    #: The same figure over an equal window before the migration: the noise floor.
    baseline_downtime: Downtime
    latency: LatencyReport
    processing: ProcessingSummary
    #: How late output events reached the recorder (from the instance's ``t_end_ns``).
    recorder_lag: LatencySummary


class DeadLetters(TypedDict):
    """What the service's dead-letter queue holds: input its instances refused."""

    total: int
    #: By reason: ``malformed``, ``oversized``, ``repeat``, ``jump``, ``unarmed_barrier``.
    by_reason: dict[str, int]


class Counts(TypedDict):
    published: int
    confirmed: int
    processed_live: int
    processed_replay: int
    malformed_events: int
    #: Input refused since the service was deployed (never applied).
    dead_letters: DeadLetters
    #: Messages sent after this instant are outside the check.
    cut_ns: int


# -- the checker's verdict ---------------------------------------------------------------------


class Finding(TypedDict):
    """A count with a few of the offending sequence numbers."""

    count: int
    examples: list[int]


class ObservedState(TypedDict):
    """What the final instance reported of its state."""

    instance: str
    last_seq: int
    count: int
    digest: str


StateOracle = Literal["reference", "twin", "none"]
"""What checked the final state: the reference service's fold of the confirmed log; for a
service of one's own, a twin (a fresh instance fed the confirmed log in order, compared by
digest); or nothing (the twin could not run: only lost, duplicated and reordered messages are
checked)."""


class StateVerdict(TypedDict):
    """Whether the final state equals what ``oracle`` expects (``None``: unknown, or no
    oracle)."""

    oracle: StateOracle
    #: Why the intended oracle (the twin) could not check the state, if it could not.
    oracle_error: str | None
    consistent: bool | None
    observed: ObservedState | None
    expected_digest: str | None
    #: The state was started anew, empty, after this seq (its instance died before a
    #: checkpoint held it): it is checked against what came after only.
    restarted_after: int | None


class Verdict(TypedDict):
    """The checker's verdict: valid only if every sub-verdict holds."""

    result: CheckResult
    expected: int
    lost: Finding
    duplicated: Finding
    reordered: Finding
    unconfirmed_processed: Finding
    state: StateVerdict


# -- the document ------------------------------------------------------------------------------


class ReportDocument(TypedDict):
    """The report of one migration, as JSON (``Report.to_dict()``)."""

    schema: str
    run_id: str
    strategy: StrategyName
    service: ServiceSpec
    workload: WorkloadSpec | None
    #: The workload's long-run mean rate, msg/s.
    workload_rate: float | None
    options: MigrationOptions
    source: Placement
    target: Placement
    environment: Environment
    #: The shaped hosts' links (empty: every host reaches the broker directly).
    links: dict[str, LinkReport]
    #: What each shaped link carried during the migration.
    link_traffic: dict[str, LinkTraffic]
    phases: list[Phase]
    migration: MigrationSummary
    metrics: Metrics
    counts: Counts
    verdict: Verdict
    #: Broker resources of the migration still present after it (empty: it cleaned up).
    leftovers: list[str]


__all__ = [
    "BurstsProfile",
    "CheckResult",
    "ConstantProfile",
    "Counts",
    "CutoffReport",
    "Downtime",
    "Environment",
    "Fault",
    "Finding",
    "LatencyReport",
    "LatencySummary",
    "LinkProbe",
    "LinkReport",
    "LinkSpec",
    "LinkTraffic",
    "Metrics",
    "MigrationOptions",
    "MigrationStatus",
    "MigrationSummary",
    "ObservedState",
    "Outcome",
    "PacingSummary",
    "Phase",
    "PhaseName",
    "Placement",
    "PoissonProfile",
    "ProcessingSummary",
    "Profile",
    "ReportDocument",
    "Role",
    "ServiceSpec",
    "StateVerdict",
    "Step",
    "StepsProfile",
    "StrategyName",
    "Verdict",
    "WorkloadSpec",
]
