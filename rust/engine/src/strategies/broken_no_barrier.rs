//! Deliberately broken, for the checker's own tests (feature `test-strategies`): MS2M without
//! the barrier. The checkpoint is a plain snapshot taken while the source serves, and the
//! replay queue is bound only afterwards, so the messages the source processes in between are
//! in neither the snapshot nor the replay queue: the target's state silently misses them.
//! Every message is still processed live exactly once; only the state check can tell.

use super::{ms2m, Ctx, PhaseName};
use crate::error::Result;
use std::time::Duration;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    ctx.enter(PhaseName::Checkpoint).await?;
    let checkpoint = ctx.snapshot_source().await?;
    // Widen the gap so that some messages surely fall into it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queue = ms2m::prepare(ctx, true).await?;
    let unfetched = ms2m::transfer(ctx, checkpoint).await?;
    ms2m::restore(ctx, unfetched).await?;
    ctx.enter(PhaseName::Replay).await?;
    ms2m::start_replay(ctx, &queue, None).await?;
    ms2m::catch_up(ctx, &queue, None).await?;
    ms2m::cutover(ctx, true).await
}
