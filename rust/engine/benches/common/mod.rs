//! What the benchmarks share: their configuration from the environment and the runtime and
//! testbed they run on.

use anyhow::{Context, Result};
use ms2m_engine::config::RuntimeKind;
use ms2m_engine::{Testbed, TestbedConfig};

/// A comma-separated list from the environment variable `name`, or `default` when unset.
#[allow(dead_code)] // not every benchmark takes a list
pub fn env_list<T: std::str::FromStr + Clone>(name: &str, default: &[T]) -> Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|x| x.trim().parse().with_context(|| format!("{name}: {x:?}")))
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

#[allow(dead_code)] // the links benchmark needs no testbed
/// Runs `f` on a two-worker tokio runtime with a testbed whose runtime `MS2M_RUNTIME` picks
/// (docker, local; default auto).
pub fn with_testbed<T>(f: impl AsyncFnOnce(Testbed) -> Result<T>) -> Result<T> {
    let runtime = match std::env::var("MS2M_RUNTIME").as_deref() {
        Ok("local") => RuntimeKind::Local,
        Ok("docker") => RuntimeKind::Docker,
        _ => RuntimeKind::Auto,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(async {
            let tb = Testbed::start(TestbedConfig {
                runtime,
                ..TestbedConfig::default()
            })
            .await?;
            f(tb).await
        })
}
