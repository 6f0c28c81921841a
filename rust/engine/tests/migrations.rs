//! Real migrations: in Docker (one broker container, service instances as containers) and with
//! local processes (rabbitmq-server and ms2m-service subprocesses, also against an external
//! broker), under an open-loop workload, with the checker's verdict on the whole history of
//! every run.
//!
//! A custom harness runs the cases one after another on one testbed per runtime, so that their
//! timings do not disturb each other, and removes the testbed at the end whatever happened.
//! Pass words as arguments to run only the cases (or runtimes) whose names contain one of them;
//! `local::word` picks cases of one runtime.

use anyhow::{bail, ensure, Context, Result};
use ms2m_engine::checker::{CheckResult, StateOracle};
use ms2m_engine::config::RuntimeKind;
use ms2m_engine::net::{HostLink, LinkSpec};
use ms2m_engine::report::MigrationStatus;
use ms2m_engine::strategies::{Fault, Role, Transfer};
use ms2m_engine::testbed::MigrationError;
use ms2m_engine::{
    Error, MigrationOptions, PhaseName, Report, ServiceSpec, Strategy, Testbed, TestbedConfig,
    WorkloadSpec,
};
use ms2m_wire::Mode;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

const CASE_TIMEOUT: Duration = Duration::from_secs(300);

type Case = for<'a> fn(&'a Testbed) -> Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        vec![$((stringify!($name), (|tb| Box::pin($name(tb))) as Case)),*]
    };
}

fn main() {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let suites = [
        (
            RuntimeKind::Docker,
            cases![
                every_strategy_migrates_without_loss,
                backlog_waiting_when_the_migration_starts,
                prefetch_larger_than_one,
                processing_time_of_50_us_is_achieved,
                thousands_of_messages_per_second,
                large_state_of_200_mib_with_every_strategy,
                target_killed_in_the_middle_of_a_chunked_transfer,
                several_migrations_in_a_row,
                near_capacity_19_msg_s,
                plain_ms2m_cannot_converge_above_capacity_and_says_so,
                cutoff_converges_above_capacity,
                every_kill_at_every_phase_has_its_outcome,
                a_broker_restart_loses_nothing_confirmed,
                target_killed_just_after_it_starts_in_stop_and_copy,
                checker_catches_a_migration_without_barrier,
                links_carry_every_strategy_and_an_outage_holds_messages,
                a_service_of_ones_own_is_deployed_by_image_or_command,
                the_conformance_kit_passes_the_reference_and_names_a_broken_rule,
                the_broker_has_its_own_user_and_refuses_guest,
                bad_input_is_dead_lettered_and_the_migration_stays_exact,
                probing_missing_queues_past_the_channel_limit,
            ],
        ),
        (
            RuntimeKind::Local,
            cases![
                every_strategy_migrates_without_loss,
                several_migrations_in_a_row,
                processing_time_of_50_us_is_achieved,
                thousands_of_messages_per_second,
                every_kill_at_every_phase_has_its_outcome,
                a_broker_restart_loses_nothing_confirmed,
                target_killed_in_the_middle_of_a_chunked_transfer,
                target_killed_just_after_it_starts_in_stop_and_copy,
                large_state_of_200_mib_with_every_strategy,
                external_broker_is_used_and_left_clean,
                links_carry_every_strategy_and_an_outage_holds_messages,
                a_service_of_ones_own_is_deployed_by_image_or_command,
                the_conformance_kit_passes_the_reference_and_names_a_broken_rule,
                the_broker_has_its_own_user_and_refuses_guest,
                bad_input_is_dead_lettered_and_the_migration_stays_exact,
                probing_missing_queues_past_the_channel_limit,
            ],
        ),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut passed, mut failed) = (0, 0);
    for (kind, cases) in suites {
        let chosen: Vec<_> = cases
            .into_iter()
            .filter(|(n, _)| {
                filters.is_empty()
                    || filters.iter().any(|f| match f.split_once("::") {
                        Some((k, case)) => k == kind.name() && n.contains(case),
                        None => n.contains(f.as_str()) || kind.name() == f,
                    })
            })
            .collect();
        if chosen.is_empty() {
            continue;
        }
        let (p, f) = rt.block_on(run_suite(kind, chosen));
        passed += p;
        failed += f;
    }
    println!("\ntest result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out\n",
        if failed == 0 { "ok" } else { "FAILED" });
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

async fn run_suite(kind: RuntimeKind, cases: Vec<(&str, Case)>) -> (usize, usize) {
    let cfg = TestbedConfig {
        runtime: kind,
        ..TestbedConfig::default()
    };
    let tb = Testbed::start(cfg)
        .await
        .expect("start the testbed (make setup installs the runtimes and builds the images)");
    println!(
        "\nrunning {} {} cases on testbed {}",
        cases.len(),
        kind.name(),
        tb.id()
    );
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in &cases {
        let started = std::time::Instant::now();
        // A hang must fail its case, not the whole run.
        let outcome = tokio::time::timeout(CASE_TIMEOUT, case(&tb))
            .await
            .unwrap_or_else(|_| bail!("did not finish within {CASE_TIMEOUT:?}"));
        match outcome {
            Ok(()) => {
                passed += 1;
                println!(
                    "test {}::{name} ... ok ({:.1} s)",
                    kind.name(),
                    started.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                println!("test {}::{name} ... FAILED\n    {e:#}", kind.name());
            }
        }
    }
    tb.close().await.expect("remove the testbed");
    let left = processes_of(tb.id());
    if !left.is_empty() {
        failed += 1;
        println!(
            "test {}::nothing_left_behind ... FAILED\n    {left:?}",
            kind.name()
        );
    }
    (passed, failed)
}

/// Processes still marked as started by testbed `id` (the local runtime marks them).
fn processes_of(id: &str) -> Vec<String> {
    let mark = format!("MS2M_TESTBED={id}");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter(|p| {
            std::fs::read(p.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == mark.as_bytes()))
        })
        .map(|p| p.file_name().to_string_lossy().into_owned())
        .collect()
}

fn spec(name: &str, state_bytes: u64) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        host: "edge-1".into(),
        processing_ms: 50.0,
        state_bytes,
        prefetch: 1,
        max_seq_gap: 1,
        image: None,
        command: None,
        env: Default::default(),
        durable: false,
    }
}

fn opts() -> MigrationOptions {
    MigrationOptions {
        settle_s: 0.3,
        reply_timeout_s: 30.0,
        replay_timeout_s: 30.0,
        ..Default::default()
    }
}

fn workload(rate: f64) -> WorkloadSpec {
    WorkloadSpec::constant(rate)
}

/// The invariants every completed run must keep.
fn clean(report: &Report) -> Result<()> {
    let v = &report.verdict;
    let context = || format!("{} run {}", report.strategy, report.run_id);
    ensure!(
        report.migration.status == MigrationStatus::Completed,
        "{}: {:?}",
        context(),
        report.migration.error
    );
    ensure!(v.lost.count == 0, "{}: lost {:?}", context(), v.lost);
    ensure!(
        v.duplicated.count == 0,
        "{}: duplicated {:?}",
        context(),
        v.duplicated
    );
    ensure!(
        v.reordered.count == 0,
        "{}: reordered {:?}",
        context(),
        v.reordered
    );
    ensure!(
        v.state.consistent == Some(true),
        "{}: state {:?}",
        context(),
        v.state
    );
    ensure!(v.is_valid(), "{}: {v:?}", context());
    ensure!(v.expected > 0, "{}: the workload sent nothing", context());
    ensure!(
        report.leftovers.is_empty(),
        "{}: left behind {:?}",
        context(),
        report.leftovers
    );
    Ok(())
}

/// Deploys, warms up under `rate`, runs `f`, and removes the service whatever happened.
async fn with_service<F, Fut>(tb: &Testbed, s: ServiceSpec, rate: f64, f: F) -> Result<()>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let name = s.name.clone();
    tb.deploy(s).await?;
    let result = async {
        tb.start_workload(&name, workload(rate)).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f(name.clone()).await
    }
    .await;
    let removed = tb.remove(&name).await;
    result?;
    removed.context("removing the service")
}

async fn every_strategy_migrates_without_loss(tb: &Testbed) -> Result<()> {
    for strategy in Strategy::ALL {
        let name = format!("every-{}", strategy.name().replace('_', "-"));
        with_service(tb, spec(&name, 1_000_000), 10.0, |name| async move {
            let r = tb.migrate(&name, "edge-2", strategy, opts()).await?;
            clean(&r)?;
            let phases: Vec<_> = r.phases.iter().map(|p| p.name).collect();
            ensure!(phases == strategy.phases(), "phases {phases:?}");
            ensure!(r.target.host == "edge-2" && tb.service_info(&name).await?.host == "edge-2");
            ensure!(r.migration.outcome.checkpoint_bytes > 1_000_000);
            ensure!(r.migration.control_plane_downtime_ms.is_some());
            ensure!(
                (r.migration.outcome.lambda - 10.0).abs() < 2.0,
                "lambda {}",
                r.migration.outcome.lambda
            );
            let mu = r.migration.outcome.mu.context("mu measured")?;
            ensure!((15.0..=21.0).contains(&mu), "mu {mu}");
            ensure!(r.migration.outcome.cutoff.is_some() == (strategy == Strategy::Ms2mCutoff));
            Ok(())
        })
        .await
        .with_context(|| strategy.name())?;
    }
    Ok(())
}

async fn backlog_waiting_when_the_migration_starts(tb: &Testbed) -> Result<()> {
    for strategy in [Strategy::Ms2m, Strategy::StopAndCopy] {
        let name = format!("backlog-{}", strategy.name().replace('_', "-"));
        with_service(tb, spec(&name, 10_000), 5.0, |name| async move {
            // A burst: about 1.5 s of work queues up in front of the barrier.
            tb.stop_workload(&name).await?;
            tb.start_workload(&name, workload(100.0)).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            tb.stop_workload(&name).await?;
            tb.start_workload(&name, workload(5.0)).await?;
            let r = tb.migrate(&name, "edge-2", strategy, opts()).await?;
            clean(&r)
        })
        .await?;
    }
    Ok(())
}

async fn prefetch_larger_than_one(tb: &Testbed) -> Result<()> {
    for strategy in Strategy::ALL {
        let name = format!("prefetch-{}", strategy.name().replace('_', "-"));
        let s = ServiceSpec {
            prefetch: 10,
            max_seq_gap: 1,
            ..spec(&name, 10_000)
        };
        with_service(tb, s, 15.0, |name| async move {
            clean(&tb.migrate(&name, "edge-2", strategy, opts()).await?)
        })
        .await?;
    }
    Ok(())
}

/// The service spends what it is asked, also far below tokio's 1 ms timer granularity, and the
/// report says what it achieved.
async fn processing_time_of_50_us_is_achieved(tb: &Testbed) -> Result<()> {
    let s = ServiceSpec {
        processing_ms: 0.05,
        ..spec("precise", 10_000)
    };
    with_service(tb, s, 200.0, |name| async move {
        let r = tb.migrate(&name, "edge-2", Strategy::Ms2m, opts()).await?;
        clean(&r)?;
        let p = &r.metrics.processing;
        ensure!(p.asked_ms == 0.05 && p.count > 100, "{p:?}");
        ensure!(!p.off_target, "asked 0.05 ms, achieved {p:?}");
        Ok(())
    })
    .await
}

/// A pipelined service (prefetch 100) at 2,000 msg/s with 0.2 ms per message: 40% of its
/// capacity, far beyond one broker round trip per message.
async fn thousands_of_messages_per_second(tb: &Testbed) -> Result<()> {
    for strategy in [Strategy::Ms2m, Strategy::Ms2mCutoff] {
        let name = format!("fast-{}", strategy.name().replace('_', "-"));
        let s = ServiceSpec {
            processing_ms: 0.2,
            prefetch: 100,
            max_seq_gap: 1,
            ..spec(&name, 10_000)
        };
        with_service(tb, s, 2000.0, |name| async move {
            let r = tb.migrate(&name, "edge-2", strategy, opts()).await?;
            clean(&r)?;
            ensure!(r.verdict.expected > 3000, "{:?}", r.counts);
            // Replay events report runs of messages, together exactly those replayed.
            let h = tb.history(&name).await?;
            let runs: Vec<_> = h.events.iter().filter(|e| e.mode == Mode::Replay).collect();
            let reported: u64 = runs.iter().map(|e| e.messages()).sum();
            let replayed = r.migration.outcome.messages_replayed;
            ensure!(
                reported == replayed,
                "{reported} reported, {replayed} replayed"
            );
            ensure!(
                runs.iter().all(|e| e.first_seq.is_some_and(|f| f <= e.seq)),
                "{runs:?}"
            );
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Larger than a broker message (128 MiB): the checkpoint crosses in chunks.
async fn large_state_of_200_mib_with_every_strategy(tb: &Testbed) -> Result<()> {
    with_service(tb, spec("large", 200 << 20), 10.0, |name| async move {
        for (to, strategy) in [
            ("edge-2", Strategy::Ms2m),
            ("cloud", Strategy::StopAndCopy),
            ("edge-1", Strategy::Ms2mCutoff),
            ("edge-2", Strategy::Ms2mSequential),
        ] {
            let r = tb.migrate(&name, to, strategy, opts()).await?;
            clean(&r).with_context(|| strategy.name())?;
            let cp = r
                .migration
                .outcome
                .checkpoint
                .as_ref()
                .context("checkpoint stats")?;
            ensure!(cp.bytes > 200 << 20 && cp.bytes == r.migration.outcome.checkpoint_bytes);
            ensure!(cp.chunks == 26, "{} chunks of 8 MiB", cp.chunks);
            ensure!(
                cp.write_mib_s > 0.0 && cp.fetch_mib_s.is_some_and(|t| t > 0.0),
                "{cp:?}"
            );
        }
        Ok(())
    })
    .await
}

/// A kill while the target is fetching the chunks: the source never stopped serving.
async fn target_killed_in_the_middle_of_a_chunked_transfer(tb: &Testbed) -> Result<()> {
    with_service(
        tb,
        spec("kill-chunked", 200 << 20),
        10.0,
        |name| async move {
            let fault = Fault {
                kill: Role::Target,
                at_phase: PhaseName::Transfer,
                // 200 chunks of 1 MiB take far longer than this to fetch.
                after_ms: 50.0,
                outage_s: None,
            };
            let o = MigrationOptions {
                chunk_bytes: 1 << 20,
                ..opts()
            };
            assert_rolled_back_with(tb, &name, Strategy::Ms2m, fault.clone(), o.clone()).await?;
            // The same, read directly from the source (back on edge-1 first): its server gives
            // up on the dead reader, and the next checkpoint replaces the one never fetched.
            clean(&tb.migrate(&name, "edge-1", Strategy::Ms2m, opts()).await?)?;
            let direct = MigrationOptions {
                transfer: Transfer::Direct,
                ..o
            };
            assert_rolled_back_with(tb, &name, Strategy::Ms2m, fault, direct)
                .await
                .context("direct transfer")
        },
    )
    .await
}

/// Every strategy once, through the broker and then directly from host to host (no links
/// here: the target connects to the source's own address).
async fn several_migrations_in_a_row(tb: &Testbed) -> Result<()> {
    with_service(tb, spec("chain", 100_000), 10.0, |name| async move {
        let mut previous_end = 0;
        for (to, strategy, transfer) in [
            ("edge-2", Strategy::Ms2m, Transfer::Broker),
            ("cloud", Strategy::Ms2mCutoff, Transfer::Broker),
            ("edge-1", Strategy::Ms2mSequential, Transfer::Broker),
            ("edge-2", Strategy::StopAndCopy, Transfer::Broker),
            ("cloud", Strategy::Ms2m, Transfer::Direct),
            ("edge-1", Strategy::Ms2mCutoff, Transfer::Direct),
            ("edge-2", Strategy::Ms2mSequential, Transfer::Direct),
            ("cloud", Strategy::StopAndCopy, Transfer::Direct),
        ] {
            let o = MigrationOptions { transfer, ..opts() };
            let r = tb.migrate(&name, to, strategy, o).await?;
            let context = || format!("{} to {to}, {}", strategy.name(), transfer.name());
            clean(&r).with_context(context)?;
            let cp = r
                .migration
                .outcome
                .checkpoint
                .as_ref()
                .context("checkpoint")?;
            ensure!(cp.transfer == transfer && cp.fetch_ms.is_some(), "{cp:?}");
            ensure!(tb.service_info(&name).await?.host == to);
            // The baseline window reaches back no further than the previous migration's end.
            let (from, _) = r.metrics.baseline_downtime.window_ns;
            ensure!(
                from >= previous_end,
                "baseline window {from} before {previous_end}"
            );
            previous_end = r.migration.t_end_ns;
        }
        Ok(())
    })
    .await
}

async fn near_capacity_19_msg_s(tb: &Testbed) -> Result<()> {
    for strategy in Strategy::ALL {
        let name = format!("r19-{}", strategy.name().replace('_', "-"));
        with_service(tb, spec(&name, 10_000), 19.0, |name| async move {
            let r = tb.migrate(&name, "edge-2", strategy, opts()).await?;
            clean(&r)
        })
        .await?;
    }
    Ok(())
}

/// Above the service's capacity (20 msg/s at 50 ms) the replay can never catch up: plain ms2m
/// gives up after its replay timeout, rolled back, nothing lost. Exactly at capacity whether
/// it catches up within the timeout is a race (a critically loaded queue), not a property, so
/// it is not asserted (a clean-clone CI run saw it converge once at 20 msg/s).
async fn plain_ms2m_cannot_converge_above_capacity_and_says_so(tb: &Testbed) -> Result<()> {
    for rate in [25.0, 30.0] {
        let name = format!("noconv-{rate}");
        with_service(tb, spec(&name, 10_000), rate, |name| async move {
            let o = MigrationOptions {
                replay_timeout_s: 3.0,
                ..opts()
            };
            let started = std::time::Instant::now();
            match tb.migrate(&name, "edge-2", Strategy::Ms2m, o).await {
                Err(MigrationError {
                    error: Error::MigrationFailed { phase, reason },
                    report,
                }) => {
                    ensure!(phase == Some("replay"), "failed in {phase:?}");
                    ensure!(reason.contains("did not catch up"), "{reason}");
                    let r = report.context("a failed migration still has its report")?;
                    ensure!(r.migration.status == MigrationStatus::Aborted);
                    ensure!(
                        r.verdict.lost.count == 0 && r.verdict.duplicated.count == 0,
                        "{:?}",
                        r.verdict
                    );
                    ensure!(
                        r.verdict.state.consistent == Some(true),
                        "{:?}",
                        r.verdict.state
                    );
                    ensure!(r.leftovers.is_empty(), "{:?}", r.leftovers);
                    ensure!(
                        tb.service_info(&name).await?.host == "edge-1",
                        "the source keeps serving"
                    );
                    // Bounded: replay timeout plus the other phases, not forever.
                    ensure!(started.elapsed() < Duration::from_secs(60));
                    Ok(())
                }
                Ok(r) => bail!(
                    "ms2m converged at {rate} msg/s (capacity 20): {:?}",
                    r.migration
                ),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
    }
    Ok(())
}

async fn cutoff_converges_above_capacity(tb: &Testbed) -> Result<()> {
    for rate in [20.0, 25.0] {
        let name = format!("cutoff-{rate}");
        with_service(tb, spec(&name, 10_000), rate, |name| async move {
            let o = MigrationOptions {
                replay_max_s: 1.0,
                replay_timeout_s: 20.0,
                ..opts()
            };
            let r = tb.migrate(&name, "edge-2", Strategy::Ms2mCutoff, o).await?;
            clean(&r)?;
            let c = r
                .migration
                .outcome
                .cutoff
                .clone()
                .context("cutoff report")?;
            // At capacity (20 msg/s) the target may or may not draw level before T_cutoff: a
            // race, not a property. Above it, it never can.
            ensure!(
                c.fired || rate <= 20.0,
                "the cutoff did not fire at {rate} msg/s: {c:?}"
            );
            let t = c.t_cutoff_s.context("T_cutoff")?;
            ensure!((t - c.replay_max_s * c.mu / c.lambda).abs() < 1e-9);
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// A migration whose target dies must leave the source serving and every message processed
/// exactly once.
async fn assert_rolled_back(
    tb: &Testbed,
    name: &str,
    strategy: Strategy,
    fault: Fault,
) -> Result<()> {
    assert_rolled_back_with(tb, name, strategy, fault, opts()).await
}

async fn assert_rolled_back_with(
    tb: &Testbed,
    name: &str,
    strategy: Strategy,
    fault: Fault,
    o: MigrationOptions,
) -> Result<()> {
    let o = MigrationOptions {
        fault: Some(fault.clone()),
        ..o
    };
    match tb.migrate(name, "edge-2", strategy, o).await {
        Err(MigrationError {
            error: Error::MigrationFailed { phase, reason },
            report,
        }) => {
            // The failure shows in the fault's phase or, when the target had already done that
            // phase's work, in a later one.
            let order = strategy.phases();
            let at = |p: &str| order.iter().position(|x| x.name() == p);
            let phase = phase.context("the failure names its phase")?;
            ensure!(
                at(phase) >= at(fault.at_phase.name()),
                "failed in {phase} before the fault: {reason}"
            );
            ensure!(reason.contains("exited"), "{reason}");
            let r = report.context("report of the aborted run")?;
            ensure!(r.migration.status == MigrationStatus::Aborted);
            let note = r.migration.outcome.fault.as_deref().unwrap_or_default();
            ensure!(note.contains(fault.at_phase.name()), "fault: {note:?}");
            let v = &r.verdict;
            ensure!(
                v.lost.count == 0 && v.duplicated.count == 0 && v.reordered.count == 0,
                "{v:?}"
            );
            ensure!(v.state.consistent == Some(true), "{:?}", v.state);
            ensure!(r.leftovers.is_empty(), "{:?}", r.leftovers);
            ensure!(tb.service_info(name).await?.host == "edge-1");
        }
        Ok(_) => bail!("the migration succeeded although {fault:?}"),
        Err(e) => return Err(e.into()),
    }
    // The system is as it was: the next migration works.
    clean(&tb.migrate(name, "edge-2", strategy, opts()).await?)
}

/// A kill already due when the manager begins to wait (the target takes longer to start than
/// `after_ms`): it must happen, not hang the migration.
async fn target_killed_just_after_it_starts_in_stop_and_copy(tb: &Testbed) -> Result<()> {
    with_service(
        tb,
        spec("kill-cold-late", 100_000),
        10.0,
        |name| async move {
            let fault = Fault {
                kill: Role::Target,
                at_phase: PhaseName::Restore,
                after_ms: 1.0,
                outage_s: None,
            };
            assert_rolled_back(tb, &name, Strategy::StopAndCopy, fault).await
        },
    )
    .await
}

/// What a kill at the start of a phase leads to: the README's table of faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    /// The migration completes exactly, as without the fault.
    Completed,
    /// The source serves again; nothing confirmed is lost.
    RolledBack,
    /// The target serves in place of the dead source (its checkpoint was complete).
    TakenOver,
    /// An empty instance serves in place of the dead source (its state died with it).
    Restarted,
}

fn expected_outcome(strategy: Strategy, phase: PhaseName, victim: Role) -> Expected {
    use PhaseName::*;
    match (victim, strategy, phase) {
        // A target never holds anything the source does not.
        (Role::Target, _, _) => Expected::RolledBack,
        // Before its checkpoint is complete, the state exists only in the source.
        (Role::Source, Strategy::StopAndCopy, Stop | Checkpoint) => Expected::Restarted,
        (Role::Source, _, Prepare | Checkpoint) => Expected::Restarted,
        // A stopped source holds nothing its checkpoint does not.
        (Role::Source, Strategy::StopAndCopy, _) => Expected::Completed,
        // Sequential MS2M's source has stopped at S and the target has replayed up to S when
        // finalize begins: it needs nothing more from the source.
        (Role::Source, Strategy::Ms2mSequential, Finalize) => Expected::Completed,
        (Role::Source, _, _) => Expected::TakenOver,
        (Role::Broker, ..) => unreachable!("a_broker_restart_loses_nothing_confirmed"),
    }
}

/// Every strategy, every phase, the source or the target killed as it begins: the outcome is
/// the table's, exact where the table says so, and the service serves on (the next migration
/// adds nothing to what the fault cost).
async fn every_kill_at_every_phase_has_its_outcome(tb: &Testbed) -> Result<()> {
    let mut failures = Vec::new();
    let mut n = 0;
    for strategy in Strategy::ALL {
        for &phase in strategy.phases() {
            for victim in [Role::Source, Role::Target] {
                n += 1;
                let expected = expected_outcome(strategy, phase, victim);
                let name = format!("kill{n}-{}", strategy.name()).replace('_', "-");
                let fault = Fault {
                    kill: victim,
                    at_phase: phase,
                    after_ms: 0.0,
                    outage_s: None,
                };
                let outcome = with_service(tb, spec(&name, 100_000), 10.0, |name| async move {
                    kill_and_check(tb, &name, strategy, fault, Transfer::Broker, expected).await
                })
                .await;
                if let Err(e) = outcome {
                    failures.push(format!(
                        "{victim:?} killed in {strategy}'s {phase} (expected {expected:?}): {e:#}"
                    ));
                }
            }
        }
    }
    // Sent directly, a checkpoint is in the source until the target has fetched it.
    let fault = Fault {
        kill: Role::Source,
        at_phase: PhaseName::Transfer,
        after_ms: 0.0,
        outage_s: None,
    };
    let direct = with_service(tb, spec("kill-direct", 100_000), 10.0, |name| async move {
        let restarted = Expected::Restarted;
        kill_and_check(
            tb,
            &name,
            Strategy::Ms2m,
            fault,
            Transfer::Direct,
            restarted,
        )
        .await
    });
    if let Err(e) = direct.await {
        failures.push(format!("Source killed in a direct transfer: {e:#}"));
    }
    ensure!(
        failures.is_empty(),
        "{} of {n}:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

async fn kill_and_check(
    tb: &Testbed,
    name: &str,
    strategy: Strategy,
    fault: Fault,
    transfer: Transfer,
    expected: Expected,
) -> Result<()> {
    if expected == Expected::RolledBack {
        return assert_rolled_back(tb, name, strategy, fault).await;
    }
    let o = MigrationOptions {
        fault: Some(fault),
        transfer,
        // A message the target held ahead of a dead source never gets a live output event:
        // the drain would wait for it in vain.
        drain_timeout_s: 3.0,
        ..opts()
    };
    let r = match (
        tb.migrate(name, "edge-2", strategy, o.clone()).await,
        expected,
    ) {
        (Ok(r), Expected::Completed) => return clean(&r),
        (Ok(r), Expected::TakenOver) => {
            let t = r.migration.outcome.takeover.as_ref();
            let t = t.with_context(|| format!("no takeover: {:?}", r.migration))?;
            ensure!(r.migration.status == MigrationStatus::Completed);
            ensure!(t.source_died_in.is_some(), "{t:?}");
            ensure!(
                r.verdict.lost.count <= t.replayed_ahead,
                "lost {:?}, {t:?}",
                r.verdict.lost
            );
            ensure!(tb.service_info(name).await?.host == "edge-2");
            r
        }
        (
            Err(MigrationError {
                error: Error::MigrationFailed { reason, .. },
                report: Some(r),
            }),
            Expected::Restarted,
        ) => {
            let restarted = r.migration.outcome.restarted.as_ref();
            let restarted = restarted.with_context(|| format!("not restarted: {reason}"))?;
            ensure!(
                reason.contains("died before its checkpoint was complete"),
                "{reason}"
            );
            ensure!(r.migration.status == MigrationStatus::Aborted);
            ensure!(r.verdict.lost.count == 0, "lost {:?}", r.verdict.lost);
            if let Some(after) = restarted.after_seq {
                ensure!(
                    r.verdict.state.restarted_after == Some(after),
                    "{:?}",
                    r.verdict.state
                );
            }
            let now = tb.service_info(name).await?;
            ensure!(
                now.host == "edge-1" && now.instance == restarted.instance,
                "{now:?}"
            );
            *r
        }
        (Ok(r), _) => bail!(
            "expected {expected:?}, the migration completed: {:?}",
            r.migration
        ),
        (Err(e), _) => bail!("expected {expected:?}: {e}"),
    };
    let v = &r.verdict;
    // The message the source was handling when it died, if its output went out.
    ensure!(v.duplicated.count <= 1, "{:?}", v.duplicated);
    ensure!(v.reordered.count == 0, "{:?}", v.reordered);
    ensure!(v.state.consistent == Some(true), "{:?}", v.state);
    ensure!(r.leftovers.is_empty(), "{:?}", r.leftovers);
    let o = MigrationOptions {
        drain_timeout_s: 3.0,
        ..opts()
    };
    let back = if expected == Expected::TakenOver {
        "edge-1"
    } else {
        "edge-2"
    };
    let next = tb.migrate(name, back, Strategy::Ms2m, o).await?;
    let n = &next.verdict;
    ensure!(
        next.migration.status == MigrationStatus::Completed,
        "{:?}",
        next.migration
    );
    ensure!(
        n.lost.count == v.lost.count && n.duplicated.count == v.duplicated.count,
        "the next migration: {n:?}"
    );
    ensure!(
        n.state.consistent == Some(true),
        "the next migration: {:?}",
        n.state
    );
    Ok(())
}

/// A durable service and a broker restarted while it serves, then as each phase of each
/// strategy begins: every migration ends completed or rolled back with the source serving,
/// nothing confirmed is lost, nothing is applied or output twice, the state stays consistent,
/// and the next migration is exact.
async fn a_broker_restart_loses_nothing_confirmed(tb: &Testbed) -> Result<()> {
    let durable = |name: &str| ServiceSpec {
        durable: true,
        ..spec(name, 100_000)
    };
    with_service(tb, durable("restart-serving"), 10.0, |name| async move {
        tb.restart_broker(Duration::from_millis(500)).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        clean(&tb.migrate(&name, "edge-2", Strategy::Ms2m, opts()).await?)
    })
    .await
    .context("the broker restarted while the service served")?;
    let cases: Vec<_> = Strategy::ALL
        .iter()
        .flat_map(|&s| s.phases().iter().map(move |&p| (s, p)))
        .collect();
    let mut failures = Vec::new();
    for (n, (strategy, phase)) in cases.iter().copied().enumerate() {
        let name = format!("brk{n}-{}", strategy.name()).replace('_', "-");
        let outcome = with_service(tb, durable(&name), 10.0, |name| async move {
            let fault = Fault {
                kill: Role::Broker,
                at_phase: phase,
                after_ms: 0.0,
                outage_s: None,
            };
            let o = MigrationOptions {
                fault: Some(fault),
                ..opts()
            };
            let r = match tb.migrate(&name, "edge-2", strategy, o).await {
                Ok(r) => {
                    clean(&r)?;
                    println!(
                        "      broker restarted in {strategy}'s {}: completed",
                        phase.name()
                    );
                    r
                }
                Err(MigrationError {
                    error: Error::MigrationFailed { reason, .. },
                    report: Some(r),
                }) => {
                    ensure!(r.migration.status == MigrationStatus::Aborted);
                    let v = &r.verdict;
                    ensure!(
                        v.lost.count == 0 && v.duplicated.count == 0 && v.reordered.count == 0,
                        "{v:?} ({reason})"
                    );
                    ensure!(v.state.consistent == Some(true), "{:?}", v.state);
                    ensure!(r.leftovers.is_empty(), "{:?}", r.leftovers);
                    ensure!(tb.service_info(&name).await?.host == "edge-1", "{reason}");
                    println!(
                        "      broker restarted in {strategy}'s {}: rolled back ({reason})",
                        phase.name()
                    );
                    *r
                }
                Err(e) => bail!("{e}"),
            };
            let note = r.migration.outcome.fault.as_deref().unwrap_or_default();
            ensure!(note.contains("restarted the broker"), "fault: {note:?}");
            let back = match tb.service_info(&name).await?.host.as_str() {
                "edge-1" => "edge-2",
                _ => "edge-1",
            };
            clean(&tb.migrate(&name, back, Strategy::Ms2m, opts()).await?)
        })
        .await;
        if let Err(e) = outcome {
            failures.push(format!("broker restarted in {strategy}'s {phase:?}: {e:#}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {}:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

/// A probe of a missing queue costs a channel (the broker closes it); 2,500 of them, past
/// RabbitMQ's 2,047 channel ids per connection, keep working (a soak stopped at 672 migrations
/// when lapin came back to an id whose old closure it still held).
async fn probing_missing_queues_past_the_channel_limit(tb: &Testbed) -> Result<()> {
    let link = ms2m_engine::broker::Link::open(tb.amqp_url(), Duration::from_secs(10)).await?;
    let probed = async {
        for i in 0..2500 {
            ensure!(
                !link.queue_exists(&format!("nobody-{i}")).await?,
                "nobody-{i}"
            );
        }
        let present = "probe-present";
        link.declare_queue(present).await?;
        ensure!(link.queue_exists(present).await?);
        link.delete_queue(present).await?;
        Ok(())
    };
    let result = probed.await;
    link.close().await;
    result
}

async fn checker_catches_a_migration_without_barrier(tb: &Testbed) -> Result<()> {
    // Gaps allowed: the target misses the messages between snapshot and replay queue, and
    // must go on past them for the checker to have something to catch.
    let s = ServiceSpec {
        max_seq_gap: u64::MAX,
        ..spec("broken", 10_000)
    };
    with_service(tb, s, 10.0, |name| async move {
        let r = tb
            .migrate(&name, "edge-2", Strategy::BrokenNoBarrier, opts())
            .await?;
        let v = &r.verdict;
        ensure!(r.migration.status == MigrationStatus::Completed);
        // Every message was processed live once: only the state shows what was lost.
        ensure!(v.lost.count == 0 && v.duplicated.count == 0, "{v:?}");
        ensure!(
            v.state.consistent == Some(false),
            "the checker missed the lost state: {v:?}"
        );
        ensure!(v.result == CheckResult::Invalid);
        Ok(())
    })
    .await
}

/// What an outside producer may publish to a service's input exchange that must never reach
/// the state: one of each [`ms2m_wire::Rejection`], with the reason each must get.
fn bad_inputs() -> Vec<(Vec<u8>, &'static str)> {
    let data = |seq: u64, payload: &str| {
        serde_json::json!({"kind": "data", "seq": seq, "t_pub_ns": 1, "payload": payload})
            .to_string()
            .into_bytes()
    };
    vec![
        (b"{not json".to_vec(), "malformed"),
        (
            br#"{"kind":"data","t_pub_ns":1,"payload":"no seq"}"#.to_vec(),
            "malformed",
        ),
        (data(3, &"x".repeat(17 << 20)), "oversized"),
        (br#"{"kind":"explode","seq":3}"#.to_vec(), "malformed"),
        (data(5, "again"), "repeat"),
        (data(1_000_000_000_000_000_000, "far"), "jump"),
        (
            serde_json::json!({
                "kind": "barrier", "id": "not-from-the-manager", "reply_to": "outside.replies",
                "stream": {"queue": "outside.loot", "chunk_bytes": 1 << 20},
            })
            .to_string()
            .into_bytes(),
            "unarmed_barrier",
        ),
    ]
}

async fn publish_bad_inputs(url: &str, service: &str) -> Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let exchange = ms2m_wire::names::input_exchange(service);
    for (body, _) in bad_inputs() {
        ch.basic_publish(
            exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            lapin::BasicProperties::default(),
        )
        .await?
        .await?;
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}

/// An outside producer's malformed, oversized, repeated, far-ahead and unannounced messages,
/// before a migration and during one, go to the dead-letter queue with their reasons; the
/// migration is exact all the same (the issue's measurement had 69 reordered, 1 duplicated and
/// an inconsistent state).
async fn bad_input_is_dead_lettered_and_the_migration_stays_exact(tb: &Testbed) -> Result<()> {
    let url = tb.amqp_url().to_string();
    with_service(tb, spec("bad-input", 100_000), 10.0, |name| async move {
        publish_bad_inputs(&url, &name).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The same again while the migration runs: copies land in the replay queue too, and
        // the target's replay must drop what the live instance dead-letters.
        let during = async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            publish_bad_inputs(&url, &name).await
        };
        let (r, published) =
            tokio::join!(tb.migrate(&name, "edge-2", Strategy::Ms2m, opts()), during);
        published?;
        let r = r?;
        clean(&r)?;
        // The report counts what was refused by the time it was made.
        let first = &r.counts.dead_letters;
        ensure!((7..=14).contains(&first.total), "{first:?}");
        let mut want = std::collections::BTreeMap::<String, u64>::new();
        for (_, reason) in bad_inputs() {
            *want.entry(reason.to_string()).or_default() += 2;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let again = tb
            .migrate(&name, "edge-1", Strategy::StopAndCopy, opts())
            .await?;
        clean(&again)?;
        let dead = &again.counts.dead_letters;
        ensure!(dead.total == 14 && dead.by_reason == want, "{dead:?}");
        // Counting them left them where they were.
        let last = tb.migrate(&name, "edge-2", Strategy::Ms2m, opts()).await?;
        clean(&last)?;
        ensure!(last.counts.dead_letters == *dead, "{:?}", last.counts);
        Ok(())
    })
    .await
}

/// The testbed's broker has a user of its own with a random password: `guest` does not exist
/// on it, and a report does not show the password.
async fn the_broker_has_its_own_user_and_refuses_guest(tb: &Testbed) -> Result<()> {
    let url = tb.amqp_url().to_string();
    ensure!(url.starts_with("amqp://ms2m:"), "{url}");
    let at = url.rfind('@').expect("a user in the URL");
    let password = url["amqp://ms2m:".len()..at].to_string();
    ensure!(password.len() >= 20, "a short password: {password:?}");
    let guest = format!("amqp://guest:guest{}", &url[at..]);
    let refused = lapin::Connection::connect(&guest, lapin::ConnectionProperties::default()).await;
    ensure!(refused.is_err(), "the broker let guest in");
    with_service(tb, spec("creds", 10_000), 10.0, |name| async move {
        let r = tb.migrate(&name, "edge-2", Strategy::Ms2m, opts()).await?;
        clean(&r)?;
        ensure!(
            !r.to_json().contains(&password),
            "the report shows the broker's password"
        );
        Ok(())
    })
    .await
}

/// A second testbed uses the first one's broker as an external broker: it migrates there and,
/// once its service is removed, has left none of its queues on it.
async fn external_broker_is_used_and_left_clean(tb: &Testbed) -> Result<()> {
    let cfg = TestbedConfig {
        runtime: RuntimeKind::Local,
        amqp_url: Some(tb.amqp_url().to_string()),
        ..TestbedConfig::default()
    };
    let ext = &Testbed::start(cfg).await?;
    let result = async {
        ensure!(ext.amqp_url() == tb.amqp_url());
        with_service(ext, spec("external", 10_000), 10.0, |name| async move {
            let r = ext.migrate(&name, "edge-2", Strategy::Ms2m, opts()).await?;
            clean(&r)?;
            ensure!(
                r.environment
                    .broker_image
                    .starts_with("external amqp://ms2m:***@"),
                "{}",
                r.environment.broker_image
            );
            let seen = ext.broker_queues().await?;
            // Primary, events, dead letters, the instance's control queue.
            ensure!(
                seen.len() == 4,
                "the service's queues on the broker: {seen:?}"
            );
            Ok(())
        })
        .await?;
        let theirs = ext.broker_queues().await?;
        ensure!(theirs.is_empty(), "left on the external broker: {theirs:?}");
        let all = tb.broker_queues().await?;
        ensure!(all.is_empty(), "the broker holds {all:?}");
        Ok(())
    }
    .await;
    let closed = ext.close().await;
    result?;
    Ok(closed?)
}

/// A testbed whose edge hosts reach the broker over shaped links: the probe measured each
/// link, every strategy migrates across them without loss, the checkpoint crosses the
/// source's link up and the target's down (through the broker, or directly: across the two
/// host links, or the link between two hosts), and an outage holds messages until it ends.
/// Bounds here are ones a relay cannot break however slow the machine (never faster than
/// the link, never before the outage ends), not timings.
async fn links_carry_every_strategy_and_an_outage_holds_messages(tb: &Testbed) -> Result<()> {
    let edge1 = LinkSpec {
        up_mbit: Some(20.0),
        down_mbit: Some(20.0),
        delay_ms: 10.0,
        jitter_ms: 2.0,
    };
    let edge2 = LinkSpec {
        up_mbit: Some(10.0),
        down_mbit: Some(40.0),
        delay_ms: 5.0,
        jitter_ms: 0.0,
    };
    let pair = LinkSpec {
        up_mbit: Some(50.0),
        down_mbit: Some(50.0),
        delay_ms: 1.0,
        jitter_ms: 0.0,
    };
    let cfg = TestbedConfig {
        runtime: tb.runtime(),
        links: [
            ("edge-1".into(), edge1.clone()),
            ("edge-2".into(), edge2.clone()),
        ]
        .into(),
        host_links: vec![HostLink {
            between: ["edge-2".into(), "cloud".into()],
            link: pair.clone(),
        }],
        ..TestbedConfig::default()
    };
    let shaped = &Testbed::start(cfg).await?;
    let result = async {
        let links = shaped.links();
        for (host, spec) in [
            ("edge-1", &edge1),
            ("edge-2", &edge2),
            ("edge-2<->cloud", &pair),
        ] {
            let l = links.get(host).context("a report per shaped link")?;
            ensure!(l.configured == *spec && l.mechanism == "relay");
            let m = l.measured.as_ref().context("the probe measured the link")?;
            ensure!(
                m.rtt_ms_p50 >= 2.0 * (spec.delay_ms - spec.jitter_ms),
                "{host}: {m:?}"
            );
            ensure!(m.up_mbit <= spec.up_mbit.unwrap() * 1.05, "{host}: {m:?}");
            ensure!(
                m.down_mbit <= spec.down_mbit.unwrap() * 1.05,
                "{host}: {m:?}"
            );
        }
        ensure!(!links.contains_key("cloud"), "cloud has no link");
        for strategy in Strategy::ALL {
            let name = format!("linked-{}", strategy.name().replace('_', "-"));
            with_service(shaped, spec(&name, 2_000_000), 10.0, |name| async move {
                let r = shaped.migrate(&name, "edge-2", strategy, opts()).await?;
                clean(&r)?;
                ensure!(r.links.len() == 3, "{:?}", r.links.keys());
                let cp = r.migration.outcome.checkpoint_bytes;
                let (up, down) = (&r.link_traffic["edge-1"], &r.link_traffic["edge-2"]);
                ensure!(
                    up.up_bytes >= cp,
                    "source link carried {up:?}, checkpoint {cp}"
                );
                ensure!(
                    down.down_bytes >= cp,
                    "target link carried {down:?}, checkpoint {cp}"
                );
                Ok(())
            })
            .await
            .with_context(|| strategy.name())?;
        }
        // Direct transfers: edge-1 and edge-2 have no link of their own, so the checkpoint
        // crosses edge-1's link up and edge-2's down, past the broker; edge-2 to cloud crosses
        // the link between them.
        for strategy in [Strategy::StopAndCopy, Strategy::Ms2m] {
            let name = format!("direct-{}", strategy.name().replace('_', "-"));
            with_service(shaped, spec(&name, 2_000_000), 10.0, |name| async move {
                let direct = MigrationOptions {
                    transfer: Transfer::Direct,
                    ..opts()
                };
                let r = shaped
                    .migrate(&name, "edge-2", strategy, direct.clone())
                    .await?;
                clean(&r)?;
                let cp = r
                    .migration
                    .outcome
                    .checkpoint
                    .clone()
                    .context("checkpoint")?;
                ensure!(cp.transfer == Transfer::Direct, "{cp:?}");
                let [hop] = &cp.hops[..] else {
                    bail!("one hop expected: {:?}", cp.hops)
                };
                ensure!((hop.from.as_str(), hop.to.as_str()) == ("edge-1", "edge-2"));
                // Never faster than the slower of the two links (edge-1's 20 Mbit/s).
                let mbit = hop.mbit_s.context("the hop was timed")?;
                ensure!(mbit > 0.0 && mbit <= 20.0 * 1.05, "{hop:?}");
                let (up, down) = (&r.link_traffic["edge-1"], &r.link_traffic["edge-2"]);
                ensure!(up.up_bytes >= cp.bytes, "edge-1 carried {up:?}");
                ensure!(down.down_bytes >= cp.bytes, "edge-2 carried {down:?}");
                let r = shaped.migrate(&name, "cloud", strategy, direct).await?;
                clean(&r)?;
                let bytes = r.migration.outcome.checkpoint_bytes;
                let pair = &r.link_traffic["edge-2<->cloud"];
                ensure!(pair.up_bytes >= bytes, "edge-2<->cloud carried {pair:?}");
                let host = &r.link_traffic["edge-2"];
                ensure!(host.up_bytes < bytes, "edge-2's own link carried {host:?}");
                Ok(())
            })
            .await
            .with_context(|| format!("direct {}", strategy.name()))?;
        }
        // A checkpoint that needs longer than the reply timeout on a slow link is waited for
        // (the wait scales with the state and the link), not taken for a dead instance.
        with_service(
            shaped,
            spec("patient", 2_000_000),
            10.0,
            |name| async move {
                let short = MigrationOptions {
                    reply_timeout_s: 0.5,
                    ..opts()
                };
                let r = shaped
                    .migrate(&name, "edge-2", Strategy::StopAndCopy, short)
                    .await?;
                clean(&r)?;
                let cp = r
                    .migration
                    .outcome
                    .checkpoint
                    .as_ref()
                    .context("checkpoint")?;
                ensure!(cp.write_ms > 500.0, "the upload took {} ms", cp.write_ms);
                Ok(())
            },
        )
        .await
        .context("transfer longer than the reply timeout")?;
        // A link changes for what is sent next, and is probed again.
        let slower = LinkSpec {
            up_mbit: Some(5.0),
            down_mbit: Some(5.0),
            ..edge1.clone()
        };
        shaped.set_link("edge-1", slower.clone()).await?;
        let links = shaped.links();
        let l = &links["edge-1"];
        ensure!(l.configured == slower);
        let m = l.measured.as_ref().context("probed again")?;
        ensure!(m.up_mbit <= 5.0 * 1.05, "{m:?}");
        with_service(shaped, spec("outage", 10_000), 10.0, |name| async move {
            let t0 = ms2m_wire::now_ns();
            shaped.set_link_outage("edge-1", true)?;
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let t1 = ms2m_wire::now_ns();
            shaped.set_link_outage("edge-1", false)?;
            ensure!(
                shaped
                    .wait_processed(&name, Duration::from_secs(30))
                    .await?
            );
            let h = shaped.history(&name).await?;
            let held: Vec<_> = h
                .events
                .iter()
                .filter(|e| e.t_pub_ns > t0 + 20_000_000 && e.t_pub_ns < t1)
                .collect();
            ensure!(!held.is_empty(), "messages were sent during the outage");
            for e in held {
                ensure!(
                    e.t_start_ns >= t1,
                    "seq {} was processed during the outage",
                    e.seq
                );
            }
            // The whole history, outage included, keeps every invariant.
            let r = shaped
                .migrate(&name, "cloud", Strategy::Ms2m, opts())
                .await?;
            clean(&r)
        })
        .await
        .context("outage")?;
        // An outage of the target's link during the transfer: its fetch cannot answer, the
        // migration is rolled back and the source serves on, nothing lost; once the link is
        // back, the next migration completes.
        with_service(shaped, spec("cut", 200_000), 10.0, |name| async move {
            let fault = Fault {
                kill: Role::Target,
                at_phase: PhaseName::Transfer,
                after_ms: 0.0,
                outage_s: Some(6.0),
            };
            // An outage needs a link: cloud has none, refused before anything starts.
            let to_cloud = MigrationOptions {
                fault: Some(fault.clone()),
                ..opts()
            };
            let refused = shaped
                .migrate(&name, "cloud", Strategy::Ms2m, to_cloud)
                .await
                .unwrap_err();
            ensure!(refused.error.is_config(), "{}", refused.error);
            ensure!(refused.report.is_none());
            let o = MigrationOptions {
                reply_timeout_s: 3.0,
                fault: Some(fault),
                ..opts()
            };
            let started = std::time::Instant::now();
            let Err(MigrationError { error, report }) =
                shaped.migrate(&name, "edge-2", Strategy::Ms2m, o).await
            else {
                bail!("the migration completed across a link that was down");
            };
            ensure!(error.is_migration_failed(), "{error}");
            let r = report.context("report of the aborted run")?;
            ensure!(
                r.migration.failed_phase == Some(PhaseName::Transfer),
                "{error}"
            );
            let note = r.migration.outcome.fault.as_deref().unwrap_or_default();
            ensure!(note.contains("link of edge-2 down"), "fault: {note:?}");
            let v = &r.verdict;
            ensure!(v.lost.count == 0 && v.duplicated.count == 0, "{v:?}");
            ensure!(v.state.consistent == Some(true), "{:?}", v.state);
            ensure!(r.leftovers.is_empty(), "{:?}", r.leftovers);
            ensure!(shaped.service_info(&name).await?.host == "edge-1");
            // The outage ends 6 s after it began.
            tokio::time::sleep(Duration::from_secs(6).saturating_sub(started.elapsed())).await;
            clean(
                &shaped
                    .migrate(&name, "edge-2", Strategy::Ms2m, opts())
                    .await?,
            )
        })
        .await
        .context("outage during the transfer")?;
        let err = shaped.set_link_outage("cloud", true).unwrap_err();
        ensure!(err.is_config(), "{err}");
        Ok(())
    }
    .await;
    let closed = shaped.close().await;
    result?;
    Ok(closed?)
}

/// A service of one's own, deployed by image and command (here the reference binary, which
/// takes the contract's `MS2M_*` variables), migrates without loss or duplicates, and a twin
/// that never migrated agrees with its state. One that never gets ready is refused with the wait it failed and its log, and
/// leaves nothing behind.
async fn a_service_of_ones_own_is_deployed_by_image_or_command(tb: &Testbed) -> Result<()> {
    let (image, program) = match tb.runtime() {
        RuntimeKind::Docker => (
            Some("ms2m/service:dev".to_string()),
            "/usr/local/bin/ms2m-service".to_string(),
        ),
        _ => (
            None,
            ms2m_engine::runtime::local::service_binary(&TestbedConfig::default())?
                .display()
                .to_string(),
        ),
    };
    let own = ServiceSpec {
        image: image.clone(),
        command: Some(vec![program]),
        env: [("MY_SETTING".to_string(), "1".to_string())].into(),
        ..spec("own", 10_000)
    };
    with_service(tb, own, 10.0, |name| async move {
        for (to, strategy) in [("edge-2", Strategy::Ms2m), ("cloud", Strategy::StopAndCopy)] {
            let r = tb.migrate(&name, to, strategy, opts()).await?;
            ensure!(r.migration.status == MigrationStatus::Completed);
            let v = &r.verdict;
            ensure!(
                v.lost.count == 0 && v.duplicated.count == 0 && v.reordered.count == 0,
                "{v:?}"
            );
            ensure!(
                v.state.oracle == StateOracle::Twin && v.state.consistent == Some(true),
                "{:?}",
                v.state
            );
            ensure!(r.service.command.is_some() && r.leftovers.is_empty());
        }
        Ok(())
    })
    .await?;
    if image.is_some() {
        // The image alone: its own entrypoint, the contract from the environment only.
        let image_only = ServiceSpec {
            image: image.clone(),
            ..spec("own-image", 10_000)
        };
        with_service(tb, image_only, 10.0, |name| async move {
            let r = tb.migrate(&name, "edge-2", Strategy::Ms2m, opts()).await?;
            ensure!(
                r.verdict.state.oracle == StateOracle::Twin,
                "{:?}",
                r.verdict
            );
            ensure!(r.verdict.state.consistent == Some(true), "{:?}", r.verdict);
            Ok(())
        })
        .await
        .context("image only")?;
    }
    let broken = ServiceSpec {
        image,
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            "echo starting; echo 'cannot reach my database' >&2; exit 3".into(),
        ]),
        ..spec("broken", 10_000)
    };
    let err = tb.deploy(broken).await.unwrap_err();
    let text = err.to_string();
    ensure!(
        text.contains("exited before it was ready")
            && text.contains("cannot reach my database")
            && text.contains("ms2m-service ready"),
        "{text}"
    );
    let left = tb.broker_queues().await?;
    ensure!(left.is_empty(), "queues left: {left:?}");
    Ok(())
}

/// The conformance kit passes the reference service on every rule, and fails one whose replay
/// has side effects with a message that names that rule (and only that one).
async fn the_conformance_kit_passes_the_reference_and_names_a_broken_rule(
    tb: &Testbed,
) -> Result<()> {
    let reference = ServiceSpec {
        processing_ms: 0.0,
        ..spec("conform", 10_000)
    };
    let rules = tb.conformance(reference).await?;
    ensure!(rules.len() >= 6, "{rules:?}");
    for r in &rules {
        ensure!(r.passed, "the reference breaks {:?}: {}", r.rule, r.detail);
    }
    let broken = ServiceSpec {
        processing_ms: 0.0,
        env: [(
            "REFERENCE_SERVICE_BREAKS".to_string(),
            "replay_side_effects".to_string(),
        )]
        .into(),
        ..spec("conform-broken", 10_000)
    };
    let rules = tb.conformance(broken).await?;
    let failed: Vec<_> = rules.iter().filter(|r| !r.passed).collect();
    ensure!(failed.len() == 1, "{rules:?}");
    ensure!(
        failed[0].rule.contains("no side effects") && failed[0].detail.contains("side effects"),
        "{:?}",
        failed[0]
    );
    ensure!(tb.broker_queues().await?.is_empty());
    Ok(())
}
