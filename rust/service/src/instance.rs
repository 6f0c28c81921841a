//! The instance's event loop: control commands, live messages and replayed messages, one at a
//! time, so that every command sees the state between two messages.
//!
//! This is only the I/O half: it turns lapin deliveries into [`crate::machine::Event`]s and
//! executes the [`Action`]s the core returns. Every decision about what to apply, skip, stop or
//! answer is in [`crate::machine`].

use crate::machine::{Action, Core, Event as CoreEvent, Outgoing, ReplaySpan};
use crate::pipeline::{Ack, Pipeline, Publish};
use crate::{Config, Service};
use anyhow::{Context, Result};
use futures_lite::StreamExt;
use lapin::{
    message::Delivery,
    options::*,
    types::{FieldTable, ShortString},
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
    PublisherConfirm,
};
use ms2m_wire::{
    control::{self, Checkpoint, ChunkHeader, Command, Envelope, Reply, StreamTo},
    names, now_ns, parse_input, Mode, OutputEvent, Refused,
};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Chunks of a checkpoint published and not yet confirmed: enough to keep the broker busy,
/// few enough that the frames waiting in the client stay a few chunks' worth of memory.
const STREAM_WINDOW: usize = 4;
/// Longest wait for the next chunk of a checkpoint being fetched: a source that died
/// mid-stream must fail the fetch, not hang the target.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a source serves a checkpoint for a direct transfer that nobody fetches: a
/// migration that gave up must not leave the snapshot's copy in memory for good.
const SERVE_IDLE: Duration = Duration::from_secs(600);

/// The task serving the last checkpoint taken for a direct transfer, if it still runs.
static SERVING: std::sync::Mutex<Option<tokio::task::AbortHandle>> = std::sync::Mutex::new(None);
/// A replay consumer prefetches at least what it processes in this long, up to
/// [`REPLAY_PREFETCH_MAX`]: with a live-sized prefetch a fast target would wait for a broker
/// round trip every few messages and replay no faster than it serves. Not more: the manager
/// takes an empty replay queue for a caught-up target, and what the target holds unprocessed
/// is the error of that judgement.
const REPLAY_IN_HAND: Duration = Duration::from_millis(10);
const REPLAY_PREFETCH_MAX: u16 = 1000;
/// How much of a spare buffer is mapped between two looks at whether it is still wanted.
const MAP_STEP: usize = 16 << 20;
/// How long an instance of a durable service waits for a restarted broker before it gives up
/// (a RabbitMQ restart takes a few seconds; a broker gone for good ends the instance).
const RECONNECT_WITHIN: Duration = Duration::from_secs(120);
/// How long a failed instance watches its connections before it takes the failure for the
/// broker's (they close a moment after the first channel or consumer error shows).
const LOSS_SETTLES: Duration = Duration::from_secs(2);

/// A consumer with the channel it owns: closing the channel hands every fetched but unacked
/// message back to its queue.
struct Subscription {
    channel: Channel,
    consumer: Consumer,
    /// The queue consumed: a reconnected instance consumes it again.
    queue: String,
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
        Ok(Subscription {
            channel,
            consumer,
            queue: queue.to_string(),
        })
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

/// Sends `o`: streams its attachment (a snapshot) to `o.stream` first when it has a stream (to
/// its queue on `stream_channel`, or served to the target directly), and replies with the
/// stream's description, or with why streaming failed: nothing about a checkpoint stops the
/// instance. The reply is stamped when it goes out.
async fn deliver(
    out: &Channel,
    stream_channel: Option<Result<Channel>>,
    o: Outgoing,
    spare: Spare,
) -> lapin::Result<()> {
    let Outgoing {
        to,
        mut reply,
        attachment,
        stream,
    } = o;
    let attachment = match stream {
        Some(stream) => {
            let streamed = match (&stream.listen, stream_channel) {
                (Some(listen), _) => {
                    serve_checkpoint(attachment, &stream, listen, spare.clone()).await
                }
                (None, Some(Ok(channel))) => {
                    let r = stream_checkpoint(&channel, attachment, &stream, &spare).await;
                    let _ = channel.close(200, "checkpoint streamed".into()).await;
                    r
                }
                (None, Some(Err(e))) => Err(e),
                (None, None) => Err(anyhow::anyhow!("no channel to stream on")),
            };
            match streamed {
                Ok(checkpoint) => reply.checkpoint = Some(checkpoint),
                Err(e) => {
                    reply.error = Some(format!(
                        "streaming the checkpoint to {} failed: {e:#}",
                        stream.listen.as_deref().unwrap_or(&stream.queue)
                    ))
                }
            }
            Vec::new()
        }
        None => attachment,
    };
    reply.t_ns = now_ns();
    publish_reply(out, &to, &reply, &attachment).await?;
    spare.give_back(attachment);
    Ok(())
}

/// Where a snapshot's buffer goes once its bytes are out: back to the event loop, which keeps
/// it for the next snapshot (see [`ms2m_service::Service::snapshot_into`]).
#[derive(Clone)]
struct Spare(tokio::sync::mpsc::UnboundedSender<Vec<u8>>);

impl Spare {
    /// Buffers under a MiB are not worth keeping.
    fn give_back(&self, buf: Vec<u8>) {
        if buf.capacity() >= 1 << 20 {
            let _ = self.0.send(buf);
        }
    }

    /// Gives back the snapshot if nothing else holds it any more.
    fn give_back_shared(&self, snapshot: Arc<Vec<u8>>) {
        if let Ok(buf) = Arc::try_unwrap(snapshot) {
            self.give_back(buf);
        }
    }
}

/// Serves `snapshot` for a direct transfer: listens on `listen`, hashes the snapshot, and
/// answers with where it is served; a task then sends the chunks to whoever connects, until all
/// of them went out on one connection, or nobody came for [`SERVE_IDLE`]. The task holds
/// the one copy of the snapshot; the broker carries none of it.
async fn serve_checkpoint(
    snapshot: Vec<u8>,
    to: &StreamTo,
    listen: &str,
    spare: Spare,
) -> Result<Checkpoint> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?.to_string();
    let addr_served = addr.clone();
    let snapshot = Arc::new(snapshot);
    let snap = snapshot.clone();
    let sha256 = in_background(move || ms2m_wire::hex(&Sha256::digest(&snap[..]))).await?;
    let total = snapshot.len() as u64;
    let chunk_bytes = to.chunk_bytes;
    let chunks = ChunkHeader::split(total, chunk_bytes).count() as u32;
    let serving = tokio::spawn(async move {
        loop {
            let accepted = tokio::time::timeout(SERVE_IDLE, listener.accept()).await;
            let Ok(Ok((mut conn, peer))) = accepted else {
                eprintln!("ms2m-service: stopped serving the checkpoint on {addr_served}");
                return;
            };
            match send_chunks(&mut conn, &snapshot, chunk_bytes).await {
                Ok(()) => return spare.give_back_shared(snapshot),
                Err(e) => eprintln!("ms2m-service: serving the checkpoint to {peer}: {e:#}"),
            }
        }
    });
    // A newer checkpoint replaces an older one nobody fetched (a migration rolled back): the
    // instance never holds more than one snapshot copy besides its state.
    let older = SERVING
        .lock()
        .expect("serving lock")
        .replace(serving.abort_handle());
    if let Some(older) = older {
        older.abort();
    }
    Ok(Checkpoint {
        queue: to.queue.clone(),
        bytes: total,
        chunks,
        sha256,
        addr: Some(addr),
    })
}

/// Writes every chunk of `snapshot` to `conn`, each a length-prefixed envelope as on a
/// checkpoint queue, then waits (a while) for the reader to close: it closes once it has
/// checked them, and the relay of a link may still hold the last bytes until then.
async fn send_chunks(
    conn: &mut tokio::net::TcpStream,
    snapshot: &[u8],
    chunk_bytes: u32,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A reader that stops reading (frozen, or behind a link that is down) must not hold the
    // snapshot's copy for good: every piece has to go out within CHUNK_TIMEOUT.
    let mut write = async |bytes: &[u8]| -> Result<()> {
        for piece in bytes.chunks(64 * 1024) {
            tokio::time::timeout(CHUNK_TIMEOUT, conn.write_all(piece))
                .await
                .map_err(|_| {
                    anyhow::anyhow!("the reader took nothing for {} s", CHUNK_TIMEOUT.as_secs())
                })??;
        }
        Ok(())
    };
    for (header, range) in ChunkHeader::split(snapshot.len() as u64, chunk_bytes) {
        let head = control::encode(&header, &[]);
        let frame = (head.len() + range.len()) as u32;
        write(&frame.to_le_bytes()).await?;
        write(&head).await?;
        write(&snapshot[range]).await?;
    }
    conn.flush().await?;
    let mut rest = [0u8; 1];
    let _ = tokio::time::timeout(CHUNK_TIMEOUT, conn.read(&mut rest)).await;
    Ok(())
}

/// Writes `snapshot` to `to.queue` as chunks of at most `to.chunk_bytes`, at most
/// [`STREAM_WINDOW`] unconfirmed at a time, hashing each on the blocking pool while it
/// travels (the event loop keeps serving). Done when the broker confirmed every chunk.
async fn stream_checkpoint(
    channel: &Channel,
    snapshot: Vec<u8>,
    to: &StreamTo,
    spare: &Spare,
) -> Result<Checkpoint> {
    let snapshot = Arc::new(snapshot);
    let total = snapshot.len() as u64;
    let mut in_flight = VecDeque::new();
    let mut hasher = Sha256::new();
    let mut chunks = 0;
    for (header, range) in ChunkHeader::split(total, to.chunk_bytes) {
        let body = control::encode(&header, &snapshot[range.clone()]);
        // Mandatory: a chunk for a queue that does not exist comes back instead of vanishing.
        let confirm = channel
            .basic_publish(
                "".into(),
                to.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                BasicProperties::default(),
            )
            .await?;
        drop(body);
        in_flight.push_back(confirm);
        let snap = snapshot.clone();
        hasher = in_background(move || {
            hasher.update(&snap[range]);
            hasher
        })
        .await?;
        if in_flight.len() >= STREAM_WINDOW {
            confirmed(in_flight.pop_front().expect("not empty"), &to.queue).await?;
        }
        chunks = header.count;
    }
    while let Some(c) = in_flight.pop_front() {
        confirmed(c, &to.queue).await?;
    }
    spare.give_back_shared(snapshot);
    Ok(Checkpoint {
        queue: to.queue.clone(),
        bytes: total,
        chunks,
        sha256: ms2m_wire::hex(&hasher.finalize()),
        addr: None,
    })
}

/// Waits for a chunk's confirm; a nack or a chunk returned unroutable is an error.
async fn confirmed(confirm: PublisherConfirm, queue: &str) -> Result<()> {
    let c = confirm.await?;
    if c.is_nack() {
        anyhow::bail!("the broker refused (nacked) a chunk");
    }
    if c.take_message().is_some() {
        anyhow::bail!("queue {queue} does not exist (a chunk came back unroutable)");
    }
    Ok(())
}

/// Waits for the next delivery of an optional subscription; pends forever when there is none.
async fn next_of(sub: &mut Option<Subscription>) -> Option<lapin::Result<Delivery>> {
    match sub {
        Some(s) => s.consumer.next().await,
        None => std::future::pending().await,
    }
}

struct Instance<S> {
    cfg: Config,
    conn: Connection,
    /// Checkpoints stream over a connection of their own: in one TCP stream with the live
    /// path, their megabytes would queue ahead of every output event and ack (head-of-line
    /// blocking), and a source behind a slow link would stop serving for the whole upload.
    bulk: Connection,
    /// Publishes replies, output events and hand-overs, with publisher confirms.
    out: Channel,
    /// Confirms of output events, then acks, in order (see [`crate::pipeline`]).
    pipeline: Pipeline,
    core: Core<S>,
    live: Option<Subscription>,
    /// A channel opened ahead of going live (while replaying), so that the cutover waits for
    /// one broker round trip (the consume) instead of three.
    standby: Option<Channel>,
    replay: Option<Subscription>,
    spare: Spare,
    /// A buffer for snapshots was prepared (once per instance: after that, checkpoints give
    /// theirs back).
    spare_prepared: bool,
    /// Cleared to give up the spare being prepared (None: none is).
    spare_wanted: Option<Arc<AtomicBool>>,
    /// A durable service's last live output events (seq, body), newest last: a message the
    /// broker hands back after a restart (applied, its ack lost) gets its event again instead
    /// of being applied twice. Never more than the unacked window needs.
    recent_outputs: VecDeque<(u64, Vec<u8>)>,
}

/// An instance's broker connections, with its control queue consumed.
struct Connected {
    conn: Connection,
    bulk: Connection,
    out: Channel,
    control: Subscription,
}

/// Connects, retrying for `patience` (zero: once).
async fn connect_within(cfg: &Config, patience: Duration) -> Result<Connection> {
    let start = Instant::now();
    loop {
        match Connection::connect(&cfg.amqp_url, ConnectionProperties::default()).await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() >= patience => {
                return Err(e)
                    .with_context(|| format!("connecting to the broker at {}", cfg.broker_shown()))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Opens the instance's connections and declares what it publishes to and consumes.
async fn connect(cfg: &Config, patience: Duration) -> Result<Connected> {
    let conn = connect_within(cfg, patience).await?;
    let bulk = connect_within(cfg, patience).await?;
    let setup = conn.create_channel().await?;
    let control_queue = names::control_queue(&cfg.service, &cfg.instance);
    setup
        .queue_declare(
            control_queue.as_str().into(),
            QueueDeclareOptions {
                durable: cfg.durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // Durable, as the testbed declares it: refused input is kept for whoever looks.
    setup
        .queue_declare(
            names::dead_letter_queue(&cfg.service).as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    setup
        .exchange_declare(
            names::output_exchange(&cfg.service).into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: cfg.durable,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = setup.close(200, "declared".into()).await;
    let out = conn.create_channel().await?;
    out.confirm_select(ConfirmSelectOptions::default()).await?;
    let control = Subscription::open(&conn, &control_queue, "control", 16).await?;
    Ok(Connected {
        conn,
        bulk,
        out,
        control,
    })
}

enum Event {
    Control(Option<lapin::Result<Delivery>>),
    Live(Option<lapin::Result<Delivery>>),
    Replay(Option<lapin::Result<Delivery>>),
    Idle,
    PipelineFailed(anyhow::Error),
    Terminate,
    /// A buffer for the next snapshot: prepared in the background, or given back.
    Spare(Vec<u8>),
}

/// Whether the event loop goes on.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

/// Runs the instance until a `shutdown` command, SIGTERM, or a broker failure (for a durable
/// service: a broker that does not come back within [`RECONNECT_WITHIN`]).
pub async fn run<S: Service>(cfg: Config, service: S) -> Result<()> {
    let Connected {
        conn,
        bulk,
        out,
        mut control,
    } = connect(&cfg, Duration::ZERO).await?;
    let (spare, mut spares) = tokio::sync::mpsc::unbounded_channel();
    let mut inst = Instance {
        core: Core::new(cfg.instance.clone(), service).with_max_seq_gap(cfg.max_seq_gap),
        cfg,
        conn,
        bulk,
        out,
        pipeline: Pipeline::start(),
        live: None,
        standby: None,
        replay: None,
        spare: Spare(spare),
        spare_prepared: false,
        spare_wanted: None,
        recent_outputs: VecDeque::new(),
    };
    let boot = inst.core.boot(inst.cfg.live);
    inst.execute(boot, None).await?;
    println!(
        "ms2m-service ready: service={} instance={} live={}",
        inst.cfg.service, inst.cfg.instance, inst.cfg.live
    );
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        match inst.serve(&mut control, &mut sigterm, &mut spares).await {
            Ok(()) => break,
            Err(e) if inst.cfg.durable && inst.lost_broker().await => {
                eprintln!("ms2m-service: lost the broker ({e:#}); reconnecting, the state kept");
                control = inst.reconnect().await?;
                eprintln!("ms2m-service reconnected: instance={}", inst.cfg.instance);
            }
            Err(e) => return Err(e),
        }
    }
    let _ = inst.pipeline.flush().await;
    let _ = control.close().await;
    let _ = inst.bulk.close(200, "instance exits".into()).await;
    let _ = inst.conn.close(200, "instance exits".into()).await;
    Ok(())
}

/// The prefetch of a replay consumer (see [`REPLAY_IN_HAND`]): never less than live's.
fn replay_prefetch(cfg: &Config) -> u16 {
    let in_hand = REPLAY_IN_HAND.as_secs_f64() / cfg.processing.as_secs_f64().max(1e-6);
    cfg.prefetch
        .max((in_hand.ceil() as u16).min(REPLAY_PREFETCH_MAX))
}

impl<S: Service> Instance<S> {
    /// Serves until a `shutdown` command or SIGTERM (Ok) or a failure (Err).
    async fn serve(
        &mut self,
        control: &mut Subscription,
        sigterm: &mut tokio::signal::unix::Signal,
        spares: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) -> Result<()> {
        loop {
            let (polls_live, polls_replay) = (self.core.polls_live(), self.core.polls_replay());
            let event = tokio::select! {
                biased;
                _ = sigterm.recv() => Event::Terminate,
                e = self.pipeline.failed() => Event::PipelineFailed(e),
                d = control.consumer.next() => Event::Control(d),
                Some(buf) = spares.recv() => Event::Spare(buf),
                d = next_of(&mut self.live), if polls_live => Event::Live(d),
                d = next_of(&mut self.replay), if polls_replay => Event::Replay(d),
                // Last, so only when nothing above is ready: the end of a run of replayed messages.
                _ = std::future::ready(()), if self.core.has_open_span() => Event::Idle,
            };
            let flow = match event {
                Event::Terminate => Flow::Exit,
                Event::Spare(buf) => {
                    self.spare_wanted = None;
                    self.core.offer_buffer(buf);
                    Flow::Continue
                }
                Event::PipelineFailed(e) => return Err(e),
                Event::Idle => {
                    let actions = self.core.handle(now_ns(), CoreEvent::Idle);
                    self.execute(actions, None).await?
                }
                Event::Control(d) => {
                    let d = d.context("control queue closed")??;
                    d.ack(BasicAckOptions::default()).await?;
                    match control::decode::<Envelope>(&d.data) {
                        Ok((env, attachment)) => {
                            if matches!(
                                env.command,
                                Command::ArmBarrier { .. } | Command::Snapshot { .. }
                            ) {
                                self.give_up_spare();
                            }
                            let actions = self
                                .core
                                .handle(now_ns(), CoreEvent::Control(env, attachment));
                            self.execute(actions, None).await?
                        }
                        Err(e) => {
                            eprintln!("ms2m-service: refusing a control message: {e}");
                            // Answered when it says where: its sender learns why at once.
                            if let Some((corr, reply_to)) = control::reply_address(&d.data) {
                                let reply = Reply {
                                    corr,
                                    instance: self.cfg.instance.clone(),
                                    error: Some(e.to_string()),
                                    t_ns: now_ns(),
                                    ..Reply::default()
                                };
                                publish_reply(&self.out, &reply_to, &reply, &[]).await?;
                            }
                            Flow::Continue
                        }
                    }
                }
                Event::Live(d) => {
                    let d = d.context("primary queue consumer closed")??;
                    let channel = self.live.as_ref().map_or(0, |s| s.channel.id());
                    if d.redelivered && self.resend_output(&d, channel)? {
                        continue;
                    }
                    let input = CoreEvent::Live(parse_input(&d.data, self.cfg.max_input_bytes));
                    let actions = self.core.handle(now_ns(), input);
                    let prefetch = self.cfg.prefetch;
                    self.execute(actions, Some((&d, channel, prefetch))).await?
                }
                Event::Replay(d) => {
                    let d = d.context("replay queue consumer closed")??;
                    let channel = self.replay.as_ref().map_or(0, |s| s.channel.id());
                    let input = CoreEvent::Replay(parse_input(&d.data, self.cfg.max_input_bytes));
                    let actions = self.core.handle(now_ns(), input);
                    let prefetch = replay_prefetch(&self.cfg);
                    self.execute(actions, Some((&d, channel, prefetch))).await?
                }
            };
            if flow == Flow::Exit {
                return Ok(());
            }
        }
    }

    /// Whether the failure just seen was the broker's going away: a connection closed (or
    /// closing within [`LOSS_SETTLES`]). Anything else (a queue refused on a live connection)
    /// stays a failure of the instance.
    async fn lost_broker(&self) -> bool {
        let start = Instant::now();
        loop {
            if !self.conn.status().connected() || !self.bulk.status().connected() {
                return true;
            }
            if start.elapsed() >= LOSS_SETTLES {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connects again after a broker restart, with the state as it was: the same
    /// subscriptions (live, replay) on new channels, a new pipeline (the old one's acks died
    /// with their channels: the broker hands those messages back, see
    /// [`Instance::resend_output`]). Returns the control queue's new subscription.
    async fn reconnect(&mut self) -> Result<Subscription> {
        let c = connect(&self.cfg, RECONNECT_WITHIN).await?;
        self.conn = c.conn;
        self.bulk = c.bulk;
        self.out = c.out;
        self.pipeline = Pipeline::start();
        self.standby = None;
        if let Some(old) = self.live.take() {
            let channel = consumer_channel(&self.conn, self.cfg.prefetch).await?;
            self.live = Some(Subscription::on(channel, &old.queue, &self.cfg.instance).await?);
        }
        if let Some(old) = self.replay.take() {
            let prefetch = replay_prefetch(&self.cfg);
            self.replay =
                Some(Subscription::open(&self.conn, &old.queue, "replay", prefetch).await?);
        }
        Ok(c.control)
    }

    /// A live message handed back by the broker that this instance already applied (its ack
    /// died with a restarted broker's connection): its output event is sent again, identical
    /// (the recorder keeps one of two identical events), and it is acked, never applied twice.
    /// False when it is not such a message: the core decides as for any other.
    fn resend_output(&mut self, d: &Delivery, channel: lapin::types::ChannelId) -> Result<bool> {
        let Ok(ms2m_wire::Input::Data { seq, .. }) = parse_input(&d.data, self.cfg.max_input_bytes)
        else {
            return Ok(false);
        };
        if seq > self.core.position().last_seq {
            return Ok(false);
        }
        let Some(body) = self
            .recent_outputs
            .iter()
            .find(|(s, _)| *s == seq)
            .map(|(_, b)| b.clone())
        else {
            return Ok(false);
        };
        let publish = self.publish_event_body(body);
        let ack = Ack {
            channel,
            acker: d.acker.clone(),
            batch: usize::from(self.cfg.prefetch / 4),
        };
        self.pipeline.push(Some(publish), Some(ack))?;
        Ok(true)
    }

    /// Executes the core's actions in order; `delivery` is the message they are about, if any,
    /// with the id and the prefetch of the channel it came on.
    async fn execute(
        &mut self,
        actions: Vec<Action>,
        delivery: Option<(&Delivery, lapin::types::ChannelId, u16)>,
    ) -> Result<Flow> {
        let mut todo = VecDeque::from(actions);
        // The output event of the delivery being handled, whose confirm its ack waits for.
        let mut publish = None;
        while let Some(action) = todo.pop_front() {
            match action {
                Action::Process {
                    seq,
                    mode,
                    t_pub_ns,
                    t_start_ns,
                    chain,
                    output,
                } => {
                    // The service's own handling counts toward the processing time.
                    let took = Duration::from_nanos(now_ns().saturating_sub(t_start_ns));
                    spend(self.cfg.processing.saturating_sub(took)).await;
                    if mode == Mode::Live {
                        let event = OutputEvent {
                            instance: self.cfg.instance.clone(),
                            seq,
                            mode,
                            t_pub_ns,
                            t_start_ns,
                            t_end_ns: now_ns(),
                            chain: ms2m_wire::hex(&chain),
                            first_seq: None,
                            messages: None,
                            output,
                        };
                        publish = Some(self.publish_output(&event)?);
                    }
                }
                Action::ReplaySpan(span) => {
                    let event = self.replay_event(span);
                    let publish = self.publish_output(&event)?;
                    self.pipeline.push(Some(publish), None)?;
                }
                Action::Ack => {
                    let (d, channel, prefetch) =
                        delivery.context("the core acked without a delivery")?;
                    let ack = Ack {
                        channel,
                        acker: d.acker.clone(),
                        batch: usize::from(prefetch / 4),
                    };
                    self.pipeline.push(publish.take(), Some(ack))?;
                }
                Action::Reply(o) => self.send(o).await?,
                Action::Send { to, envelope } => {
                    self.out
                        .basic_publish(
                            "".into(),
                            to.as_str().into(),
                            BasicPublishOptions::default(),
                            &control::encode(&envelope, &[]),
                            BasicProperties::default(),
                        )
                        .await?;
                }
                Action::Checkpoint(o) => self.send_in_background(o).await,
                Action::Fetch(checkpoint) => {
                    let fetched = self.fetch(&checkpoint).await.map_err(|e| {
                        format!(
                            "fetching the checkpoint from {}: {e:#}",
                            checkpoint.origin()
                        )
                    });
                    todo.extend(self.core.handle(now_ns(), CoreEvent::Fetched(fetched)));
                }
                Action::StartLive => self.start_live().await?,
                Action::StopLive => {
                    if let Some(sub) = self.live.take() {
                        // Nothing applied may go back to the queue.
                        self.pipeline.flush().await?;
                        sub.close().await?;
                    }
                }
                Action::OpenReplay { queue } => {
                    if self.standby.is_none() {
                        self.standby = Some(consumer_channel(&self.conn, self.cfg.prefetch).await?);
                    }
                    let opened = match Subscription::open(
                        &self.conn,
                        &queue,
                        "replay",
                        replay_prefetch(&self.cfg),
                    )
                    .await
                    {
                        Ok(sub) => {
                            self.replay = Some(sub);
                            Ok(())
                        }
                        Err(e) => Err(format!("{e:#}")),
                    };
                    todo.extend(self.core.handle(now_ns(), CoreEvent::ReplayOpened(opened)));
                }
                Action::CloseReplay { wait } => {
                    if let Some(sub) = self.replay.take() {
                        let flushed = self.pipeline.flusher();
                        let close = async move {
                            flushed.flush().await?;
                            sub.close().await
                        };
                        if wait {
                            close.await?;
                        } else {
                            tokio::spawn(async move {
                                if let Err(e) = close.await {
                                    eprintln!("ms2m-service: closing the replay: {e:#}");
                                }
                            });
                        }
                    }
                }
                Action::DeadLetter(refused) => {
                    let (d, ..) = delivery.context("the core dead-lettered without a delivery")?;
                    eprintln!(
                        "ms2m-service: refused an input ({}): {}",
                        refused.reason, refused.detail
                    );
                    publish = Some(self.publish_dead_letter(&d.data, &refused));
                }
                Action::Fail(message) => {
                    // What was applied before it is acked; this message goes back.
                    self.pipeline.flush().await?;
                    anyhow::bail!(message);
                }
                Action::Exit => {
                    self.pipeline.flush().await?;
                    return Ok(Flow::Exit);
                }
            }
        }
        Ok(Flow::Continue)
    }

    /// Sends a reply, stamped now. It waits until the frames are written, not for the broker's
    /// confirm: the manager has the reply as soon as the broker routes it, and a reply that goes
    /// missing shows as the manager's timeout.
    async fn send(&self, o: Outgoing) -> Result<()> {
        let channel = self.stream_channel(&o).await;
        deliver(&self.out, channel, o, self.spare.clone()).await?;
        Ok(())
    }

    /// Sends a checkpoint without holding up the event loop: the core copied the state, and
    /// writing its megabytes happens while the instance goes on serving.
    async fn send_in_background(&self, o: Outgoing) {
        let channel = self.stream_channel(&o).await;
        let (out, spare) = (self.out.clone(), self.spare.clone());
        tokio::spawn(async move {
            if let Err(e) = deliver(&out, channel, o, spare).await {
                eprintln!("ms2m-service: sending the checkpoint failed: {e}");
            }
        });
    }

    /// A channel of its own for streaming `o`'s checkpoint, if it streams one: a broker error
    /// on it (a chunk refused) closes that channel, never the one output events go out on.
    async fn stream_channel(&self, o: &Outgoing) -> Option<Result<Channel>> {
        if o.stream.as_ref()?.listen.is_some() {
            return None;
        }
        Some(
            async {
                let channel = self.bulk.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                Ok(channel)
            }
            .await,
        )
    }

    /// Reads a streamed checkpoint: every chunk in order, its size and SHA-256 checked, from
    /// its queue or (with an address) from the source directly. Queued chunks are acked as they
    /// arrive, so the broker lets go of them; the buffer is the one copy of the checkpoint here
    /// (the restore takes it over).
    async fn fetch(&self, checkpoint: &Checkpoint) -> Result<Vec<u8>> {
        if let Some(addr) = &checkpoint.addr {
            let conn = tokio::time::timeout(CHUNK_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| anyhow::anyhow!("connecting took over {} s", CHUNK_TIMEOUT.as_secs()))?
                .with_context(|| format!("connecting to {addr}"))?;
            // Dropped (closed) once checked: the source takes that as done.
            return read_chunks(&mut Chunks::Direct(conn), checkpoint).await;
        }
        let mut sub =
            Subscription::open(&self.bulk, &checkpoint.queue, "fetch", STREAM_WINDOW as u16)
                .await?;
        let fetched = read_chunks(&mut Chunks::Queue(&mut sub.consumer), checkpoint).await;
        let _ = sub.close().await;
        fetched
    }

    async fn start_live(&mut self) -> Result<()> {
        if self.live.is_none() {
            let queue = names::primary_queue(&self.cfg.service);
            let channel = match self.standby.take() {
                Some(c) => c,
                None => consumer_channel(&self.conn, self.cfg.prefetch).await?,
            };
            self.live = Some(Subscription::on(channel, &queue, &self.cfg.instance).await?);
            self.prepare_spare();
        }
        Ok(())
    }

    /// Once serving live (a source to be, some day), prepares a buffer for snapshots in the
    /// background if the service wants one: not earlier, so that a target, which holds the
    /// checkpoint it fetched besides its state, never holds a third copy.
    fn prepare_spare(&mut self) {
        let Some(bytes) = self.core.snapshot_size_hint() else {
            return;
        };
        if self.spare_prepared {
            return;
        }
        self.spare_prepared = true;
        let spare = self.spare.clone();
        let wanted = Arc::new(AtomicBool::new(true));
        self.spare_wanted = Some(wanted.clone());
        tokio::spawn(async move {
            if let Ok(Some(buf)) = in_background(move || mapped_buffer(bytes, &wanted)).await {
                spare.give_back(buf);
            }
        });
    }

    /// A checkpoint is coming (a barrier was armed, a snapshot asked for): a spare still being
    /// prepared is given up, since the snapshot would be taken into fresh memory while it is
    /// mapped, a third copy of the state (the checkpoint's buffer comes back as the next spare).
    fn give_up_spare(&mut self) {
        if let Some(wanted) = self.spare_wanted.take() {
            wanted.store(false, Ordering::Relaxed);
        }
    }

    /// The output event of a run of replayed messages, stamped now.
    fn replay_event(&self, span: ReplaySpan) -> OutputEvent {
        let broken = self.cfg.breaks.as_deref() == Some("replay_side_effects");
        OutputEvent {
            instance: self.cfg.instance.clone(),
            seq: span.seq,
            mode: if broken { Mode::Live } else { Mode::Replay },
            t_pub_ns: span.t_pub_ns,
            t_start_ns: span.t_start_ns,
            t_end_ns: now_ns(),
            chain: ms2m_wire::hex(&span.chain),
            first_seq: Some(span.first_seq),
            messages: Some(span.messages),
            output: None,
        }
    }

    /// Enqueues an output event's frames; the write and the confirm are the pipeline's to
    /// await. Not awaiting the write here spares the event loop a hand-over to lapin's I/O
    /// thread and back per message.
    /// Puts a refused input in the dead-letter queue as it came, with why in its headers
    /// (`x-ms2m-reason`, `x-ms2m-detail`, `x-ms2m-instance`, `x-ms2m-t-ns`).
    fn publish_dead_letter(&self, body: &[u8], refused: &Refused) -> Publish {
        use lapin::types::{AMQPValue, LongString};
        let mut headers = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        headers.insert("x-ms2m-reason".into(), text(refused.reason.name()));
        // Bounded: the detail quotes parts of the input.
        let detail: String = refused.detail.chars().take(512).collect();
        headers.insert("x-ms2m-detail".into(), text(&detail));
        headers.insert("x-ms2m-instance".into(), text(&self.cfg.instance));
        headers.insert(
            "x-ms2m-t-ns".into(),
            AMQPValue::LongLongInt(now_ns() as i64),
        );
        let (out, body) = (self.out.clone(), body.to_vec());
        let queue = names::dead_letter_queue(&self.cfg.service);
        let publish: Publish = Box::pin(async move {
            out.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await
        });
        enqueued(publish)
    }

    fn publish_output(&mut self, event: &OutputEvent) -> Result<Publish> {
        let body = serde_json::to_vec(event)?;
        if self.cfg.durable && event.mode == Mode::Live {
            let keep = usize::from(self.cfg.prefetch) * 2 + 64;
            if self.recent_outputs.len() >= keep {
                self.recent_outputs.pop_front();
            }
            self.recent_outputs.push_back((event.seq, body.clone()));
        }
        Ok(self.publish_event_body(body))
    }

    /// Enqueues an output event (persistent for a durable service).
    fn publish_event_body(&self, body: Vec<u8>) -> Publish {
        let out = self.out.clone();
        let exchange = names::output_exchange(&self.cfg.service);
        let properties = match self.cfg.durable {
            true => BasicProperties::default().with_delivery_mode(2),
            false => BasicProperties::default(),
        };
        let publish: Publish = Box::pin(async move {
            out.basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
        });
        enqueued(publish)
    }
}

/// Polls a publish once, which enqueues its frames: publishes go out in the order they are
/// made, and the pipeline awaits the rest (the write and the confirm).
fn enqueued(mut publish: Publish) -> Publish {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match publish.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(written) => Box::pin(std::future::ready(written)),
        std::task::Poll::Pending => publish,
    }
}

/// Where a fetch reads a checkpoint's chunks from.
enum Chunks<'a> {
    Queue(&'a mut Consumer),
    /// The source's own connection (a direct transfer).
    Direct(tokio::net::TcpStream),
}

impl Chunks<'_> {
    /// The next chunk's envelope. Waits at most [`CHUNK_TIMEOUT`] for a queued chunk, and for
    /// each read of a direct one (a slow link may take longer than that for a whole chunk,
    /// but not between two reads): a source that died mid-stream fails the fetch.
    async fn next(&mut self, index: u32, checkpoint: &Checkpoint) -> Result<Vec<u8>> {
        let late = || {
            anyhow::anyhow!(
                "chunk {index} of {} did not arrive within {} s",
                checkpoint.chunks,
                CHUNK_TIMEOUT.as_secs()
            )
        };
        match self {
            Chunks::Queue(consumer) => {
                let d = tokio::time::timeout(CHUNK_TIMEOUT, consumer.next())
                    .await
                    .map_err(|_| late())?
                    .context("the checkpoint queue's consumer closed")??;
                d.ack(BasicAckOptions::default()).await?;
                Ok(d.data)
            }
            Chunks::Direct(conn) => {
                use tokio::io::AsyncReadExt;
                let mut len = [0u8; 4];
                tokio::time::timeout(CHUNK_TIMEOUT, conn.read_exact(&mut len))
                    .await
                    .map_err(|_| late())?
                    .context("the source closed the connection")?;
                let len = u32::from_le_bytes(len) as usize;
                // A chunk is never larger than the checkpoint plus its header.
                if len as u64 > checkpoint.bytes + 4096 {
                    anyhow::bail!("a chunk of {len} bytes announced, beyond the checkpoint's size");
                }
                let mut body = vec![0u8; len];
                let mut filled = 0;
                while filled < len {
                    let n = tokio::time::timeout(CHUNK_TIMEOUT, conn.read(&mut body[filled..]))
                        .await
                        .map_err(|_| late())??;
                    if n == 0 {
                        anyhow::bail!("the source closed the connection within chunk {index}");
                    }
                    filled += n;
                }
                Ok(body)
            }
        }
    }
}

/// The chunks of `checkpoint`, reassembled and checked.
async fn read_chunks(chunks: &mut Chunks<'_>, checkpoint: &Checkpoint) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    buf.try_reserve_exact(checkpoint.bytes as usize)
        .with_context(|| format!("no memory for a checkpoint of {} bytes", checkpoint.bytes))?;
    ms2m_wire::state::hint_huge_pages(&mut buf);
    let mut hasher = Sha256::new();
    for index in 0..checkpoint.chunks {
        let body = chunks.next(index, checkpoint).await?;
        let (header, data) = control::decode::<ChunkHeader>(&body)?;
        let expected = (index, checkpoint.chunks, buf.len() as u64, checkpoint.bytes);
        if (header.index, header.count, header.offset, header.total) != expected {
            anyhow::bail!(
                "chunk out of place: got {header:?}, expected index {index} of {} at offset {} \
                 of {} bytes",
                checkpoint.chunks,
                buf.len(),
                checkpoint.bytes
            );
        }
        if buf.len() + data.len() > checkpoint.bytes as usize {
            anyhow::bail!(
                "the chunks hold more than the {} bytes announced",
                checkpoint.bytes
            );
        }
        hasher.update(data);
        buf.extend_from_slice(data);
    }
    if buf.len() as u64 != checkpoint.bytes {
        anyhow::bail!(
            "{} bytes arrived, {} announced",
            buf.len(),
            checkpoint.bytes
        );
    }
    let sha256 = ms2m_wire::hex(&hasher.finalize());
    if sha256 != checkpoint.sha256 {
        anyhow::bail!(
            "SHA-256 {sha256} differs from the source's {}",
            checkpoint.sha256
        );
    }
    Ok(buf)
}

/// Below this much of a processing time, tokio's timer (1 ms granularity, up to about a
/// millisecond late) hands over to the thread's own sleep.
const COARSE: Duration = Duration::from_millis(2);
/// The last part of a processing time is spun: with 1 ns timer slack ([`precise_sleep`]) a
/// thread's sleep wakes 5-40 us late here.
const SPIN: Duration = Duration::from_micros(50);

/// Spends `d` precisely, as a service busy for that long would, without holding a core for
/// it: tokio's timer until [`COARSE`] before the deadline (the event loop's other tasks run
/// meanwhile), the thread's sleep until [`SPIN`] before it, then a spin.
async fn spend(d: Duration) {
    if d.is_zero() {
        return;
    }
    let deadline = Instant::now() + d;
    if d > COARSE {
        tokio::time::sleep_until((deadline - COARSE).into()).await;
    }
    let rest = deadline.saturating_duration_since(Instant::now());
    if rest > SPIN {
        std::thread::sleep(rest - SPIN);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// An empty buffer of `bytes` capacity whose pages are all mapped (written once), or None once
/// `wanted` is cleared (checked every [`MAP_STEP`] bytes, and at the end).
fn mapped_buffer(bytes: usize, wanted: &AtomicBool) -> Option<Vec<u8>> {
    let mut buf = ms2m_wire::state::buffer(bytes);
    while buf.len() < bytes {
        if !wanted.load(Ordering::Relaxed) {
            return None;
        }
        buf.resize((buf.len() + MAP_STEP).min(bytes), 0);
    }
    buf.clear();
    wanted.load(Ordering::Relaxed).then_some(buf)
}

/// Runs CPU work of a checkpoint (hashing its megabytes) off the event loop, on a thread of
/// the blocking pool at the lowest CPU priority: where cores are few, the live path (this
/// instance's event loop, and whatever else shares its cgroup) goes first and the checkpoint
/// takes what is left. A 256 MiB state otherwise cost ms2m hundreds of ms of downtime on a
/// 2-core machine, its hashing competing with the messages the source still serves.
fn in_background<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(move || {
        // SAFETY: setpriority on this thread's own id only lowers its priority (a per-thread
        // attribute on Linux); a failure leaves it as it was.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        }
        work()
    })
}

/// Asks for the smallest timer slack on the calling thread (the event loop's), so that its
/// short sleeps end when asked rather than up to 50 us later (Linux's default slack).
pub fn precise_sleep() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) changes only the calling thread's timer slack; a failure
    // leaves it as it was.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(processing_ms: f64, prefetch: u16) -> Config {
        Config {
            amqp_url: String::new(),
            service: "s".into(),
            instance: "s-1".into(),
            processing: Duration::from_secs_f64(processing_ms / 1e3),
            state_bytes: 0,
            prefetch,
            max_input_bytes: ms2m_wire::MAX_INPUT_BYTES,
            max_seq_gap: 1,
            live: false,
            durable: false,
            breaks: None,
        }
    }

    #[test]
    fn replay_prefetches_about_ten_ms_of_work_never_less_than_live() {
        assert_eq!(replay_prefetch(&cfg(0.0, 1)), REPLAY_PREFETCH_MAX);
        assert_eq!(replay_prefetch(&cfg(0.05, 1)), 200);
        assert_eq!(replay_prefetch(&cfg(1.0, 1)), 10);
        assert_eq!(replay_prefetch(&cfg(50.0, 1)), 1);
        assert_eq!(replay_prefetch(&cfg(50.0, 10)), 10);
    }
}
