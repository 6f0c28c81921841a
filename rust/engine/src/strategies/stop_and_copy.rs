//! Stop-and-copy (cold) migration: the source stops serving, its state is checkpointed,
//! transferred and restored on a newly started target, which then serves. Downtime spans all
//! of it.

use super::{Ctx, PhaseName};
use crate::error::Result;
use ms2m_wire::control::Command;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let (source, target) = (ctx.source.clone(), ctx.target.clone());
    ctx.enter(PhaseName::Stop).await?;
    let (stopped, _) = ctx
        .command(&source, Command::StopLive { after_seq: None }, &[])
        .await?;
    ctx.source_stopped = true;
    ctx.outcome.t_source_stop_ns = Some(stopped.t_ns);

    ctx.enter(PhaseName::Checkpoint).await?;
    let (_, snapshot) = ctx.command(&source, Command::Snapshot, &[]).await?;
    ctx.outcome.checkpoint_bytes = snapshot.len() as u64;

    // The snapshot travels to the target host's inbox (its control queue) before the target
    // exists, as a checkpoint image would be copied to the target node.
    ctx.enter(PhaseName::Transfer).await?;
    ctx.link
        .declare_control_queue(&ctx.spec.name, &target)
        .await?;
    let restored = ctx
        .link
        .send(&ctx.spec.name, &target, Command::Restore, &snapshot)
        .await?;
    drop(snapshot);

    ctx.enter(PhaseName::Restore).await?;
    ctx.start_target().await?;
    ctx.reply(&target, restored).await?;

    ctx.enter(PhaseName::Finalize).await?;
    let (live, _) = ctx.command(&target, Command::StartLive, &[]).await?;
    ctx.outcome.t_target_live_ns = Some(live.t_ns);
    ctx.committed();
    ctx.retire_source().await?;
    ctx.timeline.end();
    Ok(())
}
