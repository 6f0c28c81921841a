//! MS2M: message-based live migration (Dinh-Tuan and Beierle, 2022).
//!
//! 1. prepare: bind a replay queue to the input exchange (from now on it keeps a copy of every
//!    new message) and start the target, while the source serves.
//! 2. checkpoint: arm the source for a barrier with an unguessable id (a control command), then
//!    publish that barrier through the input exchange. It queues behind every message
//!    already waiting for the source, so the checkpoint the source takes when it reaches the
//!    barrier holds exactly the messages before it. The source keeps serving.
//!    The source streams the snapshot to the migration's checkpoint queue in chunks and replies
//!    once the broker has every chunk.
//! 3. transfer and 4. restore: the target fetches the chunks (checking size and SHA-256),
//!    then restores them.
//! 5. replay: the target replays the replay queue without side effects, skipping what the
//!    snapshot already holds, until the queue is drained (bounded by `replay_timeout_s`: at
//!    rates near capacity the replay may never catch up, and the migration is aborted).
//! 6. finalize (cutover): once the target is level with the source, both are told to stop
//!    at the same seq T a little ahead (or the target pauses where it is, T); the target
//!    replays up to T and pauses, the source serves on until it has processed T, stops at
//!    S >= T, reports S and sends the target `finish_replay` up to S itself (a hand-over:
//!    one hop instead of two through the manager); the target
//!    replays up to S and starts consuming the primary queue, where everything after S waits.
//!    Nothing is lost or processed live twice, and the gap is a few broker hops when the
//!    target was caught up.
//!
//! The phases are functions so that the MS2M variants (`ms2m_cutoff`, `ms2m_sequential`)
//! compose them in their own order.

use super::{Ctx, PhaseName};
use crate::error::Result;
use ms2m_wire::control::{Checkpoint, Command, Reply};
use std::time::{Duration, Instant};

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let queue = prepare(ctx, true).await?;
    let checkpoint = checkpoint(ctx).await?;
    let unfetched = transfer(ctx, checkpoint).await?;
    restore(ctx, unfetched).await?;
    ctx.enter(PhaseName::Replay).await?;
    start_replay(ctx, &queue, None).await?;
    catch_up(ctx, &queue, None).await?;
    cutover(ctx, true).await
}

/// Binds the replay queue (accumulation starts) and, with `start_target`, starts the target.
pub(super) async fn prepare(ctx: &mut Ctx<'_>, start_target: bool) -> Result<String> {
    ctx.enter(PhaseName::Prepare).await?;
    let queue = ctx
        .link
        .bind_replay_queue(&ctx.spec.name, &ctx.migration_id)
        .await?;
    ctx.replay_queue = Some(queue.clone());
    if start_target {
        ctx.start_target().await?;
    }
    Ok(queue)
}

/// Publishes the barrier and waits until the source has streamed its checkpoint to the
/// checkpoint queue; the source keeps serving meanwhile.
pub(super) async fn checkpoint(ctx: &mut Ctx<'_>) -> Result<Checkpoint> {
    ctx.enter(PhaseName::Checkpoint).await?;
    let stream = ctx.checkpoint_stream().await?;
    // Anyone may publish to the input exchange: the source takes only the barrier whose
    // unguessable id the manager announced on its control queue.
    let barrier = {
        use rand::distr::{Alphanumeric, SampleString};
        let token = Alphanumeric.sample_string(&mut rand::rng(), 22);
        format!("barrier-{}-{token}", ctx.migration_id)
    };
    let source = ctx.source.clone();
    ctx.command(
        &source,
        Command::ArmBarrier {
            id: barrier.clone(),
        },
        &[],
    )
    .await?;
    let checkpoint = ctx.link.expect(&barrier);
    ctx.link
        .publish_barrier(&ctx.spec.name, &barrier, stream)
        .await?;
    let what = format!("{} to reach the barrier and checkpoint", ctx.source);
    let timeout = ctx.transfer_timeout();
    let (reply, _) = ctx
        .watch(
            &ctx.source.clone(),
            crate::broker::wait(checkpoint, timeout, &what),
        )
        .await?;
    if let Some(e) = &reply.error {
        return Err(ctx.failed(format!("{}: {e}", reply.instance)));
    }
    ctx.took_checkpoint(&reply)
}

/// A running target fetches the checkpoint now. One not started yet (stop-and-copy,
/// sequential MS2M) finds it waiting in its queue, as an image copied to the target node waits
/// on disk, and fetches it as it restores: the checkpoint is returned for [`restore`].
pub(super) async fn transfer(
    ctx: &mut Ctx<'_>,
    checkpoint: Checkpoint,
) -> Result<Option<Checkpoint>> {
    ctx.enter(PhaseName::Transfer).await?;
    if !ctx.target_started {
        return Ok(Some(checkpoint));
    }
    ctx.fetch(checkpoint).await?;
    Ok(None)
}

/// The target restores the checkpoint (started and fetching it first when `unfetched`).
pub(super) async fn restore(ctx: &mut Ctx<'_>, unfetched: Option<Checkpoint>) -> Result<()> {
    ctx.enter(PhaseName::Restore).await?;
    if !ctx.target_started {
        ctx.start_target().await?;
    }
    if let Some(checkpoint) = unfetched {
        ctx.fetch(checkpoint).await?;
    }
    ctx.restore_fetched().await
}

/// Starts the target's replay of `queue`, never beyond `until_seq` when given.
pub(super) async fn start_replay(
    ctx: &mut Ctx<'_>,
    queue: &str,
    until_seq: Option<u64>,
) -> Result<()> {
    // A source dead by now leaves the target to take over: replaying first would apply
    // messages the source never processed.
    let source = ctx.source.clone();
    if !ctx.runtime.is_running(&source).await {
        return Err(ctx.failed(format!("{source} exited before the replay began")));
    }
    let target = ctx.target.clone();
    ctx.command(
        &target,
        Command::Replay {
            queue: queue.to_string(),
            until_seq,
        },
        &[],
    )
    .await?;
    ctx.replay_started = true;
    Ok(())
}

/// How the replay phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CatchUp {
    /// The replay queue was drained.
    CaughtUp,
    /// The deadline passed first (the cutoff fired).
    CutOff,
}

/// Waits until the target has drained the replay queue, or until `cutoff` passes. Past
/// `replay_timeout_s` the migration fails: the target cannot keep up with the input.
pub(super) async fn catch_up(
    ctx: &mut Ctx<'_>,
    queue: &str,
    cutoff: Option<Instant>,
) -> Result<CatchUp> {
    let started = Instant::now();
    let limit = Duration::from_secs_f64(ctx.opts.replay_timeout_s);
    let target = ctx.target.clone();
    loop {
        if ctx.link.queue_depth(queue).await? == 0 {
            return Ok(CatchUp::CaughtUp);
        }
        if cutoff.is_some_and(|c| Instant::now() >= c) {
            return Ok(CatchUp::CutOff);
        }
        if started.elapsed() > limit {
            return Err(ctx.failed(format!(
                "the target did not catch up within replay_timeout_s = {} s: messages arrive \
                 about as fast as it replays them or faster (measured lambda {:.2} msg/s, mu \
                 {:.2} msg/s); the migration was aborted and the source kept serving",
                ctx.opts.replay_timeout_s,
                ctx.probe.arrival_rate(Duration::from_secs(5)),
                ctx.probe.service_rate().unwrap_or(f64::NAN),
            )));
        }
        ctx.kill_if_due().await?;
        if !ctx.runtime.is_running(&target).await {
            return Err(ctx.failed(format!("{target} exited during the replay")));
        }
        if !ctx.runtime.is_running(&ctx.source).await {
            return Err(ctx.failed(format!("{} exited during the replay", ctx.source)));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How long a cutover whose `stop_live` failed waits for the target's reply to the hand-over,
/// in case the source handed over before failing.
const HANDOVER_GRACE: Duration = Duration::from_secs(2);

/// Longest wait at the cutover for a caught-up target to draw level with the source. A target
/// that has just drained its queue still trails by up to one processing time, and gains
/// `1 - load` of a processing time per message: near capacity (95%), about a second.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// How much later than the source a level target may start the same message.
const LEVEL_SLACK_NS: u64 = 500_000;

/// How far ahead of both instances a level cutover meets: far enough that neither has passed
/// it when the commands arrive (two messages' processing), near enough to cost little waiting.
const MEET_AHEAD: u64 = 2;
/// The load (arrival over service rate) from which a level cutover meets ahead.
const MEET_LOAD: f64 = 0.5;
/// The longest a cutover waits for the arrivals it meets at.
const MEET_WAIT_MAX: Duration = Duration::from_secs(1);

/// The cutover: the source hands over to the target with nothing lost or processed twice.
///
/// With `level`, it first waits (at most [`HANDOVER_WAIT`]) until the target is level with the
/// source: ahead of it, or at the same message started no later (each instance's `queued_ns`,
/// [`LEVEL_SLACK_NS`]). A target that drained the replay queue can still be busy with its last
/// message while the source has finished it: what it trails by is downtime at the hand-over.
/// Then, near capacity, both are told to stop at the same message a little ahead
/// ([`MEET_AHEAD`], [`MEET_LOAD`]): the target pauses once it has replayed it, the source
/// stops once it has served it, and the target has nothing left to replay. Pausing the target
/// where it stood instead let a source that was processing the next message hand over one
/// message ahead, which the target then replayed while nobody served (a whole processing
/// time of downtime near capacity).
pub(super) async fn cutover(ctx: &mut Ctx<'_>, level: bool) -> Result<()> {
    ctx.enter(PhaseName::Finalize).await?;
    let (source, target) = (ctx.source.clone(), ctx.target.clone());
    let mut meet = None;
    if level {
        let deadline = Instant::now() + HANDOVER_WAIT;
        loop {
            let (s, _) = ctx.command(&source, Command::Status, &[]).await?;
            let (t, _) = ctx.command(&target, Command::Status, &[]).await?;
            let level = t.last_seq > s.last_seq
                || (t.last_seq == s.last_seq && t.queued_ns <= s.queued_ns + LEVEL_SLACK_NS);
            if level || Instant::now() >= deadline {
                meet = Some(s.last_seq.max(t.last_seq) + MEET_AHEAD);
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Meeting ahead costs MEET_AHEAD arrivals of waiting. It pays where the instances are
        // busy at least half the time (an idle source stops where the target paused), and only
        // where the meeting message comes soon: a source told to serve up to a message nobody
        // sends would never stop.
        let lambda = ctx.probe.arrival_rate(Duration::from_secs(1));
        let load = ctx.probe.service_rate().map_or(0.0, |mu| lambda / mu);
        if load < MEET_LOAD || lambda * MEET_WAIT_MAX.as_secs_f64() < MEET_AHEAD as f64 {
            meet = None;
        }
    }
    let pause = Command::PauseReplay { after_seq: meet };
    let (paused, _) = ctx.command(&target, pause, &[]).await?;
    // The source itself tells the target where it stopped: one hop less of downtime than
    // relaying its reply.
    let (hand_over, finished) = ctx.link.hand_over(&ctx.spec.name, &target);
    let stop = Command::StopLive {
        // Below `meet`, the target's pause is pending there.
        after_seq: Some(paused.last_seq.max(meet.unwrap_or(0))),
        hand_over: Some(hand_over),
    };
    let stopped = match ctx.command(&source, stop, &[]).await {
        Ok((stopped, _)) => stopped,
        Err(e) => {
            // The source may have stopped and handed over before its reply went missing (or
            // before it died): if the target went live on that, the migration is done, and
            // rolling back would remove the one instance serving.
            return match finished.reply(HANDOVER_GRACE).await {
                Ok((live, _)) => {
                    ctx.source_stopped = true;
                    went_live(ctx, &live);
                    finish(ctx).await
                }
                Err(_) => Err(e),
            };
        }
    };
    ctx.source_stopped = true;
    ctx.outcome.t_source_stop_ns = Some(stopped.t_ns);
    // The target replays from T to S before it answers: after a cutoff, the whole backlog.
    let wait = ctx.replay_wait(stopped.last_seq.saturating_sub(paused.last_seq));
    let (live, _) = ctx.watch(&target, finished.reply(wait)).await?;
    went_live(ctx, &live);
    finish(ctx).await
}

/// Records the target's `finish_replay` reply: when it went live and what it replayed.
pub(super) fn went_live(ctx: &mut Ctx<'_>, live: &Reply) {
    ctx.outcome.t_target_live_ns = Some(live.t_ns);
    ctx.outcome.messages_replayed = live.replayed;
    ctx.outcome.replay_skipped = live.skipped;
}

/// Once the target serves: drop the replay queue and retire the source. Nothing from here on
/// may roll the migration back.
pub(super) async fn finish(ctx: &mut Ctx<'_>) -> Result<()> {
    ctx.committed();
    if let Some(q) = ctx.replay_queue.take() {
        ctx.link.delete_queue(&q).await?;
    }
    ctx.retire_source().await?;
    ctx.timeline.end();
    Ok(())
}
