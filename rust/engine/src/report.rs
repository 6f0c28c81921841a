//! One versioned JSON document per migration: configuration, environment, phase timeline,
//! metrics, latency summaries and the checker's verdict.

use crate::checker::Verdict;
use crate::config::{MigrationOptions, ServiceSpec, WorkloadSpec};
use crate::metrics::{Downtime, LatencySummary, PacingSummary};
use crate::strategies::{Outcome, Phase};
use serde::{Deserialize, Serialize};

/// Version of the report format; bumped on any incompatible change.
pub const SCHEMA: &str = "ms2m.report/1";

/// Where an instance ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Placement {
    pub instance: String,
    pub host: String,
}

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

/// The migration itself, as the manager saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigrationSummary {
    /// "completed", or "aborted" (rolled back; see `failed_phase` and `error`).
    pub status: String,
    pub failed_phase: Option<String>,
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
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Counts {
    pub published: u64,
    pub confirmed: u64,
    pub processed_live: u64,
    pub processed_replay: u64,
    /// Output events the recorder could not read as events (a service breaking the contract).
    pub malformed_events: u64,
    /// Messages sent after this instant are outside the check (still in flight at its end).
    pub cut_ns: u64,
}

/// The report of one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Report {
    pub schema: String,
    pub run_id: String,
    pub strategy: String,
    pub service: ServiceSpec,
    pub workload: Option<WorkloadSpec>,
    /// The workload's long-run mean rate, msg/s.
    pub workload_rate: Option<f64>,
    pub options: MigrationOptions,
    pub source: Placement,
    pub target: Placement,
    pub environment: Environment,
    pub phases: Vec<Phase>,
    pub migration: MigrationSummary,
    pub metrics: Metrics,
    pub counts: Counts,
    pub verdict: Verdict,
    /// Broker resources of the migration still present after it (replay queue, the source's
    /// control queue): empty when the migration cleaned up after itself.
    pub leftovers: Vec<String>,
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
