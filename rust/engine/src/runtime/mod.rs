//! Where the broker and the service instances run (ARCHITECTURE.md, "Runtimes"):
//! - [`docker`]: containers on the testbed's own Docker network,
//! - [`local`]: local processes, for machines without Docker,
//!
//! each either starting its own broker or using an external one (`amqp_url`). The testbed and
//! the strategies see only [`Runtime`].

mod api_shim;

pub mod docker;
pub mod local;

use crate::amqp_url::{is_loopback_url, redact};
use crate::config::{RuntimeKind, ServiceSpec, TestbedConfig};
use crate::error::{Error, Result};
use docker::DockerRuntime;
use local::LocalRuntime;

/// Erlang VM flags for every broker the testbed starts: schedulers that sleep when idle instead
/// of spinning first. RabbitMQ's default busy wait holds CPU that the instances and the harness
/// on the same two cores need (RabbitMQ's own advice for shared hosts).
pub(crate) const BROKER_ERL_ARGS: (&str, &str) = (
    "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
    "+sbwt none +sbwtdcpu none +sbwtdio none",
);

/// The user a testbed's own broker is created with, and its password: random per testbed, so
/// that no well-known account (RabbitMQ's `guest`) exists on it.
#[derive(Clone)]
pub(crate) struct BrokerUser {
    pub name: &'static str,
    pub password: String,
}

impl BrokerUser {
    pub fn generate() -> Self {
        use rand::distr::{Alphanumeric, SampleString};
        BrokerUser {
            name: "ms2m",
            password: Alphanumeric.sample_string(&mut rand::rng(), 24),
        }
    }

    /// The broker's Erlang VM flags ([`BROKER_ERL_ARGS`]) with this user as the one created
    /// at the broker's first start, instead of `guest`.
    pub fn erl_args(&self) -> String {
        format!(
            "{} -rabbit default_user <<\"{}\">> default_pass <<\"{}\">>",
            BROKER_ERL_ARGS.1, self.name, self.password
        )
    }

    /// An AMQP URL for `host:port` as this user.
    pub fn url(&self, authority: &str) -> String {
        format!("amqp://{}:{}@{authority}/%2f", self.name, self.password)
    }
}

/// Where instances and clients reach the broker.
#[derive(Debug, Clone)]
pub struct BrokerEndpoint {
    /// From this machine.
    pub url: String,
    /// From where instances run (containers on the testbed network, or this machine).
    pub internal_url: String,
}

/// The runtime a testbed started with.
pub enum Runtime {
    // Boxed: one per testbed, and their sizes differ widely.
    Docker(Box<DockerRuntime>),
    Local(Box<LocalRuntime>),
}

impl Runtime {
    /// Resolves `auto`, then starts the broker (unless `cfg.amqp_url` names one) and waits
    /// until it accepts AMQP connections.
    pub async fn start(cfg: &TestbedConfig, testbed_id: &str) -> Result<(Runtime, BrokerEndpoint)> {
        match resolve(cfg).await? {
            RuntimeKind::Local => {
                let (rt, ep) = LocalRuntime::start(cfg, testbed_id).await?;
                Ok((Runtime::Local(Box::new(rt)), ep))
            }
            _ => {
                let (rt, ep) = DockerRuntime::start(cfg, testbed_id).await?;
                Ok((Runtime::Docker(Box::new(rt)), ep))
            }
        }
    }

    pub fn kind(&self) -> RuntimeKind {
        match self {
            Runtime::Docker(_) => RuntimeKind::Docker,
            Runtime::Local(_) => RuntimeKind::Local,
        }
    }

    /// Starts one instance of `spec` on `host` and waits until it is ready for commands.
    pub async fn start_instance(
        &self,
        spec: &ServiceSpec,
        instance: &str,
        host: &str,
        amqp_url: &str,
        live: bool,
    ) -> Result<()> {
        let program = match (&spec.command, spec.is_reference()) {
            (_, true) => Program::Reference(instance_args(spec, instance, amqp_url, live)),
            (Some(cmd), false) => Program::Command(cmd.clone()),
            (None, false) => Program::Image,
        };
        let launch = Launch {
            program,
            env: instance_env(spec, instance, amqp_url, live, host),
            live,
        };
        match self {
            Runtime::Docker(d) => d.start_instance(spec, instance, host, launch).await,
            Runtime::Local(l) => l.start_instance(spec, instance, host, launch).await,
        }
    }

    /// Where instances reach this machine (where the link relays listen): the docker
    /// network's gateway, or loopback for local processes.
    pub async fn host_address(&self, cfg: &TestbedConfig) -> Result<std::net::IpAddr> {
        match self {
            Runtime::Docker(_) if cfg.amqp_url.is_some() => Err(Error::Config(
                "links need the broker the testbed starts on the docker runtime: leave \
                 amqp_url out, or use the local runtime"
                    .into(),
            )),
            Runtime::Docker(d) => d.host_address().await,
            Runtime::Local(_) => Ok(std::net::Ipv4Addr::LOCALHOST.into()),
        }
    }

    /// Where an instance listens for a direct checkpoint transfer (port 0: any free one):
    /// every address of its container, or loopback for a local process.
    pub fn serve_listen(&self) -> &'static str {
        match self {
            Runtime::Docker(_) => "0.0.0.0:0",
            Runtime::Local(_) => "127.0.0.1:0",
        }
    }

    /// Where this machine and the other instances reach an instance.
    pub async fn instance_address(&self, instance: &str) -> Result<std::net::IpAddr> {
        match self {
            Runtime::Docker(d) => d.instance_address(instance).await,
            Runtime::Local(_) => Ok(std::net::Ipv4Addr::LOCALHOST.into()),
        }
    }

    /// Kills an instance's process at once (SIGKILL), as a crash would.
    pub async fn kill_instance(&self, instance: &str) -> Result<()> {
        match self {
            Runtime::Docker(d) => d.kill_instance(instance).await,
            Runtime::Local(l) => l.kill_instance(instance).await,
        }
    }

    /// Whether an instance runs; false for one never started or already removed.
    pub async fn is_running(&self, instance: &str) -> bool {
        match self {
            Runtime::Docker(d) => d.is_running(instance).await,
            Runtime::Local(l) => l.is_running(instance).await,
        }
    }

    /// Resolves once a started instance has stopped; pends for one not started.
    pub async fn wait_until_exited(&self, instance: &str) {
        match self {
            Runtime::Docker(d) => d.wait_until_exited(instance).await,
            Runtime::Local(l) => l.wait_until_exited(instance).await,
        }
    }

    /// Removes an instance (its container or process).
    pub async fn remove_instance(&self, instance: &str) -> Result<()> {
        match self {
            Runtime::Docker(d) => d.remove_instance(instance).await,
            Runtime::Local(l) => l.remove_instance(instance).await,
        }
    }

    /// The queues (name, ready messages) of a broker this runtime started, as `rabbitmqctl`
    /// lists them; None for an external broker, which only the testbed's own names can probe.
    pub async fn broker_queues(&self) -> Result<Option<Vec<(String, u64)>>> {
        let args = [
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ];
        Ok(self
            .rabbitmqctl(&args)
            .await?
            .as_deref()
            .map(parse_queue_list))
    }

    /// Restarts the broker this runtime started: RabbitMQ's application stops (every client
    /// connection closes; queues and exchanges that are not durable, and messages that are not
    /// persistent, are gone) and starts again after `down`. Returns once it takes connections.
    pub async fn restart_broker(&self, down: std::time::Duration) -> Result<()> {
        if self.rabbitmqctl(&["stop_app"]).await?.is_none() {
            return Err(Error::Config(
                "the testbed uses an external broker (amqp_url), which it cannot restart".into(),
            ));
        }
        tokio::time::sleep(down).await;
        self.rabbitmqctl(&["start_app"]).await?;
        // start_app returns once the application runs; a moment later it listens.
        self.rabbitmqctl(&["await_startup"]).await?;
        Ok(())
    }

    /// The broker's version (RabbitMQ's own), when this runtime started it.
    pub async fn broker_version(&self) -> Option<String> {
        let v = self.rabbitmqctl(&["version"]).await.ok()??;
        Some(v.trim().to_string()).filter(|v| !v.is_empty())
    }

    /// The container engine's version, for the docker runtime.
    pub async fn docker_version(&self) -> Option<String> {
        match self {
            Runtime::Docker(_) => docker::daemon_version().await,
            Runtime::Local(_) => None,
        }
    }

    /// Runs `rabbitmqctl` against the broker this runtime started; its standard output, or
    /// None for an external broker.
    async fn rabbitmqctl(&self, args: &[&str]) -> Result<Option<String>> {
        match self {
            Runtime::Docker(d) => d.rabbitmqctl(args).await,
            Runtime::Local(l) => l.rabbitmqctl(args).await,
        }
    }

    /// What the report's environment names as the broker and the service "images".
    pub fn artifacts(&self, cfg: &TestbedConfig) -> (String, String) {
        let external = cfg
            .amqp_url
            .as_ref()
            .map(|u| format!("external {}", redact(u)));
        match self {
            Runtime::Docker(_) => (
                external.unwrap_or_else(|| cfg.broker_image.clone()),
                cfg.service_image.clone(),
            ),
            Runtime::Local(l) => (
                external.unwrap_or_else(|| l.broker_program()),
                l.service_binary(),
            ),
        }
    }

    /// Leaves everything running after this process (for debugging).
    pub fn keep(&self) {
        if let Runtime::Local(l) = self {
            l.keep();
        }
    }

    /// Removes every instance and the broker it started.
    pub async fn shutdown(&self) -> Result<()> {
        match self {
            Runtime::Docker(d) => d.shutdown().await,
            Runtime::Local(l) => l.shutdown().await,
        }
    }
}

/// What `auto` means: docker where a daemon answers, local otherwise. An external broker on
/// this machine's loopback is out of the containers' reach, so it means local too.
async fn resolve(cfg: &TestbedConfig) -> Result<RuntimeKind> {
    if cfg.runtime != RuntimeKind::Auto {
        return Ok(cfg.runtime);
    }
    if cfg.amqp_url.as_deref().is_some_and(is_loopback_url) {
        return Ok(RuntimeKind::Local);
    }
    match docker::ensure_docker().await {
        Ok(()) => Ok(RuntimeKind::Docker),
        Err(docker_err) => match local::check_available(cfg) {
            Ok(_) => Ok(RuntimeKind::Local),
            Err(local_err) => Err(Error::RuntimeUnavailable(format!(
                "no runtime can start here. docker: {docker_err}. local: {local_err}"
            ))),
        },
    }
}

/// The flags of `ms2m-service` for one instance (see rust/service/src/main.rs).
/// What an instance prints once it consumes its control queue (the contract's readiness).
pub(crate) const READY_LINE: &str = "ms2m-service ready";
/// Longest wait for an instance to be ready.
pub(crate) const INSTANCE_STARTUP: std::time::Duration = std::time::Duration::from_secs(60);

/// What an instance runs.
pub enum Program {
    /// The reference service, with these flags.
    Reference(Vec<String>),
    /// The service's own program and arguments (docker: instead of the image's entrypoint).
    Command(Vec<String>),
    /// The service's own image, as it is (docker only).
    Image,
}

/// How to start an instance.
pub struct Launch {
    pub program: Program,
    /// The contract's `MS2M_*` variables, then the service's own.
    pub env: Vec<(String, String)>,
    pub live: bool,
}

/// The contract's environment: the instance's parameters as `MS2M_*` variables (what the
/// reference service also takes as flags), then the service's own variables.
fn instance_env(
    spec: &ServiceSpec,
    instance: &str,
    amqp_url: &str,
    live: bool,
    host: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("MS2M_AMQP_URL", amqp_url.to_string()),
        ("MS2M_SERVICE", spec.name.clone()),
        ("MS2M_INSTANCE", instance.to_string()),
        ("MS2M_HOST", host.to_string()),
        ("MS2M_PROCESSING_MS", spec.processing_ms.to_string()),
        ("MS2M_STATE_BYTES", spec.state_bytes.to_string()),
        ("MS2M_PREFETCH", spec.prefetch.to_string()),
        ("MS2M_MAX_SEQ_GAP", spec.max_seq_gap.to_string()),
        ("MS2M_LIVE", if live { "1" } else { "0" }.to_string()),
        (
            "MS2M_DURABLE",
            if spec.durable { "1" } else { "0" }.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The reference service's flags for one instance.
fn instance_args(spec: &ServiceSpec, instance: &str, amqp_url: &str, live: bool) -> Vec<String> {
    let mut args = vec![
        "--amqp-url".to_string(),
        amqp_url.to_string(),
        "--service".into(),
        spec.name.clone(),
        "--instance".into(),
        instance.to_string(),
        "--processing-ms".into(),
        spec.processing_ms.to_string(),
        "--state-bytes".into(),
        spec.state_bytes.to_string(),
        "--prefetch".into(),
        spec.prefetch.to_string(),
        "--max-seq-gap".into(),
        spec.max_seq_gap.to_string(),
    ];
    if live {
        args.push("--live".into());
    }
    if spec.durable {
        args.push("--durable".into());
    }
    args
}

/// What [`cleanup_leftovers`] removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Cleanup {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    /// Local processes (pid and program) of the local runtime.
    pub processes: Vec<String>,
    /// What the journals of dead drivers' testbeds led to (see [`crate::journal`]): kept
    /// testbeds repaired, an external broker's queues deleted.
    pub repaired: Vec<String>,
}

/// Removes what crashed ms2m runs left (all ms2m leftovers with `all`): containers and
/// networks where a Docker daemon answers, local-runtime processes and directories, and an
/// external broker's queues. A kept testbed whose driver died is repaired and left running
/// (one instance serving per service) unless `all`.
pub async fn cleanup_leftovers(all: bool) -> Result<Cleanup> {
    api_shim::remove_stale();
    let recovered = crate::journal::recover(all).await;
    let mut out = Cleanup {
        processes: local::cleanup_leftovers(all, &recovered.spared)?,
        repaired: recovered.done,
        ..Cleanup::default()
    };
    if docker::ensure_docker().await.is_ok() {
        let (containers, networks) = docker::cleanup_leftovers(all, &recovered.spared).await?;
        out.containers = containers;
        out.networks = networks;
    }
    // Last: a dead driver's instances no longer consume the queues it left.
    crate::journal::forget(recovered.gone, &mut out.repaired).await;
    Ok(out)
}

/// Parses `rabbitmqctl list_queues name messages` output: one "name<TAB>count" per line.
pub(crate) fn parse_queue_list(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let n = it.next()?.parse().ok()?;
            Some((name.to_string(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_list_is_parsed_and_headers_skipped() {
        let q = parse_queue_list("name\tmessages\nsvc.primary\t3\namq.gen-x\t0\n");
        assert_eq!(
            q,
            [("svc.primary".to_string(), 3), ("amq.gen-x".to_string(), 0)]
        );
    }
}
