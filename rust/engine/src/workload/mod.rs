//! Open-loop workload generator.
//!
//! Message `k` is due at an absolute time given by the rate [`Profile`]: a slow broker delays
//! sends but never thins the schedule, so latency cannot hide (no coordinated omission). The
//! sender is a thread of its own that sleeps with the OS timer (tokio's timer wheel has 1 ms
//! resolution, too coarse for high rates), and publishes are pipelined: a separate task collects
//! publisher confirms, so waiting for them never holds the schedule back. Every message's
//! scheduled and actual send times are logged: their difference is the pacing error.

mod profile;

pub use profile::{Profile, Schedule, Step};

use crate::broker;
use crate::broker::Rpc;
use crate::config::WorkloadSpec;
use crate::error::Result;
use crate::history::{PublishOutcome, Published};
use lapin::{options::*, BasicProperties, PublisherConfirm};
use ms2m_wire::{names, now_ns, state::workload_payload, Input};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A running workload.
pub struct Workload {
    spec: WorkloadSpec,
    log: Arc<Mutex<Vec<Published>>>,
    stop: Arc<AtomicBool>,
    sender: std::thread::JoinHandle<Result<()>>,
    confirmer: JoinHandle<()>,
    conn: lapin::Connection,
    pub started_ns: u64,
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
    /// Starts sending to `service`'s input exchange, numbering messages from `first_seq`.
    pub async fn start(
        url: &str,
        service: &str,
        spec: WorkloadSpec,
        first_seq: u64,
    ) -> Result<Workload> {
        spec.validate()?;
        let conn = broker::connect(url, Duration::from_secs(10)).await?;
        let channel = conn
            .create_channel()
            .rpc("opening the workload channel")
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .rpc("enabling publisher confirms")
            .await?;
        let log: Arc<Mutex<Vec<Published>>> = Arc::default();
        let (confirms, mut pending) = mpsc::unbounded_channel::<(usize, PublisherConfirm)>();
        let confirm_log = log.clone();
        let confirmer = tokio::spawn(async move {
            // Confirms arrive in publish order; awaiting them in order costs nothing.
            while let Some((i, c)) = pending.recv().await {
                let outcome = match c.await {
                    Ok(c) if c.is_ack() => PublishOutcome::Confirmed,
                    Ok(_) => PublishOutcome::Nacked,
                    Err(_) => PublishOutcome::Uncertain,
                };
                confirm_log.lock().unwrap()[i].outcome = outcome;
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
        let sender = std::thread::Builder::new()
            .name(format!("ms2m-workload-{service}"))
            .spawn(move || -> Result<()> {
                for (k, due_s) in schedule.enumerate() {
                    let due = Duration::from_secs_f64(due_s);
                    if !sleep_until(start + due, &send_stop) {
                        break;
                    }
                    let seq = first_seq + k as u64;
                    let t_pub_ns = now_ns();
                    let body = serde_json::to_vec(&Input::Data {
                        seq,
                        t_pub_ns,
                        payload: workload_payload(seq, size),
                    })
                    .expect("input serializes");
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
                    let published = rt.block_on(
                        channel
                            .basic_publish(
                                exchange.as_str().into(),
                                "".into(),
                                BasicPublishOptions::default(),
                                &body,
                                BasicProperties::default(),
                            )
                            .rpc("publishing a workload message"),
                    );
                    match published {
                        Ok(c) => {
                            let _ = confirms.send((index, c));
                        }
                        Err(e) => {
                            send_log.lock().unwrap()[index].outcome = PublishOutcome::Uncertain;
                            return Err(e);
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| crate::error::Error::Io {
                context: "starting the workload thread".into(),
                source: e,
            })?;
        Ok(Workload {
            spec,
            log,
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

    /// A copy of the send log so far.
    pub fn published(&self) -> Vec<Published> {
        self.log.lock().unwrap().clone()
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
        broker::close_quietly(&self.conn, "workload stops").await;
        let mut log = self.log.lock().unwrap().clone();
        for p in log
            .iter_mut()
            .filter(|p| p.outcome == PublishOutcome::Pending)
        {
            p.outcome = PublishOutcome::Uncertain;
        }
        sent.map(|_| log)
    }
}
