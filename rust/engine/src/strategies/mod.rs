//! Migration strategies, one file each. A strategy is an explicit sequence of phases; every
//! phase boundary is timestamped on the host clock in the [`Timeline`].
//!
//! What the strategies share lives here: the context they act through, the phase bookkeeping
//! and the rollback that leaves the source serving when a migration fails.

#[cfg(feature = "test-strategies")]
mod broken_no_barrier;
mod ms2m;
pub mod ms2m_cutoff;
mod ms2m_sequential;
mod options;
mod stop_and_copy;
mod timeline;

pub use options::{Fault, MigrationOptions, Role};
pub use timeline::{Phase, PhaseName, Timeline};

use crate::broker::{Answer, Link, Sent};
use crate::config::ServiceSpec;
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use ms2m_wire::{control::Command, now_ns};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use strum::IntoStaticStr;

/// The migration strategies this engine implements, one file each under `strategies/`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
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

    /// The name used in reports, the CLI and Python (the serde name).
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The phases this strategy runs through, in order.
    pub fn phases(self) -> &'static [PhaseName] {
        use PhaseName::*;
        match self {
            Strategy::StopAndCopy => &[Stop, Checkpoint, Transfer, Restore, Finalize],
            Strategy::Ms2m | Strategy::Ms2mCutoff => {
                &[Prepare, Checkpoint, Transfer, Restore, Replay, Finalize]
            }
            Strategy::Ms2mSequential => &[
                Prepare, Checkpoint, Transfer, Stop, Restore, Replay, Finalize,
            ],
            #[cfg(feature = "test-strategies")]
            Strategy::BrokenNoBarrier => {
                &[Checkpoint, Prepare, Transfer, Restore, Replay, Finalize]
            }
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

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an instance ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Placement {
    pub instance: String,
    pub host: String,
}

/// Rates a strategy can measure while it runs.
pub trait RateProbe: Sync {
    /// Messages per second sent to the service over the last `window` (lambda).
    fn arrival_rate(&self, window: Duration) -> f64;
    /// Messages per second one instance processes when busy (mu): the inverse of the mean
    /// processing time of recent live messages; None before any was processed.
    fn service_rate(&self) -> Option<f64>;
}

/// What the cutoff strategy decided, and from which measurements.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct CutoffReport {
    pub replay_max_s: f64,
    /// Arrival rate measured when the replay began, msg/s.
    pub lambda: f64,
    /// Service rate measured when the replay began, msg/s.
    pub mu: f64,
    /// T_cutoff = replay_max_s * mu / lambda, from the binding of the replay queue; None when
    /// nothing arrived.
    pub t_cutoff_s: Option<f64>,
    /// Whether the cutoff ended the replay (rather than the target catching up).
    pub fired: bool,
    pub fired_at_ns: Option<u64>,
}

/// What a strategy found out while it ran.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct Outcome {
    pub checkpoint_bytes: u64,
    /// Messages the target applied in replay mode.
    pub messages_replayed: u64,
    /// Replayed messages the target dropped because its snapshot already held them.
    pub replay_skipped: u64,
    /// When the source stopped serving live (instance clock reading).
    pub t_source_stop_ns: Option<u64>,
    /// When the target started serving live.
    pub t_target_live_ns: Option<u64>,
    /// Arrival rate (lambda) over the 5 s before the migration, msg/s.
    pub lambda: f64,
    /// Service rate (mu) of the source before the migration, msg/s (None: nothing processed).
    pub mu: Option<f64>,
    /// ms2m_cutoff only.
    pub cutoff: Option<CutoffReport>,
    /// The fault injected, if any, and when.
    pub fault: Option<String>,
}

/// Everything a strategy acts through.
pub(crate) struct Ctx<'a> {
    pub link: &'a Link,
    pub runtime: &'a Runtime,
    pub spec: &'a ServiceSpec,
    pub internal_url: &'a str,
    pub opts: &'a MigrationOptions,
    pub probe: &'a dyn RateProbe,
    pub migration_id: String,
    pub source: String,
    pub target: String,
    pub target_host: String,
    pub timeline: Timeline,
    pub outcome: Outcome,
    // What rollback must undo.
    pub source_stopped: bool,
    pub target_started: bool,
    pub replay_queue: Option<String>,
    /// A fault aimed at the target before it existed: kill it as soon as it starts.
    kill_target_on_start: bool,
}

impl<'a> Ctx<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        link: &'a Link,
        runtime: &'a Runtime,
        spec: &'a ServiceSpec,
        internal_url: &'a str,
        opts: &'a MigrationOptions,
        probe: &'a dyn RateProbe,
        migration_id: String,
        source: String,
        target: Placement,
    ) -> Self {
        Ctx {
            link,
            runtime,
            spec,
            internal_url,
            opts,
            probe,
            migration_id,
            source,
            target: target.instance,
            target_host: target.host,
            timeline: Timeline::default(),
            outcome: Outcome {
                lambda: probe.arrival_rate(Duration::from_secs(5)),
                mu: probe.service_rate(),
                ..Outcome::default()
            },
            source_stopped: false,
            target_started: false,
            replay_queue: None,
            kill_target_on_start: false,
        }
    }

    /// A failure in the current phase.
    pub fn failed(&self, reason: String) -> Error {
        Error::MigrationFailed {
            phase: self.timeline.current().map(PhaseName::name),
            reason,
        }
    }

    /// Begins a phase, injecting the configured fault if it is aimed at this phase.
    pub async fn enter(&mut self, phase: PhaseName) -> Result<()> {
        self.timeline.begin(phase);
        let Some(fault) = self.opts.fault.as_ref().filter(|f| f.at_phase == phase) else {
            return Ok(());
        };
        match fault.kill {
            Role::Source => self.kill(&self.source.clone()).await,
            Role::Target if self.target_started => self.kill(&self.target.clone()).await,
            Role::Target => {
                self.kill_target_on_start = true;
                Ok(())
            }
        }
    }

    async fn kill(&mut self, instance: &str) -> Result<()> {
        self.runtime.kill_instance(instance).await?;
        self.outcome.fault = Some(format!(
            "killed {instance} at the start of {} ({} ns)",
            self.timeline.current().map_or("?", PhaseName::name),
            now_ns()
        ));
        Ok(())
    }

    /// Runs `fut`, failing at once if `instance` exits meanwhile.
    pub async fn watch<T>(
        &self,
        instance: &str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::select! {
            r = fut => r,
            _ = self.runtime.wait_until_exited(instance) => Err(self.failed(format!(
                "{instance} exited (killed or crashed) while the manager waited for it"
            ))),
        }
    }

    /// Sends a command and waits for the reply, watching the instance.
    pub async fn command(&self, instance: &str, cmd: Command, attachment: &[u8]) -> Result<Answer> {
        let sent = self
            .link
            .send(&self.spec.name, instance, cmd, attachment)
            .await?;
        self.reply(instance, sent).await
    }

    /// Waits for the reply to a command sent earlier, watching the instance.
    pub async fn reply(&self, instance: &str, sent: Sent) -> Result<Answer> {
        self.watch(instance, sent.reply(self.opts.reply_timeout()))
            .await
    }

    /// Starts the target instance (standby: it waits for commands).
    pub async fn start_target(&mut self) -> Result<()> {
        self.link
            .declare_control_queue(&self.spec.name, &self.target)
            .await?;
        self.target_started = true;
        self.runtime
            .start_instance(
                self.spec,
                &self.target,
                &self.target_host,
                self.internal_url,
                false,
            )
            .await?;
        if std::mem::take(&mut self.kill_target_on_start) {
            self.kill(&self.target.clone()).await?;
        }
        Ok(())
    }

    /// The target serves: from here on a failure must not roll the migration back.
    pub fn committed(&mut self) {
        self.source_stopped = false;
        self.target_started = false;
    }

    /// Stops and removes the source once the target serves.
    pub async fn retire_source(&mut self) -> Result<()> {
        // The process may already be gone; its container is removed either way.
        let _ = self
            .command(&self.source.clone(), Command::Shutdown, &[])
            .await;
        self.runtime.remove_instance(&self.source).await?;
        self.link
            .delete_queue(&ms2m_wire::names::control_queue(
                &self.spec.name,
                &self.source,
            ))
            .await
    }
}

async fn run(strategy: Strategy, ctx: &mut Ctx<'_>) -> Result<()> {
    match strategy {
        Strategy::StopAndCopy => stop_and_copy::run(ctx).await,
        Strategy::Ms2m => ms2m::run(ctx).await,
        Strategy::Ms2mCutoff => ms2m_cutoff::run(ctx).await,
        Strategy::Ms2mSequential => ms2m_sequential::run(ctx).await,
        #[cfg(feature = "test-strategies")]
        Strategy::BrokenNoBarrier => broken_no_barrier::run(ctx).await,
    }
}

/// Why a migration was aborted.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The phase in progress when it failed (None: none was open).
    pub phase: Option<PhaseName>,
    pub reason: String,
}

impl Failure {
    /// The error a caller of the migration sees.
    pub fn to_error(&self) -> Error {
        Error::MigrationFailed {
            phase: self.phase.map(PhaseName::name),
            reason: self.reason.clone(),
        }
    }
}

/// Runs `strategy`; if it fails, rolls the migration back ([`abort`]) and says why.
pub(crate) async fn run_or_roll_back(strategy: Strategy, ctx: &mut Ctx<'_>) -> Option<Failure> {
    let error = run(strategy, ctx).await.err()?;
    let phase = ctx.timeline.current();
    let mut reason = match error {
        Error::MigrationFailed { reason, .. } => reason,
        other => other.to_string(),
    };
    let problems = abort(ctx).await;
    if !problems.is_empty() {
        reason.push_str(&format!("; rollback incomplete: {}", problems.join("; ")));
    }
    Some(Failure { phase, reason })
}

/// Undoes a failed migration: the target goes, the replay queue goes, and the source serves
/// again (its unprocessed messages are still in the primary queue). Returns what could not be
/// undone.
async fn abort(ctx: &mut Ctx<'_>) -> Vec<String> {
    let mut problems = Vec::new();
    ctx.timeline.begin(PhaseName::Abort);
    if ctx.target_started {
        let _ = ctx
            .link
            .send(&ctx.spec.name, &ctx.target, Command::Shutdown, &[])
            .await;
        if let Err(e) = ctx.runtime.remove_instance(&ctx.target).await {
            problems.push(e.to_string());
        }
        let _ = ctx
            .link
            .delete_queue(&ms2m_wire::names::control_queue(
                &ctx.spec.name,
                &ctx.target,
            ))
            .await;
    }
    if let Some(q) = ctx.replay_queue.take() {
        if let Err(e) = ctx.link.delete_queue(&q).await {
            problems.push(e.to_string());
        }
    }
    if ctx.source_stopped {
        if let Err(e) = ctx
            .command(&ctx.source.clone(), Command::StartLive, &[])
            .await
        {
            problems.push(format!("the source could not resume serving: {e}"));
        }
    }
    ctx.timeline.end();
    problems
}

#[cfg(test)]
mod tests {
    use super::Strategy;

    #[test]
    fn strategy_names_are_their_serde_names_and_parse_back() {
        for s in Strategy::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
            assert_eq!(s.name().parse::<Strategy>().unwrap(), s);
            assert!(s.phases().len() >= 5, "{s} has phases {:?}", s.phases());
        }
    }
}
