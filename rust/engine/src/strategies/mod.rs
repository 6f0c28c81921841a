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
mod stop_and_copy;

use crate::broker::{Answer, Link, Sent};
use crate::config::{MigrationOptions, Role, ServiceSpec, Strategy};
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use ms2m_wire::{control::Command, now_ns};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;

/// Rates a strategy can measure while it runs.
pub trait RateProbe: Sync {
    /// Messages per second sent to the service over the last `window` (lambda).
    fn arrival_rate(&self, window: Duration) -> f64;
    /// Messages per second one instance processes when busy (mu): the inverse of the mean
    /// processing time of recent live messages; None before any was processed.
    fn service_rate(&self) -> Option<f64>;
}

/// What the cutoff strategy decided, and from which measurements.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
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

/// One phase of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Phase {
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub duration_ms: f64,
}

/// Phase bookkeeping: `begin` closes the open phase and opens the next.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    phases: Vec<Phase>,
    open: Option<(String, u64)>,
}

impl Timeline {
    pub fn begin(&mut self, name: &str) {
        self.begin_at(name, now_ns());
    }

    pub fn begin_at(&mut self, name: &str, t_ns: u64) {
        self.end_at(t_ns);
        self.open = Some((name.to_string(), t_ns));
    }

    pub fn end(&mut self) {
        self.end_at(now_ns());
    }

    pub fn end_at(&mut self, t_ns: u64) {
        if let Some((name, start)) = self.open.take() {
            let end = t_ns.max(start);
            self.phases.push(Phase {
                name,
                start_ns: start,
                end_ns: end,
                duration_ms: (end - start) as f64 / 1e6,
            });
        }
    }

    /// The phase in progress, if any.
    pub fn current(&self) -> Option<&str> {
        self.open.as_ref().map(|(n, _)| n.as_str())
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }
}

/// What a strategy found out while it ran.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
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
        target: (String, String),
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
            target: target.0,
            target_host: target.1,
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
            phase: self.timeline.current().unwrap_or("start").to_string(),
            reason,
            report: None,
        }
    }

    /// Begins a phase, injecting the configured fault if it is aimed at this phase.
    pub async fn enter(&mut self, phase: &str) -> Result<()> {
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
            self.timeline.current().unwrap_or("?"),
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

pub(crate) async fn run(strategy: Strategy, ctx: &mut Ctx<'_>) -> Result<()> {
    match strategy {
        Strategy::StopAndCopy => stop_and_copy::run(ctx).await,
        Strategy::Ms2m => ms2m::run(ctx).await,
        Strategy::Ms2mCutoff => ms2m_cutoff::run(ctx).await,
        Strategy::Ms2mSequential => ms2m_sequential::run(ctx).await,
        #[cfg(feature = "test-strategies")]
        Strategy::BrokenNoBarrier => broken_no_barrier::run(ctx).await,
    }
}

/// Undoes a failed migration: the target goes, the replay queue goes, and the source serves
/// again (its unprocessed messages are still in the primary queue). Returns what could not be
/// undone.
pub(crate) async fn abort(ctx: &mut Ctx<'_>) -> Vec<String> {
    let mut problems = Vec::new();
    ctx.timeline.begin("abort");
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
    use super::Timeline;

    #[test]
    fn begin_closes_the_open_phase_and_end_closes_the_last() {
        let mut t = Timeline::default();
        t.begin_at("a", 100);
        t.begin_at("b", 250);
        assert_eq!(t.current(), Some("b"));
        t.end_at(400);
        assert_eq!(t.current(), None);
        let p = t.phases();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].name.as_str(), p[0].start_ns, p[0].end_ns),
            ("a", 100, 250)
        );
        assert_eq!(
            (p[1].name.as_str(), p[1].start_ns, p[1].end_ns),
            ("b", 250, 400)
        );
        assert_eq!(p[1].duration_ms, 150e-6);
    }

    #[test]
    fn end_without_open_phase_is_a_no_op_and_time_never_runs_backwards() {
        let mut t = Timeline::default();
        t.end_at(5);
        assert!(t.phases().is_empty());
        t.begin_at("a", 10);
        t.end_at(3);
        assert_eq!(t.phases()[0].end_ns, 10);
        assert_eq!(t.phases()[0].duration_ms, 0.0);
    }
}
