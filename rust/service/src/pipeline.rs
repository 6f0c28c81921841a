//! The tail of message handling, pipelined: a message's output event is confirmed by the
//! broker, then the message is acked, in delivery order, while the instance already works on
//! the next ones.
//!
//! Waiting for each confirm before taking the next message made one broker round trip per
//! message the ceiling of the service's rate (about 600 msg/s here). Now the event loop only
//! enqueues; a task awaits confirms and sends acks in order. The guarantee is the same: a
//! message is acked only once its output event is confirmed, so a message the broker hands to
//! another instance was never reported as processed. How many are in flight is bounded by the
//! consumer's prefetch, since an unacked message holds a prefetch slot.
//!
//! Before a consumer's channel closes (stop live, end of replay, exit), the event loop
//! [`Pipeline::flush`]es: every message it applied is acked first, so that none is handed back
//! to a queue and processed again elsewhere.

use anyhow::{bail, Context, Result};
use lapin::{options::BasicAckOptions, Acker, PublisherConfirm};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

enum Step {
    /// Await the output event's confirm (if the message produced one), then ack.
    Done {
        confirm: Option<PublisherConfirm>,
        ack: Acker,
    },
    /// Answer once every step before this one is done.
    Flush(oneshot::Sender<()>),
}

pub struct Pipeline {
    tx: mpsc::UnboundedSender<Step>,
    task: JoinHandle<Result<()>>,
}

impl Pipeline {
    pub fn start() -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(step) = rx.recv().await {
                match step {
                    Step::Done { confirm, ack } => {
                        if let Some(c) = confirm {
                            if c.await.context("confirm of an output event")?.is_nack() {
                                bail!("the broker refused (nacked) an output event");
                            }
                        }
                        ack.ack(BasicAckOptions::default())
                            .await
                            .context("acking a message")?;
                    }
                    Step::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
            Ok(())
        });
        Pipeline { tx, task }
    }

    /// Acks `ack`'s message once `confirm` (its output event's, if any) arrives, after every
    /// message pushed before it.
    pub fn push(&self, confirm: Option<PublisherConfirm>, ack: Acker) -> Result<()> {
        self.tx
            .send(Step::Done { confirm, ack })
            .ok()
            .context("the output pipeline has stopped")
    }

    /// Waits until every message pushed so far is confirmed and acked.
    pub async fn flush(&self) -> Result<()> {
        let (done, flushed) = oneshot::channel();
        self.tx
            .send(Step::Flush(done))
            .ok()
            .context("the output pipeline has stopped")?;
        flushed.await.ok().context("the output pipeline failed")
    }

    /// Resolves when the pipeline's task ends, which only an error makes it do.
    pub async fn failed(&mut self) -> anyhow::Error {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => anyhow::anyhow!("the output pipeline ended"),
            Err(e) => anyhow::anyhow!("the output pipeline panicked: {e}"),
        }
    }
}
