//! An instance's parameters: flags, or the `MS2M_*` environment the testbed sets.

use anyhow::{bail, Context, Result};
use std::time::Duration;

/// The instance's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub amqp_url: String,
    pub service: String,
    pub instance: String,
    /// The least time every message takes: what [`crate::Service::handle`] took is topped up
    /// to it with a precise timer (see the wire README), so that a testbed's `processing_ms`
    /// means the same for any service.
    pub processing: Duration,
    /// The reference service's state size; another service may read it as a size hint.
    pub state_bytes: usize,
    pub prefetch: u16,
    /// Inputs longer than this go to the dead-letter queue unread.
    pub max_input_bytes: usize,
    /// How far past the next seq an input may be and still be applied (1: only the next; more
    /// for a producer that may lose messages on the way).
    pub max_seq_gap: u64,
    /// Consume the primary queue at once (the first instance) rather than wait for commands.
    pub live: bool,
    /// The service's queues and exchanges are durable and its output events persistent, and
    /// the instance reconnects when the broker restarts, keeping its state (see
    /// [`crate::instance`]): what survives a broker restart.
    pub durable: bool,
    /// A deliberately broken rule of the contract, for the conformance kit's own tests
    /// (`REFERENCE_SERVICE_BREAKS=replay_side_effects`: replayed messages are published as live
    /// output events). Never set in a real run.
    pub breaks: Option<String>,
}

impl Config {
    /// The broker's URL as logs may show it: without the password.
    pub fn broker_shown(&self) -> String {
        ms2m_wire::redact_url(&self.amqp_url)
    }
}

const USAGE: &str = "flags (or the MS2M_* variables): --amqp-url URL --service NAME --instance ID \
                     [--processing-ms F] [--state-bytes N] [--prefetch N] [--max-input-bytes N] \
                     [--max-seq-gap N] [--live] [--durable]";

impl Config {
    /// Reads flags (`--amqp-url URL`, `--service NAME`, `--instance ID`, `--processing-ms F`,
    /// `--state-bytes N`, `--prefetch N`, `--live`, `--durable`), each falling back to its environment
    /// variable (`MS2M_AMQP_URL`, ..., `MS2M_LIVE=1`).
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Config> {
        let mut values = std::collections::HashMap::new();
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "--live" | "--durable" => {
                    values.insert(flag[2..].to_string(), "1".to_string());
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                f if f.starts_with("--") => {
                    let v = args
                        .next()
                        .with_context(|| format!("flag {f} needs a value"))?;
                    values.insert(f[2..].to_string(), v);
                }
                other => bail!("unexpected argument {other:?} ({USAGE})"),
            }
        }
        let get = |key: &str| -> Option<String> {
            values.get(key).cloned().or_else(|| {
                std::env::var(format!("MS2M_{}", key.replace('-', "_").to_uppercase())).ok()
            })
        };
        let required = |key: &str| {
            get(key).with_context(|| {
                let var = format!("MS2M_{}", key.replace('-', "_").to_uppercase());
                format!(
                    "missing --{key} (or {var}); the testbed sets it when it starts an instance"
                )
            })
        };
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
            max_input_bytes: get("max-input-bytes")
                .map(|v| v.parse())
                .transpose()
                .context("--max-input-bytes must be a byte count")?
                .unwrap_or(ms2m_wire::MAX_INPUT_BYTES),
            max_seq_gap: get("max-seq-gap")
                .map(|v| v.parse())
                .transpose()
                .context("--max-seq-gap must be a count >= 1")?
                .unwrap_or(1)
                .max(1),
            live: get("live").is_some_and(|v| v == "1" || v == "true"),
            durable: get("durable").is_some_and(|v| v == "1" || v == "true"),
            breaks: std::env::var("REFERENCE_SERVICE_BREAKS").ok(),
        })
    }
}
