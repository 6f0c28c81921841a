//! The manager's side of the broker: service topology, and the control link to instances
//! (commands out, replies matched by correlation id).

use crate::error::{BrokerContext, Error, Result};
use futures_lite::StreamExt;
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties,
    ExchangeKind,
};
use ms2m_wire::control::{self, Command, Envelope, Reply};
use ms2m_wire::{names, Input};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
                    "the broker at {url} did not accept a connection within {:.0} s: {e}",
                    deadline.as_secs_f64()
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The migration manager's link to the broker.
pub struct Link {
    conn: Connection,
    channel: Channel,
    reply_queue: String,
    waiters: Waiters,
    next: AtomicU64,
}

impl Link {
    pub async fn open(url: &str, deadline: Duration) -> Result<Link> {
        let conn = connect(url, deadline).await?;
        let channel = conn.create_channel().await.broker("opening a channel")?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .broker("enabling publisher confirms")?;
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
            .await
            .broker("declaring the manager's reply queue")?;
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
            .await
            .broker("consuming the reply queue")?;
        let waiters: Waiters = Arc::default();
        let w = waiters.clone();
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
        });
        Ok(Link {
            conn,
            channel,
            reply_queue,
            waiters,
            next: AtomicU64::new(1),
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Declares a service's exchanges and queues (idempotent).
    pub async fn declare_service(&self, service: &str) -> Result<()> {
        let ch = &self.channel;
        for ex in [
            names::input_exchange(service),
            names::output_exchange(service),
        ] {
            ch.exchange_declare(
                ex.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .broker(format!("declaring exchange {ex}"))?;
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
            self.declare_bound_queue(&q, &ex).await?;
        }
        Ok(())
    }

    async fn declare_bound_queue(&self, queue: &str, exchange: &str) -> Result<()> {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .broker(format!("declaring queue {queue}"))?;
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .broker(format!("binding {queue} to {exchange}"))
    }

    /// Binds a replay queue to the service's input exchange; from now on it keeps a copy of
    /// every new message.
    pub async fn bind_replay_queue(&self, service: &str, migration_id: &str) -> Result<String> {
        let q = names::replay_queue(service, migration_id);
        self.declare_bound_queue(&q, &names::input_exchange(service))
            .await?;
        Ok(q)
    }

    /// Messages ready in a queue (not counting those fetched and unacknowledged).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .broker(format!("inspecting queue {queue}"))?;
        Ok(q.message_count())
    }

    /// Whether a queue exists (on a channel of its own: a failed passive declare closes it).
    pub async fn queue_exists(&self, queue: &str) -> Result<bool> {
        let ch = self
            .conn
            .create_channel()
            .await
            .broker("opening a probe channel")?;
        let found = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        if found {
            let _ = ch.close(200, "probe done".into()).await;
        }
        Ok(found)
    }

    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .broker(format!("deleting queue {queue}"))?;
        Ok(())
    }

    pub async fn delete_exchange(&self, exchange: &str) -> Result<()> {
        self.channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
            .broker(format!("deleting exchange {exchange}"))
    }

    /// Registers interest in a reply before the message that causes it is sent.
    pub fn expect(&self, corr: &str) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(corr.to_string(), tx);
        rx
    }

    /// Publishes a barrier through the input exchange; the live instance's checkpoint comes
    /// back as a reply with `corr == id`.
    pub async fn publish_barrier(&self, service: &str, id: &str) -> Result<()> {
        let body = serde_json::to_vec(&Input::Barrier {
            id: id.to_string(),
            reply_to: self.reply_queue.clone(),
        })
        .expect("barrier serializes");
        self.publish(&names::input_exchange(service), "", &body)
            .await
    }

    async fn publish(&self, exchange: &str, key: &str, body: &[u8]) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .broker(format!("publishing to {exchange}{key}"))?
            .await
            .broker(format!("confirm of a publish to {exchange}{key}"))?;
        if confirm.is_nack() {
            return Err(Error::BrokerRefused(format!(
                "a message to {exchange}{key} was negatively confirmed"
            )));
        }
        Ok(())
    }

    /// Declares an instance's control queue, so commands can wait there before it starts.
    pub async fn declare_control_queue(&self, service: &str, instance: &str) -> Result<()> {
        let q = names::control_queue(service, instance);
        self.channel
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .broker(format!("declaring queue {q}"))?;
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
        let what = format!("{command:?}");
        let what = what
            .split([' ', '{'])
            .next()
            .unwrap_or("command")
            .to_string();
        let rx = self.expect(&corr);
        let env = Envelope {
            corr: corr.clone(),
            reply_to: self.reply_queue.clone(),
            command,
        };
        self.publish(
            "",
            &names::control_queue(service, instance),
            &control::encode(&env, attachment),
        )
        .await?;
        Ok(Sent {
            rx,
            what: format!("{instance} to answer {what}"),
            corr,
            waiters: self.waiters.clone(),
        })
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
        let _ = self.conn.close(200, "testbed closes".into()).await;
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
    /// Waits for the reply; a reply that carries an error becomes `Err`.
    pub async fn reply(self, timeout: Duration) -> Result<Answer> {
        let answer = wait(self.rx, timeout, &self.what).await;
        if answer.is_err() {
            // Nobody waits any more: a late reply must not find a stale entry.
            self.waiters.lock().unwrap().remove(&self.corr);
        }
        let (reply, blob) = answer?;
        if let Some(e) = &reply.error {
            return Err(Error::MigrationFailed {
                phase: reply.kind.clone(),
                reason: format!("{}: {e}", reply.instance),
                report: None,
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
