//! Sequential MS2M: the source must stop before the target is restored, as when both would
//! share one identity (a Kubernetes StatefulSet). The checkpoint is taken at a barrier while the
//! source serves; then the source stops at S, the target starts, restores, replays the backlog
//! up to S and only then serves. Downtime spans the target's start, restore and replay.
//!
//! The stopped source process is kept (not serving) until the target serves, so that a failed
//! migration can roll back to it; a StatefulSet would have deleted it.

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
    ms2m::finish_replay(ctx, stopped.last_seq).await?;
    ctx.enter(PhaseName::Finalize).await?;
    ms2m::finish(ctx).await
}
