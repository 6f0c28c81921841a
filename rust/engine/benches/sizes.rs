//! What a state's size costs a migration: for each size, one ms2m and one stop-and-copy
//! migration of a service under 10 msg/s, with the checkpoint's write (source to broker),
//! fetch (broker to target) and restore times, the downtime, and the peak memory of the
//! source, the target, the broker and this harness.
//!
//! Run with `cargo bench -p ms2m-engine --bench sizes` (part of `make bench`). Environment:
//! `MS2M_RUNTIME` (auto, docker, local), `MS2M_BENCH_SIZES_MIB` (comma-separated, default
//! 1,64,256,1024). Peak memory is each process's high-water mark (`VmHWM`), read from /proc
//! every 20 ms while the migration runs: instances are found by their `--instance` flag, the
//! broker as `beam.smp`. Figures are measured here, never asserted in tests.

mod common;

use anyhow::Result;
use ms2m_engine::report::MigrationStatus;
use ms2m_engine::testbed::MigrationError;
use ms2m_engine::{
    MigrationOptions, PhaseName, Report, ServiceSpec, Strategy, Testbed, WorkloadSpec,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const RATE: f64 = 10.0;
const MIB: u64 = 1 << 20;

/// Peak resident memory (MiB) seen per process label.
type Peaks = Arc<Mutex<HashMap<String, f64>>>;

/// `VmHWM` of a process, MiB.
fn high_water_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The label of a process worth watching: `instance:<name>` for an `ms2m-service`, `broker`
/// for RabbitMQ's VM.
fn label(pid: &str) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let program = String::from_utf8_lossy(args.first()?);
    if program.ends_with("ms2m-service") {
        let at = args.iter().position(|a| *a == b"--instance")?;
        return Some(format!(
            "instance:{}",
            String::from_utf8_lossy(args.get(at + 1)?)
        ));
    }
    program.ends_with("beam.smp").then(|| "broker".to_string())
}

/// Samples the high-water marks of the watched processes until dropped.
fn watch_memory(peaks: Peaks) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(dir) = std::fs::read_dir("/proc") {
                for entry in dir.flatten() {
                    let pid = entry.file_name().to_string_lossy().to_string();
                    if !pid.bytes().all(|b| b.is_ascii_digit()) {
                        continue;
                    }
                    if let (Some(l), Some(m)) = (label(&pid), high_water_mib(&pid)) {
                        let mut p = peaks.lock().unwrap();
                        let e = p.entry(l).or_insert(0.0);
                        *e = e.max(m);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

struct Row {
    mib: u64,
    report: Report,
    source_mib: f64,
    target_mib: f64,
    broker_mib: f64,
    harness_mib: f64,
}

fn phase_ms(r: &Report, name: PhaseName) -> String {
    r.phases
        .iter()
        .filter(|p| p.name == name)
        .map(|p| p.duration_ms)
        .reduce(f64::max)
        .map_or("-".into(), |ms| format!("{ms:.0}"))
}

/// Migrates `service` to `to`, watching memory; an aborted migration is a result too.
async fn migrate(
    tb: &Testbed,
    service: &str,
    to: &str,
    strategy: Strategy,
    mib: u64,
) -> Result<Row> {
    let peaks: Peaks = Arc::default();
    let watcher = watch_memory(peaks.clone());
    let opts = MigrationOptions {
        reply_timeout_s: 300.0,
        settle_s: 0.5,
        ..MigrationOptions::default()
    };
    let outcome = tb.migrate(service, to, strategy, opts).await;
    watcher.abort();
    let report = match outcome {
        Ok(r) => r,
        Err(MigrationError {
            report: Some(r), ..
        }) => *r,
        Err(e) => return Err(e.into()),
    };
    let peaks = peaks.lock().unwrap().clone();
    let of = |instance: &str| {
        peaks
            .get(&format!("instance:{instance}"))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(Row {
        mib,
        source_mib: of(&report.source.instance),
        target_mib: of(&report.target.instance),
        broker_mib: peaks.get("broker").copied().unwrap_or(f64::NAN),
        harness_mib: high_water_mib("self").unwrap_or(f64::NAN),
        report,
    })
}

fn main() -> Result<()> {
    let sizes: Vec<u64> = common::env_list("MS2M_BENCH_SIZES_MIB", &[1, 64, 256, 1024])?;
    common::with_testbed(async |tb| {
        let mut rows = Vec::new();
        let result = async {
            for &mib in &sizes {
                let name = format!("size-{mib}");
                tb.deploy(ServiceSpec {
                    name: name.clone(),
                    host: "edge-1".into(),
                    processing_ms: 1.0,
                    state_bytes: mib * MIB,
                    prefetch: 1,
                    max_seq_gap: 1,
                    image: None,
                    command: None,
                    env: Default::default(),
                    durable: false,
                })
                .await?;
                let run = async {
                    tb.start_workload(&name, WorkloadSpec::constant(RATE))
                        .await?;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    for (to, strategy) in [
                        ("edge-2", Strategy::Ms2m),
                        ("edge-1", Strategy::StopAndCopy),
                    ] {
                        let row = migrate(&tb, &name, to, strategy, mib).await?;
                        eprintln!(
                            "  {mib} MiB {strategy}: {:?}, downtime {:.1} ms",
                            row.report.migration.status, row.report.metrics.downtime.ms
                        );
                        rows.push(row);
                    }
                    anyhow::Ok(())
                }
                .await;
                tb.remove(&name).await?;
                run?;
            }
            anyhow::Ok(())
        }
        .await;
        tb.close().await?;
        result?;
        println!(
            "\ncheckpoint sizes ({} runtime, {RATE} msg/s, 1 ms processing, chunks of {} MiB)",
            tb.runtime().name(),
            MigrationOptions::default().chunk_bytes as u64 / MIB
        );
        println!(
            "{:>6} {:>14} {:>9} | {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>11} {:>5} {:>4} {:>5} | {:>7} {:>7} {:>7} {:>7}",
            "MiB", "strategy", "status", "ckpt ms", "write/s", "xfer ms", "fetch/s", "rest ms", "chunks",
            "downtime ms", "lost", "dup", "state", "src MiB", "tgt MiB", "brk MiB", "hrn MiB"
        );
        for r in &rows {
            let m = &r.report;
            let cp = m.migration.outcome.checkpoint.as_ref();
            println!(
                "{:>6} {:>14} {:>9} | {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>11.1} {:>5} {:>4} {:>5} | {:>7.0} {:>7.0} {:>7.0} {:>7.0}",
                r.mib,
                m.strategy.name(),
                match m.migration.status {
                    MigrationStatus::Completed => "completed",
                    MigrationStatus::Aborted => "aborted",
                },
                phase_ms(m, PhaseName::Checkpoint),
                cp.map_or("-".into(), |c| format!("{:.0}", c.write_mib_s)),
                phase_ms(m, PhaseName::Transfer),
                cp.and_then(|c| c.fetch_mib_s).map_or("-".into(), |v| format!("{v:.0}")),
                phase_ms(m, PhaseName::Restore),
                cp.map_or("-".into(), |c| c.chunks.to_string()),
                m.metrics.downtime.ms,
                m.verdict.lost.count,
                m.verdict.duplicated.count,
                match m.verdict.state.consistent {
                    Some(true) => "ok",
                    Some(false) => "BAD",
                    None => "?",
                },
                r.source_mib,
                r.target_mib,
                r.broker_mib,
                r.harness_mib,
            );
        }
        println!("write/s and fetch/s in MiB/s; a stop-and-copy target fetches during restore");
        Ok(())
    })
}
