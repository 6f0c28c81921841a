//! Sequential MS2M: the source must stop before the target is restored, as when both would
//! share one identity (a Kubernetes StatefulSet). The checkpoint is taken at a barrier while the
//! source serves; then the source stops at S, the target starts, restores, replays the backlog
//! up to S and only then serves. Downtime spans the target's start, restore and replay.
//!
//! The stopped source process is kept (not serving) until the target serves, so that a failed
//! migration can roll back to it; a StatefulSet would have deleted it. A source that dies once
//! its checkpoint is complete leaves the target to restore it and take over (`takeover`).

use super::ms2m;
use super::{Ctx, PhaseName};
use crate::error::Result;
use ms2m_wire::control::Command;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let queue = ms2m::prepare(ctx, false).await?;
    let checkpoint = ms2m::checkpoint(ctx).await?;
    let unfetched = ms2m::transfer(ctx, checkpoint).await?;

    ctx.enter(PhaseName::Stop).await?;
    let source = ctx.source.clone();
    let (stopped, _) = ctx
        .command(
            &source,
            Command::StopLive {
                after_seq: None,
                hand_over: None,
            },
            &[],
        )
        .await?;
    ctx.source_stopped = true;
    ctx.outcome.t_source_stop_ns = Some(stopped.t_ns);

    ms2m::restore(ctx, unfetched).await?;
    ctx.enter(PhaseName::Replay).await?;
    // The source stopped at S: the target must not replay past it, or it would apply a
    // message twice when it meets it again, live, in the primary queue.
    ms2m::start_replay(ctx, &queue, Some(stopped.last_seq)).await?;
    let target = ctx.target.clone();
    let finish_replay = Command::FinishReplay {
        until_seq: stopped.last_seq,
        go_live: false,
    };
    // The whole backlog since the checkpoint, while nobody serves.
    let restored = ctx.target_restored.unwrap_or(0);
    let wait = ctx.replay_wait(stopped.last_seq.saturating_sub(restored));
    let (replayed, _) = ctx.command_within(&target, finish_replay, wait).await?;
    // Live only in finalize: a target that fails now still leaves the stopped source to
    // resume, rather than a service that nobody serves.
    ctx.enter(PhaseName::Finalize).await?;
    let (live, _) = ctx.command(&target, Command::StartLive, &[]).await?;
    ctx.outcome.t_target_live_ns = Some(live.t_ns);
    ctx.outcome.messages_replayed = replayed.replayed;
    ctx.outcome.replay_skipped = replayed.skipped;
    ms2m::finish(ctx).await
}
