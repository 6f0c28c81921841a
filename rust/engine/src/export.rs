//! Exports of a history for other tools: the per-message timeline as CSV (for plotting), and the
//! latency histograms as an HdrHistogram interval log (for HdrHistogram's own tools, such as
//! HistogramLogAnalyzer or `hdr-plot`).

use crate::history::{History, PublishOutcome};
use crate::metrics::{Latencies, Span};
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2DeflateSerializer;
use ms2m_wire::Mode;
use std::fmt::Write;
use std::time::{Duration, UNIX_EPOCH};

/// Header of [`timeline_csv`].
pub const TIMELINE_COLUMNS: &str =
    "seq,outcome,t_sched_ns,t_pub_ns,instance,mode,t_start_ns,t_end_ns,latency_us";

fn outcome_name(o: PublishOutcome) -> &'static str {
    match o {
        PublishOutcome::Pending => "pending",
        PublishOutcome::Confirmed => "confirmed",
        PublishOutcome::Nacked => "nacked",
        PublishOutcome::Uncertain => "uncertain",
    }
}

/// One row per live processing of a message and per run of replayed messages (under the run's
/// last seq), plus one row with empty processing columns for every sent message nobody
/// processed; ordered by seq, then start time.
pub fn timeline_csv(history: &History) -> String {
    let mut by_seq: std::collections::BTreeMap<u64, Vec<&ms2m_wire::OutputEvent>> =
        std::collections::BTreeMap::new();
    for e in &history.events {
        by_seq.entry(e.seq).or_default().push(e);
    }
    let mut out = String::with_capacity(64 * (history.events.len() + history.published.len()));
    out.push_str(TIMELINE_COLUMNS);
    out.push('\n');
    let published: std::collections::BTreeMap<u64, _> =
        history.published.iter().map(|p| (p.seq, p)).collect();
    let seqs: std::collections::BTreeSet<u64> =
        published.keys().chain(by_seq.keys()).copied().collect();
    for seq in seqs {
        let p = published.get(&seq);
        let head = match p {
            Some(p) => format!(
                "{seq},{},{},{}",
                outcome_name(p.outcome),
                p.t_sched_ns,
                p.t_pub_ns
            ),
            None => format!("{seq},unknown,,"),
        };
        match by_seq.get_mut(&seq) {
            None => {
                let _ = writeln!(out, "{head},,,,,");
            }
            Some(events) => {
                events.sort_by_key(|e| e.t_start_ns);
                for e in events.iter() {
                    let mode = if e.mode == Mode::Live {
                        "live"
                    } else {
                        "replay"
                    };
                    let t_pub = p.map_or(e.t_pub_ns, |p| p.t_pub_ns);
                    let _ = writeln!(
                        out,
                        "{head},{},{mode},{},{},{:.3}",
                        e.instance,
                        e.t_start_ns,
                        e.t_end_ns,
                        e.t_end_ns.saturating_sub(t_pub) as f64 / 1000.0
                    );
                }
            }
        }
    }
    out
}

/// The live latencies (microseconds) before, during and after `migration` as an HdrHistogram
/// interval log with three intervals tagged `before`, `during` and `after`. Interval times are
/// the send times of the messages each holds, relative to the log's base time.
pub fn interval_log(history: &History, migration: Span) -> String {
    let lat = Latencies::compute(history, migration);
    let sent: Vec<u64> = history.published.iter().map(|p| p.t_pub_ns).collect();
    let first = sent
        .iter()
        .copied()
        .min()
        .unwrap_or(migration.0)
        .min(migration.0);
    let last = sent
        .iter()
        .copied()
        .max()
        .unwrap_or(migration.1)
        .max(migration.1);
    let base = UNIX_EPOCH + Duration::from_nanos(first);
    let mut buf = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    {
        let mut w = IntervalLogWriterBuilder::new()
            .add_comment("ms2m end-to-end latency (t_end - t_pub) of live messages, microseconds")
            .add_comment("intervals: messages sent before, during and after the migration")
            .with_start_time(base)
            .with_base_time(base)
            .with_max_value_divisor(1000.0)
            .begin_log_with(&mut buf, &mut serializer)
            .expect("writing to memory");
        let spans = [
            ("before", &lat.before, first, migration.0),
            ("during", &lat.during, migration.0, migration.1),
            ("after", &lat.after, migration.1, last.max(migration.1)),
        ];
        for (tag, h, a, b) in spans {
            w.write_histogram(
                h,
                Duration::from_nanos(a - first),
                Duration::from_nanos(b.saturating_sub(a)),
                Tag::new(tag),
            )
            .expect("histograms serialize to memory");
        }
    }
    String::from_utf8(buf).expect("interval logs are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::tests::{event, published};
    use base64::prelude::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;

    fn history() -> History {
        let mut events: Vec<_> = (1..=5)
            .map(|s| event(s, s * 1_000_000 + 10, s * 1_000_000 + 500_000, Mode::Live))
            .collect();
        events.push(event(3, 9_000_000, 9_100_000, Mode::Replay));
        for e in events.iter_mut() {
            e.t_pub_ns = e.seq * 1_000_000;
        }
        let mut published = published(6, 1_000_000);
        published[5].outcome = PublishOutcome::Uncertain;
        History {
            published,
            events,
            message_bytes: 0,
            state_bytes: 0,
            state_restarts: Vec::new(),
        }
    }

    #[test]
    fn timeline_has_a_row_per_processing_and_per_unprocessed_message() {
        let csv = timeline_csv(&history());
        let lines: Vec<_> = csv.lines().collect();
        assert_eq!(lines[0], TIMELINE_COLUMNS);
        assert_eq!(lines.len(), 1 + 5 + 1 + 1);
        assert!(lines.contains(&"6,uncertain,6000000,6000000,,,,,"), "{csv}");
        assert!(lines
            .iter()
            .any(|l| l.starts_with("3,confirmed,") && l.contains(",replay,")));
        assert!(lines.contains(&"1,confirmed,1000000,1000000,a,live,1000010,1500000,500.000"));
    }

    #[test]
    fn interval_log_reads_back_with_three_tagged_histograms() {
        let log = interval_log(&history(), (2_500_000, 4_500_000));
        let mut tags = Vec::new();
        let mut counts = Vec::new();
        for entry in IntervalLogIterator::new(log.as_bytes()) {
            if let LogEntry::Interval(h) = entry.expect("a valid log") {
                tags.push(h.tag().unwrap().as_str().to_string());
                let bytes = BASE64_STANDARD.decode(h.encoded_histogram()).unwrap();
                let hist: hdrhistogram::Histogram<u64> = Deserializer::new()
                    .deserialize(&mut bytes.as_slice())
                    .unwrap();
                counts.push(hist.len());
            }
        }
        assert_eq!(tags, ["before", "during", "after"]);
        assert_eq!(counts, [2, 2, 1]);
    }
}
