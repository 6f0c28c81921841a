//! The append-only record of a run: what the workload sent and what the instances reported.
//! A history is saved with the report and can be checked again offline.

use ms2m_wire::OutputEvent;
use serde::{Deserialize, Serialize};

/// What the broker said of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PublishOutcome {
    /// Not answered yet.
    Pending,
    /// The broker confirmed it: it must be processed live exactly once.
    Confirmed,
    /// The broker refused it: it must not be processed.
    Nacked,
    /// The connection failed before an answer: it may or may not have been routed.
    Uncertain,
}

/// One message the workload sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Published {
    pub seq: u64,
    /// When the open-loop schedule said to send it.
    pub t_sched_ns: u64,
    /// When it was sent.
    pub t_pub_ns: u64,
    pub outcome: PublishOutcome,
}

/// Everything the checker needs, in one serializable value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub published: Vec<Published>,
    pub events: Vec<OutputEvent>,
    /// Payload size of the workload's messages (payloads are regenerated from the seq).
    pub message_bytes: usize,
    /// Size of the service's state payload.
    pub state_bytes: u64,
    /// Instances started empty in place of a source that died with its state (in order): the
    /// state holds only what came after the last one's start.
    #[serde(default)]
    pub state_restarts: Vec<StateRestart>,
}

/// An instance started empty in place of one that died with its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StateRestart {
    pub instance: String,
    /// It took the stream up after this seq (None: at the first message it processed).
    pub after_seq: Option<u64>,
}

impl History {
    /// The seq after which the last instance started empty took the stream up (None: the state
    /// was never restarted, or its new instance has processed nothing yet).
    pub(crate) fn restarted_after(&self) -> Option<u64> {
        let r = self.state_restarts.last()?;
        r.after_seq.or_else(|| {
            self.events
                .iter()
                .filter(|e| e.mode == ms2m_wire::Mode::Live && e.instance == r.instance)
                .map(|e| e.seq.saturating_sub(1))
                .min()
        })
    }

    /// Live events, each seq's first one only, in seq order; also how often each seq was live.
    pub(crate) fn first_live(&self) -> std::collections::BTreeMap<u64, (&OutputEvent, u32)> {
        let mut map = std::collections::BTreeMap::new();
        for e in self
            .events
            .iter()
            .filter(|e| e.mode == ms2m_wire::Mode::Live)
        {
            map.entry(e.seq)
                .and_modify(|(first, n): &mut (&OutputEvent, u32)| {
                    *n += 1;
                    if e.t_start_ns < first.t_start_ns {
                        *first = e;
                    }
                })
                .or_insert((e, 1));
        }
        map
    }
}
