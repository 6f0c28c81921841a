//! The source died before its checkpoint was complete: its state died with it.
//!
//! No target can take over (it has nothing to restore), and rolling back has no source to
//! return to. Nobody can bring the state back; what the harness does is what an orchestrator
//! does with a crashed instance, so that the service serves again and nothing still queued is
//! lost:
//!
//! 1. wait until the primary queue has no consumer (the dead source's unacked messages are back
//!    on it);
//! 2. find the primary queue's first seq `H` above the last one with a live output event
//!    (peeked, left in place; a copy of a message the source processed but did not ack is
//!    passed over);
//! 3. remove the dead instance and its control queue (commands it never read must not reach
//!    the new one);
//! 4. start a new instance on the source's host, empty, `adopt` after `H - 1` (with nothing
//!    queued: the next input above the last processed seq, whatever it is) and `start_live`.
//!
//! The report says so (`migration.restarted`), and the checker checks the new instance's state
//! against what came after `H - 1` only: the state of everything before is lost, and the error
//! says it.

use super::{takeover, Ctx, PhaseName};
use crate::error::Result;
use ms2m_wire::control::Command;
use ms2m_wire::names;
use serde::{Deserialize, Serialize};

/// How many waiting messages are looked at for the primary queue's first seq.
const PEEK: usize = 64;

/// A new instance, started empty, serving in place of a source that died with its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Restarted {
    /// The phase in which the source was found dead.
    pub source_died_in: Option<PhaseName>,
    /// The new instance (on the source's host).
    pub instance: String,
    /// Its state holds nothing up to this seq (the state of those messages died with the
    /// source); None: nothing was queued, and it took the stream up at the next message.
    pub after_seq: Option<u64>,
}

impl Restarted {
    /// The name of the instance that replaces `source` in migration `migration_id`.
    pub fn instance_name(service: &str, migration_id: &str) -> String {
        format!("{service}-restarted-{migration_id}")
    }
}

/// Starts an empty instance in the dead source's place (see the module's description).
pub(crate) async fn run(ctx: &mut Ctx<'_>, died_in: Option<PhaseName>) -> Result<Restarted> {
    ctx.timeline.begin(PhaseName::Restart);
    let result = restart(ctx, died_in).await;
    ctx.timeline.end();
    result
}

async fn restart(ctx: &mut Ctx<'_>, died_in: Option<PhaseName>) -> Result<Restarted> {
    let primary = names::primary_queue(&ctx.spec.name);
    takeover::wait_until_released(ctx, &primary).await?;
    let processed = ctx.probe.last_live_seq().unwrap_or(0);
    let first = ctx.link.peek_first_seq(&primary, processed, PEEK).await?;
    let source = ctx.source.clone();
    ctx.runtime.remove_instance(&source).await?;
    ctx.link
        .delete_queue(&names::control_queue(&ctx.spec.name, &source))
        .await?;
    let instance = Restarted::instance_name(&ctx.spec.name, &ctx.migration_id);
    let control = names::control_queue(&ctx.spec.name, &instance);
    ctx.link
        .declare_control_queue(&ctx.spec.name, &instance)
        .await?;
    // With nothing queued, the next message above what was processed, whatever its seq: the
    // recorder may not have seen the dead source's last outputs yet.
    let adopt = match first {
        Some(h) => Command::Adopt {
            after_seq: h - 1,
            next_above: false,
        },
        None => Command::Adopt {
            after_seq: processed,
            next_above: true,
        },
    };
    let started = async {
        ctx.runtime
            .start_instance(ctx.spec, &instance, &ctx.source_host, ctx.source_url, false)
            .await?;
        ctx.command(&instance, adopt, &[]).await?;
        ctx.command(&instance, Command::StartLive, &[]).await
    };
    if let Err(e) = started.await {
        // Half a replacement is none: it goes, with its queue.
        let _ = ctx.runtime.remove_instance(&instance).await;
        let _ = ctx.link.delete_queue(&control).await;
        return Err(e);
    }
    Ok(Restarted {
        source_died_in: died_in,
        instance,
        after_seq: first.map(|h| h - 1),
    })
}
