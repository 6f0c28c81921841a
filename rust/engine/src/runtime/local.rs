//! The local runtime: the broker is Debian's `rabbitmq-server` started on free loopback ports
//! in a temporary directory, and every service instance is an `ms2m-service` subprocess. A
//! "host" is only a name here: all instances share this machine.
//!
//! Every process started carries `MS2M_TESTBED` and `MS2M_OWNER_PID` in its environment so
//! that [`cleanup_leftovers`] can find what a crashed run left. Processes are killed explicitly
//! by [`LocalRuntime::shutdown`]; `kill_on_drop` is the backstop.

use super::BrokerEndpoint;
use crate::config::TestbedConfig;
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

const MARK_TESTBED: &str = "MS2M_TESTBED";
const MARK_OWNER: &str = "MS2M_OWNER_PID";
const DEFAULT_RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const HOW_TO_GET_RABBITMQ: &str = "install Debian's rabbitmq-server (`apt-get install \
     rabbitmq-server`; `make setup` does), set MS2M_RABBITMQ_SERVER to its rabbitmq-server \
     script, or give an external broker with amqp_url";
use super::{INSTANCE_STARTUP, READY_LINE};
const BROKER_STOP: Duration = Duration::from_secs(15);

fn rabbitmq_server() -> PathBuf {
    std::env::var_os("MS2M_RABBITMQ_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_RABBITMQ_SERVER.into())
}

/// The `ms2m-service` binary instances run: the configured one, `$MS2M_SERVICE_BIN`,
/// `ms2m-service` on PATH, or this checkout's release build.
pub fn service_binary(cfg: &TestbedConfig) -> Result<PathBuf> {
    if let Some(bin) = cfg
        .service_binary
        .clone()
        .or_else(|| std::env::var("MS2M_SERVICE_BIN").ok())
    {
        return Ok(bin.into());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("ms2m-service"))
            .find(|p| p.is_file())
    });
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/ms2m-service");
    on_path
        .or_else(|| built.is_file().then_some(built))
        .ok_or_else(|| {
            Error::RuntimeUnavailable(
                "the local runtime needs the ms2m-service binary: build it with `cargo build \
                 --release -p ms2m-service` (`make setup` does), or set MS2M_SERVICE_BIN"
                    .into(),
            )
        })
}

/// Whether the local runtime can start here (the error says what is missing); the service
/// binary it would run.
pub fn check_available(cfg: &TestbedConfig) -> Result<PathBuf> {
    let binary = service_binary(cfg)?;
    if cfg.amqp_url.is_none() && !rabbitmq_server().is_file() {
        return Err(Error::RuntimeUnavailable(format!(
            "{} is not installed; {HOW_TO_GET_RABBITMQ}",
            rabbitmq_server().display()
        )));
    }
    Ok(binary)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    Ok(l.local_addr()
        .map_err(io_err("finding a free port"))?
        .port())
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(12).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("{} says:\n{}", path.display(), tail.join("\n"))
}

async fn epmd_running() -> bool {
    Command::new("epmd")
        .arg("-names")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

struct LocalBroker {
    child: Child,
    ctl: PathBuf,
    env: Vec<(String, String)>,
    /// Erlang's port mapper was started by this broker (and goes with it).
    started_epmd: bool,
}

pub struct LocalRuntime {
    testbed_id: String,
    dir: PathBuf,
    service_binary: PathBuf,
    broker_program: String,
    broker: Mutex<Option<LocalBroker>>,
    instances: Mutex<HashMap<String, Child>>,
    kept: AtomicBool,
}

impl LocalRuntime {
    /// Starts the broker process (unless `cfg.amqp_url` names an external broker) and waits
    /// until it listens.
    pub async fn start(cfg: &TestbedConfig, testbed_id: &str) -> Result<(Self, BrokerEndpoint)> {
        let service_binary = check_available(cfg)?;
        let dir = std::env::temp_dir().join(format!("ms2m-{testbed_id}"));
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        std::fs::write(dir.join("owner"), std::process::id().to_string())
            .map_err(io_err(format!("writing {}", dir.display())))?;
        let rt = LocalRuntime {
            testbed_id: testbed_id.to_string(),
            dir,
            service_binary,
            broker_program: rabbitmq_server().display().to_string(),
            broker: Mutex::new(None),
            instances: Mutex::new(HashMap::new()),
            kept: AtomicBool::new(false),
        };
        let url = match &cfg.amqp_url {
            Some(url) => url.clone(),
            None => {
                let deadline = Duration::from_secs_f64(cfg.broker_startup_timeout_s);
                let user = super::BrokerUser::generate();
                let (broker, port) = rt.start_broker(deadline, &user).await?;
                *rt.broker.lock().await = Some(broker);
                user.url(&format!("127.0.0.1:{port}"))
            }
        };
        let endpoint = BrokerEndpoint {
            url: url.clone(),
            internal_url: url,
        };
        Ok((rt, endpoint))
    }

    fn marks(&self, cmd: &mut Command) {
        cmd.env(MARK_TESTBED, &self.testbed_id)
            .env(MARK_OWNER, std::process::id().to_string())
            .kill_on_drop(true)
            .stdin(Stdio::null());
    }

    async fn start_broker(
        &self,
        deadline: Duration,
        user: &super::BrokerUser,
    ) -> Result<(LocalBroker, u16)> {
        let (port, dist_port) = (free_port()?, free_port()?);
        let d = &self.dir;
        let write = |name: &str, text: &str| {
            std::fs::write(d.join(name), text).map_err(io_err(format!("writing {name}")))
        };
        // As in the broker image: checkpoints of up to 64 MiB travel through the broker.
        write(
            "rabbitmq.conf",
            "loopback_users = none\nmax_message_size = 134217728\n",
        )?;
        write("enabled_plugins", "[].\n")?;
        // An empty env file, so that /etc/rabbitmq/rabbitmq-env.conf cannot override ours.
        write("rabbitmq-env.conf", "")?;
        let path = |name: &str| d.join(name).display().to_string();
        let env: Vec<(String, String)> = [
            ("HOME", path("")),
            (
                "RABBITMQ_NODENAME",
                format!("ms2m-{}@localhost", self.testbed_id),
            ),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", port.to_string()),
            ("RABBITMQ_DIST_PORT", dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("RABBITMQ_PID_FILE", path("broker.pid")),
            (super::BROKER_ERL_ARGS.0, user.erl_args()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let log_path = d.join("broker.log");
        let log = std::fs::File::create(&log_path).map_err(io_err("creating broker.log"))?;
        let err = log.try_clone().map_err(io_err("opening broker.log"))?;
        let started_epmd = !epmd_running().await;
        let mut cmd = Command::new(rabbitmq_server());
        cmd.current_dir(d)
            .envs(env.iter().cloned())
            // Makes the script exec the Erlang VM instead of supervising it from a shell: the
            // child we hold is then the broker itself, and SIGTERM stops it cleanly.
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .stdout(log)
            .stderr(err);
        self.marks(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            Error::RuntimeUnavailable(format!(
                "cannot start {}: {e}; {HOW_TO_GET_RABBITMQ}",
                self.broker_program
            ))
        })?;
        let start = tokio::time::Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::RuntimeUnavailable(format!(
                    "the local broker exited ({status}) before accepting connections; {}",
                    tail(&log_path)
                )));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if start.elapsed() > deadline {
                let _ = child.kill().await;
                return Err(Error::RuntimeUnavailable(format!(
                    "the local broker did not listen on port {port} within {:.0} s; {}",
                    deadline.as_secs_f64(),
                    tail(&log_path)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let broker = LocalBroker {
            child,
            ctl: rabbitmq_server().with_file_name("rabbitmqctl"),
            env,
            started_epmd,
        };
        Ok((broker, port))
    }

    /// Starts one instance and waits until it prints that it is ready for commands.
    pub async fn start_instance(
        &self,
        spec: &crate::config::ServiceSpec,
        instance: &str,
        host: &str,
        launch: super::Launch,
    ) -> Result<()> {
        let log_path = self.dir.join(format!("{instance}.log"));
        let mut log = std::fs::File::create(&log_path)
            .map_err(io_err(format!("creating {}", log_path.display())))?;
        let err = log
            .try_clone()
            .map_err(io_err("opening the instance log"))?;
        let (program, args) = match launch.program {
            super::Program::Reference(args) => (self.service_binary.clone(), args),
            super::Program::Command(mut c) => (PathBuf::from(c.remove(0)), c),
            super::Program::Image => {
                return Err(Error::Config(format!(
                    "{} has an image but no command: the local runtime runs commands",
                    spec.name
                )))
            }
        };
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .envs(launch.env)
            .stdout(Stdio::piped())
            .stderr(err);
        self.marks(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            Error::RuntimeUnavailable(format!(
                "cannot start {} for instance {instance}: {e}",
                program.display()
            ))
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(INSTANCE_STARTUP, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log, "{line}");
                if line.contains(READY_LINE) {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            let _ = child.kill().await;
            let why = match ready {
                Err(_) => format!("was not ready within {} s", INSTANCE_STARTUP.as_secs()),
                _ => "exited before it was ready".to_string(),
            };
            return Err(Error::NotReady(format!(
                "instance {instance} of {} on {host} ({}) {why}: the testbed waits for \
                 {READY_LINE:?} on its stdout (rust/wire/README.md); {}",
                spec.name,
                program.display(),
                tail(&log_path)
            )));
        }
        // Keep copying what the instance prints, for debugging.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(log, "{line}");
            }
        });
        self.instances
            .lock()
            .await
            .insert(instance.to_string(), child);
        Ok(())
    }

    /// Kills an instance's process at once (SIGKILL), as a crash would.
    pub async fn kill_instance(&self, instance: &str) -> Result<()> {
        if let Some(c) = self.instances.lock().await.get_mut(instance) {
            c.kill()
                .await
                .map_err(io_err(format!("killing {instance}")))?;
        }
        Ok(())
    }

    pub async fn is_running(&self, instance: &str) -> bool {
        match self.instances.lock().await.get_mut(instance) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub async fn wait_until_exited(&self, instance: &str) {
        loop {
            let exited = self
                .instances
                .lock()
                .await
                .get_mut(instance)
                .map(|c| !matches!(c.try_wait(), Ok(None)));
            if exited == Some(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the instance's process if it still runs and forgets it.
    pub async fn remove_instance(&self, instance: &str) -> Result<()> {
        let c = self.instances.lock().await.remove(instance);
        if let Some(mut c) = c {
            c.kill()
                .await
                .map_err(io_err(format!("removing {instance}")))?;
        }
        Ok(())
    }

    /// Runs `rabbitmqctl` against the local broker; returns its standard output, or None when
    /// this runtime did not start the broker.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<Option<String>> {
        let guard = self.broker.lock().await;
        let Some(b) = guard.as_ref() else {
            return Ok(None);
        };
        let out = Command::new(&b.ctl)
            .args(args)
            .envs(b.env.iter().cloned())
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io_err(format!("running {}", b.ctl.display())))?;
        if !out.status.success() {
            return Err(Error::RuntimeUnavailable(format!(
                "rabbitmqctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    pub fn broker_program(&self) -> String {
        format!("local {}", self.broker_program)
    }

    pub fn service_binary(&self) -> String {
        format!("local {}", self.service_binary.display())
    }

    /// Leaves every process running after this process ends (`cleanup --all` removes them).
    pub fn keep(&self) {
        self.kept.store(true, Ordering::SeqCst);
        // Forgetting the handles disarms kill_on_drop.
        if let Ok(mut instances) = self.instances.try_lock() {
            for (_, c) in instances.drain() {
                std::mem::forget(c);
            }
        }
        if let Ok(mut broker) = self.broker.try_lock() {
            if let Some(b) = broker.take() {
                std::mem::forget(b);
            }
        }
    }

    /// Kills every instance, stops the broker (SIGTERM, then SIGKILL) and removes the
    /// temporary directory.
    pub async fn shutdown(&self) -> Result<()> {
        let instances: Vec<_> = self.instances.lock().await.drain().collect();
        for (_, mut c) in instances {
            let _ = c.kill().await;
        }
        if let Some(mut b) = self.broker.lock().await.take() {
            if let Some(pid) = b.child.id() {
                // SAFETY: kill(2) on the pid of a child we hold and have not reaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
            if tokio::time::timeout(BROKER_STOP, b.child.wait())
                .await
                .is_err()
            {
                let _ = b.child.kill().await;
            }
            if b.started_epmd {
                stop_idle_epmd().await;
            }
        }
        std::fs::remove_dir_all(&self.dir)
            .map_err(io_err(format!("removing {}", self.dir.display())))
    }
}

impl Drop for LocalRuntime {
    fn drop(&mut self) {
        if !self.kept.load(Ordering::SeqCst) {
            // The processes go with their handles (kill_on_drop); their directory goes here.
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Stops Erlang's port mapper when no node is registered with it any more.
async fn stop_idle_epmd() {
    let names = Command::new("epmd").arg("-names").output().await;
    let idle = names.is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("name "));
    if idle {
        let _ = Command::new("epmd")
            .arg("-kill")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
    }
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The value of `key` in process `pid`'s environment, if it can be read.
fn environ_var(environ: &[u8], key: &str) -> Option<String> {
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

/// Every process whose environment this user may read: its pid, its `/proc` folder and its
/// environment.
fn processes() -> impl Iterator<Item = (u32, PathBuf, Vec<u8>)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flat_map(|procs| procs.flatten())
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            Some((pid, entry.path(), environ))
        })
}

/// Kills instance `instance` of local testbed `testbed` (a kept one whose driver died).
pub fn kill_instance_of(testbed: &str, instance: &str) {
    for (pid, _, environ) in processes() {
        let mine = environ_var(&environ, MARK_TESTBED).as_deref() == Some(testbed)
            && environ_var(&environ, "MS2M_INSTANCE").as_deref() == Some(instance);
        if mine {
            // SAFETY: kill(2) with a pid read from /proc; at worst the process is gone.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Kills the processes of local testbeds whose owning process is gone (all of them with
/// `all`), except those of the `spared` testbeds, and removes their temporary directories;
/// returns what it killed.
pub fn cleanup_leftovers(all: bool, spared: &HashSet<String>) -> Result<Vec<String>> {
    let me = std::process::id();
    let mut killed = Vec::new();
    for (pid, path, environ) in processes() {
        let var = |key: &str| environ_var(&environ, key);
        let (Some(testbed), Some(owner)) = (var(MARK_TESTBED), var(MARK_OWNER)) else {
            continue;
        };
        let owner_alive = owner.parse().is_ok_and(pid_alive);
        if pid == me || ((owner_alive || spared.contains(&testbed)) && !all) {
            continue;
        }
        let program = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        // SAFETY: kill(2) with a pid read from /proc; at worst the process is already gone.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
            killed.push(format!("{pid} {} (testbed {testbed})", program.trim()));
        }
    }
    if let Ok(dirs) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dirs.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("ms2m-tb") {
                continue;
            }
            let owner = std::fs::read_to_string(entry.path().join("owner")).unwrap_or_default();
            let owner_alive = owner.trim().parse().is_ok_and(pid_alive);
            let kept = name
                .to_str()
                .and_then(|n| n.strip_prefix("ms2m-"))
                .is_some_and(|t| spared.contains(t));
            if all || !(owner_alive || kept) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(killed)
}
