//! The knobs of one migration, validated against its strategy before anything starts.

use super::{PhaseName, Strategy};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What a fault hits: an instance, or the broker. The broker restarts (RabbitMQ's application
/// stops and starts again: every connection closes, and what is not durable is gone), down for
/// the fault's `outage_s` (default none) between; only a broker the testbed started.
// (No doc comments on the variants: the schema stays a plain enum of names.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Target,
    Broker,
}

/// A fault to inject when a phase begins, or `after_ms` into it: kill an instance (SIGKILL),
/// as a crash would, or with `outage_s` cut the link of its host for that long instead, or
/// restart the broker. For experiments on failure handling and for the engine's own tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Fault {
    /// The instance hit (or whose host's link goes down), or the broker restarted.
    pub kill: Role,
    pub at_phase: PhaseName,
    /// How long into the phase (0: as it begins). A fault still pending when the phase ends
    /// does not happen, so that it never hits a later phase.
    #[serde(default)]
    pub after_ms: f64,
    /// Not a kill but an outage of the instance's host link, this many seconds (the host needs
    /// a link); it ends by itself, whatever the migration does meanwhile. For the broker: how
    /// long it stays down before it starts again.
    #[serde(default)]
    pub outage_s: Option<f64>,
}

/// How the checkpoint goes from the source's host to the target's.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Transfer {
    /// Through the broker: the source writes chunks to a queue, the target reads them (two
    /// hops: the source host's link, then the target host's).
    #[default]
    Broker,
    /// From host to host, as the paper's rsync: the target reads the chunks from the source
    /// over TCP, across the link between the two hosts.
    Direct,
}

impl Transfer {
    pub fn name(self) -> &'static str {
        match self {
            Transfer::Broker => "broker",
            Transfer::Direct => "direct",
        }
    }
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
    /// Longest wait for the backlog to drain before the checker runs, beyond the time the
    /// backlog needs at the service rate measured before the migration.
    pub drain_timeout_s: f64,
    /// ms2m_cutoff: the longest acceptable replay, T_replay_max in
    /// T_cutoff = T_replay_max * mu / lambda.
    pub replay_max_s: f64,
    /// A fault to inject, if any.
    pub fault: Option<Fault>,
    /// Largest chunk a checkpoint is streamed in, bytes (see [`MAX_CHUNK_BYTES`]).
    pub chunk_bytes: u32,
    /// How the checkpoint travels.
    pub transfer: Transfer,
}

/// The largest chunk: far below the broker's 128 MiB message limit, and small enough that
/// the few chunks in flight stay a small fraction of a large state.
pub const MAX_CHUNK_BYTES: u32 = 64 << 20;
/// The smallest chunk: below it, per-message overhead dominates.
pub const MIN_CHUNK_BYTES: u32 = 4 << 10;

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            reply_timeout_s: 60.0,
            replay_timeout_s: 60.0,
            settle_s: 1.0,
            drain_timeout_s: 60.0,
            replay_max_s: 2.0,
            fault: None,
            chunk_bytes: 8 << 20,
            transfer: Transfer::Broker,
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
                return Err(Error::Config(format!("{name} must be > 0, got {v}")));
            }
        }
        if !(self.settle_s.is_finite() && self.settle_s >= 0.0) {
            return Err(Error::Config(format!(
                "settle_s must be >= 0, got {}",
                self.settle_s
            )));
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&self.chunk_bytes) {
            return Err(Error::Config(format!(
                "chunk_bytes must be {MIN_CHUNK_BYTES}..={MAX_CHUNK_BYTES} (4 KiB to 64 MiB: a \
                 chunk is one broker message), got {}",
                self.chunk_bytes
            )));
        }
        if let Some(f) = &self.fault {
            if !(f.after_ms.is_finite() && f.after_ms >= 0.0) {
                return Err(Error::Config(format!(
                    "fault after_ms must be >= 0, got {}",
                    f.after_ms
                )));
            }
            if let Some(o) = f.outage_s {
                if !(o.is_finite() && o > 0.0) {
                    return Err(Error::Config(format!(
                        "fault outage_s must be > 0, got {o}"
                    )));
                }
            }
            if !strategy.phases().contains(&f.at_phase) {
                let phases: Vec<_> = strategy.phases().iter().map(|p| p.name()).collect();
                return Err(Error::Config(format!(
                    "fault phase {:?} is not a phase of {strategy}; its phases are {phases:?}",
                    f.at_phase.name(),
                )));
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

    #[test]
    fn bad_options_are_refused_with_a_reason() {
        let e = "warp".parse::<Strategy>().unwrap_err();
        assert!(e.to_string().contains("stop_and_copy"), "{e}");
        assert_eq!("ms2m".parse::<Strategy>().unwrap(), Strategy::Ms2m);
        let fault = MigrationOptions {
            fault: Some(Fault {
                kill: Role::Target,
                at_phase: PhaseName::Replay,
                after_ms: 0.0,
                outage_s: None,
            }),
            ..Default::default()
        };
        fault.validate(Strategy::Ms2m).unwrap();
        let e = fault.validate(Strategy::StopAndCopy).unwrap_err();
        assert!(
            e.to_string().contains("not a phase of stop_and_copy"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(r#"its phases are ["stop", "checkpoint""#),
            "{e}"
        );
        let e = MigrationOptions {
            chunk_bytes: 200 << 20,
            ..Default::default()
        }
        .validate(Strategy::Ms2m)
        .unwrap_err();
        assert!(e.to_string().contains("chunk_bytes must be"), "{e}");
        assert!(MigrationOptions {
            replay_max_s: 0.0,
            ..Default::default()
        }
        .validate(Strategy::Ms2mCutoff)
        .is_err());
    }
}
