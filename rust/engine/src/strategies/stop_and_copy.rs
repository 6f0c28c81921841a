//! Stop-and-copy (cold) migration: the source stops serving, its state is checkpointed,
//! transferred and restored on a newly started target, which then serves. Downtime spans all
//! of it.

use super::Ctx;
use crate::error::Result;
use ms2m_wire::control::Command;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    ctx.timeline.begin("stop");
    let (stopped, _) = ctx
        .command(
            &ctx.source.clone(),
            Command::StopLive { after_seq: None },
            &[],
        )
        .await?;
    ctx.source_stopped = true;
    ctx.outcome.t_source_stop_ns = Some(stopped.t_ns);

    ctx.timeline.begin("checkpoint");
    let (_, snapshot) = ctx
        .command(&ctx.source.clone(), Command::Snapshot, &[])
        .await?;
    ctx.outcome.checkpoint_bytes = snapshot.len() as u64;

    // The snapshot travels to the target host's inbox (its control queue) before the target
    // exists, as a checkpoint image would be copied to the target node.
    ctx.timeline.begin("transfer");
    ctx.link
        .declare_control_queue(&ctx.spec.name, &ctx.target)
        .await?;
    let restored = ctx
        .link
        .send(&ctx.spec.name, &ctx.target, Command::Restore, &snapshot)
        .await?;
    drop(snapshot);

    ctx.timeline.begin("restore");
    ctx.start_target().await?;
    restored.reply(ctx.opts.reply_timeout()).await?;

    ctx.timeline.begin("finalize");
    let (live, _) = ctx
        .command(&ctx.target.clone(), Command::StartLive, &[])
        .await?;
    ctx.outcome.t_target_live_ns = Some(live.t_ns);
    // From here on the target serves: nothing below may roll the migration back.
    ctx.source_stopped = false;
    ctx.target_started = false;
    ctx.retire_source().await?;
    ctx.timeline.end();
    Ok(())
}
