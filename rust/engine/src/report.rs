//! One versioned JSON document per migration: configuration, environment, phase timeline,
//! metrics, latency summaries and the checker's verdict.

use crate::checker::Verdict;
use crate::config::{MigrationOptions, ServiceSpec, WorkloadSpec};
use crate::metrics::{Downtime, LatencySummary};
use crate::strategies::{Outcome, Phase};
use serde::{Deserialize, Serialize};

/// Version of the report format; bumped on any incompatible change.
pub const SCHEMA: &str = "ms2m.report/1";

/// Where an instance ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub instance: String,
    pub host: String,
}

/// The machine and software that produced a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub ms2m_version: String,
    pub runtime: String,
    pub broker_image: String,
    pub service_image: String,
    pub docker_version: Option<String>,
    pub kernel: Option<String>,
    pub hostname: Option<String>,
    pub cores: usize,
}

impl Environment {
    pub fn collect(
        broker_image: &str,
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
            runtime: "docker".into(),
            broker_image: broker_image.into(),
            service_image: service_image.into(),
            docker_version,
            kernel: read("/proc/sys/kernel/osrelease"),
            hostname: read("/proc/sys/kernel/hostname"),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The migration itself, as the manager saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    pub before: LatencySummary,
    pub during: LatencySummary,
    pub after: LatencySummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Longest gap in the migration window while a message waited and no instance served.
    pub downtime: Downtime,
    /// The same figure over an equal window before the migration: the testbed's noise floor.
    pub baseline_downtime: Downtime,
    pub latency: LatencyReport,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub published: u64,
    pub confirmed: u64,
    pub processed_live: u64,
    pub processed_replay: u64,
    /// Messages sent after this instant are outside the check (still in flight at its end).
    pub cut_ns: u64,
}

/// The report of one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub run_id: String,
    pub strategy: String,
    pub service: ServiceSpec,
    pub workload: Option<WorkloadSpec>,
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

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports serialize")
    }

    pub fn from_json(s: &str) -> serde_json::Result<Report> {
        serde_json::from_str(s)
    }
}
