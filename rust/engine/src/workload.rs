//! Open-loop workload generator.
//!
//! Message `k` is due at `start + k / rate` on an absolute schedule: a slow broker delays sends
//! but never thins the schedule, so latency cannot hide (no coordinated omission). Publishes are
//! pipelined: a separate task collects publisher confirms, so waiting for them never holds the
//! schedule back.

use crate::broker;
use crate::config::WorkloadSpec;
use crate::error::{BrokerContext, Result};
use crate::history::{PublishOutcome, Published};
use lapin::{options::*, BasicProperties};
use ms2m_wire::{names, now_ns, state::workload_payload, Input};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A running workload.
pub struct Workload {
    spec: WorkloadSpec,
    log: Arc<Mutex<Vec<Published>>>,
    stop: watch::Sender<bool>,
    sender: JoinHandle<Result<()>>,
    confirmer: JoinHandle<()>,
    conn: lapin::Connection,
    pub started_ns: u64,
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
            .await
            .broker("opening the workload channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .broker("enabling publisher confirms")?;
        let log: Arc<Mutex<Vec<Published>>> = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let (confirms, mut pending) = mpsc::unbounded_channel::<(usize, lapin::PublisherConfirm)>();
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
        let send_log = log.clone();
        let started_ns = now_ns();
        let rate = spec.rate;
        let size = spec.message_bytes;
        let sender = tokio::spawn(async move {
            if rate <= 0.0 {
                let _ = stopped.wait_for(|s| *s).await;
                return Ok(());
            }
            let period = Duration::from_secs_f64(1.0 / rate);
            let start = tokio::time::Instant::now();
            for k in 0u64.. {
                let due = start + period.mul_f64(k as f64);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = stopped.wait_for(|s| *s) => break,
                }
                let seq = first_seq + k;
                let t_sched_ns = started_ns + (period.as_nanos() as u64) * k;
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
                        t_sched_ns,
                        t_pub_ns,
                        outcome: PublishOutcome::Pending,
                    });
                    l.len() - 1
                };
                let published = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .await;
                match published {
                    Ok(c) => {
                        let _ = confirms.send((index, c));
                    }
                    Err(e) => {
                        send_log.lock().unwrap()[index].outcome = PublishOutcome::Uncertain;
                        return Err(e).broker("publishing a workload message");
                    }
                }
            }
            Ok(())
        });
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

    /// The next sequence number this workload would use.
    pub fn next_seq(&self) -> Option<u64> {
        self.log.lock().unwrap().last().map(|p| p.seq + 1)
    }

    /// Stops sending and waits for the outstanding confirms; returns the whole send log.
    pub async fn stop(self) -> Result<Vec<Published>> {
        let _ = self.stop.send(true);
        let sent = self.sender.await.unwrap_or(Ok(()));
        // The sender dropped its end of the confirm queue; the confirmer ends once all are in.
        let _ = tokio::time::timeout(Duration::from_secs(30), self.confirmer).await;
        let _ = self.conn.close(200, "workload stops".into()).await;
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
