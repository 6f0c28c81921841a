//! Open-loop workload generator.
//!
//! Message `k` is due at an absolute time given by the rate [`Profile`]: a slow broker delays
//! sends but never thins the schedule, so latency cannot hide (no coordinated omission). The
//! sender is a thread of its own that sleeps with the OS timer (tokio's timer wheel has 1 ms
//! resolution, too coarse for high rates) with the smallest timer slack, and publishes are
//! pipelined: the sender only enqueues a message's frames on the connection (one poll of the
//! publish future) and a separate task waits for the frames to be written and for the
//! publisher confirm, so neither holds the schedule back. Every message's scheduled and actual
//! send times are logged: their difference is the pacing error.

mod profile;

pub use profile::{Profile, Schedule, Step};

use crate::broker;
use crate::broker::Rpc;
use crate::error::{Error, Result};
use crate::history::{PublishOutcome, Published};
use lapin::{options::*, BasicProperties, PublisherConfirm};
use ms2m_wire::{names, now_ns, state::workload_payload, Input};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// An open-loop workload: messages sent on an absolute schedule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct WorkloadSpec {
    pub profile: Profile,
    /// Payload bytes per message.
    pub message_bytes: usize,
    /// Seed of the random parts (Poisson gaps); the same seed gives the same schedule.
    #[serde(default)]
    pub seed: u64,
}

impl WorkloadSpec {
    /// `rate` messages per second, evenly spaced, 64-byte payloads.
    pub fn constant(rate: f64) -> Self {
        WorkloadSpec {
            profile: Profile::Constant { rate },
            message_bytes: 64,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.profile.validate()?;
        if self.message_bytes > 16 << 20 {
            return Err(Error::Config("message_bytes must be at most 16 MiB".into()));
        }
        Ok(())
    }
}

/// A running workload.
pub struct Workload {
    spec: WorkloadSpec,
    log: Arc<Mutex<Vec<Published>>>,
    /// The confirm of the i-th publish, filled in order by the confirmer. Apart from `log`, so
    /// that the sender never waits for a lock the confirmer holds.
    outcomes: Arc<Mutex<Vec<PublishOutcome>>>,
    stop: Arc<AtomicBool>,
    sender: std::thread::JoinHandle<Result<()>>,
    confirmer: JoinHandle<()>,
    /// The current connection (a durable workload replaces it after a broker restart).
    conn: Arc<Mutex<Option<lapin::Connection>>>,
    pub started_ns: u64,
}

/// How long a durable workload waits for a restarted broker before it gives up.
const RECONNECT_WITHIN: Duration = Duration::from_secs(120);
/// How long it waits for the confirms of a lost connection to resolve (as errors).
const LOST_CONFIRMS_WITHIN: Duration = Duration::from_secs(10);

/// The body of message `seq`, as first sent (a republished message is the same bytes).
fn input_body(seq: u64, t_pub_ns: u64, size: usize) -> Vec<u8> {
    serde_json::to_vec(&Input::Data {
        seq,
        t_pub_ns,
        payload: workload_payload(seq, size),
    })
    .expect("input serializes")
}

/// Message properties: persistent for a durable service, so that a confirmed message survives
/// a broker restart.
fn properties(durable: bool) -> BasicProperties {
    match durable {
        true => BasicProperties::default().with_delivery_mode(2),
        false => BasicProperties::default(),
    }
}

/// Connects (retrying for `patience`) and opens the channel the workload publishes on, with
/// publisher confirms.
async fn open(url: &str, patience: Duration) -> Result<(lapin::Connection, lapin::Channel)> {
    let conn = broker::connect(url, patience).await?;
    let channel = conn
        .create_channel()
        .rpc("opening the workload channel")
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .rpc("enabling publisher confirms")
        .await?;
    Ok((conn, channel))
}

/// Runs `fut` on the runtime from the sender thread and waits for it.
fn on_runtime<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().ok()
}

/// After a broker restart: a new connection and channel, then every message sent so far and
/// not confirmed is sent again, in order, and awaited (the stream must stay gapless: an
/// instance refuses a jump in seq). One the broker had kept after all arrives twice, and the
/// instance dead-letters the second as a repeat (counted in the report, never applied).
#[allow(clippy::too_many_arguments)]
fn resume_after_restart(
    rt: &tokio::runtime::Handle,
    url: &str,
    exchange: &str,
    size: usize,
    log: &Mutex<Vec<Published>>,
    outcomes: &Arc<Mutex<Vec<PublishOutcome>>>,
    conn_slot: &Mutex<Option<lapin::Connection>>,
) -> Result<lapin::Channel> {
    // Every publish on the lost connection resolves (as an error) before any is sent again.
    let sent = log.lock().unwrap().len();
    let start = Instant::now();
    while outcomes.lock().unwrap().len() < sent && start.elapsed() < LOST_CONFIRMS_WITHIN {
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = url.to_string();
    let opened = on_runtime(rt, async move { open(&url, RECONNECT_WITHIN).await })
        .ok_or_else(|| Error::RuntimeUnavailable("the runtime stopped".into()))??;
    let (conn, channel) = opened;
    *conn_slot.lock().unwrap() = Some(conn);
    let again: Vec<(usize, Published)> = {
        let log = log.lock().unwrap();
        let outcomes = outcomes.lock().unwrap();
        log.iter()
            .enumerate()
            .filter(|(i, _)| outcomes.get(*i) != Some(&PublishOutcome::Confirmed))
            .map(|(i, p)| (i, p.clone()))
            .collect()
    };
    for (i, p) in again {
        let (ch, ex) = (channel.clone(), exchange.to_string());
        let body = input_body(p.seq, p.t_pub_ns, size);
        let outcome = on_runtime(rt, async move {
            let confirm = ch
                .basic_publish(
                    ex.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties(true),
                )
                .rpc("publishing a workload message again")
                .await?
                .rpc("confirm of a workload message sent again")
                .await?;
            Ok::<_, Error>(match confirm.is_ack() {
                true => PublishOutcome::Confirmed,
                false => PublishOutcome::Nacked,
            })
        })
        .ok_or_else(|| Error::RuntimeUnavailable("the runtime stopped".into()))??;
        let mut outcomes = outcomes.lock().unwrap();
        if let Some(o) = outcomes.get_mut(i) {
            *o = outcome;
        }
    }
    Ok(channel)
}

/// A publish whose frames are enqueued, until they are written and the confirm is back.
type InFlight = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// Asks the OS to wake this thread on time: the smallest timer slack (the default, 50 us,
/// would add up to that much to every send) and, where allowed (root or CAP_SYS_NICE), the
/// lowest real-time priority, so that the broker sharing the cores cannot delay the schedule
/// (as load generators and cyclictest do). The thread sleeps between sends and takes little
/// CPU; the kernel's real-time throttling bounds it even if it could not keep up.
fn precise_timers() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) and sched_setscheduler(0, ..) change only the calling
    // thread's scheduling; failure (no permission) leaves it as it was.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        let param = libc::sched_param { sched_priority: 1 };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param);
    }
}

/// The send log with the confirms received so far.
fn merged(log: &Mutex<Vec<Published>>, outcomes: &Mutex<Vec<PublishOutcome>>) -> Vec<Published> {
    let mut log = log.lock().unwrap().clone();
    let outcomes = outcomes.lock().unwrap();
    for (p, o) in log.iter_mut().zip(outcomes.iter()) {
        if p.outcome == PublishOutcome::Pending {
            p.outcome = *o;
        }
    }
    log
}

/// Sleeps until `deadline` on the OS timer, waking every 50 ms to honour `stop`.
fn sleep_until(deadline: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

impl Workload {
    /// Starts sending to `service`'s input exchange, numbering messages from `first_seq`;
    /// `durable`: persistent messages, and a broker restart is ridden out (see
    /// [`resume_after_restart`]).
    pub async fn start(
        url: &str,
        service: &str,
        spec: WorkloadSpec,
        first_seq: u64,
        durable: bool,
    ) -> Result<Workload> {
        spec.validate()?;
        let (conn, channel) = open(url, Duration::from_secs(10)).await?;
        let log: Arc<Mutex<Vec<Published>>> = Arc::default();
        let (confirms, mut pending) = mpsc::unbounded_channel::<InFlight>();
        let outcomes: Arc<Mutex<Vec<PublishOutcome>>> = Arc::default();
        let confirm_log = outcomes.clone();
        let confirmer = tokio::spawn(async move {
            // Frames are written and confirms arrive in publish order; awaiting them in order
            // costs nothing.
            while let Some(publish) = pending.recv().await {
                let outcome = match publish.await {
                    Ok(confirm) => match confirm.await {
                        Ok(c) if c.is_ack() => PublishOutcome::Confirmed,
                        Ok(_) => PublishOutcome::Nacked,
                        Err(_) => PublishOutcome::Uncertain,
                    },
                    Err(_) => PublishOutcome::Uncertain,
                };
                confirm_log.lock().unwrap().push(outcome);
            }
        });
        let exchange = names::input_exchange(service);
        let stop = Arc::new(AtomicBool::new(false));
        let (send_log, send_stop) = (log.clone(), stop.clone());
        let schedule = spec.profile.schedule(spec.seed);
        let size = spec.message_bytes;
        let rt = tokio::runtime::Handle::current();
        let start = Instant::now();
        let started_ns = now_ns();
        let conn = Arc::new(Mutex::new(Some(conn)));
        let (conn_slot, url) = (conn.clone(), url.to_string());
        let resend_outcomes = outcomes.clone();
        let sender = std::thread::Builder::new()
            .name(format!("ms2m-workload-{service}"))
            .spawn(move || -> Result<()> {
                let _runtime = rt.enter();
                precise_timers();
                let mut cx = Context::from_waker(Waker::noop());
                let mut channel = channel;
                for (k, due_s) in schedule.enumerate() {
                    let due = Duration::from_secs_f64(due_s);
                    if !sleep_until(start + due, &send_stop) {
                        break;
                    }
                    if durable && !channel.status().connected() {
                        channel = resume_after_restart(
                            &rt,
                            &url,
                            &exchange,
                            size,
                            &send_log,
                            &resend_outcomes,
                            &conn_slot,
                        )?;
                    }
                    let seq = first_seq + k as u64;
                    let t_pub_ns = now_ns();
                    let body = input_body(seq, t_pub_ns, size);
                    let index = {
                        let mut l = send_log.lock().unwrap();
                        l.push(Published {
                            seq,
                            t_sched_ns: started_ns + due.as_nanos() as u64,
                            t_pub_ns,
                            outcome: PublishOutcome::Pending,
                        });
                        l.len() - 1
                    };
                    let (ch, ex) = (channel.clone(), exchange.clone());
                    let mut publish: InFlight = Box::pin(async move {
                        ch.basic_publish(
                            ex.as_str().into(),
                            "".into(),
                            BasicPublishOptions::default(),
                            &body,
                            properties(durable),
                        )
                        .await
                    });
                    // The first poll enqueues the frames, in seq order; the confirmer's await
                    // does the rest.
                    let in_flight: InFlight = match publish.as_mut().poll(&mut cx) {
                        Poll::Pending => publish,
                        // A finished future must not be polled again: hand over its result.
                        Poll::Ready(Ok(c)) => Box::pin(std::future::ready(Ok(c))),
                        // The broker went away: sent again once it is back.
                        Poll::Ready(Err(e)) if durable => Box::pin(std::future::ready(Err(e))),
                        Poll::Ready(Err(e)) => {
                            send_log.lock().unwrap()[index].outcome = PublishOutcome::Uncertain;
                            return Err(Error::Broker {
                                context: "publishing a workload message".into(),
                                source: e,
                            });
                        }
                    };
                    let _ = confirms.send(in_flight);
                }
                Ok(())
            })
            .map_err(|e| Error::Io {
                context: "starting the workload thread".into(),
                source: e,
            })?;
        Ok(Workload {
            spec,
            log,
            outcomes,
            stop,
            sender,
            confirmer,
            conn,
            started_ns,
        })
    }

    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// A copy of the send log so far, with the confirms received.
    pub fn published(&self) -> Vec<Published> {
        merged(&self.log, &self.outcomes)
    }

    /// Runs `f` on the send log without copying it.
    pub fn with_log<T>(&self, f: impl FnOnce(&[Published]) -> T) -> T {
        f(&self.log.lock().unwrap())
    }

    /// Stops sending and waits for the outstanding confirms; returns the whole send log.
    pub async fn stop(self) -> Result<Vec<Published>> {
        self.stop.store(true, Ordering::Relaxed);
        let sender = self.sender;
        let sent = tokio::task::spawn_blocking(move || sender.join())
            .await
            .ok()
            .and_then(|j| j.ok())
            .unwrap_or(Ok(()));
        // The sender dropped its end of the confirm queue; the confirmer ends once all are in.
        let _ = tokio::time::timeout(Duration::from_secs(30), self.confirmer).await;
        let conn = self.conn.lock().unwrap().take();
        if let Some(conn) = conn {
            broker::close_quietly(&conn, "workload stops").await;
        }
        let mut log = merged(&self.log, &self.outcomes);
        for p in log
            .iter_mut()
            .filter(|p| p.outcome == PublishOutcome::Pending)
        {
            p.outcome = PublishOutcome::Uncertain;
        }
        sent.map(|_| log)
    }
}

#[cfg(test)]
mod tests {
    use super::WorkloadSpec;

    #[test]
    fn bad_workloads_are_refused() {
        assert!(WorkloadSpec::constant(-2.0).validate().is_err());
        assert!(WorkloadSpec::constant(f64::NAN).validate().is_err());
        WorkloadSpec::constant(10.0).validate().unwrap();
    }
}
