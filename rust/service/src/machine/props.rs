//! Property tests of the core: random interleavings of deliveries and commands, no broker.
//!
//! Two models. One instance fed anything at all (any command at any time, the manager's order
//! or not), checked action by action; and the MS2M cutover with two instances over a small
//! broker model (FIFO queues, prefetch, unacked messages handed back when a channel closes),
//! checked for "nothing lost, nothing applied live twice".

use super::test_support::{Core, Sealed};
use super::*;
use ms2m_wire::state::{workload_payload, ServiceState};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet, VecDeque};

const BYTES: usize = 32;

fn payload(seq: u64) -> String {
    workload_payload(seq, 4)
}

fn data(seq: u64) -> Input {
    Input::Data {
        seq,
        t_pub_ns: seq,
        payload: payload(seq),
    }
}

fn state_of(seqs: impl IntoIterator<Item = u64>) -> ServiceState {
    let mut s = ServiceState::new(BYTES);
    for seq in seqs {
        s.apply(seq, payload(seq).as_bytes());
    }
    s
}

// ---------------------------------------------------------------------------------------------
// One instance, any interleaving.

#[derive(Debug, Clone)]
enum Item {
    Data(u64),
    Barrier,
    Malformed,
}

#[derive(Debug, Clone)]
enum Cmd {
    Status,
    StartLive,
    /// Announces the barrier the live queue carries (id "b").
    ArmBarrier,
    /// `after_seq`, and whether it hands over to a target.
    StopLive(Option<u64>, bool),
    Snapshot,
    /// A snapshot of `1..=k`, or (None) bytes that are not a snapshot.
    Restore(Option<u64>),
    /// `opens`: whether the subscription opens, reported at once as the I/O loop does; `None`
    /// leaves the outcome for a later [`Op::Opened`], with anything in between.
    Replay {
        limit: Option<u64>,
        opens: Option<bool>,
    },
    PauseReplay(Option<u64>),
    FinishReplay {
        until: u64,
        go_live: bool,
    },
    Digest,
    Shutdown,
}

#[derive(Debug, Clone)]
enum Op {
    /// The next message of the primary queue: a barrier, a malformed body, a repeated seq, a
    /// jump, or (mostly) the next seq.
    Live(u8),
    /// Anything at all from the replay queue: any seq, in any order, duplicates included.
    Replay(Item),
    Control(Cmd),
    /// The outcome of opening a replay subscription, whether or not one is being opened.
    Opened(bool),
    /// The I/O loop has nothing else to do.
    Idle,
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        8 => (0u64..24).prop_map(Item::Data),
        1 => Just(Item::Barrier),
        1 => Just(Item::Malformed),
    ]
}

fn command() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        2 => Just(Cmd::Status),
        2 => Just(Cmd::StartLive),
        2 => Just(Cmd::ArmBarrier),
        3 => (proptest::option::of(0u64..24), any::<bool>())
            .prop_map(|(after, hand)| Cmd::StopLive(after, hand)),
        1 => Just(Cmd::Snapshot),
        2 => proptest::option::weighted(0.8, 0u64..16).prop_map(Cmd::Restore),
        3 => (
            proptest::option::of(0u64..24),
            proptest::option::weighted(0.7, proptest::bool::weighted(0.8)),
        )
            .prop_map(|(limit, opens)| Cmd::Replay { limit, opens }),
        2 => proptest::option::of(0u64..24).prop_map(Cmd::PauseReplay),
        3 => (0u64..24, any::<bool>())
            .prop_map(|(until, go_live)| Cmd::FinishReplay { until, go_live }),
        1 => Just(Cmd::Digest),
        1 => Just(Cmd::Shutdown),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Live),
        4 => item().prop_map(Op::Replay),
        3 => command().prop_map(Op::Control),
        1 => proptest::bool::weighted(0.8).prop_map(Op::Opened),
        1 => Just(Op::Idle),
    ]
}

/// What a delivery being handled was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Live,
    Replay,
}

/// Drives one core and checks every batch of actions against a model of the instance.
struct Single {
    core: Core,
    /// The model's state: what the announced `Process` actions add up to.
    expected: ServiceState,
    /// Next seq of the primary queue. Live messages are not checked against `last_seq` (the
    /// queue hands each to one consumer), so the model's queue resumes where the instance is
    /// when it starts consuming, as the cutover arranges it.
    live_next: u64,
    live: bool,
    replay_open: bool,
    /// The highest seq applied by the replay open: a replay never applies a seq twice nor out
    /// of order, whatever happens to the state meanwhile (a restore would rewind it).
    replay_high: u64,
    /// Messages replayed and not reported yet by a replay span.
    unreported: u64,
    exited: bool,
    /// Whether barrier "b" was armed and not used yet.
    armed: bool,
    /// What the live delivery being handled must be refused for, if anything.
    refusal: Option<Rejection>,
    /// The replay delivery being handled is the armed barrier: a marker reply is due.
    marker: bool,
    /// Commands sent and not answered yet, with the kind their reply must have.
    outstanding: HashMap<String, ReplyKind>,
    /// Commands answered: none may be answered twice.
    answered: HashSet<String>,
    corr: u64,
}

impl Single {
    fn new() -> Self {
        Single {
            core: Core::new("i", ServiceState::new(BYTES)),
            expected: ServiceState::new(BYTES),
            live_next: 1,
            live: false,
            replay_open: false,
            replay_high: 0,
            unreported: 0,
            exited: false,
            armed: false,
            refusal: None,
            marker: false,
            outstanding: HashMap::new(),
            answered: HashSet::new(),
            corr: 0,
        }
    }

    fn step(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Live(k) => {
                let input = match k % 12 {
                    0 => Ok(Input::Barrier {
                        id: "b".into(),
                        reply_to: "mgr".into(),
                        stream: None,
                    }),
                    1 => Err(Refused::new(Rejection::Malformed, "malformed")),
                    2 => Ok(data(
                        self.live_next.saturating_sub(1 + u64::from(k / 12 % 3)),
                    )),
                    3 => Ok(data(self.live_next + 1 + u64::from(k / 12))),
                    _ => Ok(data(self.live_next)),
                };
                // What the core must refuse, seen from the model: anything but the next seq,
                // a barrier not armed.
                let last = self.expected.last_seq;
                self.refusal = match &input {
                    Err(r) => Some(r.reason),
                    Ok(Input::Data { seq, .. }) if *seq <= last => Some(Rejection::Repeat),
                    Ok(Input::Data { seq, .. }) if *seq > last + 1 => Some(Rejection::Jump),
                    Ok(Input::Barrier { .. }) if !self.armed => Some(Rejection::UnarmedBarrier),
                    _ => None,
                };
                let is_data = matches!(input, Ok(Input::Data { .. })) && self.refusal.is_none();
                if !self.core.polls_live() {
                    self.refusal = None;
                    let a = self.core.handle(0, Event::Live(input));
                    prop_assert!(a.is_empty(), "live delivery not polled: {a:?}");
                    return Ok(());
                }
                if is_data {
                    self.live_next += 1;
                }
                let bounds = self.bounds();
                let a = self.core.handle(0, Event::Live(input.clone()));
                self.check(a, Some((Via::Live, input)), bounds)
            }
            Op::Replay(item) => {
                let input = match item {
                    Item::Data(seq) => Ok(data(seq)),
                    Item::Barrier => Ok(Input::Barrier {
                        id: "b".into(),
                        reply_to: "mgr".into(),
                        stream: None,
                    }),
                    Item::Malformed => Err(Refused::new(Rejection::Malformed, "malformed")),
                };
                if !self.core.polls_replay() {
                    let a = self.core.handle(0, Event::Replay(input));
                    prop_assert!(a.is_empty(), "replay delivery not polled: {a:?}");
                    return Ok(());
                }
                // An armed barrier in replay marks the end of the queue: answered once.
                if matches!(input, Ok(Input::Barrier { .. })) && self.armed {
                    self.armed = false;
                    self.marker = true;
                }
                let bounds = self.bounds();
                let a = self.core.handle(0, Event::Replay(input.clone()));
                self.check(a, Some((Via::Replay, input)), bounds)
            }
            Op::Control(cmd) => self.control(cmd),
            Op::Opened(ok) => {
                let result = if ok { Ok(()) } else { Err("nope".to_string()) };
                let bounds = self.bounds();
                let a = self.core.handle(0, Event::ReplayOpened(result));
                self.check(a, None, bounds)
            }
            Op::Idle => {
                let bounds = self.bounds();
                let a = self.core.handle(0, Event::Idle);
                prop_assert_eq!(a.len(), usize::from(self.unreported > 0), "{:?}", a);
                self.check(a, None, bounds)
            }
        }
    }

    /// Whether the core must refuse `command` in its present state (an error reply, nothing
    /// else done). A replay whose queue fails to open is an error too, but not a refusal.
    fn refuses(&self, command: &Command, attachment: &[u8]) -> bool {
        let c = &self.core;
        let finishing = c.replay.as_ref().is_some_and(|r| r.finish.is_some());
        match command {
            Command::Status
            | Command::ArmBarrier { .. }
            | Command::Snapshot { .. }
            | Command::Digest
            | Command::Shutdown => false,
            Command::StartLive => c.replay.is_some(),
            Command::StopLive { after_seq, .. } => {
                c.stop_after.is_some() && c.live && after_seq.is_some_and(|s| c.ledger.last_seq < s)
            }
            Command::Restore => {
                Ledger::open(attachment.to_vec()).is_err() || c.live || c.replay.is_some()
            }
            Command::Replay { .. } => c.replay.is_some() || c.live,
            Command::Adopt { .. } => c.live || c.replay.is_some() || c.ledger.count > 0,
            Command::Fetch(_) => c.fetching.is_some(),
            Command::PauseReplay { .. } => finishing,
            Command::FinishReplay { .. } => {
                finishing || c.replay.as_ref().is_some_and(|r| r.opening.is_some())
            }
        }
    }

    /// The replay's bounds before an event: no replayed message may pass them.
    fn bounds(&self) -> (Option<u64>, Option<u64>) {
        self.core.replay.as_ref().map_or((None, None), |r| {
            (r.limit, r.finish.as_ref().map(|f| f.until_seq))
        })
    }

    fn control(&mut self, cmd: Cmd) -> Result<(), TestCaseError> {
        self.corr += 1;
        let corr = self.corr.to_string();
        let mut attachment = Vec::new();
        let mut opens = Some(true);
        let mut restore_to = None;
        let cmd_was_arm = matches!(cmd, Cmd::ArmBarrier);
        let command = match cmd {
            Cmd::Status => Command::Status,
            Cmd::StartLive => Command::StartLive,
            Cmd::ArmBarrier => Command::ArmBarrier { id: "b".into() },
            Cmd::StopLive(after_seq, hand) => Command::StopLive {
                after_seq,
                hand_over: hand.then(|| HandOver {
                    queue: "target".into(),
                    corr: "h".into(),
                    reply_to: "mgr".into(),
                }),
            },
            Cmd::Snapshot => Command::Snapshot { stream: None },
            Cmd::Restore(k) => {
                attachment = match k {
                    Some(k) => state_of(1..=k).checkpoint(),
                    None => b"garbage".to_vec(),
                };
                restore_to = k;
                Command::Restore
            }
            Cmd::Replay { limit, opens: o } => {
                opens = o;
                Command::Replay {
                    queue: "q".into(),
                    until_seq: limit,
                }
            }
            Cmd::PauseReplay(after_seq) => Command::PauseReplay { after_seq },
            Cmd::FinishReplay { until, go_live } => Command::FinishReplay {
                until_seq: until,
                go_live,
            },
            Cmd::Digest => Command::Digest,
            Cmd::Shutdown => Command::Shutdown,
        };
        let kind = command.reply_kind();
        // Only these may leave their reply for a later event.
        let waits = match command {
            Command::StopLive { .. } | Command::FinishReplay { .. } => true,
            Command::Replay { .. } => opens.is_none(),
            _ => false,
        };
        let refused = self.refuses(&command, &attachment);
        let env = Envelope {
            corr: corr.clone(),
            reply_to: "mgr".into(),
            command,
        };
        if self.exited {
            let a = self.core.handle(0, Event::Control(env, &attachment));
            prop_assert!(a.is_empty(), "after the exit: {a:?}");
            return Ok(());
        }
        self.outstanding.insert(corr.clone(), kind);
        let before = self.core.clone();
        let bounds = self.bounds();
        let mut a = self.core.handle(0, Event::Control(env, &attachment));
        if let Some(ok) = opens {
            if a.iter().any(|x| matches!(x, Action::OpenReplay { .. })) {
                let result = if ok { Ok(()) } else { Err("nope".into()) };
                a.extend(self.core.handle(0, Event::ReplayOpened(result)));
            }
        }
        let own: Vec<&Reply> = a
            .iter()
            .filter_map(|x| match x {
                Action::Reply(o) if o.reply.corr == corr => Some(&o.reply),
                _ => None,
            })
            .collect();
        if refused {
            // An error reply and nothing else: the state and every wait are as they were.
            prop_assert_eq!(a.len(), 1, "refusal with side effects: {:?}", a);
            prop_assert!(own.len() == 1 && own[0].error.is_some(), "{:?}", a);
            prop_assert_eq!(&self.core, &before, "a refusal changed the core");
        } else if opens != Some(false) {
            prop_assert!(
                own.iter().all(|r| r.error.is_none()),
                "unexpected error: {:?}",
                own
            );
        }
        if let Some(k) = restore_to {
            if !refused {
                self.expected = state_of(1..=k);
            }
        }
        if cmd_was_arm {
            self.armed = true;
        }
        self.check(a, None, bounds)?;
        if !waits {
            prop_assert!(self.answered.contains(&corr), "{} unanswered", corr);
        }
        Ok(())
    }

    /// Ends the run: a shutdown answers whatever still waits, so every command has its reply.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        if !self.exited {
            self.control(Cmd::Shutdown)?;
        }
        prop_assert!(self.exited);
        prop_assert!(
            self.outstanding.is_empty(),
            "unanswered: {:?}",
            self.outstanding
        );
        Ok(())
    }

    /// Checks one batch of actions, and the core's state against the model after it.
    fn check(
        &mut self,
        actions: Vec<Action>,
        delivery: Option<(Via, Result<Input, Refused>)>,
        (limit, until): (Option<u64>, Option<u64>),
    ) -> Result<(), TestCaseError> {
        let mut acked = false;
        let mut applied = false;
        let n = actions.len();
        for (i, action) in actions.into_iter().enumerate() {
            match action {
                Action::Process {
                    seq, mode, chain, ..
                } => {
                    // At most once and in increasing order: each applied seq is past the state.
                    prop_assert!(
                        seq > self.expected.last_seq,
                        "seq {} applied at {}",
                        seq,
                        self.expected.last_seq
                    );
                    prop_assert!(!acked && !applied, "one apply per delivery, before its ack");
                    let Some((from, Ok(Input::Data { seq: s, .. }))) = &delivery else {
                        return Err(TestCaseError::fail(format!(
                            "apply {seq} without data: {delivery:?}"
                        )));
                    };
                    prop_assert_eq!(*s, seq);
                    let want = if *from == Via::Live {
                        Mode::Live
                    } else {
                        Mode::Replay
                    };
                    prop_assert_eq!(mode, want);
                    if mode == Mode::Replay {
                        prop_assert!(seq > self.replay_high, "{} replayed again", seq);
                        self.replay_high = seq;
                        prop_assert!(limit.is_none_or(|l| seq <= l), "{} past the limit", seq);
                        prop_assert!(until.is_none_or(|u| seq <= u), "{} past until", seq);
                        self.unreported += 1;
                    }
                    self.expected.apply(seq, payload(seq).as_bytes());
                    prop_assert_eq!(chain, self.expected.chain);
                    applied = true;
                }
                Action::Ack => {
                    prop_assert!(delivery.is_some() && !acked, "ack without a delivery");
                    acked = true;
                }
                Action::Reply(o) if o.reply.corr == "b" => {
                    prop_assert!(self.marker, "a marker reply without an armed barrier");
                    self.marker = false;
                    prop_assert_eq!(o.reply.last_seq, self.expected.last_seq);
                    prop_assert_eq!(self.unreported, 0, "the marker comes after the span");
                }
                Action::Reply(o) => {
                    let corr = &o.reply.corr;
                    prop_assert!(!self.answered.contains(corr), "{} answered twice", corr);
                    let kind = self.outstanding.remove(corr);
                    prop_assert_eq!(kind, Some(o.reply.kind), "reply to {}", corr);
                    self.answered.insert(corr.clone());
                    prop_assert_eq!(o.reply.last_seq, self.expected.last_seq);
                    prop_assert_eq!(o.reply.count, self.expected.count);
                    if o.reply.kind == ReplyKind::Snapshot {
                        prop_assert_eq!(o.attachment, self.expected.checkpoint());
                    }
                }
                Action::ReplaySpan(span) => {
                    // Exactly the messages replayed since the last report, up to the state.
                    prop_assert_eq!(span.messages, self.unreported);
                    prop_assert!(span.messages > 0 && span.messages <= REPLAY_SPAN);
                    prop_assert!(span.first_seq + span.messages - 1 <= span.seq);
                    prop_assert_eq!(span.seq, self.expected.last_seq);
                    prop_assert_eq!(span.chain, self.expected.chain);
                    self.unreported = 0;
                }
                Action::Fetch(_) => prop_assert!(false, "no fetch was asked"),
                Action::Send { to, envelope } => {
                    // Only once stopped, and where the instance stopped.
                    prop_assert!(!self.live, "handed over while serving");
                    prop_assert_eq!(to, "target");
                    prop_assert_eq!(
                        envelope.command,
                        Command::FinishReplay {
                            until_seq: self.expected.last_seq,
                            go_live: true
                        }
                    );
                }
                Action::Checkpoint(o) => {
                    let barrier = matches!(delivery, Some((Via::Live, Ok(Input::Barrier { .. }))));
                    prop_assert!(barrier, "a checkpoint only for a live barrier");
                    prop_assert!(self.armed, "a checkpoint only for an armed barrier");
                    self.armed = false;
                    prop_assert_eq!(o.attachment, self.expected.checkpoint());
                }
                Action::StartLive => {
                    prop_assert!(!self.live);
                    self.live = true;
                    self.live_next = self.expected.last_seq + 1;
                }
                Action::StopLive => {
                    prop_assert!(self.live);
                    if matches!(delivery, Some((Via::Live, _))) {
                        prop_assert!(acked, "stopped before acking what it applied");
                    }
                    self.live = false;
                }
                Action::OpenReplay { .. } => {
                    prop_assert!(!self.replay_open);
                    self.replay_open = true;
                    self.replay_high = 0;
                }
                Action::CloseReplay { .. } => {
                    prop_assert!(self.replay_open);
                    self.replay_open = false;
                }
                Action::Fail(e) => prop_assert!(false, "the reference service failed: {}", e),
                Action::DeadLetter(r) => {
                    let live = matches!(delivery, Some((Via::Live, _)));
                    prop_assert!(live, "only live input is dead-lettered: {:?}", r);
                    prop_assert_eq!(self.refusal.take(), Some(r.reason));
                    prop_assert!(!applied, "a dead letter is not applied");
                }
                Action::Exit => {
                    prop_assert_eq!(i + 1, n, "exit is the last action");
                    self.exited = true;
                }
            }
        }
        if delivery.is_some() {
            prop_assert!(acked, "every delivery handled is acked: {:?}", delivery);
        }
        prop_assert_eq!(
            self.refusal.take(),
            None,
            "input to refuse was not: {:?}",
            delivery
        );
        prop_assert!(
            !std::mem::take(&mut self.marker),
            "no marker reply: {:?}",
            delivery
        );
        if self.core.replay.is_none() {
            // A replay that failed to open, or finished, or shut down.
            self.replay_open = false;
        }
        prop_assert_eq!(self.core.polls_live(), self.live && !self.exited);
        // A replay that pauses, ends or exits has reported everything it applied.
        prop_assert_eq!(self.core.has_open_span(), self.unreported > 0);
        prop_assert!(self.core.polls_replay() || self.unreported == 0);
        prop_assert!(self.unreported < REPLAY_SPAN);
        prop_assert!(!self.core.polls_replay() || self.replay_open);
        // Never both queues at once; a stop waits only while live.
        prop_assert!(
            !(self.core.live && self.core.replay.is_some()),
            "live and replaying"
        );
        prop_assert!(self.core.stop_after.is_none() || self.core.live);
        prop_assert_eq!(self.core.state(), &self.expected);
        if self.exited {
            // Everything sent before the exit was answered, before the shutdown's own reply.
            prop_assert!(
                self.outstanding.is_empty(),
                "unanswered at the exit: {:?}",
                self.outstanding
            );
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any interleaving of live and replay deliveries, replay openings and control commands
    /// (any command at any time, `start_live` while replaying and `replay` while live included)
    /// applies each seq at most once per state (a successful restore starts another, and is
    /// only accepted neither live nor replaying), in increasing order, acks every delivery once
    /// after applying it, refuses what would break that with an error reply and no other
    /// effect, and answers every command sent before the exit exactly once (the run ends with a
    /// shutdown, which answers whatever still waits).
    #[test]
    fn one_instance_applies_each_seq_at_most_once_in_order(
        live in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut m = Single::new();
        let boot = m.core.boot(live);
        m.check(boot, None, (None, None))?;
        for op in ops {
            m.step(op)?;
        }
        m.finish()?;
    }
}

// ---------------------------------------------------------------------------------------------
// Two instances and the MS2M cutover.

/// A consumer: what the broker has pushed to it and it has not acked yet.
#[derive(Debug, Default)]
struct Consumer {
    unacked: VecDeque<Input>,
}

#[derive(Debug)]
struct Node {
    core: Core,
    prefetch: usize,
    control: VecDeque<(Envelope, Vec<u8>)>,
    live: Option<Consumer>,
    replay: Option<Consumer>,
    applied: Vec<(u64, Mode)>,
}

/// Where the manager is in the MS2M protocol (`rust/engine/src/strategies/ms2m.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    BindReplayQueue,
    /// The source was told to expect the barrier (`arm_barrier`).
    PublishBarrier,
    AwaitCheckpoint,
    AwaitRestore,
    AwaitReplay,
    AwaitPause,
    AwaitStop,
    AwaitFinish,
    Done,
}

const SOURCE: usize = 0;
const TARGET: usize = 1;

struct World {
    n: u64,
    published: u64,
    primary: VecDeque<Input>,
    replay_queue: Option<VecDeque<Input>>,
    nodes: [Node; 2],
    /// Replies that reached the manager, by correlation id.
    inbox: HashMap<String, (Reply, Vec<u8>)>,
    stage: Stage,
    noise: u32,
    checkpoint_at: Option<u64>,
    stopped_at: Option<u64>,
    /// The cutover's pause: at once (None), or once the target reaches the checkpoint's position
    /// plus this many (never beyond the last message, which the manager's arrival guard does).
    pause_ahead: Option<u64>,
    /// Where the pending pause was set, if it was.
    pause_after: Option<u64>,
}

/// One thing that can happen next.
#[derive(Debug, Clone, Copy)]
enum Step {
    Publish,
    Manager,
    Noise(usize),
    FetchLive(usize),
    FetchReplay(usize),
    Control(usize),
    DeliverLive(usize),
    DeliverReplay(usize),
}

impl World {
    fn new(n: u64, prefetch: [usize; 2], pause_ahead: Option<u64>) -> Self {
        let node = |name: &str, p: usize| Node {
            core: Core::new(name, ServiceState::new(BYTES)),
            prefetch: p,
            control: VecDeque::new(),
            live: None,
            replay: None,
            applied: Vec::new(),
        };
        let mut w = World {
            n,
            published: 0,
            primary: VecDeque::new(),
            replay_queue: None,
            nodes: [node("source", prefetch[0]), node("target", prefetch[1])],
            inbox: HashMap::new(),
            stage: Stage::BindReplayQueue,
            noise: 0,
            checkpoint_at: None,
            stopped_at: None,
            pause_ahead,
            pause_after: None,
        };
        let boot = w.nodes[SOURCE].core.boot(true);
        w.execute(SOURCE, boot, None);
        w
    }

    fn publish(&mut self, input: Input) {
        self.primary.push_back(input.clone());
        if let Some(q) = self.replay_queue.as_mut() {
            q.push_back(input);
        }
    }

    fn send(&mut self, node: usize, corr: &str, command: Command, attachment: Vec<u8>) {
        let env = Envelope {
            corr: corr.into(),
            reply_to: "mgr".into(),
            command,
        };
        self.nodes[node].control.push_back((env, attachment));
    }

    fn awaited(&self) -> Option<&'static str> {
        match self.stage {
            Stage::PublishBarrier => Some("arm"),
            Stage::AwaitCheckpoint => Some("barrier"),
            Stage::AwaitRestore => Some("restore"),
            Stage::AwaitReplay => Some("replay"),
            Stage::AwaitPause => Some("pause"),
            Stage::AwaitStop => Some("stop"),
            Stage::AwaitFinish => Some("finish"),
            _ => None,
        }
    }

    fn enabled(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.published < self.n {
            steps.push(Step::Publish);
        }
        let manager_can = match self.stage {
            Stage::BindReplayQueue => true,
            Stage::Done => false,
            _ => self.inbox.contains_key(self.awaited().unwrap()),
        };
        if manager_can {
            steps.push(Step::Manager);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if self.stage != Stage::Done && self.noise < 6 {
                steps.push(Step::Noise(i));
            }
            if let Some(c) = &node.live {
                if c.unacked.len() < node.prefetch && !self.primary.is_empty() {
                    steps.push(Step::FetchLive(i));
                }
                if node.core.polls_live() && !c.unacked.is_empty() {
                    steps.push(Step::DeliverLive(i));
                }
            }
            if let (Some(c), Some(q)) = (&node.replay, &self.replay_queue) {
                if c.unacked.len() < node.prefetch && !q.is_empty() {
                    steps.push(Step::FetchReplay(i));
                }
                if node.core.polls_replay() && !c.unacked.is_empty() {
                    steps.push(Step::DeliverReplay(i));
                }
            }
            if !node.control.is_empty() {
                steps.push(Step::Control(i));
            }
        }
        steps
    }

    fn take(&mut self, corr: &str) -> (Reply, Vec<u8>) {
        let (reply, blob) = self.inbox.remove(corr).expect("awaited reply");
        assert_eq!(reply.error, None, "{corr}: {reply:?}");
        (reply, blob)
    }

    fn manager(&mut self) {
        self.stage = match self.stage {
            Stage::BindReplayQueue => {
                self.replay_queue = Some(VecDeque::new());
                let arm = Command::ArmBarrier {
                    id: "barrier".into(),
                };
                self.send(SOURCE, "arm", arm, Vec::new());
                Stage::PublishBarrier
            }
            Stage::PublishBarrier => {
                self.take("arm");
                self.publish(Input::Barrier {
                    id: "barrier".into(),
                    reply_to: "mgr".into(),
                    stream: None,
                });
                Stage::AwaitCheckpoint
            }
            Stage::AwaitCheckpoint => {
                let (r, snapshot) = self.take("barrier");
                assert_eq!(r.kind, ReplyKind::Checkpoint);
                self.checkpoint_at = Some(r.last_seq);
                self.send(TARGET, "restore", Command::Restore, snapshot);
                Stage::AwaitRestore
            }
            Stage::AwaitRestore => {
                self.take("restore");
                let replay = Command::Replay {
                    queue: "replay".into(),
                    until_seq: None,
                };
                self.send(TARGET, "replay", replay, Vec::new());
                Stage::AwaitReplay
            }
            Stage::AwaitReplay => {
                self.take("replay");
                self.pause_after = self
                    .pause_ahead
                    .map(|k| (self.checkpoint_at.unwrap() + k).min(self.n));
                let pause = Command::PauseReplay {
                    after_seq: self.pause_after,
                };
                self.send(TARGET, "pause", pause, Vec::new());
                Stage::AwaitPause
            }
            Stage::AwaitPause => {
                let (paused, _) = self.take("pause");
                // Below `pause_after`, the pause is pending: the source stops there too.
                let stop = Command::StopLive {
                    after_seq: Some(paused.last_seq.max(self.pause_after.unwrap_or(0))),
                    hand_over: None,
                };
                self.send(SOURCE, "stop", stop, Vec::new());
                Stage::AwaitStop
            }
            Stage::AwaitStop => {
                let (stopped, _) = self.take("stop");
                self.stopped_at = Some(stopped.last_seq);
                let finish = Command::FinishReplay {
                    until_seq: stopped.last_seq,
                    go_live: true,
                };
                self.send(TARGET, "finish", finish, Vec::new());
                Stage::AwaitFinish
            }
            Stage::AwaitFinish => {
                self.take("finish");
                Stage::Done
            }
            Stage::Done => Stage::Done,
        }
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Publish => {
                self.published += 1;
                self.publish(data(self.published));
            }
            Step::Manager => self.manager(),
            Step::Noise(i) => {
                self.noise += 1;
                let command = match self.noise % 3 {
                    0 => Command::Status,
                    1 => Command::Digest,
                    _ => Command::Snapshot { stream: None },
                };
                let corr = format!("noise-{}", self.noise);
                self.send(i, &corr, command, Vec::new());
            }
            Step::FetchLive(i) => {
                let m = self.primary.pop_front().unwrap();
                self.nodes[i].live.as_mut().unwrap().unacked.push_back(m);
            }
            Step::FetchReplay(i) => {
                let m = self.replay_queue.as_mut().unwrap().pop_front().unwrap();
                self.nodes[i].replay.as_mut().unwrap().unacked.push_back(m);
            }
            Step::Control(i) => {
                let (env, attachment) = self.nodes[i].control.pop_front().unwrap();
                let actions = self.nodes[i]
                    .core
                    .handle(0, Event::Control(env, &attachment));
                self.execute(i, actions, None);
            }
            Step::DeliverLive(i) => {
                let m = self.nodes[i].live.as_ref().unwrap().unacked[0].clone();
                let actions = self.nodes[i].core.handle(0, Event::Live(Ok(m)));
                self.execute(i, actions, Some(Via::Live));
            }
            Step::DeliverReplay(i) => {
                let m = self.nodes[i].replay.as_ref().unwrap().unacked[0].clone();
                let actions = self.nodes[i].core.handle(0, Event::Replay(Ok(m)));
                self.execute(i, actions, Some(Via::Replay));
            }
        }
    }

    /// Plays the I/O loop and the broker for one batch of actions.
    fn execute(&mut self, i: usize, actions: Vec<Action>, delivery: Option<Via>) {
        let mut todo = VecDeque::from(actions);
        let mut acked = delivery.is_none();
        while let Some(action) = todo.pop_front() {
            let node = &mut self.nodes[i];
            match action {
                Action::Process { seq, mode, .. } => node.applied.push((seq, mode)),
                Action::Ack => {
                    let consumer = match delivery.expect("ack without a delivery") {
                        Via::Live => node.live.as_mut(),
                        Via::Replay => node.replay.as_mut(),
                    };
                    consumer
                        .expect("ack on a closed channel")
                        .unacked
                        .pop_front();
                    acked = true;
                }
                Action::ReplaySpan(_) => {}
                Action::Fail(e) => unreachable!("the reference service never fails: {e}"),
                Action::Fetch(_) => unreachable!("the manager model fetches nothing"),
                Action::Send { .. } => unreachable!("the manager model hands over nothing"),
                Action::Reply(o) | Action::Checkpoint(o) => {
                    if o.to == "mgr" {
                        self.inbox
                            .insert(o.reply.corr.clone(), (o.reply, o.attachment));
                    }
                }
                Action::StartLive => node.live = Some(Consumer::default()),
                Action::StopLive => {
                    // Unacked messages go back to the head of the queue, in order.
                    let c = node.live.take().expect("stop while not live");
                    for m in c.unacked.into_iter().rev() {
                        self.primary.push_front(m);
                    }
                }
                Action::OpenReplay { queue } => {
                    assert_eq!(queue, "replay");
                    node.replay = Some(Consumer::default());
                    todo.extend(node.core.handle(0, Event::ReplayOpened(Ok(()))));
                }
                Action::CloseReplay { .. } => {
                    let c = node.replay.take().expect("close without a replay");
                    let q = self.replay_queue.as_mut().unwrap();
                    for m in c.unacked.into_iter().rev() {
                        q.push_front(m);
                    }
                }
                Action::DeadLetter(r) => panic!("a message of the stream refused: {r:?}"),
                Action::Exit => panic!("nobody asked to exit"),
            }
        }
        assert!(acked, "a delivery was not acked");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The MS2M cutover, for random arrival interleavings: source live from the start, target
    /// restored from the barrier's checkpoint and replaying the replay queue, then target
    /// `pause_replay` (at once, or pending at a position ahead) -> source `stop_live{after_seq:
    /// the pause's position}` -> target
    /// `finish_replay{until_seq: stopped.last_seq, go_live}`. Every seq is applied live by
    /// exactly one of the two instances, and the target ends with the state of the whole
    /// stream.
    #[test]
    fn cutover_never_applies_a_seq_live_twice_nor_loses_one(
        n in 0u64..40,
        prefetch in [1usize..4, 1usize..4],
        pause_ahead in proptest::option::of(0u64..6),
        choices in proptest::collection::vec(any::<u32>(), 0..600),
    ) {
        let mut w = World::new(n, prefetch, pause_ahead);
        let mut k = 0usize;
        loop {
            let steps = w.enabled();
            if steps.is_empty() {
                break;
            }
            let c = if choices.is_empty() { 0 } else { choices[k % choices.len()] as usize };
            w.run(steps[c % steps.len()]);
            k += 1;
            prop_assert!(k < 100_000, "the model does not settle");
        }
        prop_assert_eq!(w.stage, Stage::Done);
        let (b, l) = (w.checkpoint_at.unwrap(), w.stopped_at.unwrap());

        let mut live: Vec<u64> = w
            .nodes
            .iter()
            .flat_map(|node| node.applied.iter())
            .filter(|(_, m)| *m == Mode::Live)
            .map(|(s, _)| *s)
            .collect();
        live.sort_unstable();
        prop_assert_eq!(live, (1..=n).collect::<Vec<_>>(), "live applies across both");

        for node in &w.nodes {
            let seqs: Vec<u64> = node.applied.iter().map(|(s, _)| *s).collect();
            prop_assert!(seqs.windows(2).all(|p| p[0] < p[1]), "{:?}", node.applied);
        }
        let source: Vec<(u64, Mode)> = (1..=l).map(|s| (s, Mode::Live)).collect();
        prop_assert_eq!(&w.nodes[SOURCE].applied, &source);
        let target: Vec<(u64, Mode)> = (b + 1..=l)
            .map(|s| (s, Mode::Replay))
            .chain((l + 1..=n).map(|s| (s, Mode::Live)))
            .collect();
        prop_assert_eq!(&w.nodes[TARGET].applied, &target);
        prop_assert_eq!(w.nodes[TARGET].core.state(), &state_of(1..=n));
        prop_assert_eq!(w.nodes[SOURCE].core.state(), &state_of(1..=l));
    }
}

// ---------------------------------------------------------------------------------------------
// Restoring bytes of any kind.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A checkpoint cut short, with bytes flipped, or bytes of no origin: the restore is one
    /// reply, refused (the state as it was) or taken whole (the position the ledger says),
    /// never a panic. Bytes that pass both the trailer and the service's own checks are a
    /// state it accepts: corruption on the way is the transfer's SHA-256 to catch.
    #[test]
    fn restoring_any_bytes_is_a_reply_never_a_panic(
        keep in any::<proptest::sample::Index>(),
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), 1u8..=255), 0..4),
        noise in proptest::option::weighted(0.1, proptest::collection::vec(any::<u8>(), 0..200)),
    ) {
        let mut bytes = noise.unwrap_or_else(|| {
            let full = state_of(1..=5).checkpoint();
            let n = keep.index(full.len() + 1);
            full[..n.max(full.len() / 2)].to_vec()
        });
        for (at, x) in &flips {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
        }
        let mut core = Core::new("i", ServiceState::new(BYTES));
        let before = core.position();
        let env = Envelope {
            corr: "r".into(),
            reply_to: "mgr".into(),
            command: Command::Restore,
        };
        let a = core.handle(0, Event::Control(env, &bytes));
        let [Action::Reply(o)] = &a[..] else {
            return Err(TestCaseError::fail(format!("not one reply: {a:?}")));
        };
        match &o.reply.error {
            Some(_) => prop_assert_eq!(core.position(), before),
            None => prop_assert_eq!(o.reply.last_seq, core.position().last_seq),
        }
    }
}
