//! Configurations of a testbed, a service, a workload and a migration, each validated before
//! anything starts.

use crate::error::{Error, Result};
use crate::workload::Profile;
use serde::{Deserialize, Serialize};
use std::time::Duration;

fn refuse<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Config(msg.into()))
}

/// Where the broker and the service instances run.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// docker where a Docker daemon answers, local otherwise.
    #[default]
    Auto,
    /// Containers started with testcontainers on the testbed's own Docker network.
    Docker,
    /// Local processes: Debian's rabbitmq-server on free ports in a temporary directory, the
    /// `ms2m-service` binary as a subprocess per instance. For machines without Docker.
    Local,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Auto => "auto",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Local => "local",
        }
    }
}

/// Where the broker and the instances run, and which images they use.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TestbedConfig {
    /// Host names instances can be placed on. A host is a name the testbed maps to where an
    /// instance runs; in the docker runtime every host is a container on the testbed network.
    pub hosts: Vec<String>,
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// An existing broker (`amqp://user:pass@host:port/vhost`) to use instead of starting one.
    /// The testbed then only removes the queues and exchanges it declared.
    #[serde(default)]
    pub amqp_url: Option<String>,
    /// docker runtime: the broker and service images.
    pub broker_image: String,
    pub service_image: String,
    /// local runtime: the `ms2m-service` binary (default: `$MS2M_SERVICE_BIN`, then
    /// `ms2m-service` on PATH, then this checkout's `target/release/ms2m-service`).
    #[serde(default)]
    pub service_binary: Option<String>,
    /// Longest wait for the broker to accept AMQP connections.
    pub broker_startup_timeout_s: f64,
}

impl Default for TestbedConfig {
    fn default() -> Self {
        TestbedConfig {
            hosts: vec!["edge-1".into(), "edge-2".into(), "cloud".into()],
            runtime: RuntimeKind::Auto,
            amqp_url: None,
            service_binary: None,
            broker_image: std::env::var("MS2M_BROKER_IMAGE")
                .unwrap_or_else(|_| "ms2m/rabbitmq:3.10".into()),
            service_image: std::env::var("MS2M_SERVICE_IMAGE")
                .unwrap_or_else(|_| "ms2m/service:dev".into()),
            broker_startup_timeout_s: 90.0,
        }
    }
}

impl TestbedConfig {
    pub fn validate(&self) -> Result<()> {
        if self.hosts.is_empty() {
            return refuse("a testbed needs at least one host");
        }
        for h in &self.hosts {
            valid_name("host", h)?;
        }
        let mut sorted = self.hosts.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.hosts.len() {
            return refuse(format!("host names must be unique: {:?}", self.hosts));
        }
        for (what, image) in [
            ("broker_image", &self.broker_image),
            ("service_image", &self.service_image),
        ] {
            if image.trim().is_empty() {
                return refuse(format!("{what} must name an image"));
            }
        }
        if !(self.broker_startup_timeout_s.is_finite() && self.broker_startup_timeout_s > 0.0) {
            return refuse("broker_startup_timeout_s must be > 0");
        }
        if let Some(url) = &self.amqp_url {
            check_amqp_url(url, self.runtime)?;
        }
        if let Some(bin) = &self.service_binary {
            if !std::path::Path::new(bin).is_file() {
                return refuse(format!("service_binary {bin:?} is not a file"));
            }
        }
        Ok(())
    }
}

/// Refuses an external broker URL that cannot work before anything starts.
fn check_amqp_url(url: &str, runtime: RuntimeKind) -> Result<()> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return refuse(format!(
            "amqp_url {url:?} must start with amqp:// or amqps:// (e.g. \
             amqp://guest:guest@127.0.0.1:5672/%2f)"
        ));
    }
    if crate::runtime::url_host(url).is_none() {
        return refuse(format!("amqp_url {url:?} names no host"));
    }
    if crate::runtime::is_loopback_url(url) && runtime == RuntimeKind::Docker {
        return refuse(format!(
            "amqp_url {url:?} is on this machine's loopback, which the docker runtime's \
             containers cannot reach; use runtime \"local\", or an address the containers reach"
        ));
    }
    Ok(())
}

/// Names used in broker resources and container names: letters, digits, '-' and '_'.
pub(crate) fn valid_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 48
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return refuse(format!(
            "{what} name {name:?} must be 1-48 characters of letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// A service to deploy: the reference service's parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ServiceSpec {
    pub name: String,
    pub host: String,
    /// Processing time per message, milliseconds.
    pub processing_ms: f64,
    /// Size of the mutable state payload, bytes.
    pub state_bytes: u64,
    /// Messages an instance may fetch ahead of processing.
    pub prefetch: u16,
}

impl ServiceSpec {
    pub fn validate(&self, tb: &TestbedConfig) -> Result<()> {
        valid_name("service", &self.name)?;
        check_host(tb, &self.host)?;
        if !(self.processing_ms.is_finite() && self.processing_ms >= 0.0) {
            return refuse(format!(
                "processing_ms must be a finite number >= 0, got {}",
                self.processing_ms
            ));
        }
        if self.state_bytes > 1 << 30 {
            return refuse(format!(
                "state_bytes {} exceeds the 1 GiB the broker can carry as a checkpoint",
                self.state_bytes
            ));
        }
        if self.prefetch == 0 {
            return refuse("prefetch must be at least 1");
        }
        Ok(())
    }
}

pub(crate) fn check_host(tb: &TestbedConfig, host: &str) -> Result<()> {
    if !tb.hosts.iter().any(|h| h == host) {
        return refuse(format!(
            "unknown host {host:?}; this testbed has {:?}",
            tb.hosts
        ));
    }
    Ok(())
}

/// An open-loop workload: messages sent on an absolute schedule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct WorkloadSpec {
    pub profile: Profile,
    /// Payload bytes per message.
    pub message_bytes: usize,
    /// Seed of the random parts (Poisson gaps); the same seed gives the same schedule.
    #[serde(default)]
    pub seed: u64,
}

impl WorkloadSpec {
    /// `rate` messages per second, evenly spaced, 64-byte payloads.
    pub fn constant(rate: f64) -> Self {
        WorkloadSpec {
            profile: Profile::Constant { rate },
            message_bytes: 64,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.profile.validate()?;
        if self.message_bytes > 16 << 20 {
            return refuse("message_bytes must be at most 16 MiB");
        }
        Ok(())
    }
}

/// The migration strategies this engine implements, one file each under `strategies/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    StopAndCopy,
    Ms2m,
    Ms2mCutoff,
    Ms2mSequential,
    /// Deliberately broken MS2M without the barrier, built only with the `test-strategies`
    /// feature: it exists to prove that the checker catches the state it loses.
    #[cfg(feature = "test-strategies")]
    BrokenNoBarrier,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::StopAndCopy,
        Strategy::Ms2m,
        Strategy::Ms2mCutoff,
        Strategy::Ms2mSequential,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::StopAndCopy => "stop_and_copy",
            Strategy::Ms2m => "ms2m",
            Strategy::Ms2mCutoff => "ms2m_cutoff",
            Strategy::Ms2mSequential => "ms2m_sequential",
            #[cfg(feature = "test-strategies")]
            Strategy::BrokenNoBarrier => "broken_no_barrier",
        }
    }

    /// The phases this strategy runs through, in order.
    pub fn phases(self) -> &'static [&'static str] {
        match self {
            Strategy::StopAndCopy => &["stop", "checkpoint", "transfer", "restore", "finalize"],
            Strategy::Ms2m | Strategy::Ms2mCutoff => &[
                "prepare",
                "checkpoint",
                "transfer",
                "restore",
                "replay",
                "finalize",
            ],
            Strategy::Ms2mSequential => &[
                "prepare",
                "checkpoint",
                "transfer",
                "stop",
                "restore",
                "replay",
                "finalize",
            ],
            #[cfg(feature = "test-strategies")]
            Strategy::BrokenNoBarrier => &[
                "checkpoint",
                "prepare",
                "transfer",
                "restore",
                "replay",
                "finalize",
            ],
        }
    }
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Strategy::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown strategy {s:?}; choose one of {:?}",
                    Strategy::ALL.map(|s| s.name())
                ))
            })
    }
}

/// Which instance a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Target,
}

/// A fault to inject: kill an instance (SIGKILL) when a phase begins, as a crash would. For
/// experiments on failure handling and for the engine's own tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Fault {
    pub kill: Role,
    pub at_phase: String,
}

/// Knobs of one migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(default)]
pub struct MigrationOptions {
    /// Longest wait for any one instance reply.
    pub reply_timeout_s: f64,
    /// Longest replay phase before the migration is aborted (ms2m cannot always converge).
    pub replay_timeout_s: f64,
    /// Observation after the cutover, for the "after" latencies.
    pub settle_s: f64,
    /// Longest wait for the backlog to drain before the checker runs.
    pub drain_timeout_s: f64,
    /// ms2m_cutoff: the longest acceptable replay, T_replay_max in
    /// T_cutoff = T_replay_max * mu / lambda.
    pub replay_max_s: f64,
    /// A fault to inject, if any.
    pub fault: Option<Fault>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            reply_timeout_s: 60.0,
            replay_timeout_s: 60.0,
            settle_s: 1.0,
            drain_timeout_s: 60.0,
            replay_max_s: 2.0,
            fault: None,
        }
    }
}

impl MigrationOptions {
    pub fn validate(&self, strategy: Strategy) -> Result<()> {
        for (name, v) in [
            ("reply_timeout_s", self.reply_timeout_s),
            ("replay_timeout_s", self.replay_timeout_s),
            ("drain_timeout_s", self.drain_timeout_s),
            ("replay_max_s", self.replay_max_s),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return refuse(format!("{name} must be > 0, got {v}"));
            }
        }
        if !(self.settle_s.is_finite() && self.settle_s >= 0.0) {
            return refuse(format!("settle_s must be >= 0, got {}", self.settle_s));
        }
        if let Some(f) = &self.fault {
            if !strategy.phases().contains(&f.at_phase.as_str()) {
                return refuse(format!(
                    "fault phase {:?} is not a phase of {}; its phases are {:?}",
                    f.at_phase,
                    strategy.name(),
                    strategy.phases()
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn reply_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.reply_timeout_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "counter".into(),
            host: "edge-1".into(),
            processing_ms: 50.0,
            state_bytes: 1000,
            prefetch: 1,
        }
    }

    #[test]
    fn good_service_passes() {
        spec().validate(&TestbedConfig::default()).unwrap();
    }

    #[test]
    fn bad_inputs_are_refused_with_a_reason() {
        let tb = TestbedConfig::default();
        let e = ServiceSpec {
            host: "mars".into(),
            ..spec()
        }
        .validate(&tb)
        .unwrap_err();
        assert!(e.to_string().contains("unknown host \"mars\""), "{e}");
        assert!(ServiceSpec {
            processing_ms: -1.0,
            ..spec()
        }
        .validate(&tb)
        .is_err());
        assert!(ServiceSpec {
            name: "a.b".into(),
            ..spec()
        }
        .validate(&tb)
        .is_err());
        assert!(WorkloadSpec::constant(-2.0).validate().is_err());
        assert!(WorkloadSpec::constant(f64::NAN).validate().is_err());
        let e = "warp".parse::<Strategy>().unwrap_err();
        assert!(e.to_string().contains("stop_and_copy"), "{e}");
        assert_eq!("ms2m".parse::<Strategy>().unwrap(), Strategy::Ms2m);
        let fault = MigrationOptions {
            fault: Some(Fault {
                kill: Role::Target,
                at_phase: "replay".into(),
            }),
            ..Default::default()
        };
        fault.validate(Strategy::Ms2m).unwrap();
        let e = fault.validate(Strategy::StopAndCopy).unwrap_err();
        assert!(
            e.to_string().contains("not a phase of stop_and_copy"),
            "{e}"
        );
        assert!(MigrationOptions {
            replay_max_s: 0.0,
            ..Default::default()
        }
        .validate(Strategy::Ms2mCutoff)
        .is_err());
    }
}
