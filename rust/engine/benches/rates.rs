//! How fast the reference service runs against a real broker, and what a migration costs there:
//! for each processing time, the highest live rate it sustains (prefetch 100: no backlog
//! growing over the window), the rate at which a target replays a backlog (that of an
//! ms2m_sequential target of 64 MiB, which a checkpoint of that size lets build up), and one ms2m
//! migration at 80% of the live rate. Beside them, what the broker alone carries with the
//! service's pattern (the physical limit here), and the service's share of it.
//!
//! Run with `cargo bench -p ms2m-engine --bench rates` (part of `make bench`). Environment:
//! `MS2M_RUNTIME` (auto, docker, local), `MS2M_BENCH_WINDOW_S` (the window a rate must hold
//! for, default 10), `MS2M_BENCH_PROCESSING_MS` (comma-separated, default 0,0.05,0.2,1),
//! `MS2M_BENCH_GOAL_RUNS` (migrations at 5,000 msg/s with 0.05 ms processing, the issue's
//! goal, default 7; 0 skips them).
//! Figures depend on the machine's load: they are measured here, never asserted in tests.

mod common;

use anyhow::{ensure, Context, Result};
use futures_lite::StreamExt;
use lapin::{options::*, types::FieldTable, BasicProperties, Channel, Connection};
use ms2m_engine::history::{History, PublishOutcome};
use ms2m_engine::report::MigrationStatus;
use ms2m_engine::testbed::MigrationError;
use ms2m_engine::{MigrationOptions, Report, ServiceSpec, Strategy, Testbed, WorkloadSpec};
use ms2m_wire::{now_ns, Mode};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PREFETCH: u16 = 100;
const RATES: [f64; 17] = [
    250.0, 500.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 8000.0, 10000.0, 12000.0,
    15000.0, 20000.0, 25000.0, 30000.0, 40000.0, 50000.0,
];

/// The state of the services measured (1 MiB), and of the one whose replay is timed (64 MiB:
/// its checkpoint takes long enough for a backlog of some thousands to build up behind it).
const STATE_BYTES: u64 = 1 << 20;
const REPLAY_STATE_BYTES: u64 = 64 << 20;

fn spec(name: String, processing_ms: f64, state_bytes: u64) -> ServiceSpec {
    ServiceSpec {
        name,
        host: "edge-1".into(),
        processing_ms,
        state_bytes,
        prefetch: PREFETCH,
        max_seq_gap: 1,
        image: None,
        command: None,
        env: Default::default(),
        durable: false,
    }
}

/// Confirmed messages sent by `t` minus messages processed live by `t`.
fn backlog(h: &History, t: u64) -> i64 {
    let sent = h
        .published
        .iter()
        .filter(|p| p.t_pub_ns <= t && p.outcome == PublishOutcome::Confirmed)
        .count() as i64;
    let done = h
        .events
        .iter()
        .filter(|e| e.mode == Mode::Live && e.t_end_ns <= t)
        .count() as i64;
    sent - done
}

/// Deploys a fresh service, drives it at `rate` for 2 s, runs `f` on it, and removes it
/// whatever happened.
async fn under_load<T, Fut>(
    tb: &Testbed,
    processing_ms: f64,
    state_bytes: u64,
    rate: f64,
    f: impl FnOnce(String) -> Fut,
) -> Result<T>
where
    Fut: std::future::Future<Output = Result<T>>,
{
    let name = format!("bench-{}", now_ns() % 1_000_000_000);
    tb.deploy(spec(name.clone(), processing_ms, state_bytes))
        .await?;
    let run = async {
        tb.start_workload(&name, WorkloadSpec::constant(rate))
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        f(name.clone()).await
    }
    .await;
    tb.remove(&name).await?;
    run
}

/// Whether a fresh service keeps up with `rate` over `window`: its backlog at the end of the
/// window is no larger than at the start, give or take its prefetch and 1% of the window's
/// messages.
async fn sustains(tb: &Testbed, processing_ms: f64, rate: f64, window: Duration) -> Result<bool> {
    under_load(tb, processing_ms, STATE_BYTES, rate, |name| async move {
        let t0 = now_ns();
        tokio::time::sleep(window).await;
        let t1 = now_ns();
        tb.stop_workload(&name).await?;
        // Output events of the window's last messages are still on their way to the recorder.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let h = tb.history(&name).await?;
        let (b0, b1) = (backlog(&h, t0), backlog(&h, t1));
        let slack = i64::from(PREFETCH) + (rate * window.as_secs_f64() / 100.0) as i64;
        Ok(b1 <= b0 + slack)
    })
    .await
}

/// The highest rate the service sustains (0 if none; see [`highest`]).
async fn highest_live(tb: &Testbed, processing_ms: f64, window: Duration) -> Result<f64> {
    let capacity = if processing_ms > 0.0 {
        1000.0 / processing_ms
    } else {
        f64::INFINITY
    };
    let rates: Vec<f64> = RATES.into_iter().filter(|r| *r <= capacity).collect();
    highest(&rates, |rate| async move {
        let ok = sustains(tb, processing_ms, rate, window).await?;
        eprintln!("  processing {processing_ms} ms: {rate} msg/s sustained: {ok}");
        Ok(ok)
    })
    .await
}

/// The highest rate that `holds`: the rates in order up to the first that fails, then two
/// halvings of the gap between the last that held and that one (to the nearest 50 msg/s).
async fn highest<F, Fut>(rates: &[f64], mut holds: F) -> Result<f64>
where
    F: FnMut(f64) -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let (mut best, mut failed) = (0.0, None);
    for &rate in rates {
        if !holds(rate).await? {
            failed = Some(rate);
            break;
        }
        best = rate;
    }
    if let Some(mut fail) = failed {
        for _ in 0..2 {
            let mid = ((best + fail) / 2.0 / 50.0).round() * 50.0;
            if mid <= best || mid >= fail {
                break;
            }
            if holds(mid).await? {
                best = mid;
            } else {
                fail = mid;
            }
        }
    }
    Ok(best)
}

/// One migration of `name` to `to`; its report, also of an aborted migration (that is a
/// result here).
async fn migrate_once(tb: &Testbed, name: &str, to: &str, strategy: Strategy) -> Result<Report> {
    let opts = MigrationOptions {
        replay_timeout_s: 30.0,
        ..MigrationOptions::default()
    };
    match tb.migrate(name, to, strategy, opts).await {
        Ok(r) => Ok(r),
        Err(MigrationError {
            report: Some(r), ..
        }) => Ok(*r),
        Err(e) => Err(e.into()),
    }
}

/// Migrates a service under `rate` with `strategy`; the report (also of an aborted migration:
/// that is a result here) and the history.
async fn migrate(
    tb: &Testbed,
    processing_ms: f64,
    state_bytes: u64,
    rate: f64,
    strategy: Strategy,
) -> Result<(Report, History)> {
    under_load(tb, processing_ms, state_bytes, rate, |name| async move {
        let report = migrate_once(tb, &name, "edge-2", strategy).await?;
        tb.stop_workload(&name).await?;
        Ok((report, tb.history(&name).await?))
    })
    .await
}

/// How fast the target replayed: ms2m_sequential's target replays a backlog that no longer
/// grows (up to where the source stopped), back to back.
fn replay_rate(h: &History) -> Option<f64> {
    let runs: Vec<_> = h.events.iter().filter(|e| e.mode == Mode::Replay).collect();
    let first = runs.iter().map(|e| e.t_start_ns).min()?;
    let last = runs.iter().map(|e| e.t_end_ns).max()?;
    let replayed: u64 = runs.iter().map(|e| e.messages()).sum();
    (replayed > 10 && last > first).then(|| replayed as f64 / ((last - first) as f64 / 1e9))
}

/// The issue's goal: ms2m at 5,000 msg/s with 0.05 ms processing, `runs` migrations of one
/// service back and forth, each report kept (aborted ones too).
async fn goal_runs(tb: &Testbed, runs: usize) -> Result<Vec<Report>> {
    under_load(tb, 0.05, STATE_BYTES, 5000.0, |name| async move {
        let mut reports = Vec::new();
        for i in 0..runs {
            let to = if i % 2 == 0 { "edge-2" } else { "edge-1" };
            reports.push(migrate_once(tb, &name, to, Strategy::Ms2m).await?);
        }
        tb.stop_workload(&name).await?;
        Ok(reports)
    })
    .await
}

/// Publishing tasks of the broker-alone measurement: one alone would measure its own round
/// trips to the client's I/O thread, not the broker.
const PRODUCERS: usize = 4;

async fn queue(ch: &Channel, name: &str) -> Result<()> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Whether RabbitMQ alone carries `rate` over `window` with the service's
/// publish/consume/confirm pattern: [`PRODUCERS`] producers, paced every millisecond, publish
/// workload-sized JSON with confirms; a worker on its own connection consumes with prefetch 100
/// and, per message, publishes an output message with a confirm and acks the input once that
/// confirm is in, in order; a recorder consumes the outputs. Sustained, as for the service:
/// the outputs received by the end of the window trail the messages sent by at most the
/// prefetch and 1% of the window's messages. No processing, no state: the physical limit the
/// reference service is compared with.
async fn broker_sustains(url: &str, rate: f64, window: Duration) -> Result<bool> {
    let tag = now_ns() % 1_000_000_000;
    let (input, output) = (format!("alone-{tag}.in"), format!("alone-{tag}.out"));
    let producer = Connection::connect(url, Default::default()).await?;
    let recorder = Connection::connect(url, Default::default()).await?;
    let setup = producer.create_channel().await?;
    queue(&setup, &input).await?;
    queue(&setup, &output).await?;

    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let worker = {
        let (url, input, output) = (url.to_string(), input.clone(), output.clone());
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(alone_worker(url, input, output, ready_tx, stopped))
        })
    };
    ready
        .await
        .context("the broker-alone worker did not start")?;
    let rch = recorder.create_channel().await?;
    let mut recorded = rch
        .basic_consume(
            output.as_str().into(),
            "recorder".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let recorder_task = tokio::spawn(async move {
        while let Some(Ok(_)) = recorded.next().await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });

    let start = Instant::now();
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let ch = producer.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let input = input.clone();
        let per_s = rate / PRODUCERS as f64;
        producers.push(tokio::spawn(async move {
            let mut in_flight = VecDeque::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut sent = 0u64;
            while start.elapsed() < window {
                tick.tick().await;
                // On an absolute schedule: a late tick sends what fell due meanwhile.
                let due = start.elapsed().min(window).as_secs_f64() * per_s;
                while (sent as f64) < due {
                    let body = format!(
                        r#"{{"kind":"data","seq":{sent},"t_pub_ns":{},"payload":"abcdefghijklmnopqrstuvwxyz234567abcdefghijklmnopqrstuvwxyz234567"}}"#,
                        now_ns()
                    );
                    in_flight.push_back(
                        ch.basic_publish(
                            "".into(),
                            input.as_str().into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            BasicProperties::default(),
                        )
                        .await?,
                    );
                    sent += 1;
                    if in_flight.len() >= 1000 {
                        in_flight.pop_front().expect("not empty").await?;
                    }
                }
            }
            while let Some(c) = in_flight.pop_front() {
                c.await?;
            }
            anyhow::Ok(sent)
        }));
    }
    let mut sent = 0;
    for p in producers {
        sent += p.await??;
    }
    // As for the service: output events of the window's last messages are on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_end = received.load(Ordering::Relaxed);
    let _ = stop.send(());
    worker.join().expect("worker thread")?;
    recorder_task.abort();
    for q in [&input, &output] {
        setup
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for c in [producer, recorder] {
        let _ = c.close(200, "done".into()).await;
    }
    let slack = u64::from(PREFETCH) + (rate * window.as_secs_f64() / 100.0) as u64;
    eprintln!("    sent {sent}, through by the end {at_end}");
    Ok(sent + slack >= (rate * window.as_secs_f64()) as u64 && at_end + slack >= sent)
}

/// The broker-alone worker, as the reference service runs: its own connection, on a
/// current-thread runtime of its own thread. Consumes `input` with prefetch 100, publishes
/// each message to `output` with a confirm, and acks it once the confirm is in, in order,
/// with the service's client-side batching.
async fn alone_worker(
    url: String,
    input: String,
    output: String,
    ready: tokio::sync::oneshot::Sender<()>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<()> {
    let conn = Connection::connect(&url, Default::default()).await?;
    let win = conn.create_channel().await?;
    win.basic_qos(100, BasicQosOptions::default()).await?;
    let wout = conn.create_channel().await?;
    wout.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut work = win
        .basic_consume(
            input.as_str().into(),
            "worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    type Publish = std::pin::Pin<
        Box<dyn std::future::Future<Output = lapin::Result<lapin::PublisherConfirm>> + Send>,
    >;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Publish, lapin::Acker)>();
    // As the service does: writes and confirms awaited off the consuming loop, queued
    // messages acked together (`multiple`, at most a quarter of the prefetch).
    let acker = tokio::spawn(async move {
        while let Some((publish, mut last)) = rx.recv().await {
            publish.await?.await?;
            let mut taken = 1;
            while taken < 25 {
                let Ok((publish, acker)) = rx.try_recv() else {
                    break;
                };
                publish.await?.await?;
                last = acker;
                taken += 1;
            }
            last.ack(BasicAckOptions {
                multiple: taken > 1,
            })
            .await?;
        }
        anyhow::Ok(())
    });
    let _ = ready.send(());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        let d = tokio::select! {
            _ = &mut stop => break,
            d = work.next() => match d {
                Some(Ok(d)) => d,
                _ => break,
            },
        };
        let (ch, out) = (wout.clone(), output.clone());
        let mut publish: Publish = Box::pin(async move {
            ch.basic_publish(
                "".into(),
                out.as_str().into(),
                BasicPublishOptions::default(),
                &d.data,
                BasicProperties::default(),
            )
            .await
        });
        // The first poll enqueues the frames, in delivery order.
        if let std::task::Poll::Ready(written) = publish.as_mut().poll(&mut cx) {
            publish = Box::pin(std::future::ready(written));
        }
        if tx.send((publish, d.acker)).is_err() {
            break;
        }
    }
    drop(tx);
    acker.abort();
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// The highest rate the broker alone carries (see [`broker_sustains`] and [`highest`]).
async fn broker_alone(url: &str, window: Duration) -> Result<f64> {
    highest(&RATES, |rate| async move {
        let ok = broker_sustains(url, rate, window).await?;
        eprintln!("  RabbitMQ alone: {rate} msg/s sustained: {ok}");
        Ok(ok)
    })
    .await
}

struct Row {
    processing_ms: f64,
    live: f64,
    replay: Option<f64>,
    replayed: u64,
    ms2m: Report,
}

fn main() -> Result<()> {
    let window = Duration::from_secs_f64(common::env_list("MS2M_BENCH_WINDOW_S", &[10.0])?[0]);
    let processing = common::env_list("MS2M_BENCH_PROCESSING_MS", &[0.0, 0.05, 0.2, 1.0])?;
    let goal = common::env_list("MS2M_BENCH_GOAL_RUNS", &[7usize])?[0];
    common::with_testbed(async |tb| {
        let mut rows = Vec::new();
        let mut alone = 0.0;
        let mut goal_reports = Vec::new();
        let result = async {
            alone = broker_alone(tb.amqp_url(), window).await?;
            for &p in &processing {
                let live = highest_live(&tb, p, window).await?;
                ensure!(
                    live > 0.0,
                    "the service sustains none of {RATES:?} at {p} ms"
                );
                let (seq, hist) = migrate(
                    &tb,
                    p,
                    REPLAY_STATE_BYTES,
                    live * 0.8,
                    Strategy::Ms2mSequential,
                )
                .await?;
                let (ms2m, _) = migrate(&tb, p, STATE_BYTES, live * 0.8, Strategy::Ms2m).await?;
                rows.push(Row {
                    processing_ms: p,
                    live,
                    replay: replay_rate(&hist),
                    replayed: seq.migration.outcome.messages_replayed,
                    ms2m,
                });
            }
            goal_reports = goal_runs(&tb, goal).await?;
            Ok(())
        }
        .await;
        tb.close().await?;
        result?;
        println!(
            "\nservice rates ({} runtime, prefetch {PREFETCH}, {} MiB state, {} s windows; the \
             replay timed on an ms2m_sequential target of {} MiB)",
            tb.runtime().name(),
            STATE_BYTES >> 20,
            window.as_secs_f64(),
            REPLAY_STATE_BYTES >> 20
        );
        println!(
            "{:>13} {:>10} {:>9} {:>8} | {:>9} {:>16} {:>9} {:>5} {:>4} {:>5} {:>11}",
            "processing ms",
            "live msg/s",
            "replay/s",
            "replayed",
            "ms2m",
            "downtime ms",
            "total ms",
            "lost",
            "dup",
            "state",
            "achieved ms"
        );
        println!(
            "{:>13} {:>10.0}   RabbitMQ alone, same publish/consume/confirm pattern, no service",
            "broker", alone
        );
        for r in &rows {
            let m = &r.ms2m;
            println!(
                "{:>13} {:>10.0} {:>9} {:>8} | {:>9} {:>16.3} {:>9.1} {:>5} {:>4} {:>5} {:>11.4}",
                r.processing_ms,
                r.live,
                r.replay.map_or("-".into(), |v| format!("{v:.0}")),
                r.replayed,
                match m.migration.status {
                    MigrationStatus::Completed => "completed",
                    MigrationStatus::Aborted => "aborted",
                },
                m.metrics.downtime.ms,
                m.migration.total_ms,
                m.verdict.lost.count,
                m.verdict.duplicated.count,
                match m.verdict.state.consistent {
                    Some(true) => "ok",
                    Some(false) => "BAD",
                    None => "?",
                },
                m.metrics.processing.p50_ms,
            );
        }
        if let Some(r) = rows.iter().find(|r| r.processing_ms == 0.0) {
            println!(
                "live at 0 ms processing is {:.0}% of what RabbitMQ alone carries",
                100.0 * r.live / alone
            );
        }
        if !goal_reports.is_empty() {
            let mut down: Vec<f64> = goal_reports.iter().map(|r| r.metrics.downtime.ms).collect();
            down.sort_by(f64::total_cmp);
            let count = |f: fn(&Report) -> bool| goal_reports.iter().filter(|r| f(r)).count();
            println!(
                "ms2m at 5,000 msg/s with 0.05 ms processing, {} runs: {} completed, downtime \
                 median {:.2} ms (min {:.2}, max {:.2}), lost {}, duplicated {}, state consistent \
                 in {}",
                goal_reports.len(),
                count(|r| r.migration.status == MigrationStatus::Completed),
                down[down.len() / 2],
                down[0],
                down[down.len() - 1],
                goal_reports
                    .iter()
                    .map(|r| r.verdict.lost.count)
                    .sum::<u64>(),
                goal_reports
                    .iter()
                    .map(|r| r.verdict.duplicated.count)
                    .sum::<u64>(),
                count(|r| r.verdict.state.consistent == Some(true)),
            );
        }
        Ok(())
    })
}
