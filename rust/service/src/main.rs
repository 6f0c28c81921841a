//! `ms2m-service`: the reference stateful, message-driven microservice.
//!
//! One process is one instance. It consumes its service's primary queue (when live), spends the
//! configured processing time on every message, applies it to its deterministic state
//! ([`ms2m_wire::state::ServiceState`]) and publishes an [`ms2m_wire::OutputEvent`]. Between two
//! messages it obeys the commands of [`ms2m_wire::control`] arriving on its control queue. The
//! whole contract is in `rust/wire/README.md`.
//!
//! Configuration comes from flags or the matching environment variables:
//! `--amqp-url` (MS2M_AMQP_URL), `--service` (MS2M_SERVICE), `--instance` (MS2M_INSTANCE),
//! `--processing-ms` (MS2M_PROCESSING_MS, default 0), `--state-bytes` (MS2M_STATE_BYTES,
//! default 0), `--prefetch` (MS2M_PREFETCH, default 1), `--live` (MS2M_LIVE=1: start serving at
//! once; otherwise wait for commands, as a migration target does).

mod instance;
mod machine;
mod pipeline;

use anyhow::{bail, Context, Result};
use std::time::Duration;

/// The instance's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub amqp_url: String,
    pub service: String,
    pub instance: String,
    pub processing: Duration,
    pub state_bytes: usize,
    pub prefetch: u16,
    pub live: bool,
    /// A deliberately broken rule of the contract, for the conformance kit's own tests
    /// (`REFERENCE_SERVICE_BREAKS=replay_side_effects`: replayed messages are published as live
    /// output events). Never set in a real run.
    pub breaks: Option<String>,
}

fn parse_args() -> Result<Config> {
    let mut values = std::collections::HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--live" => {
                values.insert("live".to_string(), "1".to_string());
            }
            "-h" | "--help" => {
                println!("usage: ms2m-service --amqp-url URL --service NAME --instance ID [--processing-ms F] [--state-bytes N] [--prefetch N] [--live]");
                std::process::exit(0);
            }
            f if f.starts_with("--") => {
                let v = args
                    .next()
                    .with_context(|| format!("flag {f} needs a value"))?;
                values.insert(f[2..].to_string(), v);
            }
            other => bail!("unexpected argument {other:?} (see --help)"),
        }
    }
    let get = |key: &str| -> Option<String> {
        values.get(key).cloned().or_else(|| {
            std::env::var(format!("MS2M_{}", key.replace('-', "_").to_uppercase())).ok()
        })
    };
    let required = |key: &str| get(key).with_context(|| format!("missing --{key}"));
    let processing_ms: f64 = get("processing-ms")
        .map(|v| v.parse())
        .transpose()
        .context("--processing-ms must be a number")?
        .unwrap_or(0.0);
    if !(processing_ms.is_finite() && processing_ms >= 0.0) {
        bail!("--processing-ms must be a finite number >= 0, got {processing_ms}");
    }
    Ok(Config {
        amqp_url: required("amqp-url")?,
        service: required("service")?,
        instance: required("instance")?,
        processing: Duration::from_secs_f64(processing_ms / 1000.0),
        state_bytes: get("state-bytes")
            .map(|v| v.parse())
            .transpose()
            .context("--state-bytes must be a byte count")?
            .unwrap_or(0),
        prefetch: get("prefetch")
            .map(|v| v.parse())
            .transpose()
            .context("--prefetch must be 1..65535")?
            .unwrap_or(1)
            .max(1),
        live: get("live").is_some_and(|v| v == "1" || v == "true"),
        breaks: std::env::var("REFERENCE_SERVICE_BREAKS").ok(),
    })
}

fn main() {
    let config = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ms2m-service: {e:#}");
            std::process::exit(2);
        }
    };
    // The runtime is current-thread: the event loop runs on this thread, which spends the
    // processing times.
    instance::precise_sleep();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(instance::run(config)) {
        eprintln!("ms2m-service: {e:#}");
        std::process::exit(1);
    }
}
