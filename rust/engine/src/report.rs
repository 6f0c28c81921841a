//! One versioned JSON document per migration: configuration, environment, phase timeline,
//! metrics, latency summaries and the checker's verdict.

use crate::checker::{self, ObservedState, Verdict};
use crate::config::ServiceSpec;
use crate::history::{History, PublishOutcome};
use crate::metrics::{self, Downtime, Latencies, LatencySummary, PacingSummary, ProcessingSummary};
use crate::net::{LinkReport, LinkTraffic};
use crate::strategies::{
    Failure, MigrationOptions, Outcome, Phase, PhaseName, Placement, Strategy,
};
use crate::workload::WorkloadSpec;
use ms2m_wire::Mode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the report format; bumped on any incompatible change.
pub const SCHEMA: &str = "ms2m.report/1";

/// The machine and software that produced a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Environment {
    pub ms2m_version: String,
    /// Versions of the crates the engine is built on (from Cargo.lock).
    pub crates: std::collections::BTreeMap<String, String>,
    pub runtime: String,
    pub broker_image: String,
    /// As `rabbitmqctl version` reports it.
    pub broker_version: Option<String>,
    pub service_image: String,
    pub docker_version: Option<String>,
    pub kernel: Option<String>,
    pub hostname: Option<String>,
    pub cores: usize,
}

impl Environment {
    pub fn collect(
        runtime: &str,
        broker_image: &str,
        broker_version: Option<String>,
        service_image: &str,
        docker_version: Option<String>,
    ) -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
        };
        Environment {
            ms2m_version: env!("CARGO_PKG_VERSION").to_string(),
            crates: env!("MS2M_CRATE_VERSIONS")
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            runtime: runtime.into(),
            broker_image: broker_image.into(),
            broker_version,
            service_image: service_image.into(),
            docker_version,
            kernel: read("/proc/sys/kernel/osrelease"),
            hostname: read("/proc/sys/kernel/hostname"),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStatus {
    /// The target serves; the source is gone.
    Completed,
    /// Rolled back: the source serves again (see `failed_phase` and `error`); or, when the
    /// source died with its state, an empty instance serves in its place (`restarted`).
    Aborted,
}

/// The migration itself, as the manager saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigrationSummary {
    pub status: MigrationStatus,
    pub failed_phase: Option<PhaseName>,
    pub error: Option<String>,
    pub t_start_ns: u64,
    pub t_end_ns: u64,
    pub total_ms: f64,
    /// From the source leaving live service to the target entering it.
    pub control_plane_downtime_ms: Option<f64>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Latency percentiles by when the message was sent relative to the migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LatencyReport {
    pub before: LatencySummary,
    pub during: LatencySummary,
    pub after: LatencySummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Metrics {
    /// How late the workload sent its messages: the instrument's own error.
    pub pacing_error: PacingSummary,
    /// Longest gap in the migration window while a message waited and no instance served.
    pub downtime: Downtime,
    /// The same figure over an equal window before the migration: the testbed's noise floor.
    pub baseline_downtime: Downtime,
    pub latency: LatencyReport,
    /// The processing time asked of the service against what its instances spent.
    pub processing: ProcessingSummary,
    /// How late output events reached the recorder (from the instance's `t_end_ns`): the
    /// instrument's own delay, over every event of the service so far.
    pub recorder_lag: LatencySummary,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Counts {
    pub published: u64,
    pub confirmed: u64,
    pub processed_live: u64,
    /// Messages replayed, as the replay events report them (one event per run of messages).
    pub processed_replay: u64,
    /// Output events the recorder could not read as events (a service breaking the contract).
    pub malformed_events: u64,
    /// Input the instances refused since the service was deployed (see
    /// [`ms2m_wire::Rejection`]): what its dead-letter queue holds.
    #[serde(default)]
    pub dead_letters: DeadLetters,
    /// Messages sent after this instant are outside the check (still in flight at its end).
    pub cut_ns: u64,
}

/// What a service's dead-letter queue holds: refused input, never applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeadLetters {
    pub total: u64,
    /// By reason (`malformed`, `oversized`, `repeat`, `jump`, `unarmed_barrier`), over the
    /// first [`DeadLetters::READ_MAX`] of them.
    pub by_reason: BTreeMap<String, u64>,
}

impl DeadLetters {
    /// Most dead letters read for their reasons (each one is fetched and handed back).
    pub const READ_MAX: usize = 10_000;
}

/// The report of one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Report {
    pub schema: String,
    pub run_id: String,
    /// A strategy's name (a string in the schema: test builds know one strategy more).
    #[schemars(with = "String")]
    pub strategy: Strategy,
    pub service: ServiceSpec,
    pub workload: Option<WorkloadSpec>,
    /// The workload's long-run mean rate, msg/s.
    pub workload_rate: Option<f64>,
    pub options: MigrationOptions,
    pub source: Placement,
    pub target: Placement,
    pub environment: Environment,
    /// The shaped hosts' links to the broker's host, as configured and as the probe measured
    /// them at testbed start (empty: every host reaches the broker directly).
    #[serde(default)]
    pub links: BTreeMap<String, LinkReport>,
    /// What each shaped link carried during the migration (the checkpoint crosses the source's
    /// link up and the target's down).
    #[serde(default)]
    pub link_traffic: BTreeMap<String, LinkTraffic>,
    pub phases: Vec<Phase>,
    pub migration: MigrationSummary,
    pub metrics: Metrics,
    pub counts: Counts,
    pub verdict: Verdict,
    /// Broker resources of the migration still present after it (replay queue, the source's
    /// control queue): empty when the migration cleaned up after itself.
    pub leftovers: Vec<String>,
}

/// Everything a migration run left for its report: what was asked, what the strategy did, and
/// the recorded history with the final instance's state.
pub(crate) struct RunRecord<'a> {
    pub run_id: String,
    pub strategy: Strategy,
    pub service: ServiceSpec,
    pub workload: Option<WorkloadSpec>,
    pub options: MigrationOptions,
    pub source: Placement,
    pub target: Placement,
    pub environment: Environment,
    pub links: BTreeMap<String, LinkReport>,
    pub link_traffic: BTreeMap<String, LinkTraffic>,
    pub phases: Vec<Phase>,
    pub outcome: Outcome,
    /// Why the migration was aborted, if it was.
    pub failure: Option<Failure>,
    /// From the first phase's start to the last one's end, host clock ns.
    pub window: (u64, u64),
    /// Since when the service has been under its current workload and past its last migration
    /// (its backlog drained): the baseline window ends at the migration's start and reaches
    /// back no further.
    pub steady_since_ns: u64,
    pub history: &'a History,
    /// Messages sent after this instant are outside the check.
    pub cut_ns: u64,
    pub observed: Option<ObservedState>,
    /// What the twin reached, or why it could not (a service of one's own; None: no twin
    /// ran).
    pub twin: Option<std::result::Result<checker::TwinState, String>>,
    pub malformed_events: u64,
    pub dead_letters: DeadLetters,
    pub recorder_lag: LatencySummary,
    pub leftovers: Vec<String>,
}

impl Report {
    /// Measures and checks a run's history and puts the report together.
    pub(crate) fn assemble(run: RunRecord<'_>) -> Report {
        let RunRecord {
            history,
            window: (t_start, t_end),
            cut_ns,
            ..
        } = run;
        let (twin, twin_error) = match run.twin {
            Some(Ok(t)) => (Some(t), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        let oracle = match (run.service.is_reference(), &twin) {
            (true, _) => checker::StateOracle::Reference,
            (false, Some(_)) => checker::StateOracle::Twin,
            (false, None) => checker::StateOracle::None,
        };
        let mut verdict = checker::check_with(history, cut_ns, run.observed, oracle, twin);
        verdict.state.oracle_error = twin_error;
        let baseline = (
            t_start
                .saturating_sub(t_end - t_start)
                .max(run.steady_since_ns),
            t_start,
        );
        let lat = Latencies::compute(history, (t_start, t_end));
        let processing = metrics::processing(history, run.service.processing_ms);
        let live = history
            .events
            .iter()
            .filter(|e| e.mode == Mode::Live)
            .count() as u64;
        let control_plane = match (run.outcome.t_source_stop_ns, run.outcome.t_target_live_ns) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6),
            _ => None,
        };
        let (status, failed_phase, error) = match run.failure {
            None => (MigrationStatus::Completed, None, None),
            Some(f) => (MigrationStatus::Aborted, f.phase, Some(f.reason)),
        };
        Report {
            schema: SCHEMA.into(),
            run_id: run.run_id,
            strategy: run.strategy,
            service: run.service,
            workload_rate: run.workload.as_ref().map(|w| w.profile.mean_rate()),
            workload: run.workload,
            options: run.options,
            source: run.source,
            target: run.target,
            environment: run.environment,
            links: run.links,
            link_traffic: run.link_traffic,
            phases: run.phases,
            migration: MigrationSummary {
                status,
                failed_phase,
                error,
                t_start_ns: t_start,
                t_end_ns: t_end,
                total_ms: (t_end - t_start) as f64 / 1e6,
                control_plane_downtime_ms: control_plane,
                outcome: run.outcome,
            },
            metrics: Metrics {
                pacing_error: metrics::pacing(history, cut_ns),
                downtime: metrics::downtime(history, (t_start, t_end), cut_ns),
                baseline_downtime: metrics::downtime(history, baseline, cut_ns),
                latency: LatencyReport {
                    before: metrics::summarize(&lat.before),
                    during: metrics::summarize(&lat.during),
                    after: metrics::summarize(&lat.after),
                },
                processing,
                recorder_lag: run.recorder_lag,
            },
            counts: Counts {
                published: history.published.len() as u64,
                confirmed: history
                    .published
                    .iter()
                    .filter(|p| p.outcome == PublishOutcome::Confirmed)
                    .count() as u64,
                processed_live: live,
                processed_replay: history
                    .events
                    .iter()
                    .filter(|e| e.mode == Mode::Replay)
                    .map(|e| e.messages())
                    .sum(),
                malformed_events: run.malformed_events,
                dead_letters: run.dead_letters,
                cut_ns,
            },
            verdict,
            leftovers: run.leftovers,
        }
    }
}

/// The JSON Schema of [`Report`], generated from the types themselves.
pub fn schema_json() -> String {
    serde_json::to_string_pretty(&schemars::schema_for!(Report)).expect("schemas serialize") + "\n"
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports serialize")
    }

    pub fn from_json(s: &str) -> serde_json::Result<Report> {
        serde_json::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    /// The schema shipped with the Python package must match the types; `make schema` (or
    /// `MS2M_WRITE_SCHEMA=1 cargo test`) rewrites it.
    #[test]
    fn shipped_schema_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../python/ms2m/report.schema.json"
        );
        let schema = super::schema_json();
        if std::env::var_os("MS2M_WRITE_SCHEMA").is_some() {
            std::fs::write(path, &schema).unwrap();
        }
        let shipped = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            shipped == schema,
            "python/ms2m/report.schema.json is out of date: run `make schema`"
        );
    }
}
