//! The instance's decisions as a plain state machine: no broker, no clock, no async.
//!
//! Exactly-once across a migration rests on a handful of rules (skip what the snapshot holds,
//! never apply beyond the replay's bound, stop live only after a given position, go live only
//! once the replay is level with the source...). They live here, in the sans-I/O style of h11
//! and quinn-proto, so that every transition is tested without RabbitMQ: the I/O loop
//! (`instance.rs`) turns lapin deliveries into [`Event`]s, hands them to [`Core::handle`] one at a
//! time and executes the returned [`Action`]s in order. The processing-time wait, publishing and
//! acking stay in the I/O loop.
//!
//! Invariant: this module does no I/O and reads no clock; the only time it knows is the `now_ns`
//! it is given.
//!
//! Exactly-once holds for any order of events, not only the manager's: whatever could break it
//! is refused with an error reply that leaves everything as it was. The instance never serves
//! live and replays at once (`start_live` is refused while replaying, `replay` while live:
//! `finish_replay` with `go_live` is the one way from one to the other), never restores while
//! live or replaying, and keeps at most one `stop_live` and one `finish_replay` waiting. Every
//! command gets exactly one reply: a `stop_live` waiting when the instance stops for another
//! reason is answered then, and `shutdown` answers whatever still waits, with an error, before
//! its own reply.

use crate::{ledger::Ledger, Message, Service};
use ms2m_wire::{
    control::{Checkpoint, Command, Envelope, HandOver, Reply, ReplyKind, StreamTo},
    Input, Mode, Refused, Rejection,
};

/// Something that happened to the instance, in the order the I/O loop saw it.
#[derive(Debug)]
pub enum Event<'a> {
    /// A decoded control command and its attachment (the snapshot, for `restore`).
    Control(Envelope, &'a [u8]),
    /// The outcome of [`Action::Fetch`]: the checkpoint's bytes, checked against its size and
    /// SHA-256, or why they could not be read.
    Fetched(Result<Vec<u8>, String>),
    /// A delivery from the primary queue: the parsed input, or why it is not one.
    Live(Result<Input, Refused>),
    /// A delivery from the replay queue: the parsed input, or why it is not one.
    Replay(Result<Input, Refused>),
    /// Nothing else is waiting to be handled: a replay span still open is reported now.
    Idle,
    /// The outcome of [`Action::OpenReplay`]: the reply to `replay` waits for it, since a
    /// queue that cannot be consumed is the manager's error to see.
    ReplayOpened(Result<(), String>),
}

/// A reply ready to go, except for `t_ns`: the I/O loop stamps it when it sends, so that it
/// says when the actions before it (stopping, going live) were done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The queue to publish to (the command's `reply_to`, or the barrier's).
    pub to: String,
    pub reply: Reply,
    pub attachment: Vec<u8>,
    /// Where to stream `attachment` (a snapshot) in chunks instead of attaching it; the reply
    /// then describes the stream in `checkpoint`.
    pub stream: Option<StreamTo>,
}

/// What the I/O loop must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `seq` has been applied to the state in `mode` (its handling began at `t_start_ns`);
    /// spend the processing time. Live: then publish its output event (`chain` is the ledger's
    /// chain right after it, `output` the service's), whose confirm the ack waits for.
    /// Replayed messages are reported together, by [`Action::ReplaySpan`].
    Process {
        seq: u64,
        mode: Mode,
        t_pub_ns: u64,
        t_start_ns: u64,
        chain: [u8; 32],
        output: Option<String>,
    },
    /// The service failed to handle a message: stop as a crash would, nothing acked.
    Fail(String),
    /// Publish the one output event of a run of replayed messages. Replay has no effect on
    /// anyone, so this event is only a report: one per run rather than per message keeps a
    /// replay's broker work to a delivery and an ack per message (half of live's), which is
    /// what lets a target overtake a source.
    ReplaySpan(ReplaySpan),
    /// Ack the delivery being handled. Comes after its `Process` and before any
    /// [`Action::StopLive`], so that a message applied is never handed back to the queue.
    Ack,
    /// Send a reply and wait until it is written.
    Reply(Outgoing),
    /// Send a command to another instance's control queue `to` (a stopping source's
    /// `finish_replay` to its target) and wait until it is written.
    Send { to: String, envelope: Envelope },
    /// Send a checkpoint in the background: the instance serves on while its megabytes travel.
    Checkpoint(Outgoing),
    /// Read the checkpoint described from its queue and report with [`Event::Fetched`].
    Fetch(Checkpoint),
    /// Start consuming the primary queue.
    StartLive,
    /// Close the primary queue's channel: messages fetched but not acked go back to the queue.
    StopLive,
    /// Consume `queue` as the replay subscription (and open the channel the instance will go
    /// live on, so that the cutover costs one round trip); report with [`Event::ReplayOpened`].
    OpenReplay { queue: String },
    /// Close the replay subscription once every message replayed is acked. In the background
    /// (`wait` false) when the instance goes live: the close's round trip would hold the first
    /// live messages, and it cannot replay again before a `stop_live` (managers open a new
    /// replay queue per migration). Waited for otherwise, so that a replay opened later on the
    /// same queue cannot receive messages handed back after newer ones.
    CloseReplay { wait: bool },
    /// Put the live delivery being handled in the dead-letter queue, with why; its ack (the
    /// [`Action::Ack`] that follows) waits until the broker has it there.
    DeadLetter(Refused),
    /// Stop handling events and exit the process.
    Exit,
}

/// Consecutive replayed messages, reported by one output event (`mode` replay, `seq` the
/// last, `first_seq` and `messages` the rest) once the run ends: at [`REPLAY_SPAN`] messages,
/// when nothing more is waiting ([`Event::Idle`]), or when the replay pauses or ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySpan {
    pub first_seq: u64,
    pub seq: u64,
    pub messages: u64,
    /// The last message's publish time.
    pub t_pub_ns: u64,
    /// When the first message's handling began.
    pub t_start_ns: u64,
    /// The state's chain right after the last message.
    pub chain: [u8; 32],
}

/// Most replayed messages one output event reports.
pub const REPLAY_SPAN: u64 = 64;

/// A reply that waits for a condition on the state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pending {
    corr: String,
    reply_to: String,
    kind: ReplyKind,
}

/// A `finish_replay` waiting for the replay to reach `until_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finish {
    until_seq: u64,
    go_live: bool,
    reply: Pending,
}

#[derive(Debug)]
#[cfg_attr(test, derive(Clone, PartialEq, Eq))]
struct Replaying {
    /// The `replay` reply, while the subscription is being opened.
    opening: Option<Pending>,
    paused: bool,
    /// A `pause_replay` that takes effect once `last_seq` reaches it.
    pause_after: Option<u64>,
    /// Never apply a message above this (the `replay` command's `until_seq`).
    limit: Option<u64>,
    /// A `finish_replay` in progress.
    finish: Option<Finish>,
    /// The manager's marker was met: the queue holds nothing more, so a `finish_replay` that
    /// waits for more finishes at once.
    drained: bool,
}

/// The instance's position, as every reply reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub last_seq: u64,
    pub count: u64,
    /// Messages applied in replay mode so far.
    pub replayed: u64,
    /// Replayed messages skipped because the state already held them.
    pub skipped: u64,
}

/// One instance's exactly-once bookkeeping and its service.
///
/// Invariants: never `live` with a `replay` open; `stop_after` only while `live`.
#[derive(Debug)]
#[cfg_attr(test, derive(Clone, PartialEq, Eq))]
pub struct Core<S> {
    instance: String,
    ledger: Ledger,
    service: S,
    live: bool,
    /// A `stop_live` waiting for `last_seq >= after_seq`.
    stop_after: Option<(u64, Pending)>,
    /// Where to send the target's `finish_replay` when live service stops.
    hand_over: Option<HandOver>,
    /// Open (or being opened) while not live.
    replay: Option<Replaying>,
    replayed: u64,
    skipped: u64,
    /// How long the last message applied waited between its publication and the start of its
    /// processing (see [`Reply::queued_ns`]).
    queued_ns: u64,
    /// Replayed messages not reported yet.
    span: Option<ReplaySpan>,
    /// A `fetch` in progress, with the checkpoint it reads and when it began.
    fetching: Option<(Pending, Checkpoint, u64)>,
    /// The checkpoint fetched last, for the next `restore` without attachment.
    fetched: Option<Vec<u8>>,
    /// An empty buffer whose pages are mapped, for the next snapshot (see
    /// [`Service::snapshot_into`]).
    spare: Option<Vec<u8>>,
    /// The id of the one barrier the manager announced and that has not come yet.
    armed: Option<String>,
    /// How far past the next seq an input may be and still be applied (1: only the next).
    max_seq_gap: u64,
    /// `adopt` with `next_above`: the next live input above `last_seq` is taken as the next,
    /// whatever the gap. (Not in a checkpoint: one taken before that input would make its
    /// restorer refuse a gap as a jump, a window of one message after a restart.)
    adopt_next: bool,
    exited: bool,
}

impl<S: Service> Core<S> {
    pub fn new(instance: impl Into<String>, service: S) -> Self {
        Core {
            instance: instance.into(),
            ledger: Ledger::default(),
            service,
            live: false,
            stop_after: None,
            hand_over: None,
            replay: None,
            replayed: 0,
            skipped: 0,
            queued_ns: 0,
            span: None,
            fetching: None,
            fetched: None,
            spare: None,
            armed: None,
            max_seq_gap: 1,
            adopt_next: false,
            exited: false,
        }
    }

    /// Accepts inputs up to `gap` past the next seq (for a producer that may lose messages on
    /// the way): 1, the default, takes only the next one. At least 1.
    pub fn with_max_seq_gap(mut self, gap: u64) -> Self {
        self.max_seq_gap = gap.max(1);
        self
    }

    /// What to do at start: a live instance (`--live`) consumes the primary queue at once.
    pub fn boot(&mut self, live: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if live {
            self.start_live(&mut out);
        }
        out
    }

    /// Whether the I/O loop should take deliveries from the primary queue.
    pub fn polls_live(&self) -> bool {
        self.live && !self.exited
    }

    /// Whether the I/O loop should take deliveries from the replay queue (not while paused:
    /// paused messages stay in the queue, or unacked in the consumer, until resumed).
    pub fn polls_replay(&self) -> bool {
        !self.exited
            && self
                .replay
                .as_ref()
                .is_some_and(|r| r.opening.is_none() && !r.paused)
    }

    #[cfg(test)]
    pub fn state(&self) -> &S {
        &self.service
    }

    pub fn position(&self) -> Position {
        Position {
            last_seq: self.ledger.last_seq,
            count: self.ledger.count,
            replayed: self.replayed,
            skipped: self.skipped,
        }
    }

    /// Handles one event; `now_ns` is when it arrived (the replies' `t_begin_ns`).
    ///
    /// A delivery from a queue the core does not poll (see [`Core::polls_live`] and
    /// [`Core::polls_replay`]) gets no action, not even an ack: the I/O loop never hands one
    /// over, since a closed consumer's messages go back to the broker.
    pub fn handle(&mut self, now_ns: u64, event: Event<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        if self.exited {
            return out;
        }
        match event {
            Event::Control(env, attachment) => self.on_control(now_ns, env, attachment, &mut out),
            Event::Live(input) if self.polls_live() => self.on_live(now_ns, input, &mut out),
            Event::Replay(input) if self.polls_replay() => self.on_replay(now_ns, input, &mut out),
            Event::Live(_) | Event::Replay(_) => {}
            Event::Idle => self.end_span(&mut out),
            Event::ReplayOpened(result) => self.on_replay_opened(result, &mut out),
            Event::Fetched(result) => self.on_fetched(result, &mut out),
        }
        out
    }

    /// Takes `buf` (emptied) for the next snapshot, unless a bigger one is kept already.
    pub fn offer_buffer(&mut self, mut buf: Vec<u8>) {
        buf.clear();
        if self
            .spare
            .as_ref()
            .is_none_or(|s| s.capacity() < buf.capacity())
        {
            self.spare = Some(buf);
        }
    }

    /// How big a buffer the service would like kept for its snapshots, if any.
    pub fn snapshot_size_hint(&self) -> Option<usize> {
        self.service.snapshot_size_hint()
    }

    /// Whether replayed messages wait to be reported (the I/O loop then sends
    /// [`Event::Idle`] when it has nothing else to do).
    pub fn has_open_span(&self) -> bool {
        self.span.is_some()
    }

    /// Reports the replayed messages not reported yet, if any.
    fn end_span(&mut self, out: &mut Vec<Action>) {
        if let Some(span) = self.span.take() {
            out.push(Action::ReplaySpan(span));
        }
    }

    fn reply(&self, corr: &str, kind: ReplyKind) -> Reply {
        let p = self.position();
        Reply {
            corr: corr.to_string(),
            instance: self.instance.clone(),
            kind,
            last_seq: p.last_seq,
            count: p.count,
            replayed: p.replayed,
            skipped: p.skipped,
            queued_ns: self.queued_ns,
            ..Reply::default()
        }
    }

    fn send(&self, out: &mut Vec<Action>, to: String, reply: Reply, attachment: Vec<u8>) {
        out.push(Action::Reply(Outgoing {
            to,
            reply,
            attachment,
            stream: None,
        }));
    }

    fn answer(&self, out: &mut Vec<Action>, p: Pending) {
        let reply = self.reply(&p.corr, p.kind);
        self.send(out, p.reply_to, reply, Vec::new());
    }

    /// Answers with an error, reporting the position as it is.
    fn refuse(&self, out: &mut Vec<Action>, p: Pending, error: String) {
        let mut reply = self.reply(&p.corr, p.kind);
        reply.error = Some(error);
        self.send(out, p.reply_to, reply, Vec::new());
    }

    fn start_live(&mut self, out: &mut Vec<Action>) {
        if !self.live {
            self.live = true;
            out.push(Action::StartLive);
        }
    }

    /// Stops serving live. A `stop_live` still waiting is satisfied (the instance stopped) and
    /// answered here, so that no wait outlives the stop, then `also` if given. A hand-over goes
    /// out last: once the consumer is closed (what it held is back in the queue), and after the
    /// replies, whose `t_ns` says when the instance stopped.
    fn stop_live(&mut self, out: &mut Vec<Action>, also: Option<Pending>) {
        if self.live {
            self.live = false;
            out.push(Action::StopLive);
        }
        if let Some((_, p)) = self.stop_after.take() {
            self.answer(out, p);
        }
        if let Some(p) = also {
            self.answer(out, p);
        }
        if let Some(h) = self.hand_over.take() {
            out.push(Action::Send {
                to: h.queue,
                envelope: Envelope {
                    corr: h.corr,
                    reply_to: h.reply_to,
                    command: Command::FinishReplay {
                        until_seq: self.ledger.last_seq,
                        go_live: true,
                    },
                },
            });
        }
    }

    fn on_control(&mut self, now_ns: u64, env: Envelope, attachment: &[u8], out: &mut Vec<Action>) {
        let Envelope {
            corr,
            reply_to,
            command,
        } = env;
        let kind = command.reply_kind();
        let pending = Pending {
            corr,
            reply_to,
            kind,
        };
        match command {
            Command::Status => self.answer(out, pending),
            Command::ArmBarrier { id } => {
                self.armed = Some(id);
                self.answer(out, pending);
            }
            Command::StartLive => {
                // Live messages are not checked against `last_seq`: with both queues consumed
                // at once, a seq could be applied from each.
                if self.replay.is_some() {
                    let e = "cannot serve live while replaying; finish_replay with go_live ends \
                             the replay and goes live";
                    self.refuse(out, pending, e.into());
                } else {
                    self.start_live(out);
                    self.answer(out, pending);
                }
            }
            Command::StopLive {
                after_seq,
                hand_over,
            } => match after_seq {
                Some(s) if self.live && self.ledger.last_seq < s => {
                    if let Some((waiting, _)) = &self.stop_after {
                        let e = format!("a stop_live is already waiting for seq {waiting}");
                        self.refuse(out, pending, e);
                    } else {
                        self.stop_after = Some((s, pending));
                        self.hand_over = hand_over.or(self.hand_over.take());
                    }
                }
                // Stops at once; a `stop_live` waiting is answered by the stop.
                _ => {
                    self.hand_over = hand_over.or(self.hand_over.take());
                    self.finish_stop(pending, out)
                }
            },
            Command::Snapshot { stream } => {
                let o = self.checkpoint(now_ns, pending.corr, pending.reply_to, kind, stream);
                out.push(Action::Reply(o));
            }
            Command::Fetch(checkpoint) => {
                if self.fetching.is_some() {
                    self.refuse(out, pending, "already fetching a checkpoint".into());
                } else {
                    self.fetching = Some((pending, checkpoint.clone(), now_ns));
                    out.push(Action::Fetch(checkpoint));
                }
            }
            Command::Restore => {
                // Rewinding the state under a replay would apply its seqs again.
                let busy = if self.live {
                    Some("cannot restore while serving live")
                } else if self.replay.is_some() {
                    Some("cannot restore while replaying")
                } else {
                    None
                };
                // An invalid snapshot is reported as such even while live or replaying; a
                // fetched checkpoint is kept for a restore that may come later.
                let decoded = if !attachment.is_empty() {
                    Some(Ledger::open(attachment.to_vec()))
                } else if busy.is_none() {
                    self.fetched.take().map(Ledger::open)
                } else {
                    None
                };
                let error = match (decoded, busy) {
                    (Some(Err(e)), _) => Some(e),
                    (_, Some(busy)) => Some(busy.to_string()),
                    (Some(Ok((ledger, snapshot))), None) => match self.service.restore(snapshot) {
                        Ok(()) => {
                            self.ledger = ledger;
                            None
                        }
                        Err(e) => Some(format!("the service refused the snapshot: {e}")),
                    },
                    (None, None) => Some(
                        "nothing to restore: no snapshot attached and no checkpoint fetched"
                            .to_string(),
                    ),
                };
                // Built after the restore, so that it reports the restored position.
                let mut r = self.reply(&pending.corr, kind);
                r.error = error;
                r.t_begin_ns = now_ns;
                self.send(out, pending.reply_to, r, Vec::new());
            }
            Command::Replay { queue, until_seq } => {
                if self.replay.is_some() {
                    self.refuse(out, pending, "already replaying".into());
                } else if self.live {
                    self.refuse(out, pending, "cannot replay while serving live".into());
                } else {
                    self.replay = Some(Replaying {
                        opening: Some(pending),
                        paused: false,
                        pause_after: None,
                        limit: until_seq,
                        finish: None,
                        drained: false,
                    });
                    out.push(Action::OpenReplay { queue });
                }
            }
            Command::PauseReplay { after_seq } => match self.replay.as_mut() {
                // Paused, the replay would leave the finish waiting for good: only another
                // `finish_replay` resumes it, and that one would be refused.
                Some(Replaying {
                    finish: Some(f), ..
                }) => {
                    let e = format!(
                        "cannot pause: a finish_replay is waiting for seq {}",
                        f.until_seq
                    );
                    self.refuse(out, pending, e);
                }
                r => {
                    let last_seq = self.ledger.last_seq;
                    match (r, after_seq) {
                        (Some(r), Some(a)) if last_seq < a => r.pause_after = Some(a),
                        (Some(r), _) => {
                            r.paused = true;
                            r.pause_after = None;
                        }
                        (None, _) => {}
                    }
                    self.end_span(out);
                    self.answer(out, pending);
                }
            },
            Command::FinishReplay { until_seq, go_live } => {
                let last_seq = self.ledger.last_seq;
                match self.replay.as_mut() {
                    Some(r) if r.opening.is_some() => {
                        let e = "cannot finish a replay still being opened";
                        self.refuse(out, pending, e.into());
                    }
                    Some(Replaying {
                        finish: Some(f), ..
                    }) => {
                        let e =
                            format!("a finish_replay is already waiting for seq {}", f.until_seq);
                        self.refuse(out, pending, e);
                    }
                    Some(r) if last_seq < until_seq && !r.drained => {
                        r.paused = false;
                        r.pause_after = None;
                        r.finish = Some(Finish {
                            until_seq,
                            go_live,
                            reply: pending,
                        });
                    }
                    _ => self.finish_replay(go_live, pending, out),
                }
            }
            Command::Adopt {
                after_seq,
                next_above,
            } => {
                // Adopting a position under applied messages would misplace them.
                if self.live || self.replay.is_some() || self.ledger.count > 0 {
                    let e = "adopt is for an instance that has applied nothing and neither \
                             serves nor replays";
                    self.refuse(out, pending, e.into());
                } else {
                    self.ledger.last_seq = after_seq;
                    self.adopt_next = next_above;
                    self.answer(out, pending);
                }
            }
            Command::Digest => {
                let mut r = self.reply(&pending.corr, kind);
                match self.service.digest() {
                    Ok(d) => r.digest = Some(d),
                    Err(e) => r.error = Some(format!("the service's digest failed: {e}")),
                }
                self.send(out, pending.reply_to, r, Vec::new());
            }
            Command::Shutdown => self.shutdown(pending, out),
        }
    }

    /// Stops everything, answers whatever still waits with an error, then the shutdown itself.
    fn shutdown(&mut self, p: Pending, out: &mut Vec<Action>) {
        let mut dropped = Vec::new();
        if let Some((after, w)) = self.stop_after.take() {
            dropped.push((w, format!("shut down before reaching seq {after}")));
        }
        // The stop it was for is refused: no target may go live on it.
        self.hand_over = None;
        if let Some((w, c, _)) = self.fetching.take() {
            dropped.push((w, format!("shut down while fetching {}", c.queue)));
        }
        self.stop_live(out, None);
        self.end_span(out);
        if let Some(r) = self.replay.take() {
            out.push(Action::CloseReplay { wait: true });
            if let Some(w) = r.opening {
                dropped.push((w, "shut down before the replay queue was opened".into()));
            }
            if let Some(f) = r.finish {
                let e = format!("shut down before replaying up to seq {}", f.until_seq);
                dropped.push((f.reply, e));
            }
        }
        for (w, e) in dropped {
            self.refuse(out, w, e);
        }
        self.answer(out, p);
        self.exited = true;
        out.push(Action::Exit);
    }

    fn on_fetched(&mut self, result: Result<Vec<u8>, String>, out: &mut Vec<Action>) {
        let Some((pending, checkpoint, began_ns)) = self.fetching.take() else {
            return;
        };
        match result {
            Ok(bytes) => {
                self.fetched = Some(bytes);
                let mut r = self.reply(&pending.corr, pending.kind);
                r.t_begin_ns = began_ns;
                r.checkpoint = Some(checkpoint);
                self.send(out, pending.reply_to, r, Vec::new());
            }
            Err(e) => self.refuse(out, pending, e),
        }
    }

    fn on_replay_opened(&mut self, result: Result<(), String>, out: &mut Vec<Action>) {
        let Some(pending) = self.replay.as_mut().and_then(|r| r.opening.take()) else {
            // No `replay` waits for this: nothing to answer.
            return;
        };
        let mut r = self.reply(&pending.corr, pending.kind);
        if let Err(e) = result {
            self.replay = None;
            r.error = Some(e);
        }
        self.send(out, pending.reply_to, r, Vec::new());
    }

    fn finish_stop(&mut self, p: Pending, out: &mut Vec<Action>) {
        self.stop_live(out, Some(p));
    }

    fn finish_replay(&mut self, go_live: bool, p: Pending, out: &mut Vec<Action>) {
        self.end_span(out);
        // Serving first: closing the replay channel is one more round trip nobody waits for.
        let replay = self.replay.take();
        debug_assert!(
            replay
                .as_ref()
                .is_none_or(|r| r.opening.is_none() && r.finish.is_none()),
            "a reply waiting in the replay would be lost"
        );
        if go_live {
            self.start_live(out);
        }
        self.answer(out, p);
        if replay.is_some() {
            out.push(Action::CloseReplay { wait: !go_live });
        }
    }

    /// The service's snapshot sealed with the ledger, as the reply `corr` carries it; or the
    /// reply says why there is none.
    fn checkpoint(
        &mut self,
        now_ns: u64,
        corr: String,
        to: String,
        kind: ReplyKind,
        stream: Option<StreamTo>,
    ) -> Outgoing {
        let mut reply = self.reply(&corr, kind);
        reply.t_begin_ns = now_ns;
        let buf = self.spare.take().unwrap_or_default();
        match self.service.snapshot_into(buf) {
            Ok(snap) => Outgoing {
                to,
                reply,
                attachment: self.ledger.seal(snap),
                stream,
            },
            Err(e) => {
                reply.error = Some(format!("the service's snapshot failed: {e}"));
                Outgoing {
                    to,
                    reply,
                    attachment: Vec::new(),
                    stream: None,
                }
            }
        }
    }

    /// Applies a data message and says so; the ledger moves only once the service did.
    fn process(
        &mut self,
        now_ns: u64,
        seq: u64,
        t_pub_ns: u64,
        payload: &str,
        mode: Mode,
    ) -> Action {
        let msg = Message { seq, payload, mode };
        match self.service.handle(&msg) {
            Ok(output) => {
                self.ledger.apply(seq, payload.as_bytes());
                self.queued_ns = now_ns.saturating_sub(t_pub_ns);
                Action::Process {
                    seq,
                    mode,
                    t_pub_ns,
                    t_start_ns: now_ns,
                    chain: self.ledger.chain,
                    output: output.filter(|_| mode == Mode::Live),
                }
            }
            Err(e) => {
                self.exited = true;
                Action::Fail(format!("the service failed on seq {seq}: {e}"))
            }
        }
    }

    /// Refuses an input that would break exactly-once or that the manager did not send: a seq
    /// the state holds, one past the next (by more than `max_seq_gap`), an unarmed barrier.
    fn admit(&self, input: Input) -> Result<Input, Refused> {
        let last = self.ledger.last_seq;
        match &input {
            Input::Data { seq, .. } if *seq <= last => Err(Refused::new(
                Rejection::Repeat,
                format!("seq {seq}: the state holds every seq up to {last}"),
            )),
            Input::Data { seq, .. }
                if !self.adopt_next && *seq > last.saturating_add(self.max_seq_gap) =>
            {
                Err(Refused::new(
                    Rejection::Jump,
                    format!(
                        "seq {seq}: the next is {} (max_seq_gap {})",
                        last + 1,
                        self.max_seq_gap
                    ),
                ))
            }
            Input::Barrier { id, .. } if self.armed.as_deref() != Some(id.as_str()) => {
                Err(Refused::new(
                    Rejection::UnarmedBarrier,
                    format!("barrier {id:?}: the manager armed no such barrier"),
                ))
            }
            _ => Ok(input),
        }
    }

    fn on_live(&mut self, now_ns: u64, input: Result<Input, Refused>, out: &mut Vec<Action>) {
        match input.and_then(|i| self.admit(i)) {
            // Live messages are applied as they come: the primary queue hands each one to a
            // single consumer, and the cutover starts the target past what the source applied.
            Ok(Input::Data {
                seq,
                t_pub_ns,
                payload,
            }) => {
                self.adopt_next = false;
                let a = self.process(now_ns, seq, t_pub_ns, &payload, Mode::Live);
                let failed = matches!(a, Action::Fail(_));
                out.push(a);
                if failed {
                    return;
                }
            }
            Ok(Input::Barrier {
                id,
                reply_to,
                stream,
            }) => {
                self.armed = None;
                let o = self.checkpoint(now_ns, id, reply_to, ReplyKind::Checkpoint, stream);
                out.push(Action::Checkpoint(o));
            }
            Err(refused) => out.push(Action::DeadLetter(refused)),
        }
        out.push(Action::Ack);
        if self
            .stop_after
            .as_ref()
            .is_some_and(|(after, _)| self.ledger.last_seq >= *after)
        {
            let (_, p) = self.stop_after.take().expect("checked above");
            self.finish_stop(p, out);
        }
    }

    fn on_replay(&mut self, now_ns: u64, input: Result<Input, Refused>, out: &mut Vec<Action>) {
        if self.replay.is_none() {
            return;
        }
        if let Ok(Input::Barrier { id, reply_to, .. }) = &input {
            if self.armed.as_deref() == Some(id.as_str()) {
                // A marker the manager put at the end of the replay queue: everything before
                // it is applied, and the answer says where that left the state.
                self.armed = None;
                self.end_span(out);
                let reply = self.reply(id, ReplyKind::Status);
                self.send(out, reply_to.clone(), reply, Vec::new());
                // A finish waiting for more than the queue holds ends here; one that comes
                // later ends at once.
                if let Some(r) = self.replay.as_mut() {
                    r.drained = true;
                }
                if let Some(f) = self.replay.as_mut().and_then(|r| r.finish.take()) {
                    out.push(Action::Ack);
                    self.finish_replay(f.go_live, f.reply, out);
                    return;
                }
            }
        }
        let r = self.replay.as_ref().expect("checked above");
        let mut beyond = false;
        // Barriers and refused messages are dropped: replay has no effects, and the live
        // instance dead-lettered the same message at the same position (a jump is a jump
        // for both; it says nothing about where the stream is).
        let last = self.ledger.last_seq;
        if let Ok(Input::Data {
            seq,
            t_pub_ns,
            payload,
        }) = input
        {
            let jump = seq > last.saturating_add(self.max_seq_gap);
            beyond = !jump
                && (r.limit.is_some_and(|l| seq > l)
                    || r.finish.as_ref().is_some_and(|f| seq > f.until_seq));
            if seq <= last {
                self.skipped += 1;
            } else if !beyond && !jump {
                let a = self.process(now_ns, seq, t_pub_ns, &payload, Mode::Replay);
                if matches!(a, Action::Fail(_)) {
                    out.push(a);
                    return;
                }
                out.push(a);
                self.replayed += 1;
                let chain = self.ledger.chain;
                let span = self.span.get_or_insert(ReplaySpan {
                    first_seq: seq,
                    seq,
                    messages: 0,
                    t_pub_ns,
                    t_start_ns: now_ns,
                    chain,
                });
                span.seq = seq;
                span.messages += 1;
                span.t_pub_ns = t_pub_ns;
                span.chain = chain;
            }
        }
        out.push(Action::Ack);
        if self
            .span
            .as_ref()
            .is_some_and(|s| s.messages >= REPLAY_SPAN)
        {
            self.end_span(out);
        }
        let last_seq = self.ledger.last_seq;
        if let Some(r) = self.replay.as_mut() {
            if r.pause_after.is_some_and(|a| last_seq >= a) {
                r.pause_after = None;
                r.paused = true;
                self.end_span(out);
            }
        }
        // A message beyond the bound means the rest is not coming: the target stops either way.
        let done = self
            .replay
            .as_ref()
            .and_then(|r| r.finish.as_ref())
            .is_some_and(|f| last_seq >= f.until_seq || beyond);
        if done {
            let f = self
                .replay
                .as_mut()
                .and_then(|r| r.finish.take())
                .expect("checked above");
            self.finish_replay(f.go_live, f.reply, out);
        }
    }
}

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod props;
