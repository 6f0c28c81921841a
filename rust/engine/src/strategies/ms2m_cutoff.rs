//! MS2M with the threshold-based cutoff (arXiv 2509.05794).
//!
//! Accumulation in the replay queue starts when it is bound. If the target has not caught up
//! after T_cutoff = T_replay_max * mu / lambda, the cutoff fires: the cutover starts anyway and
//! the target replays the rest while neither instance serves. The backlog accumulated by then
//! is about lambda * T_cutoff messages, which takes T_replay_max to replay at mu, so the whole
//! migration stays bounded even when lambda approaches mu and plain MS2M would never finish.
//! lambda (arrival rate) and mu (one instance's service rate) are measured during the run.

use super::ms2m::{self, CatchUp};
use super::{Ctx, CutoffReport, PhaseName};
use crate::error::Result;
use ms2m_wire::now_ns;
use std::time::{Duration, Instant};

/// T_cutoff in seconds; None when nothing arrives (accumulation never needs cutting).
pub fn cutoff_seconds(replay_max_s: f64, mu: f64, lambda: f64) -> Option<f64> {
    (lambda > 0.0 && mu.is_finite() && mu > 0.0).then(|| replay_max_s * mu / lambda)
}

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let queue = ms2m::prepare(ctx, true).await?;
    let accumulating_since = Instant::now();
    let checkpoint = ms2m::checkpoint(ctx).await?;
    let unfetched = ms2m::transfer(ctx, checkpoint).await?;
    ms2m::restore(ctx, unfetched).await?;
    ctx.enter(PhaseName::Replay).await?;
    ms2m::start_replay(ctx, &queue, None).await?;

    let lambda = ctx.probe.arrival_rate(Duration::from_secs(5));
    let mu = ctx
        .probe
        .service_rate()
        .unwrap_or_else(|| 1000.0 / ctx.spec.processing_ms.max(1e-3));
    let t_cutoff_s = cutoff_seconds(ctx.opts.replay_max_s, mu, lambda);
    let deadline = t_cutoff_s.map(|s| accumulating_since + Duration::from_secs_f64(s));
    let ended = ms2m::catch_up(ctx, &queue, deadline).await?;
    ctx.outcome.cutoff = Some(CutoffReport {
        replay_max_s: ctx.opts.replay_max_s,
        lambda,
        mu,
        t_cutoff_s,
        fired: ended == CatchUp::CutOff,
        fired_at_ns: (ended == CatchUp::CutOff).then(now_ns),
    });
    // Once the cutoff fired the target trails by design: hand over at once.
    ms2m::cutover(ctx, ended == CatchUp::CaughtUp).await
}

#[cfg(test)]
mod tests {
    use super::cutoff_seconds;

    #[test]
    fn cutoff_follows_the_formula() {
        // 50 ms per message (mu = 20/s), lambda = 19/s, T_replay_max = 2 s.
        let t = cutoff_seconds(2.0, 20.0, 19.0).unwrap();
        assert!((t - 2.0 * 20.0 / 19.0).abs() < 1e-12);
        assert_eq!(cutoff_seconds(2.0, 20.0, 0.0), None);
        assert_eq!(cutoff_seconds(2.0, f64::NAN, 5.0), None);
    }
}
