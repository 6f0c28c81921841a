//! Migration strategies, one file each. A strategy is an explicit sequence of phases; every
//! phase boundary is timestamped on the host clock in the [`Timeline`].
//!
//! What the strategies share lives here: the context they act through, the phase bookkeeping
//! and the rollback that leaves the source serving when a migration fails.

mod ms2m;
mod stop_and_copy;

use crate::broker::{Answer, Link};
use crate::config::{MigrationOptions, ServiceSpec, Strategy};
use crate::error::Result;
use crate::runtime::docker::DockerRuntime;
use ms2m_wire::{control::Command, now_ns};
use serde::{Deserialize, Serialize};

/// One phase of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
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
}

/// Everything a strategy acts through.
pub(crate) struct Ctx<'a> {
    pub link: &'a Link,
    pub runtime: &'a DockerRuntime,
    pub spec: &'a ServiceSpec,
    pub internal_url: &'a str,
    pub opts: &'a MigrationOptions,
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
}

impl Ctx<'_> {
    pub async fn command(&self, instance: &str, cmd: Command, attachment: &[u8]) -> Result<Answer> {
        self.link
            .command(
                &self.spec.name,
                instance,
                cmd,
                attachment,
                self.opts.reply_timeout(),
            )
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
            .await
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
