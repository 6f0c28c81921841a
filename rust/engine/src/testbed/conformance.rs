//! The conformance kit: rules of the wire contract (`rust/wire/README.md`), checked against any
//! implementation by driving a deployed instance of it through them on the testbed's broker.
//! Each rule says what it found; a service that breaks one is told which and how.

use super::Testbed;
use crate::broker;
use crate::config::ServiceSpec;
use crate::error::{Error, Result};
use ms2m_wire::control::{Command, StreamTo};
use ms2m_wire::state::workload_payload;
use ms2m_wire::{names, now_ns, Input, Mode};
use serde::Serialize;
use std::time::Duration;

/// Messages sent before the barrier.
const BACKLOG: u64 = 20;
/// Messages after the snapshot, for the replay rules.
const MORE: u64 = 10;
/// How far the `until` rule lets a replay go past the snapshot.
const UNTIL: u64 = 3;
const PAYLOAD_BYTES: usize = 64;
/// Messages in flight when `stop_live` comes.
const STOP_BACKLOG: u64 = 200;
const WAIT: Duration = Duration::from_secs(30);

/// One rule and what the kit found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleOutcome {
    pub rule: String,
    pub passed: bool,
    /// What was seen (for a broken rule, how it broke).
    pub detail: String,
}

fn outcome(rule: &str, broken: Option<String>, ok: impl Into<String>) -> RuleOutcome {
    RuleOutcome {
        rule: rule.to_string(),
        passed: broken.is_none(),
        detail: broken.unwrap_or_else(|| ok.into()),
    }
}

fn data(seq: u64) -> Vec<u8> {
    serde_json::to_vec(&Input::Data {
        seq,
        t_pub_ns: now_ns(),
        payload: workload_payload(seq, PAYLOAD_BYTES),
    })
    .expect("input serializes")
}

impl Testbed {
    /// Deploys `spec` and runs the contract's rules against it; removes it afterwards.
    /// Errors only when the kit itself cannot run (the service never gets ready, the broker is
    /// gone); a broken rule is an outcome.
    pub async fn conformance(&self, spec: ServiceSpec) -> Result<Vec<RuleOutcome>> {
        self.deploy(spec.clone()).await?;
        let extra = [2, 3].map(|n| format!("{}-c{n}", spec.name));
        let outcomes = self.run_rules(&spec, &extra).await;
        for instance in &extra {
            let _ = self.runtime.remove_instance(instance).await;
            let _ = self
                .link
                .delete_queue(&names::control_queue(&spec.name, instance))
                .await;
        }
        for q in ["conformance-replay", "conformance-ckpt"] {
            let _ = self.link.delete_queue(&format!("{}.{q}", spec.name)).await;
        }
        let removed = self.remove(&spec.name).await;
        let outcomes = outcomes?;
        removed?;
        Ok(outcomes)
    }

    async fn run_rules(&self, spec: &ServiceSpec, extra: &[String; 2]) -> Result<Vec<RuleOutcome>> {
        let svc = spec.name.as_str();
        let live = format!("{svc}-1");
        let mut out = Vec::new();

        // 1. A barrier behind a backlog: the checkpoint holds every message before it.
        let ckpt = format!("{svc}.conformance-ckpt");
        self.link.declare_queue(&ckpt).await?;
        self.link
            .publish_to_exchange(&names::input_exchange(svc), (1..=BACKLOG).map(data))
            .await?;
        self.link
            .command(
                svc,
                &live,
                Command::ArmBarrier {
                    id: "conformance-barrier".into(),
                },
                &[],
                WAIT,
            )
            .await?;
        let rx = self.link.expect("conformance-barrier");
        let stream = StreamTo {
            queue: ckpt.clone(),
            chunk_bytes: 1 << 20,
            listen: None,
        };
        self.link
            .publish_barrier(svc, "conformance-barrier", stream)
            .await?;
        let barrier = broker::wait(rx, WAIT, "the checkpoint of a barrier").await;
        out.push(outcome(
            "a barrier behind a backlog checkpoints after every message before it",
            match &barrier {
                Ok((r, _)) if r.error.is_some() => Some(format!(
                    "the checkpoint failed: {}",
                    r.error.as_deref().unwrap_or_default()
                )),
                Ok((r, _)) if r.last_seq != BACKLOG => Some(format!(
                    "checkpointed at last_seq {} with {BACKLOG} messages before the barrier",
                    r.last_seq
                )),
                Ok(_) => None,
                Err(e) => Some(format!("no checkpoint reply: {e}")),
            },
            format!("checkpoint at last_seq {BACKLOG}"),
        ));
        self.link.delete_queue(&ckpt).await?;

        // The snapshot every replay below starts from. A service whose snapshot fails breaks
        // the replay rules, not the kit: the rest still run.
        let (at, snapshot) = match self
            .link
            .command(svc, &live, Command::Snapshot { stream: None }, &[], WAIT)
            .await
        {
            Ok((taken, snapshot)) => (taken.last_seq, Ok(snapshot)),
            Err(e @ Error::Instance { .. }) => {
                let (now, _) = self
                    .link
                    .command(svc, &live, Command::Status, &[], WAIT)
                    .await?;
                (
                    now.last_seq,
                    Err(format!("no snapshot to replay from: {e}")),
                )
            }
            Err(e) => return Err(e),
        };
        let attachment = snapshot.as_deref().unwrap_or(b"no snapshot");

        // 2. A restore is refused while live, and changes nothing.
        let refused = self
            .link
            .command(svc, &live, Command::Restore, attachment, WAIT)
            .await;
        let (after, _) = self
            .link
            .command(svc, &live, Command::Status, &[], WAIT)
            .await?;
        out.push(outcome(
            "restore is refused while live",
            match refused {
                Ok(_) => Some("a live instance accepted a restore".into()),
                Err(Error::Instance { .. }) if after.last_seq != at => Some(format!(
                    "refused, but last_seq went from {at} to {}",
                    after.last_seq
                )),
                Err(Error::Instance { .. }) => None,
                Err(e) => Some(format!("no answer: {e}")),
            },
            "refused with an error reply",
        ));

        // The live instance goes on to `at + MORE`; the replay queue holds 1..=at + MORE.
        let end = at + MORE;
        self.link
            .publish_to_exchange(&names::input_exchange(svc), (at + 1..=end).map(data))
            .await?;
        let replay_queue = format!("{svc}.conformance-replay");
        self.link.declare_queue(&replay_queue).await?;
        self.link
            .publish_to_queue(&replay_queue, (1..=end).map(data).collect::<Vec<_>>())
            .await?;

        // 3. Replay skips what the snapshot holds, applies the rest to the state live
        //    reaches, and has no side effects.
        let replayer = &extra[0];
        let t0 = now_ns();
        let replayed = match &snapshot {
            Ok(snapshot) => self
                .replay_instance(
                    spec,
                    replayer,
                    &spec.host,
                    Some(snapshot),
                    &replay_queue,
                    end,
                    (WAIT, WAIT),
                )
                .await
                .map_err(|e| format!("the replay failed: {e}")),
            Err(e) => Err(e.clone()),
        };
        let live_digest = self.wait_digest(svc, &live, end).await;
        // The recorder reads output events as they come: wait (a while) for the replayer's
        // last one before counting what it published.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let side_effects = loop {
            let events = self.history(svc).await?.events;
            let mine: Vec<_> = events
                .iter()
                .filter(|e| e.instance == *replayer && e.t_end_ns >= t0)
                .collect();
            if mine.iter().any(|e| e.seq >= end) || tokio::time::Instant::now() > deadline {
                break mine.iter().filter(|e| e.mode == Mode::Live).count();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        out.push(outcome(
            "replay skips what the snapshot holds and has no side effects",
            match (&replayed, &live_digest) {
                (Err(e), _) => Some(e.clone()),
                (_, Err(e)) => Some(format!("the live instance did not reach {end}: {e}")),
                (Ok(r), _) if r.skipped != at || r.replayed != MORE => Some(format!(
                    "skipped {} and applied {} of {end} messages from a snapshot at {at} \
                     (expected {at} and {MORE})",
                    r.skipped, r.replayed
                )),
                _ if side_effects > 0 => Some(format!(
                    "{side_effects} live output event(s) while replaying: replay must have no \
                     side effects"
                )),
                (Ok(r), Ok(d)) if r.digest.as_deref() != Some(d.as_str()) => Some(format!(
                    "the replayed state's digest {} differs from the live one's {d}",
                    r.digest.as_deref().unwrap_or("(none)")
                )),
                _ => None,
            },
            format!("skipped {at}, applied {MORE}, same digest as live"),
        ));

        // 4. A replay never goes past `until_seq` (from the log again: the first replay took
        //    it).
        self.link
            .publish_to_queue(&replay_queue, (1..=end).map(data).collect::<Vec<_>>())
            .await?;
        let limited = match &snapshot {
            Ok(snapshot) => self
                .replay_instance(
                    spec,
                    &extra[1],
                    &spec.host,
                    Some(snapshot),
                    &replay_queue,
                    at + UNTIL,
                    (WAIT, WAIT),
                )
                .await
                .map_err(|e| format!("the replay failed: {e}")),
            Err(e) => Err(e.clone()),
        };
        out.push(outcome(
            "a replay stops at until_seq",
            match limited {
                Err(e) => Some(e),
                Ok(r) if r.last_seq != at + UNTIL => Some(format!(
                    "last_seq {} after a replay until {}",
                    r.last_seq,
                    at + UNTIL
                )),
                Ok(_) => None,
            },
            format!("stopped at {}", at + UNTIL),
        ));

        // 5. Refused input goes to the dead-letter queue and the instance serves on.
        let refused = [
            b"{not json".to_vec(),
            br#"{"kind":"data"}"#.to_vec(),
            data(end),
            serde_json::to_vec(&Input::Barrier {
                id: "unannounced".into(),
                reply_to: names::primary_queue(svc),
                stream: None,
            })
            .expect("a barrier serializes"),
        ];
        let dead = names::dead_letter_queue(svc);
        let dead_before = self.link.queue_depth(&dead).await.unwrap_or(0);
        self.link
            .publish_to_exchange(
                &names::input_exchange(svc),
                refused.iter().cloned().chain([data(end + 1)]),
            )
            .await?;
        let served = self.wait_for(svc, &live, end + 1, Command::Status).await;
        let broken = match served {
            Err(e) => Some(format!("after refused input: {e}")),
            Ok(_) => {
                let want = dead_before + refused.len() as u32;
                self.wait_depth(&dead, want).await?.err().map(|depth| {
                    format!(
                        "{} refused inputs (malformed, no seq, a repeat, an unarmed barrier): \
                         {dead} holds {} of them",
                        refused.len(),
                        depth - dead_before.min(depth)
                    )
                })
            }
        };
        out.push(outcome(
            "refused input goes to the dead-letter queue and the instance serves on",
            broken,
            "4 dead letters, then served the next message",
        ));

        // 6. `stop_live` hands back what it fetched and did not process: every message after
        //    its `last_seq` is on the primary queue again (an invariant, whatever the timing).
        let (first, last) = (end + 2, end + 1 + STOP_BACKLOG);
        self.link
            .publish_to_exchange(&names::input_exchange(svc), (first..=last).map(data))
            .await?;
        let stop = Command::StopLive {
            after_seq: None,
            hand_over: None,
        };
        let stopped = self.link.command(svc, &live, stop, &[], WAIT).await;
        let primary = names::primary_queue(svc);
        let broken = match stopped {
            Err(e) => Some(format!("stop_live failed: {e}")),
            Ok((r, _)) => {
                let expected = last.saturating_sub(r.last_seq);
                // More than a queue can count is never reached: it fails as a wrong depth.
                let want = u32::try_from(expected).unwrap_or(u32::MAX);
                self.wait_depth(&primary, want).await?.err().map(|depth| {
                    format!(
                        "stopped at last_seq {} of {last}: {expected} messages should be back \
                         on {primary}, {depth} are",
                        r.last_seq
                    )
                })
            }
        };
        out.push(outcome(
            "stop_live hands back the messages it did not process",
            broken,
            "every unprocessed message was back on the primary queue",
        ));
        Ok(out)
    }

    /// The digest of `instance` once it has processed up to `seq` (polled).
    async fn wait_digest(&self, svc: &str, instance: &str, seq: u64) -> Result<String> {
        self.wait_for(svc, instance, seq, Command::Digest).await
    }

    /// Polls `instance` with `ask` (`status` or `digest`) until it has processed up to `seq`;
    /// returns the last reply's digest, if any.
    /// Waits (at most 5 s) until `queue` holds `want` messages ready; Err with the last depth
    /// seen when it does not.
    async fn wait_depth(&self, queue: &str, want: u32) -> Result<std::result::Result<(), u32>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let depth = self.link.queue_depth(queue).await?;
            if depth == want {
                return Ok(Ok(()));
            }
            if tokio::time::Instant::now() > deadline {
                return Ok(Err(depth));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for(&self, svc: &str, instance: &str, seq: u64, ask: Command) -> Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (d, _) = self
                .link
                .command(svc, instance, ask.clone(), &[], WAIT)
                .await?;
            if d.last_seq >= seq {
                return Ok(d.digest.unwrap_or_default());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "{instance} stayed at last_seq {} (expected {seq})",
                    d.last_seq
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
