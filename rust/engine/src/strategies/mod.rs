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
mod restart;
mod stop_and_copy;
mod takeover;
mod timeline;

pub use options::{Fault, MigrationOptions, Role, Transfer, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES};
pub use restart::Restarted;
pub use takeover::TakeOver;
pub use timeline::{Phase, PhaseName, Timeline};

use crate::broker::{Answer, Link, Sent};
use crate::config::ServiceSpec;
use crate::error::{Error, Result};
use crate::net::Links;
use crate::runtime::Runtime;
use ms2m_wire::control::{Checkpoint, Command, Reply, StreamTo};
use ms2m_wire::{names, now_ns};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::future::Future;

/// How long a rollback waits for a restarted broker to take connections again.
pub(crate) const RECONNECT_WITHIN: Duration = Duration::from_secs(60);
use std::sync::{Arc, Mutex};
use std::time::Duration;
use strum::IntoStaticStr;
use tokio::time::Instant;

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

/// Rates and positions a strategy can measure while it runs.
pub trait RateProbe: Sync {
    /// Messages per second sent to the service over the last `window` (lambda).
    fn arrival_rate(&self, window: Duration) -> f64;
    /// Messages per second one instance processes when busy (mu): the inverse of the mean
    /// processing time of recent live messages; None before any was processed.
    fn service_rate(&self) -> Option<f64>;
    /// The highest seq with a live output event so far (None: none yet).
    fn last_live_seq(&self) -> Option<u64>;
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

/// How the checkpoint travelled: written by the source to its queue in chunks, then fetched
/// by the target; or (direct) read by the target from the source. Times are the instances'
/// own (host clock).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct CheckpointStats {
    /// (Reports older than direct transfers: broker.)
    #[serde(default)]
    pub transfer: Transfer,
    /// Each stretch the bytes crossed, in order: source host to broker to target host, or
    /// (direct) source host to target host (older reports: empty).
    #[serde(default)]
    pub hops: Vec<HopStats>,
    pub bytes: u64,
    pub chunks: u32,
    /// The largest chunk asked for (`chunk_bytes`).
    pub chunk_bytes: u32,
    /// SHA-256 of the snapshot, checked by the target.
    pub sha256: String,
    /// From the source taking the snapshot to the broker confirming its last chunk (direct:
    /// to serving it), ms.
    pub write_ms: f64,
    pub write_mib_s: f64,
    /// From the target asking for the first chunk to holding all of them, checked, ms.
    pub fetch_ms: Option<f64>,
    pub fetch_mib_s: Option<f64>,
}

/// One stretch of a checkpoint's way: `from` and `to` are hosts, or `broker`.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct HopStats {
    pub from: String,
    pub to: String,
    pub bytes: u64,
    /// How long the bytes took over this stretch, ms (None: not crossed, the migration ended
    /// before).
    pub ms: Option<f64>,
    /// Payload throughput over it, Mbit/s.
    pub mbit_s: Option<f64>,
}

impl HopStats {
    fn new(from: &str, to: &str, bytes: u64) -> Self {
        HopStats {
            from: from.into(),
            to: to.into(),
            bytes,
            ms: None,
            mbit_s: None,
        }
    }

    fn took(&mut self, ms: f64) {
        self.ms = Some(ms);
        self.mbit_s = Some(mib_s(self.bytes, ms) * (1 << 20) as f64 * 8.0 / 1e6);
    }
}

/// MiB per second of `bytes` moved in `ms` milliseconds (0 for no time).
fn mib_s(bytes: u64, ms: f64) -> f64 {
    if ms > 0.0 {
        bytes as f64 / (1 << 20) as f64 / (ms / 1e3)
    } else {
        0.0
    }
}

/// Milliseconds between two instance readings of the host clock.
fn span_ms(begin_ns: u64, end_ns: u64) -> f64 {
    end_ns.saturating_sub(begin_ns) as f64 / 1e6
}

/// What a strategy found out while it ran.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
pub struct Outcome {
    pub checkpoint_bytes: u64,
    /// How the checkpoint was written and fetched (None: no checkpoint was taken).
    #[serde(default)]
    pub checkpoint: Option<CheckpointStats>,
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
    /// The source died once its checkpoint was complete, and the target took over (see
    /// `strategies/takeover.rs`).
    #[serde(default)]
    pub takeover: Option<TakeOver>,
    /// The source died and nothing held its state: an empty instance replaced it.
    pub restarted: Option<Restarted>,
}

/// Everything a strategy acts through.
pub(crate) struct Ctx<'a> {
    pub link: &'a Link,
    /// The hosts' links, for outage faults.
    pub links: Arc<Links>,
    pub runtime: &'a Runtime,
    pub spec: &'a ServiceSpec,
    /// The broker's URL as the source's host reaches it (through its link, if shaped).
    pub source_url: &'a str,
    /// The broker's URL as the target's host reaches it (through its link, if shaped).
    pub target_url: &'a str,
    pub opts: &'a MigrationOptions,
    pub probe: &'a dyn RateProbe,
    pub migration_id: String,
    pub source: String,
    pub source_host: String,
    pub target: String,
    pub target_host: String,
    pub timeline: Timeline,
    pub outcome: Outcome,
    // What rollback must undo.
    pub source_stopped: bool,
    pub target_started: bool,
    /// The position of the checkpoint the target restored (None: not restored): it can take
    /// over if the source dies.
    pub target_restored: Option<u64>,
    /// The source's complete checkpoint, once it has one: a target can restore it even if the
    /// source dies (from its queue, or already fetched).
    pub checkpoint: Option<ms2m_wire::control::Checkpoint>,
    /// The target holds the whole checkpoint (fetched and checked).
    pub target_fetched: bool,
    /// The target was told to replay the replay queue.
    pub replay_started: bool,
    /// The target serves: nothing may be rolled back or replaced any more.
    pub committed: bool,
    /// The broker restarted during the migration (the link had to reconnect).
    pub broker_restarted: bool,
    /// Where the commit is noted, for `cleanup` to finish the migration if the driver dies.
    pub journal: Option<&'a crate::journal::Journal>,
    pub replay_queue: Option<String>,
    pub checkpoint_queue: Option<String>,
    /// A fault aimed at the target before it existed: kill it as soon as it starts.
    kill_target_on_start: bool,
    /// A fault due later in the current phase: [`Ctx::watch`] carries it out while it waits.
    scheduled_kill: Mutex<Option<(Instant, Role)>>,
    /// What a scheduled kill did, once it did it.
    fired: Mutex<Option<String>>,
}

impl<'a> Ctx<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        link: &'a Link,
        links: Arc<Links>,
        runtime: &'a Runtime,
        spec: &'a ServiceSpec,
        source_url: &'a str,
        target_url: &'a str,
        opts: &'a MigrationOptions,
        probe: &'a dyn RateProbe,
        migration_id: String,
        source: Placement,
        target: Placement,
    ) -> Self {
        Ctx {
            link,
            links,
            runtime,
            spec,
            source_url,
            target_url,
            opts,
            probe,
            migration_id,
            source: source.instance,
            source_host: source.host,
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
            target_restored: None,
            checkpoint: None,
            target_fetched: false,
            replay_started: false,
            committed: false,
            broker_restarted: false,
            journal: None,
            replay_queue: None,
            checkpoint_queue: None,
            kill_target_on_start: false,
            scheduled_kill: Mutex::new(None),
            fired: Mutex::new(None),
        }
    }

    /// A failure in the current phase.
    pub fn failed(&self, reason: String) -> Error {
        Error::MigrationFailed {
            phase: self.timeline.current().map(PhaseName::name),
            reason,
        }
    }

    /// Begins a phase, injecting the configured fault if it is aimed at this phase (at once, or
    /// scheduled for [`Ctx::watch`] to carry out `after_ms` into it).
    pub async fn enter(&mut self, phase: PhaseName) -> Result<()> {
        self.timeline.begin(phase);
        *self.scheduled_kill.lock().unwrap() = None;
        let Some(fault) = self.opts.fault.as_ref().filter(|f| f.at_phase == phase) else {
            return Ok(());
        };
        if fault.after_ms > 0.0 {
            let at = Instant::now() + Duration::from_secs_f64(fault.after_ms / 1e3);
            *self.scheduled_kill.lock().unwrap() = Some((at, fault.kill));
            return Ok(());
        }
        if fault.kill == Role::Broker {
            let note = self.restart_broker(fault.outage_s.unwrap_or(0.0)).await?;
            self.outcome.fault = Some(note);
            return Ok(());
        }
        if let Some(outage) = fault.outage_s {
            let note = self.cut_link(fault.kill, outage)?;
            self.outcome.fault = Some(note);
            return Ok(());
        }
        match fault.kill {
            Role::Broker => unreachable!("restarted above"),
            Role::Source => self.kill(&self.source.clone()).await,
            Role::Target if self.target_started => self.kill(&self.target.clone()).await,
            Role::Target => {
                self.kill_target_on_start = true;
                Ok(())
            }
        }
    }

    /// Restarts the broker, down for `down_s` in between; what happened, for the report. The
    /// phase goes on with every connection gone: what it asks of the broker fails, and the
    /// rollback reconnects first ([`run_or_roll_back`]).
    async fn restart_broker(&self, down_s: f64) -> Result<String> {
        let phase = self.timeline.current().map_or("?", PhaseName::name);
        let t = now_ns();
        self.runtime
            .restart_broker(Duration::from_secs_f64(down_s))
            .await?;
        Ok(format!(
            "restarted the broker in {phase} (down {down_s} s, {:.1} s in all, from {t} ns)",
            (now_ns() - t) as f64 / 1e9
        ))
    }

    /// Takes the link of `role`'s host down for `seconds` (a task ends the outage); what
    /// happened, for the report.
    fn cut_link(&self, role: Role, seconds: f64) -> Result<String> {
        let host = match role {
            Role::Source | Role::Broker => self.source_host.clone(),
            Role::Target => self.target_host.clone(),
        };
        self.links.set_outage(&host, true)?;
        let links = self.links.clone();
        let h = host.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
            let _ = links.set_outage(&h, false);
        });
        Ok(format!(
            "link of {host} down for {seconds} s from {} into {} ({} ns)",
            self.opts.fault.as_ref().map_or(0.0, |f| f.after_ms),
            self.timeline.current().map_or("?", PhaseName::name),
            now_ns()
        ))
    }

    async fn kill(&mut self, instance: &str) -> Result<()> {
        self.runtime.kill_instance(instance).await?;
        let now = self.timeline.current().map_or("?", PhaseName::name);
        let aimed = self.opts.fault.as_ref().map_or(now, |f| f.at_phase.name());
        // A target killed as it starts, later than the phase the fault was aimed at.
        let when = match aimed == now {
            true => format!("at the start of {now}"),
            false => format!("as it started in {now} (the fault was aimed at {aimed})"),
        };
        self.outcome.fault = Some(format!("killed {instance} {when} ({} ns)", now_ns()));
        Ok(())
    }

    /// Runs `fut`, failing at once if `instance` exits meanwhile; carries out a kill scheduled
    /// for this phase when it falls due.
    pub async fn watch<T>(
        &self,
        instance: &str,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::pin!(fut);
        loop {
            let due = self.scheduled_kill.lock().unwrap().map(|(at, _)| at);
            // The exit watch is made anew each round, never kept across the kill: it holds the
            // runtime's instance table while it asks whether the instance runs, and the kill
            // needs that table (kept, it deadlocked a kill already due when the wait began).
            tokio::select! {
                r = &mut fut => return r,
                _ = self.runtime.wait_until_exited(instance) => return Err(self.failed(format!(
                    "{instance} exited (killed or crashed) while the manager waited for it"
                ))),
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.scheduled_kill_now().await?;
                }
            }
        }
    }

    /// Carries out the scheduled kill if it is due: for waits that poll rather than go
    /// through [`Ctx::watch`].
    pub async fn kill_if_due(&self) -> Result<()> {
        let due = self.scheduled_kill.lock().unwrap().map(|(at, _)| at);
        if due.is_some_and(|at| at <= Instant::now()) {
            self.scheduled_kill_now().await?;
        }
        Ok(())
    }

    /// Carries out the scheduled kill (on the target only if it runs).
    async fn scheduled_kill_now(&self) -> Result<()> {
        let Some((_, role)) = self.scheduled_kill.lock().unwrap().take() else {
            return Ok(());
        };
        let phase = self.timeline.current().map_or("?", PhaseName::name);
        if role == Role::Broker {
            let down = self.opts.fault.as_ref().and_then(|f| f.outage_s);
            let note = self.restart_broker(down.unwrap_or(0.0)).await?;
            *self.fired.lock().unwrap() = Some(note);
            return Ok(());
        }
        if let Some(outage) = self.opts.fault.as_ref().and_then(|f| f.outage_s) {
            let note = self.cut_link(role, outage)?;
            *self.fired.lock().unwrap() = Some(note);
            return Ok(());
        }
        let fault = self.opts.fault.as_ref().map_or(0.0, |f| f.after_ms);
        let victim = match role {
            Role::Source => Some(&self.source),
            Role::Target => self.target_started.then_some(&self.target),
            Role::Broker => None,
        };
        let note = match victim {
            Some(victim) => {
                self.runtime.kill_instance(victim).await?;
                format!("killed {victim} {fault} ms into {phase} ({} ns)", now_ns())
            }
            None => format!("the target was not running {fault} ms into {phase}: nothing killed"),
        };
        *self.fired.lock().unwrap() = Some(note);
        Ok(())
    }

    /// Says how to stream the checkpoint: to the migration's checkpoint queue, declared here
    /// (rollback deletes it), or served by the source for a direct transfer.
    pub async fn checkpoint_stream(&mut self) -> Result<StreamTo> {
        let queue = names::checkpoint_queue(&self.spec.name, &self.migration_id);
        let listen = match self.opts.transfer {
            Transfer::Direct => Some(self.runtime.serve_listen().to_string()),
            Transfer::Broker => {
                self.link.declare_queue(&queue).await?;
                self.checkpoint_queue = Some(queue.clone());
                None
            }
        };
        Ok(StreamTo {
            queue,
            chunk_bytes: self.opts.chunk_bytes,
            listen,
        })
    }

    /// Asks the source for a snapshot streamed as [`Ctx::checkpoint_stream`] says (the source
    /// need not serve: no barrier), and records it.
    pub async fn snapshot_source(&mut self) -> Result<Checkpoint> {
        let stream = self.checkpoint_stream().await?;
        let source = self.source.clone();
        let snapshot = Command::Snapshot {
            stream: Some(stream),
        };
        let (reply, _) = self.transfer_command(&source, snapshot).await?;
        self.took_checkpoint(&reply)
    }

    /// The checkpoint a source's reply describes, recorded in the outcome.
    pub fn took_checkpoint(&mut self, reply: &Reply) -> Result<Checkpoint> {
        let Some(cp) = reply.checkpoint.clone() else {
            return Err(self.failed(format!(
                "{} took a checkpoint but did not say where it streamed it",
                reply.instance
            )));
        };
        let write_ms = span_ms(reply.t_begin_ns, reply.t_ns);
        let (source, target) = (self.source_host.as_str(), self.target_host.as_str());
        let hops = match self.opts.transfer {
            Transfer::Broker => {
                let mut up = HopStats::new(source, "broker", cp.bytes);
                up.took(write_ms);
                vec![up, HopStats::new("broker", target, cp.bytes)]
            }
            Transfer::Direct => vec![HopStats::new(source, target, cp.bytes)],
        };
        self.outcome.checkpoint_bytes = cp.bytes;
        self.outcome.checkpoint = Some(CheckpointStats {
            transfer: self.opts.transfer,
            hops,
            bytes: cp.bytes,
            chunks: cp.chunks,
            chunk_bytes: self.opts.chunk_bytes,
            sha256: cp.sha256.clone(),
            write_ms,
            write_mib_s: mib_s(cp.bytes, write_ms),
            fetch_ms: None,
            fetch_mib_s: None,
        });
        self.checkpoint = Some(cp.clone());
        Ok(cp)
    }

    /// The target fetches the checkpoint (all chunks, checked): from its queue, or from the
    /// source across the link between their hosts.
    pub async fn fetch(&mut self, mut checkpoint: Checkpoint) -> Result<()> {
        let target = self.target.clone();
        // Lives until the fetch is answered: it carries the transfer.
        let mut relay = None;
        if let Some(served) = &checkpoint.addr {
            let port = served
                .parse::<std::net::SocketAddr>()
                .map_err(|e| {
                    self.failed(format!(
                        "the source served its checkpoint on {served:?}: {e}"
                    ))
                })?
                .port();
            let at =
                std::net::SocketAddr::new(self.runtime.instance_address(&self.source).await?, port);
            relay = self.links.path(&self.target_host, &self.source_host, at)?;
            let reach = relay.as_ref().map_or(at, |r| r.addr());
            checkpoint.addr = Some(reach.to_string());
        }
        let fetched = self
            .transfer_command(&target, Command::Fetch(checkpoint))
            .await;
        if let Some(r) = relay {
            // Stopping wakes the relay's listener with a connect: not on a runtime thread.
            tokio::task::spawn_blocking(move || drop(r));
        }
        let (fetched, _) = fetched?;
        self.target_fetched = true;
        if let Some(stats) = self.outcome.checkpoint.as_mut() {
            let ms = span_ms(fetched.t_begin_ns, fetched.t_ns);
            stats.fetch_ms = Some(ms);
            stats.fetch_mib_s = Some(mib_s(stats.bytes, ms));
            if let Some(last) = stats.hops.last_mut() {
                last.took(ms);
            }
        }
        Ok(())
    }

    /// The target restores what it fetched; the checkpoint queue, empty now, goes.
    pub async fn restore_fetched(&mut self) -> Result<()> {
        let target = self.target.clone();
        let (restored, _) = self.command(&target, Command::Restore, &[]).await?;
        self.target_restored = Some(restored.last_seq);
        if let Some(q) = self.checkpoint_queue.take() {
            self.link.delete_queue(&q).await?;
        }
        Ok(())
    }

    /// How long a reply that moves the checkpoint may take: the reply timeout, plus four times
    /// what the slowest link of the two hosts needs for the state (two hops through the
    /// broker, and as much again for a busy link), so that a large state on a slow link is not
    /// mistaken for a dead instance. Without a rate-limited link, the reply timeout.
    pub fn transfer_timeout(&self) -> Duration {
        let hosts = [self.source_host.as_str(), self.target_host.as_str()];
        let needs = self.links.slowest_mbit(&hosts).map_or(0.0, |mbit| {
            self.spec.state_bytes as f64 * 8.0 / (mbit * 1e6)
        });
        self.opts.reply_timeout() + Duration::from_secs_f64(4.0 * needs)
    }

    /// How long a reply that waits for `messages` to be replayed may take: the reply timeout,
    /// plus twice what they need at the service rate measured before the migration (a replay
    /// spends the processing time too), so that a long backlog behind a cutoff or a slow link
    /// is not mistaken for a dead instance.
    pub fn replay_wait(&self, messages: u64) -> Duration {
        let needs = match self.outcome.mu {
            Some(mu) if mu.is_finite() && mu > 0.0 => (messages as f64 / mu).min(86_400.0),
            _ => 0.0,
        };
        self.opts.reply_timeout() + Duration::from_secs_f64(2.0 * needs)
    }

    /// [`Ctx::command`], waiting for the reply at most `timeout`.
    pub async fn command_within(
        &self,
        instance: &str,
        cmd: Command,
        timeout: Duration,
    ) -> Result<Answer> {
        let sent = self.link.send(&self.spec.name, instance, cmd, &[]).await?;
        self.watch(instance, sent.reply(timeout)).await
    }

    /// [`Ctx::command`] for a command that moves the checkpoint ([`Ctx::transfer_timeout`]).
    pub async fn transfer_command(&self, instance: &str, cmd: Command) -> Result<Answer> {
        self.command_within(instance, cmd, self.transfer_timeout())
            .await
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
        // A standby's own state is replaced by the restore: starting it empty spares the
        // memory and the time of building one (a second of a large state's downtime).
        let standby = ServiceSpec {
            state_bytes: 0,
            ..self.spec.clone()
        };
        self.runtime
            .start_instance(
                &standby,
                &self.target,
                &self.target_host,
                self.target_url,
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
        self.committed = true;
        self.source_stopped = false;
        self.target_started = false;
        if let Some(j) = self.journal {
            let service = &self.spec.name;
            j.update(|e| {
                if let Some(m) = e.migrations.get_mut(service) {
                    m.committed = true;
                }
            });
        }
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
    let result = run(strategy, ctx).await;
    if let Some(fired) = ctx.fired.lock().unwrap().take() {
        ctx.outcome.fault = Some(fired);
    }
    let error = result.err()?;
    let phase = ctx.timeline.current();
    let mut reason = match error {
        Error::MigrationFailed { reason, .. } => reason,
        other => other.to_string(),
    };
    // A kill still pending belongs to the phase that failed, not to the rollback.
    *ctx.scheduled_kill.lock().unwrap() = None;
    // A restarted broker closed the manager's connection: nothing can be undone without one.
    match ctx.link.reconnect(RECONNECT_WITHIN).await {
        Ok(true) => {
            ctx.broker_restarted = true;
            reason = format!("the broker restarted, and with it every connection ({reason})");
        }
        Ok(false) => {}
        Err(e) => reason.push_str(&format!("; the broker did not come back: {e}")),
    }
    if ctx.committed {
        // The target serves and the source was retired on purpose: only queues left to go.
        let problems = abort(ctx).await;
        if !problems.is_empty() {
            reason.push_str(&format!("; cleanup incomplete: {}", problems.join("; ")));
        }
        return Some(Failure { phase, reason });
    }
    // A dead source cannot serve again; a target holding its state can serve instead.
    let mut checkpoint_lost = true;
    if takeover::possible(ctx).await {
        checkpoint_lost = false;
        match takeover::run(ctx, phase).await {
            Ok(()) => return None,
            Err(e) => reason.push_str(&format!("; the target could not take over: {e}")),
        }
    }
    let problems = abort(ctx).await;
    if !problems.is_empty() {
        reason.push_str(&format!("; rollback incomplete: {}", problems.join("; ")));
    }
    // Nothing that serves holds the dead source's state: an empty instance serves in its place.
    if !ctx.runtime.is_running(&ctx.source).await {
        let why = match checkpoint_lost {
            true => "the source died before its checkpoint was complete, and its state with it",
            false => "the source is dead and its state with it",
        };
        match restart::run(ctx, phase).await {
            Ok(r) => {
                let since = r.after_seq.map_or_else(
                    || "from the next message".to_string(),
                    |s| format!("after seq {s}"),
                );
                reason.push_str(&format!(
                    "; {why}: {} serves on {} in its place, started empty, {since}",
                    r.instance, ctx.source_host
                ));
                ctx.outcome.restarted = Some(r);
            }
            Err(e) => reason.push_str(&format!("; {why}, and no instance could replace it: {e}")),
        }
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
    for q in [ctx.replay_queue.take(), ctx.checkpoint_queue.take()]
        .into_iter()
        .flatten()
    {
        if let Err(e) = ctx.link.delete_queue(&q).await {
            problems.push(e.to_string());
        }
    }
    // A dead source is replaced afterwards (`restart`), not resumed. After a broker restart
    // a command may have reached the source without its reply reaching the manager: told to
    // serve whatever it was told (serving already, it goes on).
    let maybe_stopped = ctx.source_stopped || ctx.broker_restarted;
    if maybe_stopped && ctx.runtime.is_running(&ctx.source).await {
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
