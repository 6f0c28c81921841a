//! The source died after the target restored its checkpoint: the target takes over.
//!
//! Rolling back would leave nobody serving (the source's state died with it), while the target
//! holds the checkpoint and the replay queue holds every message since the barrier. What the
//! source acked, it processed live; what it did not is back on the primary queue once the
//! broker has closed its connection. So the target replays up to the message before the
//! primary queue's first one and goes live there:
//!
//! 1. wait until the primary queue has no consumer (the dead source's unacked messages are
//!    back on it);
//! 2. unbind the replay queue from the input exchange: from now on new messages go only to
//!    the primary queue, so the replay queue ends;
//! 3. find the primary queue's first seq `H` (peeked, left in place). With one, pause the
//!    target's replay at `T` and finish it at `max(H - 1, T)`. Without one (the source had
//!    acked everything), the whole replay queue is the source's work: the manager arms the
//!    target with a marker, puts it at the end of the replay queue, and finishes the replay
//!    "at the end of the queue" (`until_seq` = the largest seq), which the marker ends;
//! 4. the target goes live, the source's leftovers go.
//!
//! Exact, with two losses nobody can avoid, both counted by the checker: a message the source
//! was handling when it died (applied, its output event maybe published, not acked) is
//! processed again by the target (a duplicated output); and if the target had replayed past
//! `H - 1` before it paused (it can run ahead of a source that is dying), those messages are in
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
/// source is dead, the target runs and has restored, and a replay queue holds the rest.
pub(crate) async fn possible(ctx: &Ctx<'_>) -> bool {
    ctx.target_restored
        && ctx.replay_queue.is_some()
        && !ctx.runtime.is_running(&ctx.source).await
        && ctx.runtime.is_running(&ctx.target).await
}

/// Lets the target take over from the dead source (see the module's description).
pub(crate) async fn run(ctx: &mut Ctx<'_>, died_in: Option<PhaseName>) -> Result<()> {
    ctx.timeline.begin(PhaseName::TakeOver);
    let primary = names::primary_queue(&ctx.spec.name);
    let deadline = Instant::now() + CONNECTION_GONE;
    while ctx.link.consumer_count(&primary).await? > 0 {
        if Instant::now() > deadline {
            return Err(ctx.failed(format!(
                "the dead source still consumes {primary} after {} s",
                CONNECTION_GONE.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replay = ctx.replay_queue.clone().expect("checked by possible()");
    ctx.link
        .unbind(&replay, &names::input_exchange(&ctx.spec.name))
        .await?;
    let target = ctx.target.clone();
    let mut takeover = TakeOver {
        source_died_in: died_in,
        ..TakeOver::default()
    };
    let first = ctx.link.peek_first_seq(&primary, PEEK).await?;
    if !ctx.replay_started {
        // Never beyond what the source acked.
        let replay = Command::Replay {
            queue: replay.clone(),
            until_seq: first.map(|f| f - 1),
        };
        ctx.command(&target, replay, &[]).await?;
        ctx.replay_started = true;
    }
    let live = match first {
        Some(first) => {
            let (paused, _) = ctx.command(&target, Command::PauseReplay, &[]).await?;
            let acked = first - 1;
            takeover.replayed_ahead = paused.last_seq.saturating_sub(acked);
            ctx.command(
                &target,
                Command::FinishReplay {
                    until_seq: acked.max(paused.last_seq),
                    go_live: true,
                },
                &[],
            )
            .await?
        }
        None => {
            let marker = format!("end-{}", ctx.migration_id);
            let arm = Command::ArmBarrier { id: marker.clone() };
            ctx.command(&target, arm, &[]).await?;
            ctx.link.publish_marker(&replay, &marker).await?;
            let to_the_end = Command::FinishReplay {
                until_seq: u64::MAX,
                go_live: true,
            };
            ctx.command(&target, to_the_end, &[]).await?
        }
    };
    takeover.until_seq = live.0.last_seq;
    ctx.outcome.takeover = Some(takeover);
    ctx.outcome.t_target_live_ns = Some(live.0.t_ns);
    ctx.outcome.messages_replayed = live.0.replayed;
    ctx.outcome.replay_skipped = live.0.skipped;
    ms2m::finish(ctx).await
}
