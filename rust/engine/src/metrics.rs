//! Metrics computed from a history (ARCHITECTURE.md, "Metrics").

use crate::history::{History, PublishOutcome};
use hdrhistogram::Histogram;
use ms2m_wire::Mode;
use serde::{Deserialize, Serialize};

/// A half-open interval of host-clock nanoseconds.
pub type Span = (u64, u64);

/// The longest stretch of a window in which a message waited and no instance processed one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Downtime {
    pub ms: f64,
    /// Where the longest stretch lies (absent when there was none).
    pub interval_ns: Option<Span>,
    pub window_ns: Span,
}

/// Merges intervals into their sorted union.
fn union(mut spans: Vec<Span>) -> Vec<Span> {
    spans.retain(|(a, b)| b > a);
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (a, b) in spans {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Longest piece of `waiting \ busy` inside `window`; both inputs sorted unions.
fn longest_uncovered(waiting: &[Span], busy: &[Span], window: Span) -> Option<Span> {
    let mut best: Option<Span> = None;
    let mut bi = 0;
    for &(wa, wb) in waiting {
        let (mut a, b) = (wa.max(window.0), wb.min(window.1));
        if a >= b {
            continue;
        }
        while bi < busy.len() && busy[bi].1 <= a {
            bi += 1;
        }
        let mut j = bi;
        while a < b {
            let (gap_end, next) = match busy.get(j) {
                Some(&(ba, bb)) if ba < b => (ba.max(a), bb),
                _ => (b, b),
            };
            if gap_end > a && best.is_none_or(|(x, y)| gap_end - a > y - x) {
                best = Some((a, gap_end));
            }
            a = a.max(next);
            j += 1;
        }
    }
    best
}

/// Downtime over `window`: a message is waiting from its send until an instance starts it live
/// (or, for one applied only in a replay, as the messages a target took over with held ahead of
/// a dead source, until that replay began; or until `t_cut_ns` if nothing applied it); an
/// instance is busy while it processes a live message.
pub fn downtime(history: &History, window: Span, t_cut_ns: u64) -> Downtime {
    let live = history.first_live();
    // Replay runs by their first seq: (last seq, start).
    let replayed: std::collections::BTreeMap<u64, (u64, u64)> = history
        .events
        .iter()
        .filter(|e| e.mode == Mode::Replay)
        .map(|e| (e.first_seq.unwrap_or(e.seq), (e.seq, e.t_start_ns)))
        .collect();
    let replay_start = |seq: u64| {
        let (_, &(last, start)) = replayed.range(..=seq).next_back()?;
        (seq <= last).then_some(start)
    };
    let waiting = union(
        history
            .published
            .iter()
            .filter(|p| p.outcome != PublishOutcome::Nacked && p.t_pub_ns <= t_cut_ns)
            .map(|p| {
                let end = live
                    .get(&p.seq)
                    .map(|(e, _)| e.t_start_ns)
                    .or_else(|| replay_start(p.seq))
                    .unwrap_or(t_cut_ns);
                (p.t_pub_ns, end.max(p.t_pub_ns))
            })
            .collect(),
    );
    let busy = union(
        history
            .events
            .iter()
            .filter(|e| e.mode == Mode::Live)
            .map(|e| (e.t_start_ns, e.t_end_ns))
            .collect(),
    );
    let interval = longest_uncovered(&waiting, &busy, window);
    Downtime {
        ms: interval.map_or(0.0, |(a, b)| (b - a) as f64 / 1e6),
        interval_ns: interval,
        window_ns: window,
    }
}

/// Percentiles of one latency histogram, milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// How late the workload sent its messages (actual minus scheduled send time), microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PacingSummary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Pacing error of every message sent up to `t_cut_ns`.
pub fn pacing(history: &History, t_cut_ns: u64) -> PacingSummary {
    let mut h = new_histogram_ns();
    for p in history.published.iter().filter(|p| p.t_pub_ns <= t_cut_ns) {
        h.saturating_record(p.t_pub_ns.saturating_sub(p.t_sched_ns).max(1));
    }
    let [p50_us, p99_us, p999_us, max_us] = quantiles(&h, 1e-3);
    PacingSummary {
        count: h.len(),
        p50_us,
        p99_us,
        p999_us,
        max_us,
    }
}

/// The processing time asked of the service against what its instances spent on each live
/// message (`t_end - t_start` of its output event), milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProcessingSummary {
    pub asked_ms: f64,
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (p50 - asked) / asked; None when nothing was asked or nothing processed.
    pub deviation: Option<f64>,
    /// The median is off what was asked by more than [`PROCESSING_TOLERANCE`] (and by more
    /// than [`PROCESSING_FLOOR_MS`]): the service did not run at the rate the run assumed.
    pub off_target: bool,
}

/// Relative difference between asked and achieved processing time that a report flags.
pub const PROCESSING_TOLERANCE: f64 = 0.05;
/// Differences below this are the clock's and the event's own cost, not the service's.
pub const PROCESSING_FLOOR_MS: f64 = 0.002;

/// Achieved processing time of the live messages of `history`, against `asked_ms`.
pub fn processing(history: &History, asked_ms: f64) -> ProcessingSummary {
    let mut h = new_histogram_ns();
    for e in history.events.iter().filter(|e| e.mode == Mode::Live) {
        h.saturating_record(e.t_end_ns.saturating_sub(e.t_start_ns).max(1));
    }
    let [p50_ms, p99_ms, p999_ms, max_ms] = quantiles(&h, 1e-6);
    let measured = !h.is_empty();
    let off = (p50_ms - asked_ms).abs();
    ProcessingSummary {
        asked_ms,
        count: h.len(),
        p50_ms,
        p99_ms,
        p999_ms,
        max_ms,
        deviation: (measured && asked_ms > 0.0).then(|| (p50_ms - asked_ms) / asked_ms),
        off_target: measured && off > PROCESSING_FLOOR_MS && off > PROCESSING_TOLERANCE * asked_ms,
    }
}

/// A histogram of nanoseconds, 1 ns to 1 h, 3 significant digits.
fn new_histogram_ns() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("bounds")
}

/// p50, p99, p99.9 and max of a histogram, each times `scale` (zeros when it is empty).
fn quantiles(h: &Histogram<u64>, scale: f64) -> [f64; 4] {
    if h.is_empty() {
        return [0.0; 4];
    }
    [
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
    .map(|v| v as f64 * scale)
}

/// End-to-end latency (t_end - t_pub) of live messages, before, during and after a migration.
pub struct Latencies {
    pub before: Histogram<u64>,
    pub during: Histogram<u64>,
    pub after: Histogram<u64>,
}

/// A histogram of microseconds from 1 us to 1 h at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Latencies {
    /// Splits by send time: before `migration.0`, within `migration`, after `migration.1`.
    pub fn compute(history: &History, migration: Span) -> Latencies {
        let mut l = Latencies {
            before: new_histogram(),
            during: new_histogram(),
            after: new_histogram(),
        };
        for (e, _) in history.first_live().values() {
            let us = (e.t_end_ns.saturating_sub(e.t_pub_ns) / 1000).clamp(1, 3_600_000_000);
            let h = if e.t_pub_ns < migration.0 {
                &mut l.before
            } else if e.t_pub_ns < migration.1 {
                &mut l.during
            } else {
                &mut l.after
            };
            h.saturating_record(us);
        }
        l
    }
}

/// Percentiles of a latency histogram of microseconds, in milliseconds.
pub fn summarize(h: &Histogram<u64>) -> LatencySummary {
    let [p50_ms, p99_ms, p999_ms, max_ms] = quantiles(h, 1e-3);
    LatencySummary {
        count: h.len(),
        p50_ms,
        p99_ms,
        p999_ms,
        max_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::tests::{event, published};

    fn hist(events: Vec<ms2m_wire::OutputEvent>, n: u64) -> History {
        History {
            published: published(n, 100),
            events,
            message_bytes: 0,
            state_bytes: 0,
            state_restarts: Vec::new(),
        }
    }

    #[test]
    fn idle_service_has_no_downtime() {
        // Each message starts 10 ns after it is sent, done 40 ns later: waits are tiny.
        let h = hist(
            (1..=10)
                .map(|s| event(s, s * 100 + 10, s * 100 + 50, Mode::Live))
                .collect(),
            10,
        );
        let d = downtime(&h, (0, 2000), u64::MAX);
        assert_eq!(
            d.interval_ns,
            Some((110, 120)).map(|(a, b)| (a - 10, b - 10))
        );
        assert!((d.ms - 10e-6).abs() < 1e-12);
    }

    #[test]
    fn gap_while_messages_wait_is_downtime() {
        // Messages 5..=7 wait until a target starts at 1000 (sent at 500, 600, 700).
        let mut ev: Vec<_> = (1..=4)
            .map(|s| event(s, s * 100, s * 100 + 50, Mode::Live))
            .collect();
        ev.extend((5..=7).map(|s| event(s, 1000 + (s - 5) * 50, 1050 + (s - 5) * 50, Mode::Live)));
        let h = hist(ev, 7);
        let d = downtime(&h, (0, 5000), u64::MAX);
        assert_eq!(d.interval_ns, Some((500, 1000)));
        assert_eq!(d.ms, 500.0 / 1e6);
        // Clipped to the window.
        assert_eq!(
            downtime(&h, (0, 800), u64::MAX).interval_ns,
            Some((500, 800))
        );
    }

    #[test]
    fn replay_does_not_count_as_serving() {
        let ev = vec![
            event(1, 100, 150, Mode::Live),
            event(2, 210, 260, Mode::Replay),
            event(2, 400, 450, Mode::Live),
        ];
        let h = hist(ev, 2);
        assert_eq!(
            downtime(&h, (0, 1000), u64::MAX).interval_ns,
            Some((200, 400))
        );
    }

    #[test]
    fn zero_rate_and_empty_window() {
        let h = hist(vec![], 0);
        assert_eq!(downtime(&h, (0, 1000), u64::MAX).ms, 0.0);
        assert_eq!(downtime(&h, (10, 10), u64::MAX).interval_ns, None);
    }

    #[test]
    fn lost_message_waits_until_the_cut() {
        let h = hist(vec![event(1, 100, 150, Mode::Live)], 2);
        assert_eq!(downtime(&h, (0, 10_000), 900).interval_ns, Some((200, 900)));
    }

    /// A message a taking-over target replayed ahead of the dead source has no live event: it
    /// waited until its replay, not until every later cut (which made each later migration's
    /// downtime one message gap).
    #[test]
    fn a_message_applied_only_in_replay_waits_until_its_replay() {
        let mut replayed = event(2, 220, 260, Mode::Replay);
        replayed.first_seq = Some(2);
        let ev = vec![
            event(1, 100, 150, Mode::Live),
            replayed,
            event(3, 300, 350, Mode::Live),
            event(4, 400, 450, Mode::Live),
        ];
        let h = hist(ev, 4);
        assert_eq!(
            downtime(&h, (260, 10_000), 10_000).interval_ns,
            None,
            "no later window is down because of seq 2"
        );
        assert_eq!(
            downtime(&h, (0, 10_000), 10_000).interval_ns,
            Some((200, 220))
        );
    }

    #[test]
    fn gap_at_the_window_edges() {
        // A message sent before the window, processed after it: the whole window is down.
        let h = hist(vec![event(1, 5000, 5050, Mode::Live)], 1);
        assert_eq!(
            downtime(&h, (1000, 2000), u64::MAX).interval_ns,
            Some((1000, 2000))
        );
    }

    #[test]
    fn latencies_split_by_send_time() {
        let mut ev: Vec<_> = (1..=9)
            .map(|s| event(s, s * 100, s * 100 + 50, Mode::Live))
            .collect();
        for e in ev.iter_mut() {
            e.t_pub_ns = e.seq * 1_000_000;
            e.t_end_ns = e.t_pub_ns + 2_000_000;
        }
        let h = hist(ev, 9);
        let l = Latencies::compute(&h, (3_000_000, 6_000_000));
        assert_eq!((l.before.len(), l.during.len(), l.after.len()), (2, 3, 4));
        let s = summarize(&l.after);
        assert!((s.p50_ms - 2.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn processing_is_compared_with_what_was_asked() {
        // Live messages took 50 us each (one took 80); a replayed one does not count.
        let mut events: Vec<_> = (1..=9)
            .map(|i| event(i, i * 1_000_000, i * 1_000_000 + 50_000, Mode::Live))
            .collect();
        events.push(event(10, 20_000_000, 20_080_000, Mode::Live));
        events.push(event(10, 30_000_000, 39_000_000, Mode::Replay));
        let h = hist(events, 10);
        let p = processing(&h, 0.05);
        assert_eq!(p.count, 10);
        assert!((p.p50_ms - 0.05).abs() < 1e-4, "{p:?}");
        assert!((p.max_ms - 0.08).abs() < 1e-4, "{p:?}");
        assert!(p.deviation.unwrap().abs() < 0.01 && !p.off_target, "{p:?}");
        // Asked for 40 us, 50 us is 25% too long.
        let p = processing(&h, 0.04);
        assert!(p.off_target && p.deviation.unwrap() > 0.2, "{p:?}");
        // Asked for nothing: 50 us is off, but there is no relative deviation.
        let p = processing(&h, 0.0);
        assert!(p.off_target && p.deviation.is_none(), "{p:?}");
        // Within the floor: 1 us over is the clock's, not the service's.
        let h = hist(vec![event(1, 0, 1_000, Mode::Live)], 1);
        assert!(!processing(&h, 0.0).off_target);
        assert!(!processing(&hist(Vec::new(), 0), 5.0).off_target);
    }
}
