//! The manager's side of the broker: service topology, and the control link to instances
//! (commands out, replies matched by correlation id).

use crate::error::{BrokerContext, Error, Result};
use crate::report::DeadLetters;
use futures_lite::StreamExt;
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties,
    ExchangeKind,
};
use ms2m_wire::control::{self, Command, Envelope, HandOver, Reply, StreamTo};
use ms2m_wire::{names, Input};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Longest wait for one broker operation: a broker that stops answering must fail the
/// operation, never hang the testbed.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Channels a probe connection opens before it is replaced by a new one. A probe of a missing
/// queue costs its channel (the broker closes it), and RabbitMQ allows 2,047 channel ids per
/// connection: once lapin wraps around to an id whose channel the broker closed, the open fails
/// with that old NOT_FOUND (seen after 672 soak migrations). A fresh connection has fresh ids.
const PROBE_CHANNELS_PER_CONNECTION: u32 = 1000;

/// The connection and channel that probe queues, apart from the link's own: their closures
/// must not use up the ids of the channels that publish and consume.
#[derive(Default)]
struct Probe {
    conn: Option<Connection>,
    channel: Option<Channel>,
    /// Channels opened on `conn` so far.
    opened: u32,
}

/// Bounds a broker operation by [`RPC_TIMEOUT`] and describes its errors.
pub(crate) trait Rpc<T> {
    async fn rpc(self, what: impl Into<String>) -> Result<T>;
}

impl<T, F: std::future::Future<Output = std::result::Result<T, lapin::Error>>> Rpc<T> for F {
    async fn rpc(self, what: impl Into<String>) -> Result<T> {
        let what = what.into();
        match tokio::time::timeout(RPC_TIMEOUT, self).await {
            Ok(r) => r.broker(what),
            Err(_) => Err(Error::Timeout(format!(
                "the broker did not answer within {} s: {what}",
                RPC_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// Closes a connection, waiting at most a few seconds for the broker's close-ok: closing is
/// best effort, and must not hang the caller.
pub async fn close_quietly(conn: &Connection, reason: &str) {
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        conn.close(200, reason.to_string().into()),
    )
    .await;
}

/// A reply and its attachment.
pub type Answer = (Reply, Vec<u8>);
type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Answer>>>>;

/// Connects, retrying until `deadline`: a broker that just started refuses for a few seconds.
pub async fn connect(url: &str, deadline: Duration) -> Result<Connection> {
    let start = Instant::now();
    loop {
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() >= deadline => {
                return Err(Error::RuntimeUnavailable(format!(
                    "the broker at {} did not accept a connection within {:.0} s: {e}",
                    crate::amqp_url::redact(url),
                    deadline.as_secs_f64()
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The migration manager's link to the broker.
pub struct Link {
    /// The current connection; replaced by [`Link::reconnect`] after a broker restart.
    session: Mutex<Arc<Session>>,
    /// Bumped at each new session: a reply consumer that ends drops the waiters only if its
    /// session is still the current one.
    generation: Arc<AtomicU64>,
    url: String,
    probe: tokio::sync::Mutex<Probe>,
    waiters: Waiters,
    next: AtomicU64,
    /// Services whose queues are durable (see [`Link::declare_service`]).
    durable: Mutex<std::collections::HashSet<String>>,
    /// One reconnect at a time: two would each open a session, and the second would close
    /// the first's reply queue under the commands waiting on it.
    reconnecting: tokio::sync::Mutex<()>,
}

/// One connection of the link, with its channel and reply queue.
struct Session {
    conn: Connection,
    channel: Channel,
    reply_queue: String,
}

impl Session {
    async fn open(
        url: &str,
        deadline: Duration,
        waiters: &Waiters,
        generation: &Arc<AtomicU64>,
    ) -> Result<Session> {
        let conn = connect(url, deadline).await?;
        let channel = conn.create_channel().rpc("opening a channel").await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .rpc("enabling publisher confirms")
            .await?;
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .rpc("declaring the manager's reply queue")
            .await?;
        let reply_queue = q.name().to_string();
        let mut consumer = channel
            .basic_consume(
                reply_queue.as_str().into(),
                "manager".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .rpc("consuming the reply queue")
            .await?;
        let w = waiters.clone();
        let (current, mine) = (
            generation.clone(),
            generation.fetch_add(1, Ordering::SeqCst) + 1,
        );
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let Ok((reply, blob)) = control::decode::<Reply>(&d.data) else {
                    continue;
                };
                let tx = w.lock().unwrap().remove(&reply.corr);
                if let Some(tx) = tx {
                    let _ = tx.send((reply, blob.to_vec()));
                }
            }
            // The connection is gone (a broker restart): no reply can come to this queue, so
            // whoever waits learns it now rather than at a timeout.
            if current.load(Ordering::SeqCst) == mine {
                w.lock().unwrap().clear();
            }
        });
        Ok(Session {
            conn,
            channel,
            reply_queue,
        })
    }
}

impl Link {
    pub async fn open(url: &str, deadline: Duration) -> Result<Link> {
        let waiters: Waiters = Arc::default();
        let generation = Arc::new(AtomicU64::new(0));
        let session = Session::open(url, deadline, &waiters, &generation).await?;
        Ok(Link {
            session: Mutex::new(Arc::new(session)),
            generation,
            url: url.to_string(),
            probe: tokio::sync::Mutex::new(Probe::default()),
            waiters,
            next: AtomicU64::new(1),
            durable: Mutex::default(),
            reconnecting: tokio::sync::Mutex::new(()),
        })
    }

    fn session(&self) -> Arc<Session> {
        self.session.lock().unwrap().clone()
    }

    /// The channel commands, declarations and publishes go out on.
    fn channel(&self) -> Channel {
        self.session().channel.clone()
    }

    fn reply_queue(&self) -> String {
        self.session().reply_queue.clone()
    }

    /// Whether the link's connection is up.
    pub fn connected(&self) -> bool {
        self.session().conn.status().connected()
    }

    /// Opens a new connection if the broker closed the link's (a restart), waiting up to
    /// `deadline` for the broker to take it; true if it did. Replies to commands sent before
    /// are lost with the old reply queue.
    pub async fn reconnect(&self, deadline: Duration) -> Result<bool> {
        if self.connected() {
            return Ok(false);
        }
        let _one = self.reconnecting.lock().await;
        if self.connected() {
            return Ok(true);
        }
        let session = Session::open(&self.url, deadline, &self.waiters, &self.generation).await?;
        let old = std::mem::replace(&mut *self.session.lock().unwrap(), Arc::new(session));
        close_quietly(&old.conn, "replaced after a broker restart").await;
        Ok(true)
    }

    /// Declares a service's exchanges and queues (idempotent); `durable`: they survive a
    /// broker restart (as do the service's control queues, declared later).
    pub async fn declare_service(&self, service: &str, durable: bool) -> Result<()> {
        // A service removed and deployed again under its name may change its mind.
        match durable {
            true => self.durable.lock().unwrap().insert(service.to_string()),
            false => self.durable.lock().unwrap().remove(service),
        };
        let ch = &self.channel();
        for ex in [
            names::input_exchange(service),
            names::output_exchange(service),
        ] {
            ch.exchange_declare(
                ex.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .rpc(format!("declaring exchange {ex}"))
            .await?;
        }
        for (q, ex) in [
            (
                names::primary_queue(service),
                names::input_exchange(service),
            ),
            (
                names::events_queue(service),
                names::output_exchange(service),
            ),
        ] {
            self.declare_bound_queue(&q, &ex, durable).await?;
        }
        // Durable, as instances declare it: refused input is kept for whoever looks.
        let dead = names::dead_letter_queue(service);
        ch.queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .rpc(format!("declaring queue {dead}"))
        .await?;
        Ok(())
    }

    /// Counts what `service`'s dead-letter queue holds, by the reason each message carries
    /// (`x-ms2m-reason`), leaving every one in place (see [`Link::peek`]).
    pub async fn dead_letters(&self, service: &str) -> Result<DeadLetters> {
        let queue = names::dead_letter_queue(service);
        let Some(total) = self.inspect(&queue).await? else {
            return Ok(DeadLetters::default());
        };
        let mut out = DeadLetters {
            total: u64::from(total),
            ..DeadLetters::default()
        };
        if total == 0 {
            return Ok(out);
        }
        let look = DeadLetters::READ_MAX.min(total as usize);
        self.peek(&queue, look, |m| {
            let reason = m
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-ms2m-reason").cloned())
                .and_then(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                })
                .unwrap_or_else(|| "unknown".into());
            *out.by_reason.entry(reason).or_default() += 1;
            true
        })
        .await?;
        Ok(out)
    }

    /// Shows `see` the first `look` messages of `queue` in order, until it returns false,
    /// taking none: they are fetched on a channel of their own, never acked, and handed back
    /// in order when it closes.
    async fn peek(
        &self,
        queue: &str,
        look: usize,
        mut see: impl FnMut(&lapin::message::Delivery) -> bool,
    ) -> Result<()> {
        let ch = self
            .session()
            .conn
            .create_channel()
            .rpc(format!("opening a channel to peek at {queue}"))
            .await?;
        for _ in 0..look {
            let got = ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .rpc(format!("peeking at {queue}"))
                .await?;
            match got {
                Some(m) if see(&m.delivery) => {}
                _ => break,
            }
        }
        ch.close(200, "peeked".into())
            .rpc(format!("handing the messages peeked at back to {queue}"))
            .await
    }

    async fn declare_bound_queue(&self, queue: &str, exchange: &str, durable: bool) -> Result<()> {
        let channel = self.channel();
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .rpc(format!("declaring queue {queue}"))
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .rpc(format!("binding {queue} to {exchange}"))
            .await
    }

    /// Binds a replay queue to the service's input exchange; from now on it keeps a copy of
    /// every new message.
    pub async fn bind_replay_queue(&self, service: &str, migration_id: &str) -> Result<String> {
        let q = names::replay_queue(service, migration_id);
        // Never durable: a migration the broker's restart interrupts is rolled back, and the
        // rollback deletes it.
        self.declare_bound_queue(&q, &names::input_exchange(service), false)
            .await?;
        Ok(q)
    }

    /// Ready messages of a queue, or None if it does not exist. Asked on a channel of its own:
    /// the broker closes the channel of a passive declare that fails, and the control channel
    /// must survive a queue that vanished.
    async fn inspect(&self, queue: &str) -> Result<Option<u32>> {
        Ok(self.inspect_counts(queue).await?.map(|(ready, _)| ready))
    }

    /// Ready messages and consumers of a queue, or None if it does not exist.
    async fn inspect_counts(&self, queue: &str) -> Result<Option<(u32, u32)>> {
        let mut probe = self.probe.lock().await;
        let ch = match probe.channel.as_ref() {
            Some(ch) if ch.status().connected() => ch.clone(),
            _ => {
                let worn = probe.opened >= PROBE_CHANNELS_PER_CONNECTION;
                let alive = probe.conn.as_ref().is_some_and(|c| c.status().connected());
                if worn || !alive {
                    if let Some(old) = probe.conn.take() {
                        close_quietly(&old, "probe connection replaced").await;
                    }
                    probe.conn = Some(connect(&self.url, Duration::from_secs(10)).await?);
                    probe.opened = 0;
                }
                probe.opened += 1;
                let conn = probe.conn.as_ref().expect("connected above");
                let ch = conn.create_channel().rpc("opening a probe channel").await?;
                probe.channel = Some(ch.clone());
                ch
            }
        };
        let declared = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .rpc(format!("inspecting queue {queue}"))
            .await;
        match declared {
            Ok(q) => Ok(Some((q.message_count(), q.consumer_count()))),
            // The broker answers a passive declare of a missing queue by closing the channel.
            Err(Error::Broker { .. })
                if probe.conn.as_ref().is_some_and(|c| c.status().connected()) =>
            {
                probe.channel = None;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Messages ready in a queue (not counting those fetched and unacknowledged).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        self.inspect(queue)
            .await?
            .ok_or_else(|| Error::BrokerRefused(format!("queue {queue} does not exist")))
    }

    /// Consumers of a queue (0 if it does not exist).
    pub async fn consumer_count(&self, queue: &str) -> Result<u32> {
        Ok(self.inspect_counts(queue).await?.map_or(0, |(_, c)| c))
    }

    /// The seq of the first data message waiting in `queue` whose seq is above `above` (other
    /// input, and seqs at or below it, are passed over; at most `look` messages are looked
    /// at), None if there is none. Nothing is taken (see [`Link::peek`]).
    pub async fn peek_first_seq(
        &self,
        queue: &str,
        above: u64,
        look: usize,
    ) -> Result<Option<u64>> {
        let mut first = None;
        self.peek(queue, look, |m| {
            if let Ok(Input::Data { seq, .. }) = serde_json::from_slice(&m.data) {
                first = Some(seq).filter(|s| *s > above);
            }
            first.is_none()
        })
        .await?;
        Ok(first)
    }

    /// Stops routing `exchange`'s messages to `queue`.
    pub async fn unbind(&self, queue: &str, exchange: &str) -> Result<()> {
        self.channel()
            .queue_unbind(
                queue.into(),
                exchange.into(),
                "".into(),
                FieldTable::default(),
            )
            .rpc(format!("unbinding {queue} from {exchange}"))
            .await
    }

    /// Whether a queue exists.
    pub async fn queue_exists(&self, queue: &str) -> Result<bool> {
        Ok(self.inspect(queue).await?.is_some())
    }

    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.channel()
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .rpc(format!("deleting queue {queue}"))
            .await?;
        Ok(())
    }

    pub async fn delete_exchange(&self, exchange: &str) -> Result<()> {
        self.channel()
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .rpc(format!("deleting exchange {exchange}"))
            .await
    }

    /// Registers interest in a reply before the message that causes it is sent.
    pub fn expect(&self, corr: &str) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(corr.to_string(), tx);
        rx
    }

    /// Publishes a barrier through the input exchange; the live instance streams its
    /// checkpoint to `stream` and replies with `corr == id`.
    pub async fn publish_barrier(&self, service: &str, id: &str, stream: StreamTo) -> Result<()> {
        let body = serde_json::to_vec(&Input::Barrier {
            id: id.to_string(),
            reply_to: self.reply_queue(),
            stream: Some(stream),
        })
        .expect("barrier serializes");
        self.publish(&names::input_exchange(service), "", &body)
            .await
    }

    /// Puts a barrier with `id` at the end of `queue` (a replay queue no longer bound to the
    /// input exchange): an instance armed with `id` that replays the queue answers when it
    /// meets it, with everything before it applied.
    pub async fn publish_marker(&self, queue: &str, id: &str) -> Result<()> {
        let body = serde_json::to_vec(&Input::Barrier {
            id: id.to_string(),
            reply_to: self.reply_queue(),
            stream: None,
        })
        .expect("a barrier serializes");
        self.publish("", queue, &body).await
    }

    /// Publishes `bodies` to `queue` in order, confirmed once at the end (the broker confirms
    /// in order on one channel).
    pub async fn publish_to_queue(
        &self,
        queue: &str,
        bodies: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<()> {
        self.publish_all("", queue, bodies).await
    }

    /// Publishes `bodies` to `exchange` in order, confirmed once at the end.
    pub async fn publish_to_exchange(
        &self,
        exchange: &str,
        bodies: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<()> {
        self.publish_all(exchange, "", bodies).await
    }

    async fn publish_all(
        &self,
        exchange: &str,
        queue: &str,
        bodies: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<()> {
        let mut last = None;
        let channel = self.channel();
        for body in bodies {
            last = Some(
                channel
                    .basic_publish(
                        exchange.into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default(),
                    )
                    .rpc(format!("publishing to {queue}"))
                    .await?,
            );
        }
        if let Some(confirm) = last {
            if confirm
                .rpc(format!("confirm of a publish to {queue}"))
                .await?
                .is_nack()
            {
                return Err(Error::BrokerRefused(format!(
                    "a message to {queue} was negatively confirmed"
                )));
            }
        }
        Ok(())
    }

    async fn publish(&self, exchange: &str, key: &str, body: &[u8]) -> Result<()> {
        let confirm = self
            .channel()
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .rpc(format!("publishing to {exchange}{key}"))
            .await?
            .rpc(format!("confirm of a publish to {exchange}{key}"))
            .await?;
        if confirm.is_nack() {
            return Err(Error::BrokerRefused(format!(
                "a message to {exchange}{key} was negatively confirmed"
            )));
        }
        Ok(())
    }

    /// Declares an instance's control queue, so commands can wait there before it starts.
    /// Durable for a durable service, as the instance declares it.
    pub async fn declare_control_queue(&self, service: &str, instance: &str) -> Result<()> {
        let durable = self.durable.lock().unwrap().contains(service);
        self.declare_queue_with(&names::control_queue(service, instance), durable)
            .await
    }

    /// Declares a plain queue (idempotent).
    pub async fn declare_queue(&self, queue: &str) -> Result<()> {
        self.declare_queue_with(queue, false).await
    }

    async fn declare_queue_with(&self, queue: &str, durable: bool) -> Result<()> {
        self.channel()
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .rpc(format!("declaring queue {queue}"))
            .await?;
        Ok(())
    }

    /// Sends a command to an instance; the reply is awaited with [`Sent::reply`].
    pub async fn send(
        &self,
        service: &str,
        instance: &str,
        command: Command,
        attachment: &[u8],
    ) -> Result<Sent> {
        let corr = self.next.fetch_add(1, Ordering::Relaxed).to_string();
        let what = command.name();
        let rx = self.expect(&corr);
        let env = Envelope {
            corr: corr.clone(),
            reply_to: self.reply_queue(),
            command,
        };
        let published = self
            .publish(
                "",
                &names::control_queue(service, instance),
                &control::encode(&env, attachment),
            )
            .await;
        if let Err(e) = published {
            self.waiters.lock().unwrap().remove(&corr);
            return Err(e);
        }
        Ok(Sent {
            rx,
            what: format!("{instance} to answer {what}"),
            corr,
            waiters: self.waiters.clone(),
        })
    }

    /// The hand-over of a cutover: where a stopping source sends `target`'s `finish_replay`
    /// (with a correlation id and reply queue of this manager), and the reply to wait for.
    pub fn hand_over(&self, service: &str, target: &str) -> (HandOver, Sent) {
        let corr = self.next.fetch_add(1, Ordering::Relaxed).to_string();
        let rx = self.expect(&corr);
        let hand_over = HandOver {
            queue: names::control_queue(service, target),
            corr: corr.clone(),
            reply_to: self.reply_queue(),
        };
        let sent = Sent {
            rx,
            what: format!("{target} to answer the finish_replay the source handed over"),
            corr,
            waiters: self.waiters.clone(),
        };
        (hand_over, sent)
    }

    /// Sends a command and waits for its reply.
    pub async fn command(
        &self,
        service: &str,
        instance: &str,
        command: Command,
        attachment: &[u8],
        timeout: Duration,
    ) -> Result<Answer> {
        self.send(service, instance, command, attachment)
            .await?
            .reply(timeout)
            .await
    }

    pub async fn close(&self) {
        if let Some(conn) = self.probe.lock().await.conn.take() {
            close_quietly(&conn, "testbed closes").await;
        }
        close_quietly(&self.session().conn, "testbed closes").await;
    }
}

/// A command on its way; its reply is still to come.
pub struct Sent {
    rx: oneshot::Receiver<Answer>,
    what: String,
    corr: String,
    waiters: Waiters,
}

impl Sent {
    /// Stops waiting for a reply that will not come (its command was never sent).
    pub fn abandon(self) {
        self.waiters.lock().unwrap().remove(&self.corr);
    }

    /// Waits for the reply; a reply that carries an error becomes `Err`.
    pub async fn reply(self, timeout: Duration) -> Result<Answer> {
        let answer = wait(self.rx, timeout, &self.what).await;
        if answer.is_err() {
            // Nobody waits any more: a late reply must not find a stale entry.
            self.waiters.lock().unwrap().remove(&self.corr);
        }
        let (reply, blob) = answer?;
        if let Some(e) = reply.error {
            return Err(Error::Instance {
                instance: reply.instance,
                command: reply.kind.name(),
                reason: e,
            });
        }
        Ok((reply, blob))
    }
}

/// Waits for an expected reply.
pub async fn wait(rx: oneshot::Receiver<Answer>, timeout: Duration, what: &str) -> Result<Answer> {
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(_)) => Err(Error::Timeout(format!(
            "the reply channel closed while waiting for {what}"
        ))),
        Err(_) => Err(Error::Timeout(format!(
            "waited {:.1} s for {what}",
            timeout.as_secs_f64()
        ))),
    }
}
