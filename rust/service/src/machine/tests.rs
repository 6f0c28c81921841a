//! One test per transition of the core, without a broker.

use super::test_support::{Core, Sealed};
use super::*;
use ms2m_wire::state::{workload_payload, ServiceState};

const BYTES: usize = 64;

fn fresh() -> Core {
    Core::new("t", ServiceState::new(BYTES))
}

fn live() -> Core {
    let mut c = fresh();
    assert_eq!(c.boot(true), vec![Action::StartLive]);
    c
}

fn env(command: Command) -> Envelope {
    Envelope {
        corr: command.name().to_string(),
        reply_to: "mgr".into(),
        command,
    }
}

fn cmd(c: &mut Core, command: Command) -> Vec<Action> {
    c.handle(7, Event::Control(env(command), &[]))
}

fn data(seq: u64) -> Result<Input, Refused> {
    Ok(Input::Data {
        seq,
        t_pub_ns: 1000 + seq,
        payload: workload_payload(seq, 8),
    })
}

/// A barrier; the live core takes it only once armed ([`arm`]).
fn barrier(id: &str) -> Result<Input, Refused> {
    Ok(Input::Barrier {
        id: id.into(),
        reply_to: "mgr-cp".into(),
        stream: None,
    })
}

/// The manager announces barrier `id`.
fn arm<S: Service>(c: &mut super::Core<S>, id: &str) {
    let a = c.handle(
        7,
        Event::Control(env(Command::ArmBarrier { id: id.into() }), &[]),
    );
    let r = the_reply(&a);
    assert_eq!((r.kind, r.error.as_deref()), (ReplyKind::ArmBarrier, None));
}

fn malformed(detail: &str) -> Result<Input, Refused> {
    Err(Refused::new(Rejection::Malformed, detail))
}

/// The state after applying `seqs` to a fresh state.
fn state_of(seqs: impl IntoIterator<Item = u64>) -> ServiceState {
    let mut s = ServiceState::new(BYTES);
    for seq in seqs {
        s.apply(seq, workload_payload(seq, 8).as_bytes());
    }
    s
}

fn processed(actions: &[Action]) -> Vec<(u64, Mode)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Process { seq, mode, .. } => Some((*seq, *mode)),
            _ => None,
        })
        .collect()
}

fn replies(actions: &[Action]) -> Vec<&Reply> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply(o) => Some(&o.reply),
            _ => None,
        })
        .collect()
}

/// The only reply among `actions`.
fn the_reply(actions: &[Action]) -> &Reply {
    let r = replies(actions);
    assert_eq!(r.len(), 1, "{actions:?}");
    r[0]
}

/// Actions without their payloads, to check their order.
fn shape(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .map(|a| match a {
            Action::Process { .. } => "process",
            Action::ReplaySpan(_) => "replay_span",
            Action::Ack => "ack",
            Action::Reply(_) => "reply",
            Action::Send { .. } => "send",
            Action::Checkpoint(_) => "checkpoint",
            Action::Fetch(_) => "fetch",
            Action::StartLive => "start_live",
            Action::StopLive => "stop_live",
            Action::OpenReplay { .. } => "open_replay",
            Action::CloseReplay { .. } => "close_replay",
            Action::DeadLetter(_) => "dead_letter",
            Action::Fail(_) => "fail",
            Action::Exit => "exit",
        })
        .collect()
}

/// A core that is not live and replays `q` (the subscription opened fine).
fn replaying(c: &mut Core, until_seq: Option<u64>) {
    let a = cmd(
        c,
        Command::Replay {
            queue: "q".into(),
            until_seq,
        },
    );
    assert_eq!(a, vec![Action::OpenReplay { queue: "q".into() }]);
    assert!(
        !c.polls_replay(),
        "no replay deliveries before the subscription is open"
    );
    let a = c.handle(8, Event::ReplayOpened(Ok(())));
    let r = the_reply(&a);
    assert_eq!((r.kind, r.error.as_deref()), (ReplyKind::Replay, None));
    assert!(c.polls_replay());
}

/// A fresh core whose `replay` of `q` is still being opened (no `ReplayOpened` yet).
fn opening() -> Core {
    let mut c = fresh();
    let a = cmd(
        &mut c,
        Command::Replay {
            queue: "q".into(),
            until_seq: None,
        },
    );
    assert_eq!(shape(&a), ["open_replay"]);
    c
}

/// Sends `command` with its own correlation id.
fn cmd_as(c: &mut Core, corr: &str, command: Command) -> Vec<Action> {
    let e = Envelope {
        corr: corr.into(),
        ..env(command)
    };
    c.handle(7, Event::Control(e, &[]))
}

/// The replies among `actions` as (corr, error).
fn answers(actions: &[Action]) -> Vec<(&str, Option<&str>)> {
    replies(actions)
        .into_iter()
        .map(|r| (r.corr.as_str(), r.error.as_deref()))
        .collect()
}

/// A target restored at `at` that replays `q`.
fn restored_and_replaying(at: u64, until_seq: Option<u64>) -> Core {
    let mut c = fresh();
    let snap = state_of(1..=at).checkpoint();
    let a = c.handle(5, Event::Control(env(Command::Restore), &snap));
    assert_eq!(the_reply(&a).error, None);
    replaying(&mut c, until_seq);
    c
}

#[test]
fn boot_goes_live_only_when_asked() {
    let mut c = fresh();
    assert_eq!(c.boot(false), vec![]);
    assert!(!c.polls_live() && !c.polls_replay());
    assert_eq!(c.boot(true), vec![Action::StartLive]);
    assert!(c.polls_live());
}

#[test]
fn status_reports_the_position() {
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    c.handle(0, Event::Live(data(2)));
    let a = cmd(&mut c, Command::Status);
    assert_eq!(shape(&a), ["reply"]);
    let Action::Reply(o) = &a[0] else {
        unreachable!()
    };
    assert_eq!(o.to, "mgr");
    assert_eq!(
        o.reply,
        Reply {
            corr: "status".into(),
            instance: "t".into(),
            kind: ReplyKind::Status,
            last_seq: 2,
            count: 2,
            ..Reply::default()
        }
    );
}

#[test]
fn live_data_is_applied_then_acked() {
    let mut c = live();
    let a = c.handle(0, Event::Live(data(1)));
    assert_eq!(shape(&a), ["process", "ack"]);
    let expected = state_of([1]);
    assert_eq!(
        a[0],
        Action::Process {
            seq: 1,
            mode: Mode::Live,
            t_pub_ns: 1001,
            t_start_ns: 0,
            chain: expected.chain,
            output: None,
        }
    );
    assert_eq!(c.state(), &expected);
}

#[test]
fn live_barrier_takes_a_checkpoint_of_the_state_so_far() {
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    arm(&mut c, "b1");
    let a = c.handle(42, Event::Live(barrier("b1")));
    assert_eq!(shape(&a), ["checkpoint", "ack"]);
    let Action::Checkpoint(o) = &a[0] else {
        unreachable!()
    };
    assert_eq!(o.to, "mgr-cp");
    assert_eq!(o.reply.corr, "b1");
    assert_eq!(o.reply.kind, ReplyKind::Checkpoint);
    assert_eq!((o.reply.last_seq, o.reply.t_begin_ns), (1, 42));
    assert_eq!(o.attachment, state_of([1]).checkpoint());
    assert_eq!(c.position().last_seq, 1, "a barrier is not a message");
}

#[test]
fn malformed_live_input_is_dead_lettered_and_acked() {
    let mut c = live();
    let a = c.handle(0, Event::Live(malformed("expected value")));
    assert_eq!(
        a,
        vec![
            Action::DeadLetter(Refused::new(Rejection::Malformed, "expected value")),
            Action::Ack
        ]
    );
    assert_eq!(c.position(), Position::default());
}

/// The reason of the one dead letter among `actions`, which must be `[dead_letter, ack]`.
fn dead_letter(actions: &[Action]) -> Rejection {
    match actions {
        [Action::DeadLetter(r), Action::Ack] => r.reason,
        other => panic!("not a dead letter: {other:?}"),
    }
}

#[test]
fn live_repeats_and_jumps_are_dead_lettered_and_change_nothing() {
    let mut c = live();
    for seq in 1..=5 {
        c.handle(0, Event::Live(data(seq)));
    }
    let before = c.clone();
    assert_eq!(
        dead_letter(&c.handle(0, Event::Live(data(5)))),
        Rejection::Repeat
    );
    assert_eq!(
        dead_letter(&c.handle(0, Event::Live(data(1)))),
        Rejection::Repeat
    );
    assert_eq!(
        dead_letter(&c.handle(0, Event::Live(data(7)))),
        Rejection::Jump
    );
    let huge = c.handle(0, Event::Live(data(1_000_000_000_000_000_000)));
    assert_eq!(dead_letter(&huge), Rejection::Jump);
    assert_eq!(c, before, "a refused input changed the core");
    // The stream goes on where it was.
    assert_eq!(
        processed(&c.handle(0, Event::Live(data(6)))),
        [(6, Mode::Live)]
    );
    assert_eq!(c.state(), &state_of(1..=6));
}

#[test]
fn a_max_seq_gap_lets_a_lossy_stream_skip_ahead_but_never_back() {
    let mut c = fresh().with_max_seq_gap(3);
    c.boot(true);
    c.handle(0, Event::Live(data(1)));
    assert_eq!(
        processed(&c.handle(0, Event::Live(data(4)))),
        [(4, Mode::Live)]
    );
    assert_eq!(
        dead_letter(&c.handle(0, Event::Live(data(8)))),
        Rejection::Jump
    );
    assert_eq!(
        dead_letter(&c.handle(0, Event::Live(data(3)))),
        Rejection::Repeat
    );
    assert_eq!(c.state(), &state_of([1, 4]));
    assert_eq!(
        fresh().with_max_seq_gap(0).max_seq_gap,
        1,
        "at least the next seq"
    );
}

/// `adopt` after `after_seq`, or at the next input above it.
fn adopt(after_seq: u64, next_above: bool) -> Command {
    Command::Adopt {
        after_seq,
        next_above,
    }
}

/// An instance started empty where one died with its state takes the stream up where it is.
#[test]
fn adopt_takes_the_stream_up_after_a_position_or_at_the_next_input_above_it() {
    let mut c = fresh();
    let r = cmd(&mut c, adopt(41, false));
    let r = the_reply(&r);
    assert_eq!((r.error.as_deref(), r.last_seq), (None, 41));
    cmd(&mut c, Command::StartLive);
    let next = c.handle(0, Event::Live(data(42)));
    assert_eq!(processed(&next), [(42, Mode::Live)]);
    let again = c.handle(0, Event::Live(data(41)));
    assert_eq!(dead_letter(&again), Rejection::Repeat);
    assert_eq!(c.state(), &state_of([42]));

    // The next input above the position, whatever the gap (the dead source's last outputs may
    // not have been seen); a stale copy below it is still a repeat; then the usual rules.
    let mut c = fresh();
    assert_eq!(the_reply(&cmd(&mut c, adopt(900, true))).error, None);
    cmd(&mut c, Command::StartLive);
    let stale = c.handle(0, Event::Live(data(900)));
    assert_eq!(dead_letter(&stale), Rejection::Repeat);
    let bad = c.handle(0, Event::Live(malformed("x")));
    assert_eq!(dead_letter(&bad), Rejection::Malformed);
    for seq in [1000, 1001] {
        let a = c.handle(0, Event::Live(data(seq)));
        assert_eq!(processed(&a), [(seq, Mode::Live)]);
    }
    let repeat = c.handle(0, Event::Live(data(1000)));
    assert_eq!(dead_letter(&repeat), Rejection::Repeat);
    let jump = c.handle(0, Event::Live(data(1003)));
    assert_eq!(dead_letter(&jump), Rejection::Jump);
    assert_eq!(c.state(), &state_of([1000, 1001]));
}

#[test]
fn adopt_is_refused_once_anything_was_applied_or_while_serving() {
    let stop = || Command::StopLive {
        after_seq: None,
        hand_over: None,
    };
    let mut c = live();
    let r = cmd(&mut c, adopt(9, false));
    assert!(the_reply(&r).error.is_some(), "live");
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    cmd(&mut c, stop());
    let before = c.clone();
    let r = cmd(&mut c, adopt(9, true));
    let e = the_reply(&r).error.clone().unwrap_or_default();
    assert!(e.contains("applied nothing and neither serves"), "{e}");
    assert_eq!(c, before);
    let mut c = restored_and_replaying(5, None);
    let r = cmd(&mut c, adopt(9, false));
    assert!(the_reply(&r).error.is_some(), "replaying");
}

#[test]
fn a_barrier_counts_only_when_armed_and_only_once() {
    let mut c = live();
    let unarmed = c.handle(0, Event::Live(barrier("b")));
    assert_eq!(dead_letter(&unarmed), Rejection::UnarmedBarrier);
    arm(&mut c, "b");
    let wrong = c.handle(0, Event::Live(barrier("guess")));
    assert_eq!(dead_letter(&wrong), Rejection::UnarmedBarrier);
    assert_eq!(
        shape(&c.handle(0, Event::Live(barrier("b")))),
        ["checkpoint", "ack"]
    );
    let again = c.handle(0, Event::Live(barrier("b")));
    assert_eq!(
        dead_letter(&again),
        Rejection::UnarmedBarrier,
        "a barrier is used once"
    );
    // A newer arm replaces one not used.
    arm(&mut c, "old");
    arm(&mut c, "new");
    assert_eq!(
        dead_letter(&c.handle(0, Event::Live(barrier("old")))),
        Rejection::UnarmedBarrier
    );
    assert_eq!(
        shape(&c.handle(0, Event::Live(barrier("new")))),
        ["checkpoint", "ack"]
    );
}

#[test]
fn replay_drops_what_live_dead_letters_and_a_jump_does_not_end_it() {
    let mut c = fresh();
    replaying(&mut c, None);
    c.handle(0, Event::Replay(data(1)));
    let finish = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 3,
            go_live: true,
        },
    );
    assert!(finish.is_empty(), "waits for seq 3: {finish:?}");
    // An outsider's jump past the bound neither applies nor counts as the end of the stream.
    assert_eq!(c.handle(0, Event::Replay(data(1 << 60))), vec![Action::Ack]);
    assert_eq!(c.position().last_seq, 1);
    assert!(c.polls_replay(), "still replaying");
    c.handle(0, Event::Replay(data(2)));
    let a = c.handle(0, Event::Replay(data(3)));
    assert!(shape(&a).contains(&"start_live"), "{a:?}");
    assert_eq!(c.state(), &state_of(1..=3));
}

#[test]
fn stop_live_without_a_position_stops_at_once() {
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    let a = cmd(
        &mut c,
        Command::StopLive {
            after_seq: None,
            hand_over: None,
        },
    );
    assert_eq!(shape(&a), ["stop_live", "reply"]);
    assert_eq!(the_reply(&a).kind, ReplyKind::StopLive);
    assert_eq!(the_reply(&a).last_seq, 1);
    assert!(!c.polls_live());
}

#[test]
fn stop_live_waits_for_after_seq_and_stops_after_the_ack() {
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    assert_eq!(
        cmd(
            &mut c,
            Command::StopLive {
                after_seq: Some(3),
                hand_over: None
            }
        ),
        vec![]
    );
    assert!(c.polls_live(), "serves on until it has processed 3");
    assert_eq!(
        shape(&c.handle(0, Event::Live(data(2)))),
        ["process", "ack"]
    );
    let a = c.handle(0, Event::Live(data(3)));
    // Ack first: a message applied must not go back to the queue when the channel closes.
    assert_eq!(shape(&a), ["process", "ack", "stop_live", "reply"]);
    let r = the_reply(&a);
    assert_eq!(
        (r.kind, r.corr.as_str(), r.last_seq),
        (ReplyKind::StopLive, "stop_live", 3)
    );
    assert!(!c.polls_live());
}

fn hand_over_to(queue: &str) -> Option<HandOver> {
    Some(HandOver {
        queue: queue.into(),
        corr: "fin".into(),
        reply_to: "mgr".into(),
    })
}

/// The `finish_replay` the actions send, with where to.
fn sent(actions: &[Action]) -> Vec<(&str, &Envelope)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to, envelope } => Some((to.as_str(), envelope)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_stop_with_hand_over_sends_the_targets_finish_replay_after_closing_and_replying() {
    let mut c = live();
    cmd(
        &mut c,
        Command::StopLive {
            after_seq: Some(2),
            hand_over: hand_over_to("S.ctl.target"),
        },
    );
    c.handle(0, Event::Live(data(1)));
    let a = c.handle(0, Event::Live(data(2)));
    assert_eq!(shape(&a), ["process", "ack", "stop_live", "reply", "send"]);
    let [(to, env)] = sent(&a)[..] else {
        panic!("one send: {a:?}")
    };
    assert_eq!(
        (to, env.corr.as_str(), env.reply_to.as_str()),
        ("S.ctl.target", "fin", "mgr")
    );
    assert_eq!(
        env.command,
        Command::FinishReplay {
            until_seq: 2,
            go_live: true
        }
    );
    // Handed over once: a later stop sends nothing.
    cmd(&mut c, Command::StartLive);
    assert!(sent(&cmd(
        &mut c,
        Command::StopLive {
            after_seq: None,
            hand_over: None
        }
    ))
    .is_empty());
}

#[test]
fn a_refused_or_shut_down_stop_hands_nothing_over() {
    let mut c = live();
    cmd(
        &mut c,
        Command::StopLive {
            after_seq: Some(5),
            hand_over: None,
        },
    );
    let refused = cmd(
        &mut c,
        Command::StopLive {
            after_seq: Some(6),
            hand_over: hand_over_to("t"),
        },
    );
    assert!(the_reply(&refused).error.is_some());
    for seq in 1..=5 {
        assert!(sent(&c.handle(0, Event::Live(data(seq)))).is_empty());
    }
    let mut c = live();
    cmd(
        &mut c,
        Command::StopLive {
            after_seq: Some(5),
            hand_over: hand_over_to("t"),
        },
    );
    let a = cmd(&mut c, Command::Shutdown);
    assert!(sent(&a).is_empty(), "{a:?}");
}

#[test]
fn stop_after_is_checked_after_barriers_and_malformed_input_too() {
    let mut c = live();
    cmd(
        &mut c,
        Command::StopLive {
            after_seq: Some(1),
            hand_over: None,
        },
    );
    arm(&mut c, "b");
    assert_eq!(
        shape(&c.handle(0, Event::Live(barrier("b")))),
        ["checkpoint", "ack"]
    );
    assert_eq!(
        shape(&c.handle(0, Event::Live(malformed("x")))),
        ["dead_letter", "ack"]
    );
    assert_eq!(
        shape(&c.handle(0, Event::Live(data(1)))),
        ["process", "ack", "stop_live", "reply"]
    );
}

#[test]
fn stop_after_reached_inside_a_backlog_stops_at_the_first_message_past_it() {
    // A gap in the stream (5 jumps over 4, allowed by a `max_seq_gap` of 2): the source stops
    // at the first message at or past `after_seq`, and the rest of its prefetched backlog goes
    // back to the queue.
    let mut c = fresh().with_max_seq_gap(2);
    c.boot(true);
    cmd(
        &mut c,
        Command::StopLive {
            after_seq: Some(4),
            hand_over: None,
        },
    );
    for seq in [1, 2, 3] {
        assert_eq!(
            shape(&c.handle(0, Event::Live(data(seq)))),
            ["process", "ack"]
        );
    }
    let a = c.handle(0, Event::Live(data(5)));
    assert_eq!(shape(&a), ["process", "ack", "stop_live", "reply"]);
    assert_eq!(the_reply(&a).last_seq, 5);
    assert_eq!(
        c.handle(0, Event::Live(data(6))),
        vec![],
        "not consumed any more"
    );
}

#[test]
fn stop_live_already_past_after_seq_stops_at_once() {
    for after in [1, 2] {
        let mut c = live();
        c.handle(0, Event::Live(data(1)));
        c.handle(0, Event::Live(data(2)));
        let a = cmd(
            &mut c,
            Command::StopLive {
                after_seq: Some(after),
                hand_over: None,
            },
        );
        assert_eq!(shape(&a), ["stop_live", "reply"], "after_seq {after}");
    }
}

#[test]
fn stop_live_when_not_live_replies_at_once() {
    let mut c = fresh();
    let a = cmd(
        &mut c,
        Command::StopLive {
            after_seq: Some(9),
            hand_over: None,
        },
    );
    assert_eq!(shape(&a), ["reply"]);
    assert_eq!(the_reply(&a).kind, ReplyKind::StopLive);
}

#[test]
fn start_live_twice_consumes_once() {
    let mut c = fresh();
    assert_eq!(
        shape(&cmd(&mut c, Command::StartLive)),
        ["start_live", "reply"]
    );
    assert_eq!(shape(&cmd(&mut c, Command::StartLive)), ["reply"]);
    assert_eq!(
        the_reply(&cmd(&mut c, Command::StartLive)).kind,
        ReplyKind::StartLive
    );
}

#[test]
fn snapshot_attaches_the_state() {
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    let a = cmd(&mut c, Command::Snapshot { stream: None });
    let Action::Reply(o) = &a[0] else {
        panic!("{a:?}")
    };
    assert_eq!(o.reply.kind, ReplyKind::Snapshot);
    assert_eq!(o.reply.t_begin_ns, 7);
    assert_eq!(o.attachment, state_of([1]).checkpoint());
}

#[test]
fn restore_replaces_the_state_and_reports_the_restored_position() {
    let mut c = fresh();
    let snap = state_of(1..=4).checkpoint();
    let a = c.handle(9, Event::Control(env(Command::Restore), &snap));
    let r = the_reply(&a);
    assert_eq!((r.kind, r.error.as_deref()), (ReplyKind::Restore, None));
    assert_eq!((r.last_seq, r.count, r.t_begin_ns), (4, 4, 9));
    assert_eq!(c.state(), &state_of(1..=4));
}

fn checkpoint_of(snapshot: &[u8]) -> Checkpoint {
    Checkpoint {
        queue: "svc.ckpt.m1".into(),
        bytes: snapshot.len() as u64,
        chunks: 1,
        sha256: "ab".into(),
        addr: None,
    }
}

#[test]
fn fetch_then_restore_applies_the_fetched_checkpoint_once() {
    let mut c = fresh();
    let snap = state_of(1..=4).checkpoint();
    let cp = checkpoint_of(&snap);
    let a = c.handle(5, Event::Control(env(Command::Fetch(cp.clone())), &[]));
    assert_eq!(a, [Action::Fetch(cp.clone())]);
    let a = c.handle(8, Event::Fetched(Ok(snap)));
    let r = the_reply(&a);
    assert_eq!((r.kind, r.error.as_deref()), (ReplyKind::Fetch, None));
    assert_eq!((r.t_begin_ns, r.checkpoint.as_ref()), (5, Some(&cp)));
    assert_eq!(c.position().last_seq, 0, "fetching changes no state");
    let r = the_reply(&cmd(&mut c, Command::Restore)).clone();
    assert_eq!((r.error, r.last_seq), (None, 4));
    assert_eq!(c.state(), &state_of(1..=4));
    let again = the_reply(&cmd(&mut c, Command::Restore)).clone();
    assert!(again.error.unwrap().contains("nothing to restore"));
    assert_eq!(
        c.state(),
        &state_of(1..=4),
        "a refused restore changes nothing"
    );
}

#[test]
fn a_failed_fetch_is_an_error_reply_and_keeps_nothing() {
    let mut c = fresh();
    let cp = checkpoint_of(b"");
    cmd(&mut c, Command::Fetch(cp.clone()));
    let refused = cmd(&mut c, Command::Fetch(cp));
    assert_eq!(
        the_reply(&refused).error.as_deref(),
        Some("already fetching a checkpoint")
    );
    let a = c.handle(8, Event::Fetched(Err("SHA-256 differs".into())));
    assert_eq!(the_reply(&a).error.as_deref(), Some("SHA-256 differs"));
    let r = the_reply(&cmd(&mut c, Command::Restore)).clone();
    assert!(r.error.unwrap().contains("nothing to restore"));
    assert!(
        c.handle(9, Event::Fetched(Ok(vec![1]))).is_empty(),
        "nobody asked"
    );
}

#[test]
fn a_fetched_checkpoint_outlives_a_refused_restore() {
    let mut c = live();
    let snap = state_of(1..=2).checkpoint();
    cmd(&mut c, Command::Fetch(checkpoint_of(&snap)));
    c.handle(8, Event::Fetched(Ok(snap)));
    let r = the_reply(&cmd(&mut c, Command::Restore)).clone();
    assert_eq!(
        r.error.as_deref(),
        Some("cannot restore while serving live")
    );
    cmd(
        &mut c,
        Command::StopLive {
            after_seq: None,
            hand_over: None,
        },
    );
    let r = the_reply(&cmd(&mut c, Command::Restore)).clone();
    assert_eq!((r.error, r.last_seq), (None, 2));
}

#[test]
fn shutdown_answers_a_fetch_in_progress() {
    let mut c = fresh();
    cmd(&mut c, Command::Fetch(checkpoint_of(b"")));
    let a = cmd(&mut c, Command::Shutdown);
    let r = replies(&a);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].kind, ReplyKind::Fetch);
    assert!(r[0]
        .error
        .as_deref()
        .unwrap()
        .contains("shut down while fetching"));
}

#[test]
fn a_barrier_with_a_stream_says_where_to_stream() {
    let mut c = live();
    let stream = StreamTo {
        queue: "svc.ckpt.m1".into(),
        chunk_bytes: 1 << 20,
        listen: None,
    };
    let barrier = Input::Barrier {
        id: "b".into(),
        reply_to: "mgr".into(),
        stream: Some(stream.clone()),
    };
    arm(&mut c, "b");
    let a = c.handle(1, Event::Live(Ok(barrier)));
    let Action::Checkpoint(o) = &a[0] else {
        panic!("{a:?}")
    };
    assert_eq!(o.stream.as_ref(), Some(&stream));
    assert_eq!(o.attachment, ServiceState::new(BYTES).checkpoint());
    let a = cmd(
        &mut c,
        Command::Snapshot {
            stream: Some(stream.clone()),
        },
    );
    let Action::Reply(o) = &a[0] else {
        panic!("{a:?}")
    };
    assert_eq!(o.stream.as_ref(), Some(&stream));
}

#[test]
fn restore_while_live_is_refused() {
    let mut c = live();
    let snap = state_of(1..=4).checkpoint();
    let a = c.handle(0, Event::Control(env(Command::Restore), &snap));
    let r = the_reply(&a);
    assert_eq!(
        r.error.as_deref(),
        Some("cannot restore while serving live")
    );
    assert_eq!(r.last_seq, 0);
    assert_eq!(c.state(), &ServiceState::new(BYTES));
}

#[test]
fn restore_of_an_invalid_snapshot_is_an_error_reply() {
    for mut c in [fresh(), live(), restored_and_replaying(0, None)] {
        let a = c.handle(0, Event::Control(env(Command::Restore), b"not a snapshot"));
        let r = the_reply(&a);
        // The decoding error wins over "while live" and "while replaying": the snapshot is
        // looked at first.
        assert_eq!(
            r.error.as_deref(),
            Some("invalid checkpoint: 14 bytes, shorter than its 56-byte trailer")
        );
        assert_eq!(c.state(), &ServiceState::new(BYTES));
    }
}

#[test]
fn a_snapshot_the_service_refuses_leaves_the_position_as_it_was() {
    let mut c = fresh();
    let sealed = Ledger {
        last_seq: 9,
        count: 9,
        chain: [7; 32],
    }
    .seal(b"not a snapshot".to_vec());
    let a = c.handle(0, Event::Control(env(Command::Restore), &sealed));
    let r = the_reply(&a);
    assert_eq!(
        r.error.as_deref(),
        Some("the service refused the snapshot: invalid snapshot: missing MS2MSNAP header")
    );
    assert_eq!((r.last_seq, c.position().last_seq), (0, 0));
}

/// A service whose `handle` fails on one payload, and whose snapshot always fails.
#[derive(Debug, Default)]
struct Fragile(u64);

impl Service for Fragile {
    fn handle(&mut self, msg: &Message<'_>) -> crate::Result<Option<String>> {
        if msg.payload == "poison" {
            return Err("poisoned".into());
        }
        self.0 += 1;
        Ok(Some(format!("n={}", self.0)))
    }
    fn snapshot(&self) -> crate::Result<Vec<u8>> {
        Err("disk full".into())
    }
    fn restore(&mut self, _: Vec<u8>) -> crate::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_handle_stops_the_instance_without_acking_or_moving_the_ledger() {
    let mut c = super::Core::new("f", Fragile::default());
    c.boot(true);
    let input = |seq, payload: &str| {
        Ok(Input::Data {
            seq,
            t_pub_ns: 0,
            payload: payload.into(),
        })
    };
    let a = c.handle(5, Event::Live(input(1, "fine")));
    assert!(matches!(
        &a[..],
        [Action::Process { output: Some(o), t_start_ns: 5, .. }, Action::Ack] if o == "n=1"
    ));
    let a = c.handle(6, Event::Live(input(2, "poison")));
    assert!(
        matches!(&a[..], [Action::Fail(e)] if e == "the service failed on seq 2: poisoned"),
        "{a:?}"
    );
    assert_eq!(c.position().last_seq, 1);
    assert!(c.handle(7, Event::Live(input(3, "fine"))).is_empty());
}

#[test]
fn a_failed_snapshot_is_an_error_reply_with_nothing_to_stream() {
    let mut c = super::Core::new("f", Fragile::default());
    c.boot(true);
    arm(&mut c, "b");
    let barrier = Ok(Input::Barrier {
        id: "b".into(),
        reply_to: "mgr".into(),
        stream: None,
    });
    let a = c.handle(0, Event::Live(barrier));
    let [Action::Checkpoint(o), Action::Ack] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(
        o.reply.error.as_deref(),
        Some("the service's snapshot failed: disk full")
    );
    assert!(o.attachment.is_empty() && o.stream.is_none());
}

#[test]
fn restore_while_replaying_is_refused() {
    // Rewinding the state mid-replay would apply the replayed seqs again.
    let mut c = restored_and_replaying(2, None);
    c.handle(0, Event::Replay(data(3)));
    cmd(&mut c, Command::PauseReplay { after_seq: None });
    for mut c in [c, restored_and_replaying(3, None), opening()] {
        let before = c.clone();
        let snap = state_of(1..=1).checkpoint();
        let a = c.handle(0, Event::Control(env(Command::Restore), &snap));
        assert_eq!(shape(&a), ["reply"]);
        let r = the_reply(&a);
        assert_eq!(
            (r.kind, r.error.as_deref(), r.last_seq),
            (
                ReplyKind::Restore,
                Some("cannot restore while replaying"),
                before.position().last_seq
            )
        );
        assert_eq!(c, before, "refused: nothing changed");
    }
}

#[test]
fn replay_that_cannot_be_opened_is_an_error_reply_and_can_be_retried() {
    let mut c = fresh();
    let a = cmd(
        &mut c,
        Command::Replay {
            queue: "gone".into(),
            until_seq: None,
        },
    );
    assert_eq!(shape(&a), ["open_replay"]);
    let a = c.handle(0, Event::ReplayOpened(Err("NOT_FOUND".into())));
    let r = the_reply(&a);
    assert_eq!(
        (r.kind, r.error.as_deref()),
        (ReplyKind::Replay, Some("NOT_FOUND"))
    );
    assert!(!c.polls_replay());
    replaying(&mut c, None);
}

#[test]
fn replay_opened_without_a_replay_waiting_is_ignored() {
    let mut c = fresh();
    assert_eq!(c.handle(0, Event::ReplayOpened(Ok(()))), vec![]);
    replaying(&mut c, None);
    assert_eq!(c.handle(0, Event::ReplayOpened(Ok(()))), vec![]);
}

#[test]
fn replay_while_replaying_is_refused() {
    let mut c = fresh();
    replaying(&mut c, None);
    let again = Command::Replay {
        queue: "q2".into(),
        until_seq: None,
    };
    let a = cmd(&mut c, again.clone());
    assert_eq!(the_reply(&a).error.as_deref(), Some("already replaying"));
    // Paused is still replaying.
    cmd(&mut c, Command::PauseReplay { after_seq: None });
    let a = cmd(&mut c, again.clone());
    assert_eq!(the_reply(&a).error.as_deref(), Some("already replaying"));
    // Once finished, a new replay may start.
    cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 0,
            go_live: false,
        },
    );
    assert_eq!(shape(&cmd(&mut c, again)), ["open_replay"]);
}

#[test]
fn replay_skips_what_the_snapshot_holds_and_applies_the_rest() {
    let mut c = restored_and_replaying(3, None);
    for seq in 1..=3 {
        let a = c.handle(0, Event::Replay(data(seq)));
        assert_eq!(shape(&a), ["ack"], "seq {seq} is in the snapshot");
    }
    for seq in 4..=5 {
        let a = c.handle(0, Event::Replay(data(seq)));
        assert_eq!(processed(&a), [(seq, Mode::Replay)]);
        assert_eq!(shape(&a), ["process", "ack"]);
    }
    assert_eq!(
        c.position(),
        Position {
            last_seq: 5,
            count: 5,
            replayed: 2,
            skipped: 3
        }
    );
    assert_eq!(c.state(), &state_of(1..=5));
    assert_eq!(the_reply(&cmd(&mut c, Command::Status)).skipped, 3);
}

/// The replay span the actions report, if any.
fn span_of(actions: &[Action]) -> Option<&ReplaySpan> {
    actions.iter().find_map(|a| match a {
        Action::ReplaySpan(s) => Some(s),
        _ => None,
    })
}

#[test]
fn a_backlog_is_reported_in_runs_of_replay_span_messages() {
    let mut c = restored_and_replaying(3, None);
    c.handle(0, Event::Replay(data(3)));
    for seq in 4..3 + REPLAY_SPAN {
        let a = c.handle(seq * 10, Event::Replay(data(seq)));
        assert_eq!(shape(&a), ["process", "ack"], "seq {seq}");
    }
    let last = 3 + REPLAY_SPAN;
    let a = c.handle(last * 10, Event::Replay(data(last)));
    assert_eq!(shape(&a), ["process", "ack", "replay_span"]);
    let span = span_of(&a).unwrap();
    assert_eq!(
        (span.first_seq, span.seq, span.messages, span.t_start_ns),
        (4, last, REPLAY_SPAN, 40)
    );
    assert_eq!(span.chain, state_of(1..=last).chain);
    assert!(!c.has_open_span());
    assert!(
        c.handle(0, Event::Idle).is_empty(),
        "nothing left to report"
    );
}

#[test]
fn idle_and_pause_report_what_was_replayed_so_far() {
    let mut c = restored_and_replaying(3, None);
    c.handle(0, Event::Replay(data(4)));
    c.handle(0, Event::Replay(data(5)));
    assert!(c.has_open_span());
    let a = c.handle(0, Event::Idle);
    let span = span_of(&a).unwrap();
    assert_eq!((span.first_seq, span.seq, span.messages), (4, 5, 2));
    c.handle(0, Event::Replay(data(6)));
    let a = cmd(&mut c, Command::PauseReplay { after_seq: None });
    assert_eq!(shape(&a), ["replay_span", "reply"]);
    assert_eq!(span_of(&a).unwrap().first_seq, 6);
}

#[test]
fn the_replay_closes_in_the_background_only_once_live() {
    for go_live in [true, false] {
        let mut c = restored_and_replaying(3, None);
        let a = cmd(
            &mut c,
            Command::FinishReplay {
                until_seq: 3,
                go_live,
            },
        );
        assert!(
            a.contains(&Action::CloseReplay { wait: !go_live }),
            "go_live {go_live}: {a:?}"
        );
    }
}

#[test]
fn replay_drops_what_is_beyond_its_limit_and_goes_on() {
    let mut c = restored_and_replaying(0, Some(2));
    c.handle(0, Event::Replay(data(1)));
    c.handle(0, Event::Replay(data(2)));
    assert_eq!(shape(&c.handle(0, Event::Replay(data(3)))), ["ack"]);
    assert!(
        c.polls_replay(),
        "without a finish_replay, the replay stays open"
    );
    assert_eq!(c.position().last_seq, 2);
}

#[test]
fn barriers_and_malformed_input_in_replay_are_dropped() {
    let mut c = restored_and_replaying(0, None);
    assert_eq!(c.handle(0, Event::Replay(barrier("b"))), vec![Action::Ack]);
    assert_eq!(
        c.handle(0, Event::Replay(malformed("bad"))),
        vec![Action::Ack]
    );
    assert_eq!(c.position(), Position::default());
}

#[test]
fn an_armed_barrier_in_replay_marks_the_end_of_the_queue() {
    let mut c = restored_and_replaying(0, None);
    c.handle(0, Event::Replay(data(1)));
    c.handle(0, Event::Replay(data(2)));
    arm(&mut c, "end");
    let a = c.handle(0, Event::Replay(barrier("end")));
    assert_eq!(shape(&a), ["replay_span", "reply", "ack"], "{a:?}");
    let r = the_reply(&a);
    assert_eq!(
        (r.corr.as_str(), r.kind, r.last_seq),
        ("end", ReplyKind::Status, 2)
    );
    // Once: the same barrier again is dropped.
    assert_eq!(
        c.handle(0, Event::Replay(barrier("end"))),
        vec![Action::Ack]
    );
    assert!(
        c.polls_replay(),
        "the marker does not end the replay by itself"
    );
}

#[test]
fn an_armed_barrier_in_replay_ends_a_finish_waiting_for_more() {
    let mut c = restored_and_replaying(0, None);
    c.handle(0, Event::Replay(data(1)));
    arm(&mut c, "end");
    let finish = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: u64::MAX,
            go_live: true,
        },
    );
    assert!(finish.is_empty(), "{finish:?}");
    let a = c.handle(0, Event::Replay(barrier("end")));
    assert_eq!(
        shape(&a),
        [
            "replay_span",
            "reply",
            "ack",
            "start_live",
            "reply",
            "close_replay"
        ],
        "{a:?}"
    );
    let finished = replies(&a)[1];
    assert_eq!(
        (finished.kind, finished.last_seq),
        (ReplyKind::FinishReplay, 1)
    );
    assert!(c.polls_live() && !c.polls_replay());
}

#[test]
fn a_finish_after_the_marker_ends_the_replay_at_once() {
    let mut c = restored_and_replaying(0, None);
    c.handle(0, Event::Replay(data(1)));
    arm(&mut c, "end");
    c.handle(0, Event::Replay(barrier("end")));
    let a = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: u64::MAX,
            go_live: true,
        },
    );
    assert_eq!(shape(&a), ["start_live", "reply", "close_replay"], "{a:?}");
    assert_eq!(the_reply(&a).last_seq, 1);
}

#[test]
fn pause_replay_stops_taking_replayed_messages() {
    let mut c = restored_and_replaying(0, None);
    c.handle(0, Event::Replay(data(1)));
    let a = cmd(&mut c, Command::PauseReplay { after_seq: None });
    let r = the_reply(&a);
    assert_eq!((r.kind, r.last_seq), (ReplyKind::PauseReplay, 1));
    assert!(!c.polls_replay());
    assert_eq!(
        c.handle(0, Event::Replay(data(2))),
        vec![],
        "left alone while paused"
    );
    // Pausing with no replay just answers.
    assert_eq!(
        shape(&cmd(&mut fresh(), Command::PauseReplay { after_seq: None })),
        ["reply"]
    );
}

#[test]
fn pause_replay_after_a_seq_pauses_once_it_is_applied() {
    let mut c = restored_and_replaying(0, None);
    c.handle(0, Event::Replay(data(1)));
    let a = cmd(&mut c, Command::PauseReplay { after_seq: Some(3) });
    // Answered at once, below the seq: the pause is pending.
    assert_eq!(the_reply(&a).last_seq, 1);
    assert!(c.polls_replay());
    c.handle(0, Event::Replay(data(2)));
    assert!(c.polls_replay());
    c.handle(0, Event::Replay(data(3)));
    assert!(!c.polls_replay(), "paused once 3 is applied");
    assert_eq!(c.position().last_seq, 3);
    // A finish resumes it; a pause already passed takes effect at once.
    let a = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 4,
            go_live: false,
        },
    );
    assert!(a.is_empty(), "waits for 4: {a:?}");
    let a = c.handle(0, Event::Replay(data(4)));
    assert!(shape(&a).contains(&"reply"), "{a:?}");
    let mut c = restored_and_replaying(5, None);
    let a = cmd(&mut c, Command::PauseReplay { after_seq: Some(2) });
    assert_eq!(the_reply(&a).last_seq, 5);
    assert!(!c.polls_replay());
}

#[test]
fn a_finish_replay_cancels_a_pending_pause() {
    let mut c = restored_and_replaying(0, None);
    cmd(&mut c, Command::PauseReplay { after_seq: Some(1) });
    let finish = Command::FinishReplay {
        until_seq: 3,
        go_live: true,
    };
    assert!(cmd(&mut c, finish).is_empty());
    for s in 1..=2 {
        c.handle(0, Event::Replay(data(s)));
        assert!(c.polls_replay(), "the finish goes on past the pause's seq");
    }
    let a = c.handle(0, Event::Replay(data(3)));
    assert!(shape(&a).contains(&"start_live"), "{a:?}");
}

#[test]
fn finish_replay_when_already_level_goes_live_at_once() {
    let mut c = restored_and_replaying(5, None);
    let a = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 5,
            go_live: true,
        },
    );
    // Serving first, then the reply, then closing the replay nobody waits for.
    assert_eq!(shape(&a), ["start_live", "reply", "close_replay"]);
    assert_eq!(the_reply(&a).kind, ReplyKind::FinishReplay);
    assert!(c.polls_live() && !c.polls_replay());
}

#[test]
fn finish_replay_without_a_replay_answers_at_once() {
    let mut c = fresh();
    let a = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 99,
            go_live: true,
        },
    );
    assert_eq!(shape(&a), ["start_live", "reply"]);
    let mut c = fresh();
    let a = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 99,
            go_live: false,
        },
    );
    assert_eq!(shape(&a), ["reply"]);
    assert!(!c.polls_live());
}

#[test]
fn finish_replay_replays_up_to_until_seq_then_goes_live() {
    let mut c = restored_and_replaying(2, None);
    let a = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 4,
            go_live: true,
        },
    );
    assert_eq!(a, vec![]);
    assert_eq!(
        shape(&c.handle(0, Event::Replay(data(3)))),
        ["process", "ack"]
    );
    let a = c.handle(0, Event::Replay(data(4)));
    assert_eq!(
        shape(&a),
        [
            "process",
            "ack",
            "replay_span",
            "start_live",
            "reply",
            "close_replay"
        ]
    );
    let r = the_reply(&a);
    assert_eq!(
        (r.corr.as_str(), r.last_seq, r.replayed),
        ("finish_replay", 4, 2)
    );
    assert!(c.polls_live() && !c.polls_replay());
}

#[test]
fn finish_replay_without_go_live_stops_replaying_only() {
    let mut c = restored_and_replaying(0, None);
    cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 1,
            go_live: false,
        },
    );
    let a = c.handle(0, Event::Replay(data(1)));
    assert_eq!(
        shape(&a),
        ["process", "ack", "replay_span", "reply", "close_replay"]
    );
    assert!(!c.polls_live() && !c.polls_replay());
}

#[test]
fn pause_then_finish_resumes_the_replay() {
    let mut c = restored_and_replaying(0, None);
    c.handle(0, Event::Replay(data(1)));
    cmd(&mut c, Command::PauseReplay { after_seq: None });
    assert!(!c.polls_replay());
    cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 2,
            go_live: true,
        },
    );
    assert!(c.polls_replay(), "finish_replay unpauses");
    let a = c.handle(0, Event::Replay(data(2)));
    assert_eq!(
        shape(&a),
        [
            "process",
            "ack",
            "replay_span",
            "start_live",
            "reply",
            "close_replay"
        ]
    );
}

#[test]
fn a_message_beyond_until_ends_the_replay() {
    // 3 never comes (a gap a `max_seq_gap` of 2 allows): the first message past `until_seq`
    // shows the rest is not coming.
    let mut c = restored_and_replaying(0, None);
    c.max_seq_gap = 2;
    c.handle(0, Event::Replay(data(1)));
    cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 3,
            go_live: true,
        },
    );
    c.handle(0, Event::Replay(data(2)));
    let a = c.handle(0, Event::Replay(data(4)));
    assert_eq!(
        shape(&a),
        ["ack", "replay_span", "start_live", "reply", "close_replay"]
    );
    assert_eq!(the_reply(&a).last_seq, 2, "4 is dropped, not applied");
}

#[test]
fn a_message_beyond_the_replay_limit_ends_a_pending_finish() {
    let mut c = restored_and_replaying(0, Some(1));
    cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 5,
            go_live: false,
        },
    );
    c.handle(0, Event::Replay(data(1)));
    let a = c.handle(0, Event::Replay(data(2)));
    assert_eq!(shape(&a), ["ack", "replay_span", "reply", "close_replay"]);
    assert_eq!(the_reply(&a).last_seq, 1);
}

#[test]
fn barrier_met_during_replay_neither_checkpoints_nor_finishes() {
    let mut c = restored_and_replaying(0, None);
    cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 1,
            go_live: true,
        },
    );
    assert_eq!(c.handle(0, Event::Replay(barrier("b"))), vec![Action::Ack]);
    assert!(c.polls_replay());
}

#[test]
fn digest_reports_the_state_digest() {
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    let a = cmd(&mut c, Command::Digest);
    assert_eq!(
        the_reply(&a).digest.as_deref(),
        Some(state_of([1]).digest().as_str())
    );
}

#[test]
fn shutdown_stops_everything_answers_and_exits() {
    let mut c = live();
    let a = cmd(&mut c, Command::Shutdown);
    assert_eq!(shape(&a), ["stop_live", "reply", "exit"]);
    let mut c = restored_and_replaying(0, None);
    let a = cmd(&mut c, Command::Shutdown);
    assert_eq!(shape(&a), ["close_replay", "reply", "exit"]);
    assert_eq!(the_reply(&a).kind, ReplyKind::Shutdown);
    assert!(!c.polls_live() && !c.polls_replay());
    assert_eq!(
        cmd(&mut c, Command::Status),
        vec![],
        "nothing after the exit"
    );
}

#[test]
fn shutdown_answers_a_stop_live_still_waiting_with_an_error() {
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    assert_eq!(
        cmd_as(
            &mut c,
            "stop",
            Command::StopLive {
                after_seq: Some(5),
                hand_over: None
            }
        ),
        vec![]
    );
    let a = cmd(&mut c, Command::Shutdown);
    assert_eq!(shape(&a), ["stop_live", "reply", "reply", "exit"]);
    assert_eq!(
        answers(&a),
        [
            ("stop", Some("shut down before reaching seq 5")),
            ("shutdown", None)
        ]
    );
    let r = replies(&a);
    assert_eq!((r[0].kind, r[0].last_seq), (ReplyKind::StopLive, 1));
}

#[test]
fn shutdown_answers_a_finish_replay_still_waiting_with_an_error() {
    let mut c = restored_and_replaying(0, None);
    let finish = Command::FinishReplay {
        until_seq: 4,
        go_live: true,
    };
    assert_eq!(cmd_as(&mut c, "finish", finish), vec![]);
    let a = cmd(&mut c, Command::Shutdown);
    assert_eq!(shape(&a), ["close_replay", "reply", "reply", "exit"]);
    assert_eq!(
        answers(&a),
        [
            ("finish", Some("shut down before replaying up to seq 4")),
            ("shutdown", None)
        ]
    );
    assert_eq!(replies(&a)[0].kind, ReplyKind::FinishReplay);
    assert!(!c.polls_live(), "did not go live");
}

#[test]
fn shutdown_answers_a_replay_being_opened_with_an_error() {
    let mut c = opening();
    let a = cmd(&mut c, Command::Shutdown);
    assert_eq!(shape(&a), ["close_replay", "reply", "reply", "exit"]);
    assert_eq!(
        answers(&a),
        [
            (
                "replay",
                Some("shut down before the replay queue was opened")
            ),
            ("shutdown", None)
        ]
    );
    assert_eq!(
        c.handle(0, Event::ReplayOpened(Ok(()))),
        vec![],
        "answered once, by the shutdown"
    );
}

#[test]
fn deliveries_from_queues_not_polled_are_left_alone() {
    let mut c = fresh();
    assert_eq!(c.handle(0, Event::Live(data(1))), vec![]);
    assert_eq!(c.handle(0, Event::Replay(data(1))), vec![]);
    assert_eq!(c.position(), Position::default());
}

#[test]
fn a_second_stop_live_waiting_is_refused_and_the_first_waits_on() {
    for second in [2, 5, 9] {
        let mut c = live();
        assert_eq!(
            cmd_as(
                &mut c,
                "first",
                Command::StopLive {
                    after_seq: Some(5),
                    hand_over: None
                }
            ),
            vec![]
        );
        let before = c.clone();
        let a = cmd_as(
            &mut c,
            "second",
            Command::StopLive {
                after_seq: Some(second),
                hand_over: None,
            },
        );
        assert_eq!(shape(&a), ["reply"]);
        assert_eq!(
            answers(&a),
            [("second", Some("a stop_live is already waiting for seq 5"))]
        );
        assert_eq!(the_reply(&a).kind, ReplyKind::StopLive);
        assert_eq!(c, before, "refused: nothing changed");
        for seq in 1..=4 {
            assert_eq!(
                shape(&c.handle(0, Event::Live(data(seq)))),
                ["process", "ack"]
            );
        }
        let a = c.handle(0, Event::Live(data(5)));
        assert_eq!(shape(&a), ["process", "ack", "stop_live", "reply"]);
        assert_eq!(answers(&a), [("first", None)]);
    }
}

#[test]
fn an_immediate_stop_answers_the_stop_live_waiting_too() {
    // Without `after_seq`, or already past it: the instance stops at once, which is what the
    // waiting `stop_live` asked for, so both are answered.
    for after_seq in [None, Some(1), Some(2)] {
        let mut c = live();
        c.handle(0, Event::Live(data(1)));
        c.handle(0, Event::Live(data(2)));
        cmd_as(
            &mut c,
            "first",
            Command::StopLive {
                after_seq: Some(3),
                hand_over: None,
            },
        );
        let a = cmd_as(
            &mut c,
            "second",
            Command::StopLive {
                after_seq,
                hand_over: None,
            },
        );
        assert_eq!(shape(&a), ["stop_live", "reply", "reply"], "{after_seq:?}");
        assert_eq!(answers(&a), [("first", None), ("second", None)]);
        assert!(replies(&a).iter().all(|r| r.last_seq == 2));
        assert!(!c.polls_live());
        // No stale wait: serving live again, seq 3 does not stop the instance.
        cmd(&mut c, Command::StartLive);
        assert_eq!(
            shape(&c.handle(0, Event::Live(data(3)))),
            ["process", "ack"]
        );
        assert!(c.polls_live());
    }
}

#[test]
fn start_live_while_replaying_is_refused() {
    // Paused, opening or replaying, a replay is open: serving live too could apply a seq from
    // each queue, since live messages are not checked against `last_seq`.
    let mut paused = restored_and_replaying(0, None);
    cmd(&mut paused, Command::PauseReplay { after_seq: None });
    let mut finishing = restored_and_replaying(0, None);
    cmd(
        &mut finishing,
        Command::FinishReplay {
            until_seq: 3,
            go_live: true,
        },
    );
    for mut c in [
        restored_and_replaying(0, None),
        paused,
        finishing,
        opening(),
    ] {
        let before = c.clone();
        let a = cmd(&mut c, Command::StartLive);
        assert_eq!(shape(&a), ["reply"]);
        let r = the_reply(&a);
        assert_eq!(r.kind, ReplyKind::StartLive);
        assert_eq!(
            r.error.as_deref(),
            Some(
                "cannot serve live while replaying; finish_replay with go_live ends the \
                 replay and goes live"
            )
        );
        assert_eq!(c, before, "refused: nothing changed");
        assert!(!c.polls_live());
    }
    // The way from replay to live.
    let mut c = restored_and_replaying(0, None);
    c.handle(0, Event::Replay(data(1)));
    let a = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 1,
            go_live: true,
        },
    );
    assert_eq!(
        shape(&a),
        ["replay_span", "start_live", "reply", "close_replay"]
    );
    assert!(c.polls_live() && !c.polls_replay());
}

#[test]
fn replay_while_live_is_refused() {
    let mut waiting = live();
    cmd(
        &mut waiting,
        Command::StopLive {
            after_seq: Some(4),
            hand_over: None,
        },
    );
    for mut c in [live(), waiting] {
        c.handle(0, Event::Live(data(1)));
        let before = c.clone();
        let a = cmd(
            &mut c,
            Command::Replay {
                queue: "q".into(),
                until_seq: None,
            },
        );
        assert_eq!(shape(&a), ["reply"]);
        let r = the_reply(&a);
        assert_eq!(
            (r.kind, r.error.as_deref()),
            (ReplyKind::Replay, Some("cannot replay while serving live"))
        );
        assert_eq!(c, before, "refused: nothing changed");
        assert!(c.polls_live() && !c.polls_replay());
    }
    // Once stopped, the instance may replay.
    let mut c = live();
    cmd(
        &mut c,
        Command::StopLive {
            after_seq: None,
            hand_over: None,
        },
    );
    replaying(&mut c, None);
}

#[test]
fn a_second_finish_replay_is_refused_and_the_first_waits_on() {
    // Whether the second would finish at once (until 0) or wait, and whatever its go_live.
    for (until_seq, go_live) in [(0, false), (2, false), (9, true)] {
        let mut c = restored_and_replaying(0, None);
        let first = Command::FinishReplay {
            until_seq: 3,
            go_live: true,
        };
        assert_eq!(cmd_as(&mut c, "first", first), vec![]);
        let before = c.clone();
        let a = cmd_as(
            &mut c,
            "second",
            Command::FinishReplay { until_seq, go_live },
        );
        assert_eq!(shape(&a), ["reply"]);
        assert_eq!(
            answers(&a),
            [(
                "second",
                Some("a finish_replay is already waiting for seq 3")
            )]
        );
        assert_eq!(the_reply(&a).kind, ReplyKind::FinishReplay);
        assert_eq!(c, before, "refused: nothing changed");
        c.handle(0, Event::Replay(data(1)));
        c.handle(0, Event::Replay(data(2)));
        let a = c.handle(0, Event::Replay(data(3)));
        assert_eq!(
            shape(&a),
            [
                "process",
                "ack",
                "replay_span",
                "start_live",
                "reply",
                "close_replay"
            ]
        );
        assert_eq!(answers(&a), [("first", None)]);
    }
}

#[test]
fn finish_replay_while_the_replay_is_being_opened_is_refused() {
    // Finishing would drop the `replay` reply the opening still owes.
    for until_seq in [0, 5] {
        let mut c = opening();
        let before = c.clone();
        let a = cmd(
            &mut c,
            Command::FinishReplay {
                until_seq,
                go_live: true,
            },
        );
        assert_eq!(shape(&a), ["reply"]);
        assert_eq!(
            answers(&a),
            [(
                "finish_replay",
                Some("cannot finish a replay still being opened")
            )]
        );
        assert_eq!(c, before, "refused: nothing changed");
        let a = c.handle(0, Event::ReplayOpened(Ok(())));
        assert_eq!(answers(&a), [("replay", None)]);
    }
}

#[test]
fn pause_replay_while_a_finish_waits_is_refused() {
    // Paused, the replay would never reach the finish's seq, and only a second
    // `finish_replay` (refused) could resume it.
    let mut c = restored_and_replaying(0, None);
    cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 2,
            go_live: false,
        },
    );
    let before = c.clone();
    let a = cmd(&mut c, Command::PauseReplay { after_seq: None });
    assert_eq!(shape(&a), ["reply"]);
    let r = the_reply(&a);
    assert_eq!(
        (r.kind, r.error.as_deref()),
        (
            ReplyKind::PauseReplay,
            Some("cannot pause: a finish_replay is waiting for seq 2")
        )
    );
    assert_eq!(c, before, "refused: nothing changed");
    assert!(c.polls_replay());
}

#[test]
fn pause_replay_while_the_replay_is_being_opened_opens_it_paused() {
    // Pausing while the subscription is being opened is harmless: it starts paused.
    let mut c = opening();
    assert_eq!(
        answers(&cmd(&mut c, Command::PauseReplay { after_seq: None })),
        [("pause_replay", None)]
    );
    let a = c.handle(0, Event::ReplayOpened(Ok(())));
    assert_eq!(answers(&a), [("replay", None)]);
    assert!(!c.polls_replay(), "opened paused");
    let a = cmd(
        &mut c,
        Command::FinishReplay {
            until_seq: 1,
            go_live: false,
        },
    );
    assert_eq!(a, vec![]);
    assert!(c.polls_replay(), "finish_replay resumes it");
}

#[test]
fn a_snapshot_is_written_into_the_buffer_offered() {
    let attachment = |a: Vec<Action>| match a.into_iter().next() {
        Some(Action::Reply(o)) => o.attachment,
        other => panic!("{other:?}"),
    };
    let mut c = live();
    c.handle(0, Event::Live(data(1)));
    let buf = Vec::with_capacity(4096);
    let at = buf.as_ptr();
    c.offer_buffer(buf);
    // A smaller one offered later does not replace it.
    c.offer_buffer(Vec::with_capacity(16));
    let snap = attachment(cmd(&mut c, Command::Snapshot { stream: None }));
    assert_eq!((snap.as_ptr(), &snap), (at, &state_of([1]).checkpoint()));
    // Taken: the next snapshot gets memory of its own unless a buffer comes back.
    let again = attachment(cmd(&mut c, Command::Snapshot { stream: None }));
    assert_eq!(again, snap);
    assert_ne!(again.as_ptr(), at);
}
