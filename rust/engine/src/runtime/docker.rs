//! The docker runtime: the broker and every service instance are containers started with
//! testcontainers on a Docker network that belongs to the testbed.
//!
//! Everything started is labelled (`ms2m.testbed`, `ms2m.role`, `ms2m.pid`, ...) so that
//! [`cleanup_leftovers`] can find what a crashed run left. Containers are removed explicitly by
//! [`DockerRuntime::shutdown`]; testcontainers' `Drop` is the backstop. Set
//! `TESTCONTAINERS_COMMAND=keep` to keep the containers for debugging.

use super::{api_shim, BrokerEndpoint, Launch, Program, INSTANCE_STARTUP, READY_LINE};
use crate::config::{ServiceSpec, TestbedConfig};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::time::Duration;
use testcontainers::bollard::{self, query_parameters as qp, Docker};
use testcontainers::core::{ExecCommand, IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Mutex, OnceCell};

const LABEL_TESTBED: &str = "ms2m.testbed";
const AMQP_PORT: u16 = 5672;
const HOW_TO_GET_DOCKER: &str = "start a Docker engine (on Debian: `apt-get install docker.io` \
     then `dockerd &`), or run `make setup`, which does both and builds the images";

fn docker_err(what: &str) -> impl Fn(testcontainers::TestcontainersError) -> Error + '_ {
    move |e| Error::docker(what, e)
}

fn daemon_socket() -> std::path::PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(Into::into))
        .unwrap_or_else(|| "/var/run/docker.sock".into())
}

/// A client for the daemon itself (not through testcontainers), version negotiated.
async fn daemon() -> Result<Docker> {
    let socket = daemon_socket();
    let unavailable = |e: bollard::errors::Error| {
        Error::RuntimeUnavailable(format!(
            "no Docker daemon answers at {}: {e}; {HOW_TO_GET_DOCKER}",
            socket.display()
        ))
    };
    Docker::connect_with_unix(&socket.to_string_lossy(), 30, bollard::API_DEFAULT_VERSION)
        .map_err(unavailable)?
        .negotiate_version()
        .await
        .map_err(unavailable)
}

static DOCKER_READY: OnceCell<std::result::Result<(), String>> = OnceCell::const_new();

/// Checks that a daemon answers and, if it speaks an older API than testcontainers, routes
/// testcontainers through the [`api_shim`]. Done once per process.
pub async fn ensure_docker() -> Result<()> {
    DOCKER_READY
        .get_or_init(|| async {
            let docker = daemon().await.map_err(|e| e.to_string())?;
            let version = docker.version().await.map_err(|e| {
                format!("the Docker daemon did not report its version: {e}; {HOW_TO_GET_DOCKER}")
            })?;
            let daemon_api = version.api_version.unwrap_or_default();
            let client_api = format!(
                "{}.{}",
                bollard::API_DEFAULT_VERSION.major_version,
                bollard::API_DEFAULT_VERSION.minor_version
            );
            if api_lt(&daemon_api, &client_api) {
                let path = api_shim::start(daemon_socket(), &client_api, &daemon_api)
                    .map_err(|e| format!("cannot start the Docker API shim: {e}"))?;
                // testcontainers reads DOCKER_HOST when its client is first created, which has
                // not happened yet in this process (this runs before any container starts).
                std::env::set_var("DOCKER_HOST", format!("unix://{}", path.display()));
            }
            Ok(())
        })
        .await
        .clone()
        .map_err(Error::RuntimeUnavailable)
}

/// The daemon's engine version, for reports.
pub async fn daemon_version() -> Option<String> {
    daemon().await.ok()?.version().await.ok()?.version
}

/// Compares "1.41" < "1.52" numerically.
fn api_lt(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> (u32, u32) {
        let mut it = v.split('.').map(|x| x.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    parse(a) < parse(b)
}

/// Whether this host routes to a container address: a connection is accepted or refused
/// (nothing listens yet) rather than timing out.
async fn reachable(ip: std::net::IpAddr) -> bool {
    let connect = tokio::net::TcpStream::connect((ip, AMQP_PORT));
    match tokio::time::timeout(Duration::from_secs(1), connect).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

/// Refuses to start when an image is missing, with the command that builds it.
async fn require_image(docker: &Docker, image: &str) -> Result<()> {
    docker.inspect_image(image).await.map(|_| ()).map_err(|_| {
        Error::RuntimeUnavailable(format!(
            "image {image} is not on this Docker engine; build the testbed images with \
             `make images` (testbeds/images/build.sh), or point MS2M_BROKER_IMAGE / \
             MS2M_SERVICE_IMAGE at images you have"
        ))
    })
}

/// The last lines a container printed (stdout and stderr).
async fn log_tail(container: &ContainerAsync<GenericImage>) -> String {
    let mut text =
        String::from_utf8_lossy(&container.stdout_to_vec().await.unwrap_or_default()).into_owned();
    text.push_str(&String::from_utf8_lossy(
        &container.stderr_to_vec().await.unwrap_or_default(),
    ));
    let lines: Vec<&str> = text.lines().rev().take(12).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    if tail.is_empty() {
        "(nothing)".into()
    } else {
        tail.join("\n")
    }
}

fn generic(image: &str) -> GenericImage {
    let (name, tag) = match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (image, "latest"),
    };
    GenericImage::new(name, tag)
}

/// The cgroup the testbed's containers run under (cgroupfs driver), and its CPU weight
/// against the processes of the root cgroup (dockerd, containerd, runc: 1024 each in v1).
const CGROUP_PARENT: &str = "ms2m";
const CPU_SHARES_V1: &str = "8192";
const CPU_WEIGHT_V2: &str = "800";
/// Within that cgroup: a migration target while it starts, and any instance (Docker's
/// default) once it is ready.
const TARGET_CPU_SHARES: i64 = 2;
const INSTANCE_CPU_SHARES: i64 = 1024;

/// Gives the testbed's containers precedence for CPU over the container engine's own work.
///
/// On the papers' testbeds the target starts on another machine; here starting its container
/// (dockerd, containerd, runc, iptables) competes for the two cores with the source that
/// keeps serving, and shows up as downtime that a real migration would not have. Only with
/// the cgroupfs driver and where this process may write the cgroup (root); returns whether
/// containers should use the parent.
async fn prioritize_containers(docker: &Docker) -> bool {
    let cgroupfs = docker.info().await.ok().and_then(|i| i.cgroup_driver)
        == Some(bollard::models::SystemInfoCgroupDriverEnum::CGROUPFS);
    if !cgroupfs {
        return false;
    }
    let root = std::path::Path::new("/sys/fs/cgroup");
    let (dir, file, value) = if root.join("cpu").is_dir() {
        (
            root.join("cpu").join(CGROUP_PARENT),
            "cpu.shares",
            CPU_SHARES_V1,
        )
    } else {
        (root.join(CGROUP_PARENT), "cpu.weight", CPU_WEIGHT_V2)
    };
    // Docker creates the parent itself if this fails; the containers then only lose the weight.
    let _ = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join(file), value));
    true
}

pub struct DockerRuntime {
    testbed_id: String,
    /// cgroup parent of every container (see [`prioritize_containers`]).
    cgroup_parent: Option<String>,
    network: String,
    service_image: String,
    broker_name: String,
    broker: Mutex<Option<ContainerAsync<GenericImage>>>,
    instances: Mutex<HashMap<String, ContainerAsync<GenericImage>>>,
}

impl Drop for DockerRuntime {
    /// testcontainers removes (or, with `TESTCONTAINERS_COMMAND=keep`, keeps) a container in its
    /// `Drop` through the current tokio runtime, and panics where there is none: a testbed never
    /// closed is dropped at a Python interpreter's exit, outside any runtime, and a panic there
    /// aborts the user's process. Dropped outside one, the containers go on a runtime of their
    /// own.
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        let broker = self.broker.get_mut().take();
        let instances = std::mem::take(self.instances.get_mut());
        if broker.is_none() && instances.is_empty() {
            return;
        }
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                let _inside = rt.enter();
                drop(instances);
                drop(broker);
            }
            // Nothing to remove them with: leak them rather than abort (the reaper and
            // `python -m ms2m cleanup` remove them).
            Err(_) => std::mem::forget((broker, instances)),
        }
    }
}

impl DockerRuntime {
    /// Starts the broker container (unless `cfg.amqp_url` names an external broker).
    pub async fn start(cfg: &TestbedConfig, testbed_id: &str) -> Result<(Self, BrokerEndpoint)> {
        ensure_docker().await?;
        let docker = daemon().await?;
        if cfg.amqp_url.is_none() {
            require_image(&docker, &cfg.broker_image).await?;
        }
        require_image(&docker, &cfg.service_image).await?;
        let network = format!("ms2m-{testbed_id}");
        let broker_name = format!("ms2m-{testbed_id}-broker");
        let cgroup_parent = prioritize_containers(&docker)
            .await
            .then(|| format!("/{CGROUP_PARENT}"));
        let rt = DockerRuntime {
            testbed_id: testbed_id.to_string(),
            cgroup_parent: cgroup_parent.clone(),
            network: network.clone(),
            service_image: cfg.service_image.clone(),
            broker_name: broker_name.clone(),
            broker: Mutex::new(None),
            instances: Mutex::new(HashMap::new()),
        };
        if let Some(url) = &cfg.amqp_url {
            // Instances reach the external broker from the testbed's network (testcontainers
            // creates it with the first instance).
            let endpoint = BrokerEndpoint {
                url: url.clone(),
                internal_url: url.clone(),
            };
            return Ok((rt, endpoint));
        }
        let user = super::BrokerUser::generate();
        let container = generic(&cfg.broker_image)
            .with_exposed_port(AMQP_PORT.tcp())
            .with_wait_for(WaitFor::Nothing)
            .with_network(network)
            .with_container_name(&broker_name)
            .with_labels(rt.labels("broker", &[]))
            .with_env_var(super::BROKER_ERL_ARGS.0, user.erl_args())
            .with_host_config_modifier(move |hc| {
                hc.cgroup_parent = cgroup_parent.clone();
                // Publish on loopback only: the broker is for this machine's tests.
                let binding = bollard::models::PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: Some(String::new()),
                };
                hc.port_bindings = Some(HashMap::from([(
                    format!("{AMQP_PORT}/tcp"),
                    Some(vec![binding]),
                )]));
            })
            .start()
            .await
            .map_err(docker_err("starting the broker container"))?;
        let port = container
            .get_host_port_ipv4(AMQP_PORT.tcp())
            .await
            .map_err(docker_err("reading the broker's published port"))?;
        // Where the host reaches the container's bridge address (Linux), it talks to the broker
        // directly: the published port goes through docker-proxy, a user-space copy of every
        // byte that costs latency and CPU under load.
        let direct = match container.get_bridge_ip_address().await {
            Ok(ip) if reachable(ip).await => Some(ip),
            _ => None,
        };
        *rt.broker.lock().await = Some(container);
        let url = match direct {
            Some(ip) => user.url(&format!("{ip}:{AMQP_PORT}")),
            None => user.url(&format!("127.0.0.1:{port}")),
        };
        let endpoint = BrokerEndpoint {
            url,
            internal_url: user.url(&format!("{broker_name}:{AMQP_PORT}")),
        };
        Ok((rt, endpoint))
    }

    /// The address the testbed network's containers reach this machine on: its gateway.
    /// The network exists once the broker container has started on it.
    pub async fn host_address(&self) -> Result<std::net::IpAddr> {
        let net = daemon()
            .await?
            .inspect_network(&self.network, None::<qp::InspectNetworkOptions>)
            .await
            .map_err(|e| Error::docker(format!("inspecting network {}", self.network), e))?;
        net.ipam
            .and_then(|i| i.config)
            .into_iter()
            .flatten()
            .find_map(|c| c.gateway.and_then(|g| g.parse().ok()))
            .ok_or_else(|| {
                Error::RuntimeUnavailable(format!(
                    "network {} has no IPv4 gateway for the link relays to listen on",
                    self.network
                ))
            })
    }

    /// An instance's address on the testbed network, where this machine and the other
    /// containers reach it.
    pub async fn instance_address(&self, instance: &str) -> Result<std::net::IpAddr> {
        let id = match self.instances.lock().await.get(instance) {
            Some(c) => c.id().to_string(),
            None => {
                return Err(Error::RuntimeUnavailable(format!(
                    "instance {instance} is not running"
                )))
            }
        };
        let info = daemon()
            .await?
            .inspect_container(&id, None::<qp::InspectContainerOptions>)
            .await
            .map_err(|e| Error::docker(format!("inspecting {instance}"), e))?;
        info.network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(&self.network))
            .and_then(|e| e.ip_address)
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| {
                Error::RuntimeUnavailable(format!(
                    "instance {instance} has no address on network {}",
                    self.network
                ))
            })
    }

    fn labels(&self, role: &str, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut l = HashMap::from([
            (LABEL_TESTBED.to_string(), self.testbed_id.clone()),
            ("ms2m.role".to_string(), role.to_string()),
            ("ms2m.pid".to_string(), std::process::id().to_string()),
        ]);
        for (k, v) in extra {
            l.insert(format!("ms2m.{k}"), v.to_string());
        }
        l
    }

    /// Starts one instance of `spec` on `host` and waits until it is ready for commands.
    pub async fn start_instance(
        &self,
        spec: &ServiceSpec,
        instance: &str,
        host: &str,
        launch: Launch,
    ) -> Result<()> {
        let image = spec.image.as_deref().unwrap_or(&self.service_image);
        if spec.image.is_some() {
            require_image(&daemon().await?, image).await?;
        }
        // A target starts on "another host": its start-up must not take CPU from the source.
        // Once it is ready it gets the weight of any instance.
        let shares = (!launch.live).then_some(TARGET_CPU_SHARES);
        let (img, cmd) = match launch.program {
            Program::Reference(args) => (generic(image), Some(args)),
            Program::Command(mut cmd) => {
                let program = cmd.remove(0);
                (generic(image).with_entrypoint(&program), Some(cmd))
            }
            Program::Image => (generic(image), None),
        };
        let mut request = img
            .with_cmd(cmd.unwrap_or_default())
            .with_network(&self.network)
            .with_container_name(format!("ms2m-{}-{instance}", self.testbed_id))
            .with_hostname(host)
            .with_labels(self.labels(
                "instance",
                &[
                    ("service", &spec.name),
                    ("instance", instance),
                    ("host", host),
                ],
            ))
            .with_host_config_modifier({
                let parent = self.cgroup_parent.clone();
                move |hc| {
                    hc.cgroup_parent = parent.clone();
                    hc.cpu_shares = shares;
                }
            });
        for (k, v) in launch.env {
            request = request.with_env_var(k, v);
        }
        let container = request.start().await.map_err(docker_err(&format!(
            "starting instance {instance} on {host}"
        )))?;
        // Waited for here rather than by testcontainers, so that a failure can quote the log.
        let ready = tokio::time::timeout(INSTANCE_STARTUP, async {
            let mut lines = container.stdout(true).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(READY_LINE) {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            let why = match ready {
                Err(_) => format!("was not ready within {} s", INSTANCE_STARTUP.as_secs()),
                _ => "exited before it was ready".to_string(),
            };
            let log = log_tail(&container).await;
            let _ = container.rm().await;
            return Err(Error::NotReady(format!(
                "instance {instance} of {} on {host} ({image}) {why}: the testbed waits for \
                 {READY_LINE:?} on its stdout (rust/wire/README.md); the last lines of its \
                 log:\n{log}",
                spec.name
            )));
        }
        let id = container.id().to_string();
        self.instances
            .lock()
            .await
            .insert(instance.to_string(), container);
        if shares.is_some() {
            self.set_cpu_shares(instance, &id, INSTANCE_CPU_SHARES)
                .await?;
        }
        Ok(())
    }

    async fn set_cpu_shares(&self, instance: &str, id: &str, shares: i64) -> Result<()> {
        let body = bollard::models::ContainerUpdateBody {
            cpu_shares: Some(shares),
            ..Default::default()
        };
        daemon()
            .await?
            .update_container(id, body)
            .await
            .map_err(|e| Error::docker(format!("setting the CPU weight of {instance}"), e))
    }

    /// Kills an instance's process at once (SIGKILL), as a crash would.
    pub async fn kill_instance(&self, instance: &str) -> Result<()> {
        if let Some(c) = self.instances.lock().await.get(instance) {
            c.stop_with_timeout(Some(0))
                .await
                .map_err(docker_err(&format!("killing {instance}")))?;
        }
        Ok(())
    }

    /// Whether an instance's container runs; false for one never started or already removed.
    pub async fn is_running(&self, instance: &str) -> bool {
        match self.instances.lock().await.get(instance) {
            Some(c) => c.is_running().await.unwrap_or(false),
            None => false,
        }
    }

    /// Resolves once a started instance's container has stopped; pends for one not started.
    pub async fn wait_until_exited(&self, instance: &str) {
        loop {
            let state = match self.instances.lock().await.get(instance) {
                Some(c) => Some(c.is_running().await.unwrap_or(false)),
                None => None,
            };
            if state == Some(false) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Removes an instance's container.
    pub async fn remove_instance(&self, instance: &str) -> Result<()> {
        let c = self.instances.lock().await.remove(instance);
        if let Some(c) = c {
            c.rm()
                .await
                .map_err(docker_err(&format!("removing {instance}")))?;
        }
        Ok(())
    }

    /// Runs `rabbitmqctl` in the broker container; returns its standard output, or None when
    /// this runtime did not start the broker.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<Option<String>> {
        let guard = self.broker.lock().await;
        let Some(broker) = guard.as_ref() else {
            return Ok(None);
        };
        let mut cmd = vec!["rabbitmqctl"];
        cmd.extend_from_slice(args);
        let mut res = broker
            .exec(ExecCommand::new(cmd))
            .await
            .map_err(docker_err("running rabbitmqctl in the broker"))?;
        let out = res
            .stdout_to_vec()
            .await
            .map_err(docker_err("reading rabbitmqctl's output"))?;
        Ok(Some(String::from_utf8_lossy(&out).into_owned()))
    }

    /// Removes every container of the testbed (the network goes with the last one).
    pub async fn shutdown(&self) -> Result<()> {
        let instances: Vec<_> = self.instances.lock().await.drain().collect();
        let mut first_err = None;
        for (name, c) in instances {
            if let Err(e) = c.rm().await {
                first_err.get_or_insert(Error::docker(format!("removing {name}"), e));
            }
        }
        if let Some(b) = self.broker.lock().await.take() {
            if let Err(e) = b.rm().await {
                first_err.get_or_insert(Error::docker(format!("removing {}", self.broker_name), e));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Removes one container by name, if it is there (best effort: a repair's step).
pub async fn remove_container_named(name: &str) {
    if let Ok(docker) = daemon().await {
        let _ = docker
            .remove_container(
                name,
                Some(qp::RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await;
    }
}

/// Whether any container of testbed `testbed` exists (None: no Docker daemon answers).
pub async fn testbed_has_containers(testbed: &str) -> Option<bool> {
    let docker = daemon().await.ok()?;
    let list = docker
        .list_containers(Some(qp::ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![format!("{LABEL_TESTBED}={testbed}")],
            )])),
            ..Default::default()
        }))
        .await
        .ok()?;
    Some(!list.is_empty())
}

/// Removes the containers of testbeds whose owning process is gone (all of them with `all`),
/// except those of the `spared` testbeds, and the networks nothing uses any more; returns the
/// names of the containers and networks removed.
pub async fn cleanup_leftovers(
    all: bool,
    spared: &std::collections::HashSet<String>,
) -> Result<(Vec<String>, Vec<String>)> {
    let docker = daemon().await?;
    let list = docker
        .list_containers(Some(qp::ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![LABEL_TESTBED.to_string()],
            )])),
            ..Default::default()
        }))
        .await
        .map_err(|e| Error::docker("listing containers", e))?;
    let (mut containers, mut networks) = (Vec::new(), Vec::new());
    for c in list {
        let labels = c.labels.unwrap_or_default();
        let owner_alive = labels
            .get("ms2m.pid")
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        let kept = labels
            .get(LABEL_TESTBED)
            .is_some_and(|t| spared.contains(t));
        if (owner_alive || kept) && !all {
            continue;
        }
        let id = c.id.unwrap_or_default();
        let name = c
            .names
            .and_then(|n| n.first().cloned())
            .unwrap_or_else(|| id.clone());
        docker
            .remove_container(
                &id,
                Some(qp::RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| Error::docker(format!("removing {name}"), e))?;
        containers.push(name.trim_start_matches('/').to_string());
    }
    let nets = docker
        .list_networks(Some(qp::ListNetworksOptions {
            filters: Some(HashMap::from([(
                "name".to_string(),
                vec!["ms2m-".to_string()],
            )])),
        }))
        .await
        .map_err(|e| Error::docker("listing networks", e))?;
    for n in nets {
        let name = n.name.unwrap_or_default();
        // A network still in use belongs to a live testbed: the daemon refuses to remove it.
        if docker.remove_network(&name).await.is_ok() {
            networks.push(name);
        }
    }
    Ok((containers, networks))
}

#[cfg(test)]
mod tests {
    #[test]
    fn api_versions_compare_numerically() {
        assert!(super::api_lt("1.41", "1.52"));
        assert!(super::api_lt("1.9", "1.41"));
        assert!(!super::api_lt("1.52", "1.52"));
    }

    #[test]
    fn image_names_split_at_the_tag() {
        use testcontainers::Image;
        let g = super::generic("ms2m/rabbitmq:3.10");
        assert_eq!((g.name(), g.tag()), ("ms2m/rabbitmq", "3.10"));
        let g = super::generic("localhost:5000/rabbitmq");
        assert_eq!((g.name(), g.tag()), ("localhost:5000/rabbitmq", "latest"));
    }
}
