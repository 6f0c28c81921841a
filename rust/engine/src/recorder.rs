//! Recorder: consumes every output event of a service into the history, and measures its own
//! lag (from an event's `t_end_ns` at the instance to its arrival here).

use crate::broker;
use crate::broker::Rpc;
use crate::error::Result;
use crate::metrics::{self, LatencySummary};
use futures_lite::StreamExt;
use hdrhistogram::Histogram;
use lapin::{options::*, types::FieldTable};
use ms2m_wire::{names, now_ns, OutputEvent};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

pub struct Recorder {
    events: Arc<Mutex<Vec<OutputEvent>>>,
    malformed: Arc<Mutex<u64>>,
    /// Arrival minus `t_end_ns` of every event, microseconds.
    lag: Arc<Mutex<Histogram<u64>>>,
    task: JoinHandle<()>,
    /// The current connection (replaced after a broker restart for a durable service).
    conn: Arc<Mutex<Option<lapin::Connection>>>,
}

/// How long the recorder of a durable service waits for a restarted broker.
const RECONNECT_WITHIN: Duration = Duration::from_secs(120);

/// Connects and consumes the events queue; a durable service's events are acked one by one
/// (so that none is lost with a connection), others are taken as delivered.
async fn consume(
    url: &str,
    service: &str,
    durable: bool,
    patience: Duration,
) -> Result<(lapin::Connection, lapin::Consumer)> {
    let conn = broker::connect(url, patience).await?;
    let channel = conn
        .create_channel()
        .rpc("opening the recorder channel")
        .await?;
    if durable {
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .rpc("setting the recorder's prefetch")
            .await?;
    }
    let consumer = channel
        .basic_consume(
            names::events_queue(service).into(),
            "recorder".into(),
            BasicConsumeOptions {
                no_ack: !durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .rpc("consuming the events queue")
        .await?;
    Ok((conn, consumer))
}

impl Recorder {
    /// Starts consuming the service's events queue (declared with the service, so no event
    /// published since then is missed); `durable`: it reconnects after a broker restart.
    pub async fn start(url: &str, service: &str, durable: bool) -> Result<Recorder> {
        let (conn, mut consumer) = consume(url, service, durable, Duration::from_secs(10)).await?;
        let conn = Arc::new(Mutex::new(Some(conn)));
        let events: Arc<Mutex<Vec<OutputEvent>>> = Arc::default();
        let malformed: Arc<Mutex<u64>> = Arc::default();
        let lag = Arc::new(Mutex::new(metrics::new_histogram()));
        let (ev, bad, late) = (events.clone(), malformed.clone(), lag.clone());
        // A twin's replay is the state check's, not the service's: no metric or drain sees it.
        let twin = names::twin_instance(service);
        let (url, service, slot) = (url.to_string(), service.to_string(), conn.clone());
        let task = tokio::spawn(async move {
            // The events recorded, by (mode, first seq, seq, start): an instance sends an event
            // again, identical, for a message the broker handed back after a restart, and a
            // redelivered event reaches the recorder twice; one is kept.
            let mut seen = std::collections::HashSet::new();
            loop {
                while let Some(Ok(d)) = consumer.next().await {
                    let arrived = now_ns();
                    if durable {
                        let _ = d.ack(BasicAckOptions::default()).await;
                    }
                    match serde_json::from_slice::<OutputEvent>(&d.data) {
                        Ok(e) if e.instance == twin => {}
                        Ok(e) if !seen.insert((e.mode, e.first_seq, e.seq, e.t_start_ns)) => {}
                        Ok(e) => {
                            let us = arrived.saturating_sub(e.t_end_ns) / 1_000;
                            late.lock().unwrap().saturating_record(us.max(1));
                            ev.lock().unwrap().push(e);
                        }
                        Err(_) => *bad.lock().unwrap() += 1,
                    }
                }
                if !durable {
                    return;
                }
                match consume(&url, &service, durable, RECONNECT_WITHIN).await {
                    Ok((c, next)) => {
                        *slot.lock().unwrap() = Some(c);
                        consumer = next;
                    }
                    Err(e) => {
                        eprintln!("ms2m: the recorder of {service} lost the broker for good: {e}");
                        return;
                    }
                }
            }
        });
        Ok(Recorder {
            events,
            malformed,
            lag,
            task,
            conn,
        })
    }

    /// A copy of the events recorded so far.
    pub fn events(&self) -> Vec<OutputEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Runs `f` on the recorded events without copying them.
    pub fn with_events<T>(&self, f: impl FnOnce(&[OutputEvent]) -> T) -> T {
        f(&self.events.lock().unwrap())
    }

    /// How late output events reached the recorder (from `t_end_ns`), over every event so far.
    pub fn lag(&self) -> LatencySummary {
        metrics::summarize(&self.lag.lock().unwrap())
    }

    /// Output events that were not valid JSON events.
    pub fn malformed(&self) -> u64 {
        *self.malformed.lock().unwrap()
    }

    pub async fn stop(&self) {
        // Aborted first, so that it cannot reconnect once the connection is closed.
        self.task.abort();
        let conn = self.conn.lock().unwrap().take();
        if let Some(conn) = conn {
            broker::close_quietly(&conn, "recorder stops").await;
        }
    }
}
