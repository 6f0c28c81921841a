//! The tail of message handling, pipelined: a message's output event is written and confirmed
//! by the broker, then the message is acked, in delivery order, while the instance already
//! works on the next ones.
//!
//! Waiting for each confirm before taking the next message made one broker round trip per
//! message the ceiling of the service's rate (about 600 msg/s here); waiting for each publish's
//! frames to be written (a hand-over to lapin's I/O thread and back) cost about a third of the
//! service's CPU at 3,000 msg/s. Now the event loop only enqueues frames; a task awaits writes
//! and confirms in order and acks. Messages already queued behind the one being acked are
//! taken with it (up to a quarter of their channel's prefetch) and acked at once (`multiple`).
//!
//! The guarantee is the same: a live message is acked only once its output event is confirmed,
//! so a message the broker hands to another instance was never reported as processed. (A
//! replayed message has no event of its own and nothing to wait for.) A multiple
//! ack covers exactly the messages pushed before it on its channel, since the event loop
//! pushes every delivery of a channel, in delivery order. How many are in flight is bounded
//! by the consumer's prefetch, since an unacked message holds a prefetch slot.
//!
//! Before a consumer's channel closes (stop live, end of replay, exit), the pipeline is
//! flushed ([`Pipeline::flush`], or a [`Flusher`] in the task that closes a replay channel in
//! the background): every message applied is acked first, so that none is handed back to a
//! queue and processed again elsewhere.

use anyhow::{bail, Context, Result};
use lapin::{options::BasicAckOptions, types::ChannelId, Acker, PublisherConfirm};
use std::future::Future;
use std::pin::Pin;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A publish whose frames are enqueued, not necessarily written yet.
pub type Publish = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A delivery to ack.
pub struct Ack {
    /// The channel it came on: one `multiple` ack covers deliveries of one channel only.
    pub channel: ChannelId,
    pub acker: Acker,
    /// How many messages one `multiple` ack may cover at most on this channel (a quarter of
    /// its prefetch), so that the broker never waits long for prefetch slots.
    pub batch: usize,
}

enum Step {
    /// Await the output event's write and confirm (if there is one), then ack the delivery
    /// (if there is one: a replay run's event acks nothing).
    Done {
        publish: Option<Publish>,
        ack: Option<Ack>,
    },
    /// Answer once every step before this one is done.
    Flush(oneshot::Sender<()>),
}

pub struct Pipeline {
    tx: mpsc::UnboundedSender<Step>,
    task: JoinHandle<Result<()>>,
}

/// Waits until `publish` (if any) is written and confirmed.
async fn confirmed(publish: Option<Publish>) -> Result<()> {
    if let Some(p) = publish {
        let confirm = p.await.context("publishing an output event")?;
        if confirm
            .await
            .context("confirm of an output event")?
            .is_nack()
        {
            bail!("the broker refused (nacked) an output event");
        }
    }
    Ok(())
}

/// Whether a step acking `b` may join a batch acking up to `a`: one `multiple` ack covers
/// deliveries of one channel only.
fn same_channel(a: Option<&Ack>, b: Option<&Ack>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x.channel == y.channel,
        _ => true,
    }
}

/// Awaits every step in order; consecutive messages of one channel already queued are acked
/// with one `multiple` ack, at most their channel's `batch` at a time.
async fn run(mut rx: mpsc::UnboundedReceiver<Step>) -> Result<()> {
    let mut next = rx.recv().await;
    while let Some(step) = next.take() {
        match step {
            Step::Flush(done) => {
                let _ = done.send(());
            }
            Step::Done { publish, ack } => {
                confirmed(publish).await?;
                let mut last = ack;
                let mut taken = usize::from(last.is_some());
                let mut failed = None;
                // Take what is already queued, as long as it is of the same channel.
                while taken < last.as_ref().map_or(1, |a| a.batch.max(1)) {
                    match rx.try_recv() {
                        Ok(Step::Done { publish, ack })
                            if same_channel(last.as_ref(), ack.as_ref()) =>
                        {
                            if let Err(e) = confirmed(publish).await {
                                failed = Some(e);
                                break;
                            }
                            if ack.is_some() {
                                last = ack;
                                taken += 1;
                            }
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // What was confirmed is acked even when a later event failed: handed back, it
                // would be processed twice.
                if let Some(Ack { acker, .. }) = last {
                    let sent = acker
                        .ack(BasicAckOptions {
                            multiple: taken > 1,
                        })
                        .await
                        .context("acking a message")?;
                    if !sent {
                        bail!("an ack could not be sent: its channel is closed");
                    }
                }
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
        if next.is_none() {
            next = rx.recv().await;
        }
    }
    Ok(())
}

impl Pipeline {
    /// Starts the pipeline of an instance.
    pub fn start() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Pipeline {
            tx,
            task: tokio::spawn(run(rx)),
        }
    }

    /// Acks `ack`'s message, if any, once `publish` (its output event's, if any) is
    /// confirmed, after every step pushed before it.
    pub fn push(&self, publish: Option<Publish>, ack: Option<Ack>) -> Result<()> {
        self.tx
            .send(Step::Done { publish, ack })
            .ok()
            .context("the output pipeline has stopped")
    }

    /// Waits until every message pushed so far is confirmed and acked.
    pub async fn flush(&self) -> Result<()> {
        self.flusher().flush().await
    }

    /// A handle that flushes what is pushed before this call, for a task of its own.
    pub fn flusher(&self) -> Flusher {
        let (done, flushed) = oneshot::channel();
        // A pipeline that has stopped drops `done`: the flush then reports it failed.
        let _ = self.tx.send(Step::Flush(done));
        Flusher(flushed)
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

/// A flush requested with [`Pipeline::flusher`].
pub struct Flusher(oneshot::Receiver<()>);

impl Flusher {
    /// Waits until every message pushed before the flusher was made is confirmed and acked.
    pub async fn flush(self) -> Result<()> {
        self.0.await.ok().context("the output pipeline failed")
    }
}
