//! Benchmarks of the measuring instrument itself, against a real broker container:
//!
//! 1. the highest confirmed publish rate the workload generator sustains with a pacing error
//!    p99 under 1 ms;
//! 2. the highest rate of output events the recorder takes without losing one;
//! 3. the pacing error at 1,000 msg/s.
//!
//! Run with `cargo bench -p ms2m-engine --bench instrument` (or `make bench`); figures vary
//! with the machine's load, which is why they are measured here and never asserted in tests.

mod common;

use ms2m_engine::broker::Link;
use ms2m_engine::history::PublishOutcome;
use ms2m_engine::recorder::Recorder;
use ms2m_engine::workload::Workload;
use ms2m_engine::WorkloadSpec;
use ms2m_wire::{names, now_ns, Mode, OutputEvent};
use std::time::{Duration, Instant};

const SERVICE: &str = "bench";

struct Run {
    rate: f64,
    confirmed_rate: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

async fn generator(url: &str, link: &Link, rate: f64, seconds: f64) -> anyhow::Result<Run> {
    link.delete_queue(&names::primary_queue(SERVICE)).await?;
    link.declare_service(SERVICE, false).await?;
    let w = Workload::start(url, SERVICE, WorkloadSpec::constant(rate), 1, false).await?;
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let log = w.stop().await?;
    let confirmed: Vec<_> = log
        .iter()
        .filter(|p| p.outcome == PublishOutcome::Confirmed)
        .collect();
    // Over the time the sends really took: a generator that falls behind its schedule must
    // not be credited with the scheduled rate.
    let span = match (log.first(), log.last()) {
        (Some(a), Some(b)) if b.t_pub_ns > a.t_pub_ns => (b.t_pub_ns - a.t_pub_ns) as f64 / 1e9,
        _ => seconds,
    };
    let mut h = hdrhistogram::Histogram::<u64>::new(3)?;
    for p in &log {
        h.record(p.t_pub_ns.saturating_sub(p.t_sched_ns).max(1))?;
    }
    Ok(Run {
        rate,
        confirmed_rate: confirmed.len() as f64 / span,
        p50_us: h.value_at_quantile(0.5) as f64 / 1e3,
        p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
        max_us: h.max() as f64 / 1e3,
    })
}

/// Publishes `n` output events as fast as confirms allow, then measures how fast the recorder
/// drains them and whether it got every one.
async fn recorder(url: &str, link: &Link, n: u64) -> anyhow::Result<(f64, u64)> {
    link.delete_queue(&names::events_queue(SERVICE)).await?;
    link.declare_service(SERVICE, false).await?;
    let conn = ms2m_engine::broker::connect(url, Duration::from_secs(10)).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    for seq in 1..=n {
        let e = OutputEvent {
            instance: "bench-1".into(),
            seq,
            mode: Mode::Live,
            t_pub_ns: now_ns(),
            t_start_ns: now_ns(),
            t_end_ns: now_ns(),
            chain: "0".repeat(64),
            first_seq: None,
            messages: None,
            output: None,
        };
        // Dropped unawaited, a confirm is collected by wait_for_confirms below.
        let confirm = ch
            .basic_publish(
                names::output_exchange(SERVICE).as_str().into(),
                "".into(),
                Default::default(),
                &serde_json::to_vec(&e)?,
                Default::default(),
            )
            .await?;
        drop(confirm);
    }
    ch.wait_for_confirms().await?;
    let started = Instant::now();
    let rec = Recorder::start(url, SERVICE, false).await?;
    let deadline = started + Duration::from_secs(120);
    while rec.with_events(|e| e.len() as u64) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let got = rec.with_events(|e| e.len() as u64);
    let elapsed = started.elapsed().as_secs_f64();
    rec.stop().await;
    let _ = conn.close(200, "done".into()).await;
    Ok((got as f64 / elapsed, n - got.min(n)))
}

fn main() -> anyhow::Result<()> {
    // MS2M_RUNTIME=docker|local picks the runtime (default: auto).
    common::with_testbed(async |tb| {
        println!(
            "broker: {} runtime, {}\n",
            tb.runtime().name(),
            tb.amqp_url()
        );
        let url = tb.amqp_url().to_string();
        let result = async {
            let link = Link::open(&url, Duration::from_secs(30)).await?;
            println!("workload generator (3 s per rate, 64-byte messages, publisher confirms)");
            println!(
                "{:>9} {:>14} {:>10} {:>10} {:>10}",
                "rate", "confirmed/s", "p50 us", "p99 us", "max us"
            );
            let mut best = 0.0;
            for rate in [
                1_000.0, 5_000.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 60_000.0,
            ] {
                let r = generator(&url, &link, rate, 3.0).await?;
                println!(
                    "{:>9.0} {:>14.0} {:>10.1} {:>10.1} {:>10.1}",
                    r.rate, r.confirmed_rate, r.p50_us, r.p99_us, r.max_us
                );
                if r.p99_us < 1000.0 && r.confirmed_rate >= 0.98 * r.rate {
                    best = r.rate;
                }
            }
            println!("=> highest sustained rate with pacing p99 < 1 ms: {best:.0} msg/s\n");

            let pace = generator(&url, &link, 1_000.0, 5.0).await?;
            println!(
                "pacing error at 1,000 msg/s over 5 s: p50 {:.1} us, p99 {:.1} us, max {:.1} us\n",
                pace.p50_us, pace.p99_us, pace.max_us
            );

            let n = 200_000;
            let (rate, lost) = recorder(&url, &link, n).await?;
            println!("recorder: {n} output events drained at {rate:.0} events/s, {lost} lost");
            link.close().await;
            anyhow::Ok(())
        }
        .await;
        tb.close().await?;
        result
    })
}
