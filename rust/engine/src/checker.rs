//! The invariant checker: a pure function of a history.
//!
//! Invariants (ARCHITECTURE.md, "Invariants"): every confirmed message is processed live
//! exactly once; live processing follows sequence order (reorderings are counted, and any one
//! makes the run invalid); the final instance's state digest equals the digest of the confirmed
//! log folded through the same transition function.

use crate::history::{History, PublishOutcome};
use ms2m_wire::state::{workload_payload, ServiceState};
use serde::{Deserialize, Serialize};

const EXAMPLES: usize = 10;

/// A count with a few of the offending sequence numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Finding {
    pub count: u64,
    pub examples: Vec<u64>,
}

impl Finding {
    fn add(&mut self, seq: u64, n: u64) {
        self.count += n;
        if self.examples.len() < EXAMPLES {
            self.examples.push(seq);
        }
    }
}

/// What the final instance reported of its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ObservedState {
    pub instance: String,
    pub last_seq: u64,
    pub count: u64,
    pub digest: String,
}

/// What the final state is checked against.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum StateOracle {
    /// The reference service's state, folded from the confirmed log.
    #[default]
    Reference,
    /// A twin: a fresh instance of the same service that never migrated, fed the confirmed
    /// log in order (as a replay), compared by digest (a service of one's own).
    Twin,
    /// Nothing: the twin could not be run; only lost, duplicated and reordered messages are
    /// checked.
    None,
}

/// What a twin reached after replaying the confirmed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinState {
    pub last_seq: u64,
    pub digest: String,
}

/// The state verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StateVerdict {
    /// Which oracle checked the state.
    #[serde(default)]
    pub oracle: StateOracle,
    /// Why the intended oracle could not check it (the twin failed), if it could not.
    #[serde(default)]
    pub oracle_error: Option<String>,
    /// None when no final state was observed, or no oracle applies (verdict unknown).
    pub consistent: Option<bool>,
    pub observed: Option<ObservedState>,
    /// Digest of the confirmed log up to the observed `last_seq`.
    pub expected_digest: Option<String>,
    /// The state was started anew, empty, after this seq (its source died before a checkpoint
    /// held it): it is checked against what came after only.
    #[serde(default)]
    pub restarted_after: Option<u64>,
}

/// The overall result of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    /// Every invariant holds.
    Valid,
    /// At least one invariant is broken (lost, duplicated, reordered, or the state differs).
    Invalid,
    /// Nothing is broken, but the final state could not be observed.
    Unknown,
}

/// The checker's verdict: valid only if every sub-verdict holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Verdict {
    pub result: CheckResult,
    /// Messages the checker expected (confirmed, sent before the cut).
    pub expected: u64,
    pub lost: Finding,
    /// Extra live processings beyond the first.
    pub duplicated: Finding,
    /// Live processings that started after a higher seq had started.
    pub reordered: Finding,
    /// Messages whose publish was never confirmed (nacked or uncertain) that were processed.
    pub unconfirmed_processed: Finding,
    pub state: StateVerdict,
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        self.result == CheckResult::Valid
    }
}

/// Checks `history` for messages sent up to `t_cut_ns` against the `observed` final state.
pub fn check(history: &History, t_cut_ns: u64, observed: Option<ObservedState>) -> Verdict {
    check_with(history, t_cut_ns, observed, StateOracle::Reference, None)
}

/// [`check`], the state checked against `oracle` (`twin`: what the twin reached).
pub fn check_with(
    history: &History,
    t_cut_ns: u64,
    observed: Option<ObservedState>,
    oracle: StateOracle,
    twin: Option<TwinState>,
) -> Verdict {
    let live = history.first_live();
    let mut lost = Finding::default();
    let mut duplicated = Finding::default();
    let mut unconfirmed = Finding::default();
    let mut expected = 0;
    for p in &history.published {
        let seen = live.get(&p.seq).map(|(_, n)| *n).unwrap_or(0);
        match p.outcome {
            PublishOutcome::Confirmed if p.t_pub_ns <= t_cut_ns => {
                expected += 1;
                if seen == 0 {
                    lost.add(p.seq, 1);
                }
            }
            PublishOutcome::Nacked | PublishOutcome::Uncertain if seen > 0 => {
                unconfirmed.add(p.seq, 1)
            }
            _ => {}
        }
    }
    for (seq, (_, n)) in &live {
        if *n > 1 {
            duplicated.add(*seq, u64::from(*n) - 1);
        }
    }
    let mut reordered = Finding::default();
    let mut by_start: Vec<_> = history
        .events
        .iter()
        .filter(|e| e.mode == ms2m_wire::Mode::Live)
        .collect();
    by_start.sort_by_key(|e| (e.t_start_ns, e.seq));
    let mut highest = 0;
    for e in by_start {
        if e.seq < highest {
            reordered.add(e.seq, 1);
        }
        highest = highest.max(e.seq);
    }
    let mut state = match oracle {
        StateOracle::Reference => check_state(history, &live, observed),
        StateOracle::Twin => StateVerdict {
            oracle_error: None,
            oracle,
            consistent: match (&observed, &twin) {
                (Some(o), Some(t)) => Some(o.digest == t.digest && o.last_seq == t.last_seq),
                _ => None,
            },
            observed,
            expected_digest: twin.map(|t| t.digest),
            restarted_after: None,
        },
        StateOracle::None => StateVerdict {
            oracle_error: None,
            oracle,
            consistent: None,
            observed,
            expected_digest: None,
            restarted_after: None,
        },
    };
    state.restarted_after = history.restarted_after();
    let broken =
        lost.count + duplicated.count + reordered.count > 0 || state.consistent == Some(false);
    let result = if broken {
        CheckResult::Invalid
    } else if state.consistent.is_none() {
        CheckResult::Unknown
    } else {
        CheckResult::Valid
    };
    Verdict {
        result,
        expected,
        lost,
        duplicated,
        reordered,
        unconfirmed_processed: unconfirmed,
        state,
    }
}

/// The sequence numbers the final state should hold, in order: every confirmed message up to
/// `last_seq`, and every unconfirmed one that some instance processed live (after the last
/// restart of the state, if there was one).
fn log_of(
    history: &History,
    live: &std::collections::BTreeMap<u64, (&ms2m_wire::OutputEvent, u32)>,
    last_seq: u64,
) -> Vec<u64> {
    let since = history.restarted_after().unwrap_or(0);
    let mut seqs: Vec<_> = history
        .published
        .iter()
        .filter(|p| p.seq > since && p.seq <= last_seq)
        .filter(|p| match p.outcome {
            PublishOutcome::Confirmed => true,
            // An unconfirmed message belongs to the log only if some instance processed it.
            _ => live.contains_key(&p.seq),
        })
        .map(|p| p.seq)
        .collect();
    seqs.sort_unstable();
    seqs
}

/// [`log_of`] for a twin to replay: the messages, in order, with their send times.
pub fn confirmed_log(history: &History, last_seq: u64) -> Vec<(u64, u64)> {
    let live = history.first_live();
    let sent: std::collections::HashMap<u64, u64> = history
        .published
        .iter()
        .map(|p| (p.seq, p.t_pub_ns))
        .collect();
    log_of(history, &live, last_seq)
        .into_iter()
        .map(|s| (s, sent.get(&s).copied().unwrap_or(0)))
        .collect()
}

fn check_state(
    history: &History,
    live: &std::collections::BTreeMap<u64, (&ms2m_wire::OutputEvent, u32)>,
    observed: Option<ObservedState>,
) -> StateVerdict {
    let Some(obs) = observed else {
        return StateVerdict {
            oracle_error: None,
            oracle: StateOracle::Reference,
            consistent: None,
            observed: None,
            expected_digest: None,
            restarted_after: None,
        };
    };
    let seqs = log_of(history, live, obs.last_seq);
    let mut state = ServiceState::new(history.state_bytes as usize);
    for seq in seqs {
        state.apply(seq, workload_payload(seq, history.message_bytes).as_bytes());
    }
    let expected = state.digest();
    StateVerdict {
        oracle_error: None,
        oracle: StateOracle::Reference,
        consistent: Some(expected == obs.digest),
        observed: Some(obs),
        expected_digest: Some(expected),
        restarted_after: None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::history::Published;
    use ms2m_wire::{Mode, OutputEvent};

    pub(crate) fn published(n: u64, period: u64) -> Vec<Published> {
        (1..=n)
            .map(|seq| Published {
                seq,
                t_sched_ns: seq * period,
                t_pub_ns: seq * period,
                outcome: PublishOutcome::Confirmed,
            })
            .collect()
    }

    pub(crate) fn event(seq: u64, start: u64, end: u64, mode: Mode) -> OutputEvent {
        OutputEvent {
            instance: "a".into(),
            seq,
            mode,
            t_pub_ns: 0,
            t_start_ns: start,
            t_end_ns: end,
            chain: String::new(),
            first_seq: None,
            messages: None,
            output: None,
        }
    }

    /// A correct run: message i sent at 100*i, processed in [100*i+10, 100*i+50].
    fn good(n: u64) -> History {
        History {
            published: published(n, 100),
            events: (1..=n)
                .map(|s| event(s, s * 100 + 10, s * 100 + 50, Mode::Live))
                .collect(),
            message_bytes: 8,
            state_bytes: 64,
            state_restarts: Vec::new(),
        }
    }

    fn observed(h: &History, upto: u64) -> ObservedState {
        observed_of(h, "a", 1..=upto)
    }

    /// What `instance` reports after applying `seqs` (in order) to a fresh state.
    fn observed_of(h: &History, instance: &str, seqs: impl Iterator<Item = u64>) -> ObservedState {
        let mut s = ServiceState::new(h.state_bytes as usize);
        let (mut last_seq, mut count) = (0, 0);
        for seq in seqs {
            s.apply(seq, workload_payload(seq, h.message_bytes).as_bytes());
            (last_seq, count) = (seq, count + 1);
        }
        ObservedState {
            instance: instance.into(),
            last_seq,
            count,
            digest: s.digest(),
        }
    }

    #[test]
    fn correct_history_is_valid() {
        let h = good(20);
        let v = check(&h, u64::MAX, Some(observed(&h, 20)));
        assert!(v.is_valid(), "{v:?}");
        assert_eq!(v.expected, 20);
    }

    /// An instance started empty after seq 6 (its source died with its state): its state is
    /// checked against 7.. only, found either from the restart or from its first live event.
    #[test]
    fn a_restarted_state_is_checked_from_its_restart() {
        let mut h = good(20);
        for e in h.events.iter_mut().filter(|e| e.seq > 6) {
            e.instance = "b".into();
        }
        let obs = observed_of(&h, "b", 7..=20);
        for after_seq in [Some(6), None] {
            h.state_restarts = vec![crate::history::StateRestart {
                instance: "b".into(),
                after_seq,
            }];
            let v = check(&h, u64::MAX, Some(obs.clone()));
            assert!(v.is_valid(), "{after_seq:?}: {v:?}");
            assert_eq!(v.state.restarted_after, Some(6));
        }
        // The whole history's state is not what the new instance holds.
        h.state_restarts.clear();
        let v = check(&h, u64::MAX, Some(obs));
        assert_eq!(v.state.consistent, Some(false));
    }

    #[test]
    fn lost_message_is_caught() {
        let mut h = good(20);
        h.events.retain(|e| e.seq != 7);
        let v = check(&h, u64::MAX, None);
        assert_eq!(v.result, CheckResult::Invalid);
        assert_eq!(
            v.lost,
            Finding {
                count: 1,
                examples: vec![7]
            }
        );
    }

    #[test]
    fn message_after_cut_is_not_expected() {
        let mut h = good(20);
        h.events.retain(|e| e.seq != 20);
        let v = check(&h, 19 * 100, Some(observed(&h, 19)));
        assert!(v.is_valid(), "{v:?}");
    }

    #[test]
    fn duplicate_is_caught_and_replay_is_not_a_duplicate() {
        let mut h = good(10);
        h.events.push(event(4, 2000, 2001, Mode::Live));
        h.events.push(event(5, 2100, 2101, Mode::Replay));
        let v = check(&h, u64::MAX, None);
        assert_eq!(
            v.duplicated,
            Finding {
                count: 1,
                examples: vec![4]
            }
        );
        // the late duplicate of 4 also starts after 10 did
        assert_eq!(v.reordered.count, 1);
    }

    #[test]
    fn reorder_is_counted() {
        let mut h = good(10);
        for e in h.events.iter_mut() {
            if e.seq == 3 {
                e.t_start_ns = 10_000;
            }
        }
        let v = check(&h, u64::MAX, None);
        assert_eq!(
            v.reordered,
            Finding {
                count: 1,
                examples: vec![3]
            }
        );
        assert_eq!(v.result, CheckResult::Invalid);
    }

    #[test]
    fn state_mismatch_is_caught() {
        let h = good(10);
        let mut obs = observed(&h, 10);
        obs.digest = "00".into();
        let v = check(&h, u64::MAX, Some(obs));
        assert_eq!(v.state.consistent, Some(false));
        assert_eq!(v.result, CheckResult::Invalid);
        // A state that skipped a message differs too.
        let obs = observed_of(&h, "a", (1..=10).filter(|s| *s != 5));
        assert_eq!(check(&h, u64::MAX, Some(obs)).state.consistent, Some(false));
    }

    #[test]
    fn unobserved_state_is_unknown_not_valid() {
        let h = good(5);
        assert_eq!(check(&h, u64::MAX, None).result, CheckResult::Unknown);
    }

    #[test]
    fn unconfirmed_but_processed_is_reported_and_folded() {
        let mut h = good(5);
        h.published[2].outcome = PublishOutcome::Uncertain;
        let v = check(&h, u64::MAX, Some(observed(&h, 5)));
        assert!(v.is_valid(), "{v:?}");
        assert_eq!(v.unconfirmed_processed.examples, vec![3]);
        assert_eq!(v.expected, 4);
    }

    #[test]
    fn a_twin_decides_the_state_of_a_service_of_ones_own() {
        let h = good(5);
        let obs = ObservedState {
            digest: "mine".into(),
            ..observed(&h, 5)
        };
        let twin = |digest: &str, last_seq| TwinState {
            last_seq,
            digest: digest.into(),
        };
        let agree = check_with(
            &h,
            u64::MAX,
            Some(obs.clone()),
            StateOracle::Twin,
            Some(twin("mine", 5)),
        );
        assert!(agree.is_valid(), "{agree:?}");
        assert_eq!(agree.state.expected_digest.as_deref(), Some("mine"));
        for other in [twin("theirs", 5), twin("mine", 4)] {
            let v = check_with(
                &h,
                u64::MAX,
                Some(obs.clone()),
                StateOracle::Twin,
                Some(other),
            );
            assert_eq!(
                (v.result, v.state.consistent),
                (CheckResult::Invalid, Some(false))
            );
        }
        let none = check_with(&h, u64::MAX, Some(obs), StateOracle::None, None);
        assert_eq!(
            (none.result, none.state.consistent),
            (CheckResult::Unknown, None)
        );
        assert_eq!(confirmed_log(&h, 3).len(), 3);
    }
}
