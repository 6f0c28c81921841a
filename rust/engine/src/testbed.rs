//! The testbed: a broker, hosts, deployed services, their workloads and recorders, and the
//! migrations between hosts. This is the engine's entry point; the Python module wraps it.

mod conformance;

pub use conformance::RuleOutcome;

use crate::broker::Link;
use crate::checker::{self, ObservedState, TwinState};
use crate::config::{check_host, RuntimeKind, ServiceSpec, TestbedConfig};
use crate::error::{Error, Result};
use crate::history::{History, PublishOutcome, Published, StateRestart};
use crate::journal::{self, Journal};
use crate::net::{self, Links};
use crate::recorder::Recorder;
use crate::report::{Environment, Report, RunRecord};
use crate::runtime::{BrokerEndpoint, Runtime};
use crate::strategies::{
    self, Ctx, Failure, MigrationOptions, Placement, RateProbe, Role, Strategy,
};
use crate::workload::{Workload, WorkloadSpec};
use ms2m_wire::{control::Command, names, now_ns, Mode};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// How clients reach a deployed service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    pub name: String,
    pub host: String,
    pub instance: String,
    /// The broker, from this machine.
    pub amqp_url: String,
    /// Publish work here (fanout; JSON `Input` messages, see rust/wire/README.md).
    pub input_exchange: String,
    /// Instances publish an `OutputEvent` here for every processed message.
    pub output_exchange: String,
}

struct Deployed {
    spec: ServiceSpec,
    /// The instance serving now.
    current: Placement,
    deployed_ns: u64,
    recorder: Recorder,
    workload: Option<Workload>,
    /// Send logs of workloads that have ended.
    past: Vec<Published>,
    next_seq: u64,
    instances_started: u64,
    /// Payload size of this service's workloads: the checker regenerates payloads from it, so
    /// every workload of a service uses the same.
    message_bytes: Option<usize>,
    /// When the last migration's report was taken (its backlog drained), host clock ns: the
    /// next baseline window reaches back no further, or it would measure that migration.
    settled_ns: u64,
    /// The twin kept between migrations (a service of one's own), if one runs.
    twin: Option<Twin>,
    /// Instances started empty in place of a source that died with its state.
    state_restarts: Vec<StateRestart>,
    /// Seqs that will never have a live output event: a takeover's target held them ahead of
    /// the dead source (inclusive ranges). The drain does not wait for them.
    never_live: Vec<(u64, u64)>,
}

/// A twin that has applied the first `fed` entries of the confirmed log (seqs hashing to
/// `fed_hash`): the next check feeds it only what came since, so a check costs what is new,
/// not the service's whole age.
struct Twin {
    fed: usize,
    fed_hash: [u8; 32],
    /// Where its state began (a restart's position; None: at the first seq).
    since: Option<u64>,
}

/// SHA-256 of a log's seqs, in order: what a twin was fed, to tell whether the next log
/// still begins with it.
fn log_hash(log: &[(u64, u64)]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (seq, _) in log {
        h.update(seq.to_le_bytes());
    }
    h.finalize().into()
}

impl Deployed {
    fn history(&self) -> History {
        History {
            published: self.published(),
            events: self.recorder.events(),
            message_bytes: self.message_bytes.unwrap_or(0),
            state_bytes: self.spec.state_bytes,
            state_restarts: self.state_restarts.clone(),
        }
    }

    fn published(&self) -> Vec<Published> {
        let mut all = self.past.clone();
        if let Some(w) = &self.workload {
            all.extend(w.published());
        }
        all
    }
}

/// Where an instance got after [`Testbed::replay_instance`].
struct Replayed {
    last_seq: u64,
    skipped: u64,
    replayed: u64,
    digest: Option<String>,
}

/// A running testbed. Close it with [`Testbed::close`]; dropping it is only a backstop.
pub struct Testbed {
    id: String,
    cfg: TestbedConfig,
    runtime: Runtime,
    endpoint: BrokerEndpoint,
    link: Link,
    /// The hosts' links to the broker's host (shared with blocking tasks that probe).
    links: Arc<Links>,
    docker_version: Option<String>,
    broker_version: Option<String>,
    services: Mutex<HashMap<String, Arc<Mutex<Deployed>>>>,
    /// Every queue name this testbed declared or had declared: what it may leave behind on
    /// an external broker.
    queues_used: Mutex<std::collections::BTreeSet<String>>,
    /// What `cleanup` needs to repair this testbed if its driver dies (see [`journal`]).
    journal: Journal,
    migrations: AtomicU64,
    closed: AtomicBool,
}

/// A migration that did not complete. It was rolled back (the source serves again where it
/// could); `report` is the checked report of the run when the engine could still make one.
#[derive(Debug)]
pub struct MigrationError {
    pub error: Error,
    pub report: Option<Box<Report>>,
}

impl From<Error> for MigrationError {
    fn from(error: Error) -> Self {
        MigrationError {
            error,
            report: None,
        }
    }
}

impl std::fmt::Display for MigrationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for MigrationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

/// Names of one migration, fixed before it starts.
struct MigrationPlan {
    /// The testbed's migration counter.
    number: u64,
    migration_id: String,
    source: Placement,
    target: Placement,
}

/// The drain gives up when no output event arrived for this long: nobody is serving.
const DRAIN_STALL: Duration = Duration::from_secs(10);

/// How long the drain may take: `timeout` beyond what `backlog` messages need at `mu` msg/s.
fn drain_budget(timeout: Duration, backlog: usize, mu: Option<f64>) -> Duration {
    match mu {
        Some(mu) if mu.is_finite() && mu > 0.0 => {
            timeout + Duration::from_secs_f64((backlog as f64 / mu).min(86_400.0))
        }
        _ => timeout,
    }
}

fn fresh_id() -> String {
    // Unique across processes and restarts without a UUID dependency.
    format!(
        "tb{:x}{:04x}",
        now_ns() / 1_000_000 % 0xffff_ffff,
        std::process::id() % 0xffff
    )
}

impl Testbed {
    /// Starts the broker and waits until it accepts connections.
    pub async fn start(cfg: TestbedConfig) -> Result<Testbed> {
        cfg.validate()?;
        let id = fresh_id();
        let (runtime, endpoint) = Runtime::start(&cfg, &id).await?;
        let deadline = Duration::from_secs_f64(cfg.broker_startup_timeout_s);
        let opened = async {
            let link = Link::open(&endpoint.url, deadline).await?;
            let links = start_links(&cfg, &runtime, &endpoint).await?;
            Ok::<_, Error>((link, links))
        };
        let (link, links) = match opened.await {
            Ok((link, links)) => (link, Arc::new(links)),
            Err(e) => {
                let _ = runtime.shutdown().await;
                return Err(e);
            }
        };
        let broker_version = runtime.broker_version().await;
        let docker_version = runtime.docker_version().await;
        let journal = Journal::create(journal::Entry {
            testbed: id.clone(),
            owner: std::process::id(),
            runtime: Some(runtime.kind()),
            amqp_url: endpoint.url.clone(),
            external: cfg.amqp_url.is_some(),
            kept: std::env::var("TESTCONTAINERS_COMMAND").is_ok_and(|v| v == "keep"),
            ..journal::Entry::default()
        });
        Ok(Testbed {
            id,
            cfg,
            runtime,
            endpoint,
            link,
            links,
            docker_version,
            broker_version,
            services: Mutex::new(HashMap::new()),
            queues_used: Mutex::new(Default::default()),
            journal,
            migrations: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &TestbedConfig {
        &self.cfg
    }

    /// The runtime it resolved to (never `Auto`).
    pub fn runtime(&self) -> RuntimeKind {
        self.runtime.kind()
    }

    /// The broker's AMQP URL from this machine.
    pub fn amqp_url(&self) -> &str {
        &self.endpoint.url
    }

    async fn service(&self, name: &str) -> Result<Arc<Mutex<Deployed>>> {
        self.services
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| {
                Error::Config(format!(
                    "no service named {name:?} is deployed on this testbed"
                ))
            })
    }

    fn info(&self, d: &Deployed) -> ServiceInfo {
        ServiceInfo {
            name: d.spec.name.clone(),
            host: d.current.host.clone(),
            instance: d.current.instance.clone(),
            amqp_url: self.endpoint.url.clone(),
            input_exchange: names::input_exchange(&d.spec.name),
            output_exchange: names::output_exchange(&d.spec.name),
        }
    }

    /// Where a service runs now and how to reach it.
    pub async fn service_info(&self, name: &str) -> Result<ServiceInfo> {
        let s = self.service(name).await?;
        let d = s.lock().await;
        Ok(self.info(&d))
    }

    /// Declares the service's topology, starts its recorder and its first instance (live).
    pub async fn deploy(&self, spec: ServiceSpec) -> Result<ServiceInfo> {
        spec.validate(&self.cfg)?;
        crate::config::check_state_fits(spec.state_bytes, crate::config::available_memory())?;
        if self.services.lock().await.contains_key(&spec.name) {
            return Err(Error::Config(format!(
                "a service named {:?} is already deployed",
                spec.name
            )));
        }
        let instance = format!("{}-1", spec.name);
        self.used(vec![
            names::primary_queue(&spec.name),
            names::events_queue(&spec.name),
            names::dead_letter_queue(&spec.name),
            names::control_queue(&spec.name, &instance),
        ])
        .await;
        self.journal.update(|e| {
            e.exchanges.extend([
                names::input_exchange(&spec.name),
                names::output_exchange(&spec.name),
            ])
        });
        self.link.declare_service(&spec.name, spec.durable).await?;
        let started = async {
            let recorder = Recorder::start(&self.endpoint.url, &spec.name, spec.durable).await?;
            let instance_ready = async {
                self.link
                    .declare_control_queue(&spec.name, &instance)
                    .await?;
                self.runtime
                    .start_instance(
                        &spec,
                        &instance,
                        &spec.host,
                        &self.links.url_for(&spec.host, &self.endpoint.internal_url),
                        true,
                    )
                    .await
            };
            match instance_ready.await {
                Ok(()) => Ok(recorder),
                Err(e) => {
                    recorder.stop().await;
                    Err(e)
                }
            }
        };
        let recorder = match started.await {
            Ok(r) => r,
            Err(e) => {
                // Nothing of a service that never served stays on the broker.
                let _ = self.delete_broker_resources(&spec.name, &instance).await;
                return Err(e);
            }
        };
        let d = Deployed {
            current: Placement {
                instance,
                host: spec.host.clone(),
            },
            spec: spec.clone(),
            deployed_ns: now_ns(),
            recorder,
            workload: None,
            past: Vec::new(),
            next_seq: 1,
            instances_started: 1,
            message_bytes: None,
            settled_ns: 0,
            twin: None,
            state_restarts: Vec::new(),
            never_live: Vec::new(),
        };
        let info = self.info(&d);
        self.services
            .lock()
            .await
            .insert(spec.name.clone(), Arc::new(Mutex::new(d)));
        Ok(info)
    }

    /// Starts an open-loop workload against a service (one at a time per service).
    pub async fn start_workload(&self, service: &str, spec: WorkloadSpec) -> Result<()> {
        spec.validate()?;
        let s = self.service(service).await?;
        let mut d = s.lock().await;
        if d.workload.is_some() {
            return Err(Error::Config(format!(
                "a workload is already running against {service:?}; stop it first"
            )));
        }
        if let Some(size) = d.message_bytes.filter(|s| *s != spec.message_bytes) {
            return Err(Error::Config(format!(
                "{service:?} was driven with {size}-byte messages; every workload of a service \
                 keeps one message size (the checker regenerates payloads from it)"
            )));
        }
        let w = Workload::start(
            &self.endpoint.url,
            service,
            spec.clone(),
            d.next_seq,
            d.spec.durable,
        )
        .await?;
        d.message_bytes = Some(spec.message_bytes);
        d.workload = Some(w);
        Ok(())
    }

    /// Stops the service's workload (waiting for its outstanding confirms).
    pub async fn stop_workload(&self, service: &str) -> Result<()> {
        let s = self.service(service).await?;
        let mut d = s.lock().await;
        if let Some(w) = d.workload.take() {
            let log = w.stop().await?;
            if let Some(last) = log.last() {
                d.next_seq = last.seq + 1;
            }
            d.past.extend(log);
        }
        Ok(())
    }

    /// Migrates `service` to host `to` with `strategy`, then checks the whole history.
    ///
    /// On failure the migration is rolled back (the source keeps serving where it can), the
    /// history is still checked, and the error carries that report beside the failed phase.
    pub async fn migrate(
        &self,
        service: &str,
        to: &str,
        strategy: Strategy,
        opts: MigrationOptions,
    ) -> Result<Report, MigrationError> {
        opts.validate(strategy)?;
        check_host(&self.cfg, to)?;
        // After a broker restart between migrations, the manager connects again first.
        self.link
            .reconnect(crate::strategies::RECONNECT_WITHIN)
            .await?;
        let s = self.service(service).await?;
        let mut d = s.lock().await;
        // Memory may have gone since the deploy: refuse before the source takes a snapshot.
        crate::config::check_state_fits(d.spec.state_bytes, crate::config::available_memory())?;
        if let Some(f) = opts.fault.as_ref() {
            let host = match f.kill {
                Role::Source => Some(d.current.host.clone()),
                Role::Target => Some(to.to_string()),
                Role::Broker => None,
            };
            match host {
                Some(host) if f.outage_s.is_some() => self.links.check_link(&host)?,
                None if self.cfg.amqp_url.is_some() => {
                    return Err(Error::Config(
                        "a broker restart fault needs a broker the testbed started; this one \
                         uses an external broker (amqp_url)"
                            .into(),
                    )
                    .into())
                }
                None if !d.spec.durable => {
                    return Err(Error::Config(format!(
                        "a broker restart would delete {service:?}'s queues and the messages in \
                         them: deploy it with durable=True to inject one"
                    ))
                    .into())
                }
                _ => {}
            }
        }
        let plan = self.plan(&mut d, to).await?;

        let target_url = self
            .links
            .url_for(&plan.target.host, &self.endpoint.internal_url);
        let source_url = self
            .links
            .url_for(&plan.source.host, &self.endpoint.internal_url);
        let traffic_before = self.links.traffic();
        let t_start = now_ns();
        let mut ctx = Ctx::new(
            &self.link,
            self.links.clone(),
            &self.runtime,
            &d.spec,
            &source_url,
            &target_url,
            &opts,
            &*d,
            plan.migration_id.clone(),
            plan.source.clone(),
            plan.target.clone(),
        );
        ctx.journal = Some(&self.journal);
        self.journal.update(|e| {
            e.migrations.insert(
                service.to_string(),
                journal::InFlight {
                    migration_id: plan.migration_id.clone(),
                    source: plan.source.instance.clone(),
                    target: plan.target.instance.clone(),
                    committed: false,
                },
            );
        });
        let failure = strategies::run_or_roll_back(strategy, &mut ctx).await;
        self.journal.update(|e| {
            e.migrations.remove(service);
        });
        let (timeline, outcome) = (ctx.timeline, ctx.outcome);
        let t_end = now_ns();
        let link_traffic = net::traffic_between(
            &traffic_before,
            &self.links.traffic(),
            (t_end - t_start) as f64 / 1e9,
        );
        if let Some(t) = outcome.takeover.as_ref().filter(|t| t.replayed_ahead > 0) {
            d.never_live
                .push((t.until_seq + 1 - t.replayed_ahead, t.until_seq));
        }
        if failure.is_none() {
            d.current = plan.target.clone();
        } else if let Some(r) = &outcome.restarted {
            d.current = Placement {
                instance: r.instance.clone(),
                host: plan.source.host.clone(),
            };
            d.state_restarts.push(StateRestart {
                instance: r.instance.clone(),
                after_seq: r.after_seq,
            });
        }

        tokio::time::sleep(Duration::from_secs_f64(opts.settle_s)).await;
        let cut_ns = now_ns();
        self.drain(
            &d,
            cut_ns,
            Duration::from_secs_f64(opts.drain_timeout_s),
            outcome.mu,
        )
        .await;
        let observed = self
            .observe_state(service, &d.current.instance, &opts)
            .await;
        // A service of one's own has no reference model: a twin checks its state.
        let twin = match &observed {
            Some(o) if !d.spec.is_reference() => Some(
                self.run_twin(&mut d, o, &opts)
                    .await
                    .map_err(|e| format!("the twin could not check the state: {e}")),
            ),
            _ => None,
        };
        let leftovers = self.leftovers(service, &plan, failure.is_none()).await?;
        let dead_letters = self.link.dead_letters(service).await?;
        let history = d.history();
        let error = failure.as_ref().map(Failure::to_error);
        let report = Report::assemble(RunRecord {
            run_id: format!("{}-{}", self.id, plan.number),
            strategy,
            service: d.spec.clone(),
            workload: d.workload.as_ref().map(|w| w.spec().clone()),
            options: opts,
            source: plan.source,
            target: plan.target,
            environment: self.environment(),
            links: self.links.reports(),
            link_traffic,
            phases: timeline.phases().to_vec(),
            outcome,
            failure,
            window: (t_start, t_end),
            steady_since_ns: d
                .workload
                .as_ref()
                .map_or(d.deployed_ns, |w| w.started_ns)
                .max(d.deployed_ns)
                .max(d.settled_ns),
            history: &history,
            cut_ns,
            observed,
            twin,
            malformed_events: d.recorder.malformed(),
            dead_letters,
            recorder_lag: d.recorder.lag(),
            leftovers,
        });
        d.settled_ns = now_ns();
        match error {
            None => Ok(report),
            Some(error) => Err(MigrationError {
                error,
                report: Some(Box::new(report)),
            }),
        }
    }

    /// Names the migration's target instance and replay queue, and remembers the queues it
    /// will declare.
    async fn plan(&self, d: &mut Deployed, to: &str) -> Result<MigrationPlan> {
        let service = d.spec.name.clone();
        if d.current.host == to {
            return Err(Error::Config(format!(
                "{service:?} already runs on {to:?}; migrate it to another host"
            )));
        }
        let number = self.migrations.fetch_add(1, Ordering::Relaxed) + 1;
        d.instances_started += 1;
        let plan = MigrationPlan {
            number,
            migration_id: format!("m{number}"),
            source: d.current.clone(),
            target: Placement {
                instance: format!("{service}-{}", d.instances_started),
                host: to.to_string(),
            },
        };
        self.used(vec![
            names::control_queue(&service, &plan.target.instance),
            names::replay_queue(&service, &plan.migration_id),
            names::checkpoint_queue(&service, &plan.migration_id),
            names::control_queue(
                &service,
                &strategies::Restarted::instance_name(&service, &plan.migration_id),
            ),
        ])
        .await;
        Ok(plan)
    }

    /// The serving instance's state, if it is running and answers.
    async fn observe_state(
        &self,
        service: &str,
        instance: &str,
        opts: &MigrationOptions,
    ) -> Option<ObservedState> {
        if !self.runtime.is_running(instance).await {
            return None;
        }
        let (r, _) = self
            .link
            .command(
                service,
                instance,
                Command::Digest,
                &[],
                opts.reply_timeout(),
            )
            .await
            .ok()?;
        Some(ObservedState {
            instance: r.instance,
            last_seq: r.last_seq,
            count: r.count,
            digest: r.digest.unwrap_or_default(),
        })
    }

    /// Checks the state with a twin of the service: an instance that never migrates (nor
    /// restores), started on the service's host at its first check and kept until the service
    /// is removed, replays the log `observed` should hold (confirmed messages in order, from a
    /// queue of its own) and says what it reached. Each check feeds it only the log's entries
    /// since the last one; a log that no longer begins with what it was fed, or a twin that
    /// failed, gets a fresh twin fed from the start.
    async fn run_twin(
        &self,
        d: &mut Deployed,
        observed: &ObservedState,
        opts: &MigrationOptions,
    ) -> Result<TwinState> {
        let service = d.spec.name.clone();
        let (queue, twin) = (names::twin_queue(&service), names::twin_instance(&service));
        let control = names::control_queue(&service, &twin);
        self.used(vec![queue.clone(), control.clone()]).await;
        let history = d.history();
        let log = checker::confirmed_log(&history, observed.last_seq);
        let kept = d
            .twin
            .take()
            .filter(|t| t.since == history.restarted_after())
            .filter(|t| t.fed <= log.len() && log_hash(&log[..t.fed]) == t.fed_hash);
        let fresh = kept.is_none();
        let new = &log[kept.map_or(0, |t| t.fed)..];
        let result = async {
            if fresh {
                // A twin kept from before, if any, would have to forget: replaced.
                let _ = self.runtime.remove_instance(&twin).await;
                self.link.delete_queue(&control).await?;
                self.link.declare_control_queue(&service, &twin).await?;
                self.runtime
                    .start_instance(
                        &d.spec,
                        &twin,
                        &d.current.host,
                        &self.endpoint.internal_url,
                        false,
                    )
                    .await?;
                // A state restarted empty holds only what came after its restart: so does the
                // twin (the log starts there, and a replay drops a jump).
                if let Some(after_seq) = history.restarted_after() {
                    let adopt = Command::Adopt {
                        after_seq,
                        next_above: false,
                    };
                    self.link
                        .command(&service, &twin, adopt, &[], opts.reply_timeout())
                        .await?;
                }
            }
            // Built before the next await: a borrowing iterator held across it would make
            // the migration's future not `Send` for every lifetime.
            let bodies: Vec<Vec<u8>> = new
                .iter()
                .map(|&(seq, t_pub_ns)| {
                    serde_json::to_vec(&ms2m_wire::Input::Data {
                        seq,
                        t_pub_ns,
                        payload: ms2m_wire::state::workload_payload(seq, history.message_bytes),
                    })
                    .expect("input serializes")
                })
                .collect();
            self.link.declare_queue(&queue).await?;
            self.link.publish_to_queue(&queue, bodies).await?;
            // The twin spends the processing time on every message, as the service does.
            let replaying = Duration::from_secs_f64(new.len() as f64 * d.spec.processing_ms / 1e3)
                * 2
                + opts.reply_timeout();
            let timeouts = (opts.reply_timeout(), replaying);
            let r = self
                .replay_on(&service, &twin, &queue, observed.last_seq, timeouts)
                .await?;
            Ok(TwinState {
                last_seq: r.last_seq,
                digest: r.digest.unwrap_or_default(),
            })
        }
        .await;
        let _ = self.link.delete_queue(&queue).await;
        match &result {
            Ok(_) => {
                d.twin = Some(Twin {
                    fed: log.len(),
                    fed_hash: log_hash(&log),
                    since: history.restarted_after(),
                })
            }
            Err(_) => self.remove_twin(&service).await,
        }
        result
    }

    /// Removes a service's twin (instance and control queue), if one runs.
    async fn remove_twin(&self, service: &str) {
        let twin = names::twin_instance(service);
        let _ = self.runtime.remove_instance(&twin).await;
        let _ = self
            .link
            .delete_queue(&names::control_queue(service, &twin))
            .await;
    }

    /// Starts `instance` of `spec` on `host` (not live), restores `snapshot` if given, replays
    /// `queue` up to `until_seq`, and says where it got (position, counts, digest); then asks
    /// it to shut down (removing it is the caller's). `timeouts`: for each command, and for the
    /// replay to finish. The twin's state check and the conformance kit's replay rules.
    #[allow(clippy::too_many_arguments)]
    async fn replay_instance(
        &self,
        spec: &ServiceSpec,
        instance: &str,
        host: &str,
        snapshot: Option<&[u8]>,
        queue: &str,
        until_seq: u64,
        (each, finishing): (Duration, Duration),
    ) -> Result<Replayed> {
        let svc = spec.name.as_str();
        self.link.declare_control_queue(svc, instance).await?;
        let replayed = async {
            self.runtime
                .start_instance(spec, instance, host, &self.endpoint.internal_url, false)
                .await?;
            if let Some(snapshot) = snapshot {
                self.link
                    .command(svc, instance, Command::Restore, snapshot, each)
                    .await?;
            }
            self.replay_on(svc, instance, queue, until_seq, (each, finishing))
                .await
        }
        .await;
        let bye = Duration::from_secs(10);
        let _ = self
            .link
            .command(svc, instance, Command::Shutdown, &[], bye)
            .await;
        replayed
    }

    /// Has a started instance that is not live replay `queue` up to `until_seq`, and says
    /// where it got (position, counts, digest).
    async fn replay_on(
        &self,
        svc: &str,
        instance: &str,
        queue: &str,
        until_seq: u64,
        (each, finishing): (Duration, Duration),
    ) -> Result<Replayed> {
        let replay = Command::Replay {
            queue: queue.to_string(),
            until_seq: Some(until_seq),
        };
        self.link.command(svc, instance, replay, &[], each).await?;
        let finish = Command::FinishReplay {
            until_seq,
            go_live: false,
        };
        let (r, _) = self
            .link
            .command(svc, instance, finish, &[], finishing)
            .await?;
        let (d, _) = self
            .link
            .command(svc, instance, Command::Digest, &[], each)
            .await?;
        Ok(Replayed {
            last_seq: d.last_seq,
            skipped: r.skipped,
            replayed: r.replayed,
            digest: d.digest,
        })
    }

    /// Broker resources of the migration still present: its replay and checkpoint queues, and the control
    /// queue of the instance that is no longer part of the service.
    async fn leftovers(
        &self,
        service: &str,
        plan: &MigrationPlan,
        completed: bool,
    ) -> Result<Vec<String>> {
        let retired = if completed {
            &plan.source
        } else {
            &plan.target
        };
        let mut leftovers = Vec::new();
        for q in [
            names::replay_queue(service, &plan.migration_id),
            names::checkpoint_queue(service, &plan.migration_id),
            names::control_queue(service, &retired.instance),
        ] {
            if self.link.queue_exists(&q).await? {
                leftovers.push(format!("queue {q}"));
            }
        }
        Ok(leftovers)
    }

    /// The machine and software of this testbed, for reports.
    fn environment(&self) -> Environment {
        let (broker, service) = self.runtime.artifacts(&self.cfg);
        Environment::collect(
            self.runtime.kind().name(),
            &broker,
            self.broker_version.clone(),
            &service,
            self.docker_version.clone(),
        )
    }

    /// Waits until every confirmed message sent before `cut` has been processed live (but those
    /// a takeover's target held ahead, which never will be), at most
    /// `timeout` beyond the time the backlog needs at the service rate `mu` (a stop-and-copy
    /// of minutes leaves minutes of backlog, which is queued, not lost), and gives up earlier
    /// when no output event arrived for [`DRAIN_STALL`].
    async fn drain(&self, d: &Deployed, cut: u64, timeout: Duration, mu: Option<f64>) -> bool {
        let started = tokio::time::Instant::now();
        let mut deadline = None;
        let mut progress = (0, started);
        loop {
            let published = d.published();
            let (backlog, seen) = d.recorder.with_events(|events| {
                let live: std::collections::HashSet<u64> = events
                    .iter()
                    .filter(|e| e.mode == Mode::Live)
                    .map(|e| e.seq)
                    .collect();
                // Ranges in seq order (takeovers happen one after another).
                let never = |seq: u64| {
                    let i = d.never_live.partition_point(|&(a, _)| a <= seq);
                    i > 0 && seq <= d.never_live[i - 1].1
                };
                let backlog = published
                    .iter()
                    .filter(|p| p.t_pub_ns <= cut && p.outcome != PublishOutcome::Nacked)
                    .filter(|p| !live.contains(&p.seq) && !never(p.seq))
                    .count();
                (backlog, events.len())
            });
            let done = backlog == 0;
            let deadline =
                *deadline.get_or_insert_with(|| started + drain_budget(timeout, backlog, mu));
            let now = tokio::time::Instant::now();
            if seen != progress.0 {
                progress = (seen, now);
            }
            if done || now >= deadline || now - progress.1 >= DRAIN_STALL {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every message sent to `service` so far has been processed live (at most
    /// `timeout`, less if nothing is processed for 10 s); returns whether it was.
    pub async fn wait_processed(&self, service: &str, timeout: Duration) -> Result<bool> {
        let s = self.service(service).await?;
        let d = s.lock().await;
        Ok(self.drain(&d, now_ns(), timeout, None).await)
    }

    /// The history recorded so far for a service (for saving and checking offline).
    pub async fn history(&self, service: &str) -> Result<History> {
        let s = self.service(service).await?;
        let d = s.lock().await;
        Ok(d.history())
    }

    /// Removes a service: its workload, its instance, its recorder and its broker resources.
    pub async fn remove(&self, service: &str) -> Result<()> {
        let s = self.service(service).await?;
        self.stop_workload(service).await?;
        let d = s.lock().await;
        let instance = d.current.instance.clone();
        // The process may be gone already; its container is removed either way.
        let _ = self
            .link
            .command(
                service,
                &instance,
                Command::Shutdown,
                &[],
                Duration::from_secs(10),
            )
            .await;
        self.runtime.remove_instance(&instance).await?;
        if d.twin.is_some() {
            self.remove_twin(service).await;
        }
        d.recorder.stop().await;
        self.delete_broker_resources(service, &instance).await?;
        drop(d);
        self.services.lock().await.remove(service);
        Ok(())
    }

    /// Notes queues this testbed declares or has declared: what it may leave behind.
    async fn used(&self, queues: Vec<String>) {
        self.journal
            .update(|e| e.queues.extend(queues.iter().cloned()));
        self.queues_used.lock().await.extend(queues);
    }

    /// Deletes a service's queues (its instance's control queue among them) and exchanges.
    async fn delete_broker_resources(&self, service: &str, instance: &str) -> Result<()> {
        for q in [
            names::control_queue(service, instance),
            names::primary_queue(service),
            names::events_queue(service),
            names::dead_letter_queue(service),
        ] {
            self.link.delete_queue(&q).await?;
            self.journal.update(|e| {
                e.queues.remove(&q);
            });
        }
        for ex in [
            names::input_exchange(service),
            names::output_exchange(service),
        ] {
            self.link.delete_exchange(&ex).await?;
            self.journal.update(|e| {
                e.exchanges.remove(&ex);
            });
        }
        Ok(())
    }

    /// Restarts the broker (see [`Runtime::restart_broker`]), down for `down` in between, and
    /// reconnects the manager. Durable services ride it out (their instances, workload and
    /// recorder reconnect, and no confirmed message is lost); the others lose their queues.
    pub async fn restart_broker(&self, down: Duration) -> Result<()> {
        self.runtime.restart_broker(down).await?;
        self.link
            .reconnect(crate::strategies::RECONNECT_WITHIN)
            .await?;
        Ok(())
    }

    /// The broker's queues (name, ready messages) other than the testbed's own reply queue.
    /// Empty when no service is deployed: how a reused broker is checked clean between runs.
    pub async fn broker_queues(&self) -> Result<Vec<(String, u64)>> {
        let mut q = match self.runtime.broker_queues().await? {
            Some(q) => q,
            // An external broker may hold anyone's queues: probe only the names this testbed
            // used.
            None => {
                let used = self.queues_used.lock().await.clone();
                let mut q = Vec::new();
                for name in used {
                    if self.link.queue_exists(&name).await? {
                        q.push((name.clone(), self.link.queue_depth(&name).await?.into()));
                    }
                }
                q
            }
        };
        q.retain(|(name, _)| !name.starts_with("amq.gen-"));
        Ok(q)
    }

    /// Leaves the containers running when the testbed goes (for debugging): `close` becomes a
    /// no-op. Their `Drop` keeps them too when `TESTCONTAINERS_COMMAND=keep` was set before
    /// the first container started; `python -m ms2m cleanup --all` removes them later.
    pub fn keep(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.runtime.keep();
        self.journal.update(|e| e.kept = true);
    }

    /// Stops workloads and recorders and removes every container. Idempotent.
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let services: Vec<_> = self.services.lock().await.drain().collect();
        for (_, s) in services {
            let mut d = s.lock().await;
            if let Some(w) = d.workload.take() {
                let _ = w.stop().await;
            }
            d.recorder.stop().await;
        }
        self.link.close().await;
        self.links.stop();
        let shut = self.runtime.shutdown().await;
        // An external broker keeps what a failed shutdown left: cleanup may still delete it.
        if shut.is_ok() || self.cfg.amqp_url.is_none() {
            self.journal.remove();
        }
        shut
    }

    /// The hosts' links: configured, emulated how, measured (at start, and after each
    /// change).
    pub fn links(&self) -> std::collections::BTreeMap<String, net::LinkReport> {
        self.links.reports()
    }

    /// Starts (`down`) or ends an outage of `host`'s link to the broker: while it lasts,
    /// nothing its instances send or are sent crosses; connections stay open.
    pub fn set_link_outage(&self, host: &str, down: bool) -> Result<()> {
        check_link_name(&self.cfg, host)?;
        self.links.set_outage(host, down)
    }

    /// Gives `host`'s link new figures, for open connections too, and probes it again.
    pub async fn set_link(&self, host: &str, spec: net::LinkSpec) -> Result<()> {
        check_link_name(&self.cfg, host)?;
        let links = self.links.clone();
        let host = host.to_string();
        tokio::task::spawn_blocking(move || links.set_spec(&host, spec))
            .await
            .map_err(|e| Error::RuntimeUnavailable(format!("changing a link: {e}")))?
    }
}

/// Refuses a name that is neither a host nor a link between two hosts (`a<->b`).
fn check_link_name(cfg: &TestbedConfig, name: &str) -> Result<()> {
    if cfg
        .host_links
        .iter()
        .any(|l| net::names_pair(name, &l.between))
    {
        return Ok(());
    }
    check_host(cfg, name)
}

/// Starts the relays of the shaped hosts, where the runtime's instances reach this machine,
/// and probes them.
async fn start_links(
    cfg: &TestbedConfig,
    runtime: &Runtime,
    endpoint: &BrokerEndpoint,
) -> Result<Links> {
    if !cfg.has_links() {
        return Ok(Links::none());
    }
    let listen = runtime.host_address(cfg).await?;
    let (specs, pairs) = (cfg.links.clone(), cfg.host_links.clone());
    let (url, seed) = (endpoint.url.clone(), cfg.link_seed);
    tokio::task::spawn_blocking(move || Links::start(&specs, &pairs, listen, &url, seed))
        .await
        .map_err(|e| Error::RuntimeUnavailable(format!("starting the links: {e}")))?
}

impl RateProbe for Deployed {
    fn arrival_rate(&self, window: Duration) -> f64 {
        let now = now_ns();
        let from = now.saturating_sub(window.as_nanos() as u64);
        let count = |log: &[Published]| log.iter().rev().take_while(|p| p.t_pub_ns >= from).count();
        let mut n = count(&self.past);
        let mut since = self.past.first().map(|p| p.t_pub_ns);
        if let Some(w) = &self.workload {
            n += w.with_log(count);
            since = Some(since.map_or(w.started_ns, |s| s.min(w.started_ns)));
        }
        match since.filter(|&s| s > from) {
            // Younger than the window: n messages over its own age are n - 1 intervals (the
            // first went out at its start), and under a second old its nominal rate stands in
            // (two messages 1 ms apart said 2,000 msg/s of a workload of 10).
            Some(s) => {
                let age = now.saturating_sub(s) as f64 / 1e9;
                match &self.workload {
                    Some(w) if age < 1.0 => w.spec().profile.mean_rate(),
                    _ if age > 0.0 => n.saturating_sub(1) as f64 / age,
                    _ => 0.0,
                }
            }
            None => n as f64 / window.as_secs_f64(),
        }
    }

    fn last_live_seq(&self) -> Option<u64> {
        self.recorder.with_events(|events| {
            events
                .iter()
                .filter(|e| e.mode == Mode::Live)
                .map(|e| e.seq)
                .max()
        })
    }

    fn service_rate(&self) -> Option<f64> {
        const RECENT: usize = 50;
        self.recorder.with_events(|events| {
            let (n, total) = events
                .iter()
                .rev()
                .filter(|e| e.mode == Mode::Live)
                .take(RECENT)
                .fold((0u64, 0u64), |(n, t), e| {
                    (n + 1, t + e.t_end_ns.saturating_sub(e.t_start_ns))
                });
            (n > 0 && total > 0).then(|| n as f64 / (total as f64 / 1e9))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_waits_for_the_backlog_at_the_service_rate() {
        let t = Duration::from_secs(60);
        // 4,300 messages queued behind a 430 s stop-and-copy, served at 20 msg/s.
        assert_eq!(drain_budget(t, 4300, Some(20.0)), Duration::from_secs(275));
        assert_eq!(drain_budget(t, 0, Some(20.0)), t);
        for mu in [None, Some(0.0), Some(f64::NAN), Some(-1.0)] {
            assert_eq!(drain_budget(t, 4300, mu), t);
        }
        assert_eq!(
            drain_budget(t, usize::MAX, Some(1e-9)),
            t + Duration::from_secs(86_400)
        );
    }
}
