//! Stop-and-copy (cold) migration: the source stops serving, its state is checkpointed,
//! transferred and restored on a newly started target, which then serves. Downtime spans all
//! of it.

use super::{ms2m, Ctx, PhaseName};
use crate::error::Result;
use ms2m_wire::control::Command;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let (source, target) = (ctx.source.clone(), ctx.target.clone());
    ctx.enter(PhaseName::Stop).await?;
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

    // The source streams its snapshot to the checkpoint queue, where it waits for the target
    // (not started yet), as a checkpoint image copied to the target node would.
    ctx.enter(PhaseName::Checkpoint).await?;
    let checkpoint = ctx.snapshot_source().await?;
    let unfetched = ms2m::transfer(ctx, checkpoint).await?;
    ms2m::restore(ctx, unfetched).await?;

    ctx.enter(PhaseName::Finalize).await?;
    let (live, _) = ctx.command(&target, Command::StartLive, &[]).await?;
    ctx.outcome.t_target_live_ns = Some(live.t_ns);
    ctx.committed();
    ctx.retire_source().await?;
    ctx.timeline.end();
    Ok(())
}
