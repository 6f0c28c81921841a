//! MS2M: message-based live migration (Dinh-Tuan and Beierle, 2022).
//!
//! 1. prepare: bind a replay queue to the input exchange (from now on it keeps a copy of every
//!    new message) and start the target, while the source serves.
//! 2. checkpoint: publish a barrier through the input exchange. It queues behind every message
//!    already waiting for the source, so the checkpoint the source takes when it reaches the
//!    barrier holds exactly the messages before it. The source keeps serving.
//! 3. transfer and 4. restore: the snapshot goes to the target, which restores it.
//! 5. replay: the target replays the replay queue without side effects, skipping what the
//!    snapshot already holds, until the queue is drained (bounded by `replay_timeout_s`: at
//!    rates near capacity the replay may never catch up, and the migration is aborted).
//! 6. finalize (cutover): the target pauses at seq T; the source serves on until it has
//!    processed T, stops and reports S >= T; the target replays up to S and starts consuming
//!    the primary queue, where everything after S waits. Nothing is lost or processed live
//!    twice, and the gap is a few broker round trips when the target was caught up.

use super::Ctx;
use crate::error::{Error, Result};
use ms2m_wire::control::Command;
use std::time::{Duration, Instant};

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let service = ctx.spec.name.clone();
    let (source, target) = (ctx.source.clone(), ctx.target.clone());

    ctx.timeline.begin("prepare");
    let replay_queue = ctx
        .link
        .bind_replay_queue(&service, &ctx.migration_id)
        .await?;
    ctx.replay_queue = Some(replay_queue.clone());
    ctx.start_target().await?;

    ctx.timeline.begin("checkpoint");
    let barrier = format!("barrier-{}", ctx.migration_id);
    let checkpoint = ctx.link.expect(&barrier);
    ctx.link.publish_barrier(&service, &barrier).await?;
    let (_, snapshot) = crate::broker::wait(
        checkpoint,
        ctx.opts.reply_timeout(),
        &format!("{source} to reach the barrier and checkpoint"),
    )
    .await?;
    ctx.outcome.checkpoint_bytes = snapshot.len() as u64;

    ctx.timeline.begin("transfer");
    let restored = ctx
        .link
        .send(&service, &target, Command::Restore, &snapshot)
        .await?;
    drop(snapshot);

    ctx.timeline.begin("restore");
    restored.reply(ctx.opts.reply_timeout()).await?;

    ctx.timeline.begin("replay");
    ctx.command(
        &target,
        Command::Replay {
            queue: replay_queue.clone(),
        },
        &[],
    )
    .await?;
    let started = Instant::now();
    let limit = Duration::from_secs_f64(ctx.opts.replay_timeout_s);
    while ctx.link.queue_depth(&replay_queue).await? > 0 {
        if started.elapsed() > limit {
            return Err(Error::MigrationFailed {
                phase: "replay".into(),
                reason: format!(
                    "the target did not catch up within replay_timeout_s = {} s (messages \
                     arrive about as fast as it replays them); the migration was aborted and \
                     the source kept serving",
                    ctx.opts.replay_timeout_s
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    ctx.timeline.begin("finalize");
    let (paused, _) = ctx.command(&target, Command::PauseReplay, &[]).await?;
    let (stopped, _) = ctx
        .command(
            &source,
            Command::StopLive {
                after_seq: Some(paused.last_seq),
            },
            &[],
        )
        .await?;
    ctx.source_stopped = true;
    ctx.outcome.t_source_stop_ns = Some(stopped.t_ns);
    let (live, _) = ctx
        .command(
            &target,
            Command::FinishReplay {
                until_seq: stopped.last_seq,
                go_live: true,
            },
            &[],
        )
        .await?;
    ctx.outcome.t_target_live_ns = Some(live.t_ns);
    ctx.outcome.messages_replayed = live.replayed;
    ctx.outcome.replay_skipped = live.skipped;
    // From here on the target serves: nothing below may roll the migration back.
    ctx.source_stopped = false;
    ctx.target_started = false;
    if let Some(q) = ctx.replay_queue.take() {
        ctx.link.delete_queue(&q).await?;
    }
    ctx.retire_source().await?;
    ctx.timeline.end();
    Ok(())
}
