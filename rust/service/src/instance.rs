//! The instance's event loop: control commands, live messages and replayed messages, one at a
//! time, so that every command sees the state between two messages.

use crate::Config;
use anyhow::{Context, Result};
use futures_lite::StreamExt;
use lapin::{
    message::Delivery,
    options::*,
    types::{FieldTable, ShortString},
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
};
use ms2m_wire::{
    control::{self, Command, Envelope, Reply},
    names, now_ns,
    state::ServiceState,
    Input, Mode, OutputEvent,
};

/// A consumer with the channel it owns: closing the channel hands every fetched but unacked
/// message back to its queue.
struct Subscription {
    channel: Channel,
    consumer: Consumer,
}

/// A channel with its prefetch set, ready to consume.
async fn consumer_channel(conn: &Connection, prefetch: u16) -> Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel)
}

impl Subscription {
    async fn open(conn: &Connection, queue: &str, tag: &str, prefetch: u16) -> Result<Self> {
        Self::on(consumer_channel(conn, prefetch).await?, queue, tag).await
    }

    /// Consumes `queue` on a channel opened beforehand.
    async fn on(channel: Channel, queue: &str, tag: &str) -> Result<Self> {
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming {queue}"))?;
        Ok(Subscription { channel, consumer })
    }

    async fn close(self) -> Result<()> {
        self.channel
            .close(200, ShortString::from("instance leaves the queue"))
            .await?;
        Ok(())
    }
}

/// Publishes a reply (header and attachment) to the manager's queue; resolves once the frames
/// are written (the confirm is not awaited).
async fn publish_reply(
    out: &Channel,
    reply_to: &str,
    reply: &Reply,
    attachment: &[u8],
) -> lapin::Result<()> {
    out.basic_publish(
        "".into(),
        reply_to.into(),
        BasicPublishOptions::default(),
        &control::encode(reply, attachment),
        BasicProperties::default(),
    )
    .await
    .map(drop)
}

/// Waits for the next delivery of an optional subscription; pends forever when there is none.
async fn next_of(sub: &mut Option<Subscription>) -> Option<lapin::Result<Delivery>> {
    match sub {
        Some(s) => s.consumer.next().await,
        None => std::future::pending().await,
    }
}

/// A reply that waits for a condition on the state.
struct Pending {
    corr: String,
    reply_to: String,
    kind: &'static str,
}

struct ReplayState {
    sub: Subscription,
    paused: bool,
    /// Never apply a message above this (from the `replay` command).
    limit: Option<u64>,
    /// `finish_replay`: stop at this sequence number, maybe go live, then reply.
    until: Option<(u64, bool, Pending)>,
}

struct Instance {
    cfg: Config,
    conn: Connection,
    /// Publishes replies and output events, with publisher confirms.
    out: Channel,
    state: ServiceState,
    live: Option<Subscription>,
    /// A channel opened ahead of going live (while replaying), so that the cutover waits for
    /// one broker round trip (the consume) instead of three.
    standby: Option<Channel>,
    stop_after: Option<(u64, Pending)>,
    replay: Option<ReplayState>,
    replayed: u64,
    skipped: u64,
}

enum Event {
    Control(Option<lapin::Result<Delivery>>),
    Live(Option<lapin::Result<Delivery>>),
    Replay(Option<lapin::Result<Delivery>>),
    Terminate,
}

/// Runs the instance until a `shutdown` command, SIGTERM, or a broker failure.
pub async fn run(cfg: Config) -> Result<()> {
    let conn = Connection::connect(&cfg.amqp_url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to the broker at {}", cfg.amqp_url))?;
    let setup = conn.create_channel().await?;
    let control_queue = names::control_queue(&cfg.service, &cfg.instance);
    setup
        .queue_declare(
            control_queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    setup
        .exchange_declare(
            names::output_exchange(&cfg.service).into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let out = conn.create_channel().await?;
    out.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut control = Subscription::open(&conn, &control_queue, "control", 16).await?;
    let mut inst = Instance {
        state: ServiceState::new(cfg.state_bytes),
        cfg,
        conn,
        out,
        live: None,
        standby: None,
        stop_after: None,
        replay: None,
        replayed: 0,
        skipped: 0,
    };
    if inst.cfg.live {
        inst.start_live().await?;
    }
    println!(
        "ms2m-service ready: service={} instance={} live={}",
        inst.cfg.service, inst.cfg.instance, inst.cfg.live
    );
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let replaying = inst.replay.as_ref().is_some_and(|r| !r.paused);
        let event = tokio::select! {
            biased;
            _ = sigterm.recv() => Event::Terminate,
            d = control.consumer.next() => Event::Control(d),
            d = next_of(&mut inst.live), if inst.live.is_some() => Event::Live(d),
            d = async {
                match inst.replay.as_mut() {
                    Some(r) => r.sub.consumer.next().await,
                    None => std::future::pending().await,
                }
            }, if replaying => Event::Replay(d),
        };
        match event {
            Event::Terminate => break,
            Event::Control(d) => {
                let d = d.context("control queue closed")??;
                d.ack(BasicAckOptions::default()).await?;
                if !inst.on_control(&d.data).await? {
                    break;
                }
            }
            Event::Live(d) => {
                let d = d.context("primary queue consumer closed")??;
                inst.on_live(d).await?;
            }
            Event::Replay(d) => {
                let d = d.context("replay queue consumer closed")??;
                inst.on_replay(d).await?;
            }
        }
    }
    let _ = control.close().await;
    let _ = inst.conn.close(200, "instance exits".into()).await;
    Ok(())
}

impl Instance {
    fn reply(&self, corr: &str, kind: &str) -> Reply {
        Reply {
            corr: corr.to_string(),
            instance: self.cfg.instance.clone(),
            kind: kind.to_string(),
            last_seq: self.state.last_seq,
            count: self.state.count,
            t_ns: now_ns(),
            replayed: self.replayed,
            skipped: self.skipped,
            ..Reply::default()
        }
    }

    /// Sends a reply. It waits until the frames are written, not for the broker's confirm:
    /// the manager has the reply as soon as the broker routes it, and a reply that goes missing
    /// shows as the manager's timeout.
    async fn send(&self, reply_to: &str, reply: &Reply, attachment: &[u8]) -> Result<()> {
        publish_reply(&self.out, reply_to, reply, attachment).await?;
        Ok(())
    }

    /// Sends a checkpoint without holding up the event loop: the state is copied here, and
    /// writing its megabytes happens while the instance goes on serving.
    fn send_in_background(&self, reply_to: String, reply: Reply, attachment: Vec<u8>) {
        let out = self.out.clone();
        tokio::spawn(async move {
            if let Err(e) = publish_reply(&out, &reply_to, &reply, &attachment).await {
                eprintln!("ms2m-service: sending the checkpoint failed: {e}");
            }
        });
    }

    async fn start_live(&mut self) -> Result<()> {
        if self.live.is_none() {
            let queue = names::primary_queue(&self.cfg.service);
            let channel = match self.standby.take() {
                Some(c) => c,
                None => consumer_channel(&self.conn, self.cfg.prefetch).await?,
            };
            self.live = Some(Subscription::on(channel, &queue, &self.cfg.instance).await?);
        }
        Ok(())
    }

    async fn stop_live(&mut self) -> Result<()> {
        if let Some(sub) = self.live.take() {
            sub.close().await?;
        }
        Ok(())
    }

    /// Handles one control message; returns false when the instance must exit.
    async fn on_control(&mut self, body: &[u8]) -> Result<bool> {
        let (env, attachment): (Envelope, &[u8]) = match control::decode(body) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("ms2m-service: ignoring control message: {e}");
                return Ok(true);
            }
        };
        let Envelope {
            corr,
            reply_to,
            command,
        } = env;
        let t_begin = now_ns();
        match command {
            Command::Status => {
                self.send(&reply_to, &self.reply(&corr, "status"), &[])
                    .await?
            }
            Command::StartLive => {
                self.start_live().await?;
                self.send(&reply_to, &self.reply(&corr, "start_live"), &[])
                    .await?;
            }
            Command::StopLive { after_seq } => {
                let pending = Pending {
                    corr,
                    reply_to,
                    kind: "stop_live",
                };
                match after_seq {
                    Some(s) if self.live.is_some() && self.state.last_seq < s => {
                        self.stop_after = Some((s, pending));
                    }
                    _ => self.finish_stop(pending).await?,
                }
            }
            Command::Snapshot => {
                let snap = self.state.to_snapshot();
                let mut r = self.reply(&corr, "snapshot");
                r.t_begin_ns = t_begin;
                self.send(&reply_to, &r, &snap).await?;
            }
            Command::Restore => {
                let error = match ServiceState::from_snapshot(attachment) {
                    Ok(_) if self.live.is_some() => {
                        Some("cannot restore while serving live".into())
                    }
                    Ok(s) => {
                        self.state = s;
                        None
                    }
                    Err(e) => Some(e.to_string()),
                };
                // Built after the restore, so that it reports the restored position.
                let mut r = self.reply(&corr, "restore");
                r.error = error;
                r.t_begin_ns = t_begin;
                self.send(&reply_to, &r, &[]).await?;
            }
            Command::Replay { queue, until_seq } => {
                let mut r = self.reply(&corr, "replay");
                if self.replay.is_some() {
                    r.error = Some("already replaying".into());
                } else {
                    if self.standby.is_none() {
                        self.standby = Some(consumer_channel(&self.conn, self.cfg.prefetch).await?);
                    }
                    match Subscription::open(&self.conn, &queue, "replay", self.cfg.prefetch).await
                    {
                        Ok(sub) => {
                            self.replay = Some(ReplayState {
                                sub,
                                paused: false,
                                limit: until_seq,
                                until: None,
                            })
                        }
                        Err(e) => r.error = Some(format!("{e:#}")),
                    }
                }
                self.send(&reply_to, &r, &[]).await?;
            }
            Command::PauseReplay => {
                if let Some(r) = self.replay.as_mut() {
                    r.paused = true;
                }
                self.send(&reply_to, &self.reply(&corr, "pause_replay"), &[])
                    .await?;
            }
            Command::FinishReplay { until_seq, go_live } => {
                let pending = Pending {
                    corr,
                    reply_to,
                    kind: "finish_replay",
                };
                match self.replay.as_mut() {
                    Some(r) if self.state.last_seq < until_seq => {
                        r.paused = false;
                        r.until = Some((until_seq, go_live, pending));
                    }
                    _ => self.finish_replay(go_live, pending).await?,
                }
            }
            Command::Digest => {
                let mut r = self.reply(&corr, "digest");
                r.digest = Some(self.state.digest());
                self.send(&reply_to, &r, &[]).await?;
            }
            Command::Shutdown => {
                self.stop_live().await?;
                if let Some(r) = self.replay.take() {
                    r.sub.close().await?;
                }
                self.send(&reply_to, &self.reply(&corr, "shutdown"), &[])
                    .await?;
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn finish_stop(&mut self, p: Pending) -> Result<()> {
        self.stop_live().await?;
        self.send(&p.reply_to, &self.reply(&p.corr, p.kind), &[])
            .await
    }

    async fn finish_replay(&mut self, go_live: bool, p: Pending) -> Result<()> {
        // Serving first: closing the replay channel is one more round trip nobody waits for.
        let replay = self.replay.take();
        if go_live {
            self.start_live().await?;
        }
        self.send(&p.reply_to, &self.reply(&p.corr, p.kind), &[])
            .await?;
        if let Some(r) = replay {
            r.sub.close().await?;
        }
        Ok(())
    }

    /// Applies a data message and reports it on the output exchange.
    async fn process(&mut self, seq: u64, t_pub_ns: u64, payload: &str, mode: Mode) -> Result<()> {
        let t_start_ns = now_ns();
        if !self.cfg.processing.is_zero() {
            tokio::time::sleep(self.cfg.processing).await;
        }
        self.state.apply(seq, payload.as_bytes());
        let event = OutputEvent {
            instance: self.cfg.instance.clone(),
            seq,
            mode,
            t_pub_ns,
            t_start_ns,
            t_end_ns: now_ns(),
            chain: ms2m_wire::hex(&self.state.chain),
        };
        self.out
            .basic_publish(
                names::output_exchange(&self.cfg.service).into(),
                "".into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&event)?,
                BasicProperties::default(),
            )
            .await?
            .await?;
        Ok(())
    }

    async fn on_live(&mut self, d: Delivery) -> Result<()> {
        match serde_json::from_slice::<Input>(&d.data) {
            Ok(Input::Data {
                seq,
                t_pub_ns,
                payload,
            }) => self.process(seq, t_pub_ns, &payload, Mode::Live).await?,
            Ok(Input::Barrier { id, reply_to }) => {
                let t_begin = now_ns();
                let snap = self.state.to_snapshot();
                let mut r = self.reply(&id, "checkpoint");
                r.t_begin_ns = t_begin;
                self.send_in_background(reply_to, r, snap);
            }
            Err(e) => eprintln!("ms2m-service: dropping malformed input: {e}"),
        }
        d.ack(BasicAckOptions::default()).await?;
        if let Some((after, _)) = &self.stop_after {
            if self.state.last_seq >= *after {
                let (_, p) = self.stop_after.take().unwrap();
                self.finish_stop(p).await?;
            }
        }
        Ok(())
    }

    async fn on_replay(&mut self, d: Delivery) -> Result<()> {
        let mut beyond = false;
        if let Ok(Input::Data {
            seq,
            t_pub_ns,
            payload,
        }) = serde_json::from_slice::<Input>(&d.data)
        {
            beyond = self.replay.as_ref().is_some_and(|r| {
                r.limit.is_some_and(|l| seq > l)
                    || r.until.as_ref().is_some_and(|(until, _, _)| seq > *until)
            });
            if seq <= self.state.last_seq {
                self.skipped += 1;
            } else if !beyond {
                self.process(seq, t_pub_ns, &payload, Mode::Replay).await?;
                self.replayed += 1;
            }
        }
        // Barriers and messages the snapshot already holds are dropped: replay has no effects.
        d.ack(BasicAckOptions::default()).await?;
        // A message beyond `until` means the rest is not coming: the target stops either way.
        let done = self
            .replay
            .as_ref()
            .and_then(|r| r.until.as_ref())
            .is_some_and(|(until, _, _)| self.state.last_seq >= *until || beyond);
        if done {
            let (_, go_live, p) = self.replay.as_mut().unwrap().until.take().unwrap();
            self.finish_replay(go_live, p).await?;
        }
        Ok(())
    }
}
