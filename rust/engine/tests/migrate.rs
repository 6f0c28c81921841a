//! Real migrations in Docker: a broker container, service instances as containers, a
//! workload, and the checker's verdict on the whole history.

use ms2m_engine::{MigrationOptions, ServiceSpec, Strategy, Testbed, TestbedConfig, WorkloadSpec};
use std::time::Duration;

fn spec(name: &str, state_bytes: u64) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        host: "edge-1".into(),
        processing_ms: 50.0,
        state_bytes,
        prefetch: 1,
    }
}

fn assert_clean(report: &ms2m_engine::Report) {
    let v = &report.verdict;
    assert_eq!(v.lost.count, 0, "lost: {:?}", v.lost);
    assert_eq!(v.duplicated.count, 0, "duplicated: {:?}", v.duplicated);
    assert_eq!(v.reordered.count, 0, "reordered: {:?}", v.reordered);
    assert_eq!(v.state.consistent, Some(true), "state: {:?}", v.state);
    assert!(v.is_valid(), "{v:?}");
    assert!(v.expected > 0, "the workload sent nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_strategies_migrate_without_loss() -> anyhow::Result<()> {
    let tb = Testbed::start(TestbedConfig::default()).await?;
    let result = async {
        tb.deploy(spec("counter", 1_000_000)).await?;
        tb.start_workload(
            "counter",
            WorkloadSpec {
                rate: 10.0,
                message_bytes: 64,
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let opts = MigrationOptions {
            settle_s: 0.5,
            ..Default::default()
        };
        let ms2m = tb
            .migrate("counter", "edge-2", Strategy::Ms2m, opts.clone())
            .await?;
        println!("{}", ms2m.to_json());
        assert_clean(&ms2m);
        assert_eq!(ms2m.target.host, "edge-2");
        assert!(ms2m.migration.outcome.checkpoint_bytes > 1_000_000);
        let names: Vec<_> = ms2m.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "prepare",
                "checkpoint",
                "transfer",
                "restore",
                "replay",
                "finalize"
            ]
        );
        let cold = tb
            .migrate("counter", "cloud", Strategy::StopAndCopy, opts)
            .await?;
        println!("{}", cold.to_json());
        assert_clean(&cold);
        assert_eq!(tb.service_info("counter").await?.host, "cloud");
        anyhow::Ok(())
    }
    .await;
    tb.close().await?;
    result
}
