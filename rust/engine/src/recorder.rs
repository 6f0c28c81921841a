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
    conn: lapin::Connection,
}

impl Recorder {
    /// Starts consuming the service's events queue (declared with the service, so no event
    /// published since then is missed).
    pub async fn start(url: &str, service: &str) -> Result<Recorder> {
        let conn = broker::connect(url, Duration::from_secs(10)).await?;
        let channel = conn
            .create_channel()
            .rpc("opening the recorder channel")
            .await?;
        let mut consumer = channel
            .basic_consume(
                names::events_queue(service).into(),
                "recorder".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .rpc("consuming the events queue")
            .await?;
        let events: Arc<Mutex<Vec<OutputEvent>>> = Arc::default();
        let malformed: Arc<Mutex<u64>> = Arc::default();
        let lag = Arc::new(Mutex::new(metrics::new_histogram()));
        let (ev, bad, late) = (events.clone(), malformed.clone(), lag.clone());
        // A twin's replay is the state check's, not the service's: no metric or drain sees it.
        let twin = names::twin_instance(service);
        let task = tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let arrived = now_ns();
                match serde_json::from_slice::<OutputEvent>(&d.data) {
                    Ok(e) if e.instance == twin => {}
                    Ok(e) => {
                        let us = arrived.saturating_sub(e.t_end_ns) / 1_000;
                        late.lock().unwrap().saturating_record(us.max(1));
                        ev.lock().unwrap().push(e);
                    }
                    Err(_) => *bad.lock().unwrap() += 1,
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
        broker::close_quietly(&self.conn, "recorder stops").await;
        self.task.abort();
    }
}
