//! The source died once its checkpoint was complete: the target takes over.
//!
//! Rolling back would leave nobody serving (the source's state died with it), while the target
//! holds the checkpoint (or can still fetch it from its queue and restore it, which it does
//! first) and the replay queue holds every message since the barrier. What the
//! source acked, it processed live; what it did not is back on the primary queue once the
//! broker has closed its connection. So the target replays up to the message before the
//! primary queue's first one and goes live there:
//!
//! 1. pause the target's replay at `T`, if it replays: whatever it replays from now on may be
//!    something the source never processed;
//! 2. wait until the primary queue has no consumer (the dead source's unacked messages are
//!    back on it);
//! 3. unbind the replay queue from the input exchange (new messages go only to the primary
//!    queue now) and put a marker at its end: a barrier the target is armed for, which it
//!    answers and which ends a `finish_replay` waiting for more than the queue holds;
//! 4. find the primary queue's first seq `H` above the checkpoint's (peeked, left in place;
//!    input to be refused is passed over). With one, finish the target's replay at
//!    `max(H - 1, T)`; without one (the source had acked everything), the whole replay queue
//!    is the source's work: finish "at the end of the queue" (`until_seq` = the largest seq),
//!    where the marker ends it. The marker also bounds a wrong `H` (an outsider's jump at the
//!    head of the primary queue): the target never waits for seqs the queue lacks;
//! 5. the target goes live, the source's leftovers go.
//!
//! Exact, with two losses nobody can avoid, both counted by the checker: a message the source
//! was handling when it died (applied, its output event maybe published, not acked) is
//! processed again by the target (a duplicated output); and if the target had replayed past
//! `H - 1` before it was paused (it can run ahead of a source that is dying), those messages are in
//! its state but get no live output event (the primary queue's copies are refused as repeats).
//! The report's `takeover` says how many of the latter there were.

use super::{ms2m, Ctx, PhaseName};
use crate::error::Result;
use ms2m_wire::control::Command;
use ms2m_wire::names;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How long the broker may take to notice that the dead source's connection is gone.
const CONNECTION_GONE: Duration = Duration::from_secs(30);
/// How many waiting messages are looked at for the primary queue's first seq (other input,
/// refused later, may sit in front).
const PEEK: usize = 64;

/// What a takeover did, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TakeOver {
    /// The phase in which the source was found dead.
    pub source_died_in: Option<PhaseName>,
    /// The target replayed up to this seq and went live after it.
    pub until_seq: u64,
    /// Messages the target held beyond the source's last ack (replayed before it could be
    /// paused, or in its checkpoint): their copies on the primary queue are refused as
    /// repeats, so their live output events exist only where the source sent them before it
    /// died.
    pub replayed_ahead: u64,
}

/// Whether a failed migration can end with the target serving instead of a rollback: the
/// source is dead, a replay queue holds the rest, and the target has restored the source's
/// checkpoint or can still do so (it holds it, or it waits in its queue; a target not started
/// yet is started).
pub(crate) async fn possible(ctx: &Ctx<'_>) -> bool {
    let restorable = ctx.target_restored.is_some()
        || ctx.target_fetched
        || (ctx.checkpoint.is_some() && ctx.checkpoint_queue.is_some());
    let target_alive = !ctx.target_started || ctx.runtime.is_running(&ctx.target).await;
    restorable
        && ctx.replay_queue.is_some()
        && target_alive
        && !ctx.runtime.is_running(&ctx.source).await
}

/// Waits until `primary` has no consumer: the broker noticed that the dead source's connection
/// is gone and put its unacked messages back.
pub(super) async fn wait_until_released(ctx: &Ctx<'_>, primary: &str) -> Result<()> {
    let deadline = Instant::now() + CONNECTION_GONE;
    while ctx.link.consumer_count(primary).await? > 0 {
        if Instant::now() > deadline {
            return Err(ctx.failed(format!(
                "the dead source still consumes {primary} after {} s",
                CONNECTION_GONE.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Lets the target take over from the dead source (see the module's description).
pub(crate) async fn run(ctx: &mut Ctx<'_>, died_in: Option<PhaseName>) -> Result<()> {
    ctx.timeline.begin(PhaseName::TakeOver);
    let target = ctx.target.clone();
    // The source died before the target had restored (sequential MS2M's stop): the checkpoint
    // is complete, so the target restores it first.
    if ctx.target_restored.is_none() {
        if !ctx.target_started {
            ctx.start_target().await?;
        }
        if !ctx.target_fetched {
            let checkpoint = ctx.checkpoint.clone().expect("checked by possible()");
            ctx.fetch(checkpoint).await?;
        }
        ctx.restore_fetched().await?;
    }
    // First of all: every message the target replays from now on may be one the source never
    // processed.
    let paused = match ctx.replay_started {
        true => Some(
            ctx.command(&target, Command::PauseReplay { after_seq: None }, &[])
                .await?
                .0
                .last_seq,
        ),
        false => None,
    };
    let primary = names::primary_queue(&ctx.spec.name);
    wait_until_released(ctx, &primary).await?;
    let replay = ctx.replay_queue.clone().expect("checked by possible()");
    ctx.link
        .unbind(&replay, &names::input_exchange(&ctx.spec.name))
        .await?;
    let mut takeover = TakeOver {
        source_died_in: died_in,
        ..TakeOver::default()
    };
    let marker = format!("end-{}", ctx.migration_id);
    let arm = Command::ArmBarrier { id: marker.clone() };
    ctx.command(&target, arm, &[]).await?;
    ctx.link.publish_marker(&replay, &marker).await?;
    let restored_at = ctx.target_restored.expect("checked by possible()");
    let first = ctx.link.peek_first_seq(&primary, restored_at, PEEK).await?;
    // What the source acked: everything before the primary queue's first message.
    let acked = first.map(|f| f.saturating_sub(1));
    if !ctx.replay_started {
        // Never beyond what the source acked.
        let replay = Command::Replay {
            queue: replay.clone(),
            until_seq: acked,
        };
        ctx.command(&target, replay, &[]).await?;
        ctx.replay_started = true;
    }
    let until_seq = match acked {
        Some(acked) => {
            let reached = paused.unwrap_or(restored_at);
            takeover.replayed_ahead = reached.saturating_sub(acked);
            acked.max(reached)
        }
        // To the end of the queue, where the marker is.
        None => u64::MAX,
    };
    let finish = Command::FinishReplay {
        until_seq,
        go_live: true,
    };
    // What is left to replay; to the end of the queue: its depth.
    let left = match until_seq {
        u64::MAX => u64::from(ctx.link.queue_depth(&replay).await?),
        s => s.saturating_sub(paused.unwrap_or(restored_at)),
    };
    let wait = ctx.replay_wait(left);
    let (live, _) = ctx.command_within(&target, finish, wait).await?;
    takeover.until_seq = live.last_seq;
    ctx.outcome.takeover = Some(takeover);
    ms2m::went_live(ctx, &live);
    ms2m::finish(ctx).await
}
