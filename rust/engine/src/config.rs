//! Configurations of a testbed, a service, a workload and a migration, each validated before
//! anything starts.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

fn refuse<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Config(msg.into()))
}

/// Where the broker and the service instances run.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// docker where a Docker daemon answers, local otherwise.
    #[default]
    Auto,
    /// Containers started with testcontainers on the testbed's own Docker network.
    Docker,
    /// Local processes: Debian's rabbitmq-server on free ports in a temporary directory, the
    /// `ms2m-service` binary as a subprocess per instance. For machines without Docker.
    Local,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Auto => "auto",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Local => "local",
        }
    }
}

/// Where the broker and the instances run, and which images they use.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TestbedConfig {
    /// Host names instances can be placed on. A host is a name the testbed maps to where an
    /// instance runs; in the docker runtime every host is a container on the testbed network.
    pub hosts: Vec<String>,
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// An existing broker (`amqp://user:pass@host:port/vhost`) to use instead of starting one.
    /// The testbed then only removes the queues and exchanges it declared.
    #[serde(default)]
    pub amqp_url: Option<String>,
    /// docker runtime: the broker and service images.
    pub broker_image: String,
    pub service_image: String,
    /// local runtime: the `ms2m-service` binary (default: `$MS2M_SERVICE_BIN`, then
    /// `ms2m-service` on PATH, then this checkout's `target/release/ms2m-service`).
    #[serde(default)]
    pub service_binary: Option<String>,
    /// Longest wait for the broker to accept AMQP connections.
    pub broker_startup_timeout_s: f64,
    /// Each shaped host's link to the broker's host; a host not named here (or with no
    /// figure) reaches the broker directly.
    #[serde(default)]
    pub links: std::collections::BTreeMap<String, crate::net::LinkSpec>,
    /// Links between two hosts, for direct checkpoint transfers between them (without one, a
    /// direct transfer crosses the two hosts' links to the broker's host).
    #[serde(default)]
    pub host_links: Vec<crate::net::HostLink>,
    /// Seeds the links' jitter.
    #[serde(default)]
    pub link_seed: u64,
}

impl Default for TestbedConfig {
    fn default() -> Self {
        TestbedConfig {
            hosts: vec!["edge-1".into(), "edge-2".into(), "cloud".into()],
            runtime: RuntimeKind::Auto,
            amqp_url: None,
            service_binary: None,
            broker_image: std::env::var("MS2M_BROKER_IMAGE")
                .unwrap_or_else(|_| "ms2m/rabbitmq:3.10".into()),
            service_image: std::env::var("MS2M_SERVICE_IMAGE")
                .unwrap_or_else(|_| "ms2m/service:dev".into()),
            broker_startup_timeout_s: 90.0,
            links: Default::default(),
            host_links: Vec::new(),
            link_seed: 0,
        }
    }
}

impl TestbedConfig {
    /// Whether any link is configured (the testbed then starts relays).
    pub fn has_links(&self) -> bool {
        !self.links.is_empty() || !self.host_links.is_empty()
    }

    pub fn validate(&self) -> Result<()> {
        if self.hosts.is_empty() {
            return refuse("a testbed needs at least one host");
        }
        for h in &self.hosts {
            valid_name("host", h)?;
        }
        let mut sorted = self.hosts.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.hosts.len() {
            return refuse(format!("host names must be unique: {:?}", self.hosts));
        }
        for (what, image) in [
            ("broker_image", &self.broker_image),
            ("service_image", &self.service_image),
        ] {
            if image.trim().is_empty() {
                return refuse(format!("{what} must name an image"));
            }
        }
        if !(self.broker_startup_timeout_s.is_finite() && self.broker_startup_timeout_s > 0.0) {
            return refuse("broker_startup_timeout_s must be > 0");
        }
        if let Some(url) = &self.amqp_url {
            check_amqp_url(url, self.runtime)?;
        }
        if self.has_links() && self.amqp_url.is_some() && self.runtime == RuntimeKind::Docker {
            return refuse(
                "links need the broker the testbed starts on the docker runtime: leave amqp_url \
                 out, or use the local runtime",
            );
        }
        for (host, link) in &self.links {
            if !self.hosts.contains(host) {
                return refuse(format!(
                    "links name host {host:?}, which is not one of the testbed's hosts {:?}",
                    self.hosts
                ));
            }
            link.validate(host)?;
        }
        let mut pairs = std::collections::BTreeSet::new();
        for hl in &self.host_links {
            let [a, b] = &hl.between;
            for h in [a, b] {
                if !self.hosts.contains(h) {
                    return refuse(format!(
                        "host_links name host {h:?}, which is not one of the testbed's hosts {:?}",
                        self.hosts
                    ));
                }
            }
            if a == b {
                return refuse(format!("a host link joins two hosts, not {a:?} to itself"));
            }
            if !pairs.insert((a.min(b), a.max(b))) {
                return refuse(format!("host_links give {a} and {b} two links"));
            }
            hl.link.validate(&hl.name())?;
        }
        if let Some(bin) = &self.service_binary {
            if !std::path::Path::new(bin).is_file() {
                return refuse(format!("service_binary {bin:?} is not a file"));
            }
        }
        Ok(())
    }
}

/// Refuses an external broker URL that cannot work before anything starts.
fn check_amqp_url(url: &str, runtime: RuntimeKind) -> Result<()> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return refuse(format!(
            "amqp_url {url:?} must start with amqp:// or amqps:// (e.g. \
             amqp://guest:guest@127.0.0.1:5672/%2f)"
        ));
    }
    if crate::amqp_url::url_host(url).is_none() {
        return refuse(format!("amqp_url {url:?} names no host"));
    }
    if crate::amqp_url::is_loopback_url(url) && runtime == RuntimeKind::Docker {
        return refuse(format!(
            "amqp_url {url:?} is on this machine's loopback, which the docker runtime's \
             containers cannot reach; use runtime \"local\", or an address the containers reach"
        ));
    }
    Ok(())
}

/// Names used in broker resources and container names: letters, digits, '-' and '_'.
pub(crate) fn valid_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 48
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return refuse(format!(
            "{what} name {name:?} must be 1-48 characters of letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// Copies of a state that exist at once during a migration on one machine: the source's state
/// and the snapshot it streams, the checkpoint held by the broker, the target's fetched buffer
/// (which becomes its state), and the checker's reference fold.
pub const STATE_COPIES: u64 = 5;

/// Refuses a state that `available` bytes of memory (None: unknown, nothing refused) cannot
/// hold [`STATE_COPIES`] times: better a clear error at deploy than an instance or the broker
/// killed for memory in the middle of a checkpoint.
pub fn check_state_fits(state_bytes: u64, available: Option<u64>) -> Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    let needed = state_bytes.saturating_mul(STATE_COPIES);
    if needed > available {
        return refuse(format!(
            "state_bytes {state_bytes} is too large for this machine: a migration holds about \
             {STATE_COPIES} copies of the state at once (source, its snapshot, the broker, the \
             target, the checker), {:.1} GiB, and {:.1} GiB of memory is available; use at most \
             {} bytes or free memory",
            needed as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64,
            available / STATE_COPIES
        ));
    }
    Ok(())
}

/// `MemAvailable` of this machine, bytes (None where /proc/meminfo does not say).
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A service to deploy: the reference service's parameters, or any implementation of the wire
/// contract (`image` and/or `command`), which gets them as `MS2M_*` environment variables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ServiceSpec {
    pub name: String,
    pub host: String,
    /// Processing time per message, milliseconds.
    pub processing_ms: f64,
    /// Size of the mutable state payload, bytes.
    pub state_bytes: u64,
    /// Messages an instance may fetch ahead of processing.
    pub prefetch: u16,
    /// How far past the next seq an input may be and still be applied: 1 (only the next) for
    /// a producer that loses nothing, as the testbed's workload; more for one that may. Any
    /// other seq goes to the dead-letter queue.
    #[serde(default = "one")]
    pub max_seq_gap: u64,
    /// docker runtime: the image its instances run (default: the testbed's service image).
    #[serde(default)]
    pub image: Option<String>,
    /// The program and its arguments an instance runs (docker: instead of the image's
    /// entrypoint; local: instead of `ms2m-service`).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// More environment variables for every instance (`MS2M_*` ones are the contract's).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Survive a broker restart: the service's queues and exchanges are durable, its input
    /// messages and output events persistent, and every client of them (instances, workload,
    /// recorder, manager) reconnects. Costs a disk write per message at the broker.
    #[serde(default)]
    pub durable: bool,
}

fn one() -> u64 {
    1
}

impl ServiceSpec {
    pub fn validate(&self, tb: &TestbedConfig) -> Result<()> {
        valid_name("service", &self.name)?;
        check_host(tb, &self.host)?;
        if !(self.processing_ms.is_finite() && self.processing_ms >= 0.0) {
            return refuse(format!(
                "processing_ms must be a finite number >= 0, got {}",
                self.processing_ms
            ));
        }
        if self.prefetch == 0 {
            return refuse("prefetch must be at least 1");
        }
        if self.max_seq_gap == 0 {
            return refuse("max_seq_gap must be at least 1 (1: only the next seq is applied)");
        }
        if self.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
            return refuse("image must name an image (leave it out for the reference service)");
        }
        if let Some(cmd) = &self.command {
            if cmd.first().is_none_or(|p| p.trim().is_empty()) {
                return refuse("command needs a program: [\"program\", \"arg\", ...]");
            }
        }
        if self.image.is_some() && tb.runtime == RuntimeKind::Local {
            return refuse(
                "image needs the docker runtime; on the local runtime give the service a command",
            );
        }
        if let Some(k) = self
            .env
            .keys()
            .find(|k| k.starts_with("MS2M_") || k.is_empty())
        {
            return refuse(format!(
                "env {k:?}: MS2M_* variables are the contract's (set from the service's \
                 parameters); name yours otherwise"
            ));
        }
        Ok(())
    }

    /// Whether the instances run the reference service (whose state the checker can fold).
    pub fn is_reference(&self) -> bool {
        self.image.is_none() && self.command.is_none()
    }
}

pub(crate) fn check_host(tb: &TestbedConfig, host: &str) -> Result<()> {
    if !tb.hosts.iter().any(|h| h == host) {
        return refuse(format!(
            "unknown host {host:?}; this testbed has {:?}",
            tb.hosts
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ServiceSpec {
        ServiceSpec {
            name: "counter".into(),
            host: "edge-1".into(),
            processing_ms: 50.0,
            state_bytes: 1000,
            prefetch: 1,
            max_seq_gap: 1,
            image: None,
            command: None,
            env: Default::default(),
            durable: false,
        }
    }

    #[test]
    fn good_service_passes() {
        spec().validate(&TestbedConfig::default()).unwrap();
    }

    #[test]
    fn bad_inputs_are_refused_with_a_reason() {
        let tb = TestbedConfig::default();
        let e = ServiceSpec {
            host: "mars".into(),
            ..spec()
        }
        .validate(&tb)
        .unwrap_err();
        assert!(e.to_string().contains("unknown host \"mars\""), "{e}");
        assert!(ServiceSpec {
            processing_ms: -1.0,
            ..spec()
        }
        .validate(&tb)
        .is_err());
        assert!(ServiceSpec {
            name: "a.b".into(),
            ..spec()
        }
        .validate(&tb)
        .is_err());
        ServiceSpec {
            state_bytes: 1 << 30,
            ..spec()
        }
        .validate(&tb)
        .unwrap();
    }

    #[test]
    fn links_are_checked_against_the_hosts_and_the_runtime() {
        let link = crate::net::LinkSpec {
            delay_ms: 5.0,
            ..Default::default()
        };
        let mut tb = TestbedConfig {
            links: [("edge-9".to_string(), link.clone())].into(),
            ..TestbedConfig::default()
        };
        let e = tb.validate().unwrap_err().to_string();
        assert!(e.contains("not one of the testbed's hosts"), "{e}");
        tb.links = [("edge-1".to_string(), link)].into();
        tb.validate().unwrap();
        tb.runtime = RuntimeKind::Docker;
        tb.amqp_url = Some("amqp://guest:guest@10.0.0.5:5672/%2f".into());
        let e = tb.validate().unwrap_err().to_string();
        assert!(e.contains("links need the broker"), "{e}");
    }

    #[test]
    fn a_state_too_large_for_memory_is_refused_with_the_figures() {
        check_state_fits(1 << 30, None).unwrap();
        check_state_fits(1 << 30, Some(5 << 30)).unwrap();
        let e = check_state_fits(1 << 30, Some(4 << 30)).unwrap_err();
        assert!(e.to_string().contains("5.0 GiB"), "{e}");
        assert!(e.to_string().contains("at most 858993459 bytes"), "{e}");
        assert!(available_memory().is_some_and(|m| m > 0));
    }

    #[test]
    fn a_service_of_ones_own_is_checked_before_anything_starts() {
        let local = TestbedConfig {
            runtime: RuntimeKind::Local,
            ..TestbedConfig::default()
        };
        for (spec, want) in [
            (
                ServiceSpec {
                    command: Some(vec![]),
                    ..spec()
                },
                "command needs a program",
            ),
            (
                ServiceSpec {
                    env: [("MS2M_LIVE".to_string(), "1".to_string())].into(),
                    ..spec()
                },
                "MS2M_",
            ),
            (
                ServiceSpec {
                    image: Some("mine:1".into()),
                    ..spec()
                },
                "image needs the docker runtime",
            ),
        ] {
            let e = spec.validate(&local).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let own = ServiceSpec {
            command: Some(vec!["./my-service".into()]),
            ..spec()
        };
        own.validate(&local).unwrap();
        assert!(!own.is_reference() && spec().is_reference());
    }
}
