//! The contract between an ms2m migration manager and a service instance.
//!
//! Everything a program needs to play the service's role, or to read what it reports, is here:
//! the broker names of a service ([`names`]), the input messages ([`Input`]), the output events
//! ([`OutputEvent`]), the control commands and replies ([`control`]), and the deterministic state
//! machine of the reference service ([`state`]). `rust/wire/README.md` describes the same contract for
//! readers in other languages. The crate has no async or broker dependency so that the service
//! binary stays light and the checker can fold histories offline.

pub mod control;
pub mod names;
pub mod state;

use serde::{Deserialize, Serialize};

/// Nanoseconds since the Unix epoch on the host clock, which every testbed process shares
/// (containers read the same kernel clock).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A message on a service's input exchange (JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Input {
    /// Work for the service. `seq` increases by one per message of a stream; `t_pub_ns` is the
    /// send time, taken just before the publish.
    Data {
        seq: u64,
        t_pub_ns: u64,
        payload: String,
    },
    /// A marker published through the input exchange by the migration manager. It lands in every
    /// queue bound to the exchange behind all messages routed before it; an instance serving live
    /// that reaches it, and that the manager told to expect it ([`control::Command::ArmBarrier`]
    /// with this `id`, an unguessable token), takes a checkpoint, streams it to `stream` (see [`control::StreamTo`];
    /// without one, as the reply's attachment) and replies to `reply_to`.
    Barrier {
        id: String,
        reply_to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<control::StreamTo>,
    },
}

/// Why an instance refused a delivery from its input: it goes to the service's dead-letter
/// queue ([`names::dead_letter_queue`]), never into the state. The input exchange takes
/// messages from any AMQP client, so everything here can happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// Not an input message: not JSON, an unknown `kind`, a missing or mistyped field.
    Malformed,
    /// Longer than the instance's `max_input_bytes`.
    Oversized,
    /// A seq the state already holds: applying it again would count it twice.
    Repeat,
    /// A seq past the next one (by more than the instance's `max_seq_gap`): the messages in
    /// between would be skipped, and all of them refused as repeats once they came.
    Jump,
    /// A barrier the manager did not announce (`arm_barrier`) on the instance's control queue.
    UnarmedBarrier,
}

impl Rejection {
    pub const ALL: [Rejection; 5] = [
        Rejection::Malformed,
        Rejection::Oversized,
        Rejection::Repeat,
        Rejection::Jump,
        Rejection::UnarmedBarrier,
    ];

    /// The wire name, as serialized (and as the dead letter's `x-ms2m-reason` header).
    pub fn name(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Oversized => "oversized",
            Rejection::Repeat => "repeat",
            Rejection::Jump => "jump",
            Rejection::UnarmedBarrier => "unarmed_barrier",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A refused delivery: the reason, and what exactly was wrong (for the dead letter's
/// `x-ms2m-detail` header and the instance's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Rejection,
    pub detail: String,
}

impl Refused {
    pub fn new(reason: Rejection, detail: impl Into<String>) -> Self {
        Refused {
            reason,
            detail: detail.into(),
        }
    }
}

/// The input messages an instance accepts by default: a workload's largest payload (16 MiB)
/// with room for the JSON around it.
pub const MAX_INPUT_BYTES: usize = (16 << 20) + (64 << 10);

/// Reads an input message, refusing one longer than `max_bytes` before parsing it. Never
/// panics, whatever the bytes (fuzzed in `tests/fuzz_decoders.rs`).
pub fn parse_input(body: &[u8], max_bytes: usize) -> Result<Input, Refused> {
    if body.len() > max_bytes {
        return Err(Refused::new(
            Rejection::Oversized,
            format!("{} bytes, more than the {max_bytes} accepted", body.len()),
        ));
    }
    serde_json::from_slice(body).map_err(|e| Refused::new(Rejection::Malformed, e.to_string()))
}

/// Whether an instance processed a message as live work or while replaying the backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Live,
    Replay,
}

/// What an instance publishes to the service's output exchange for every message it processes
/// live, and for every run of messages it replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEvent {
    pub instance: String,
    /// The message's seq; for a replay run, the last one's.
    pub seq: u64,
    pub mode: Mode,
    /// When `seq` was published.
    pub t_pub_ns: u64,
    /// When the (first) message's handling began.
    pub t_start_ns: u64,
    pub t_end_ns: u64,
    /// Hex of the state's hash chain right after `seq` was applied.
    pub chain: String,
    /// Replay runs only: the run's first seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    /// Replay runs only: how many messages the run applied (`first_seq..=seq`, less any the
    /// stream never carried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// Live events only: what the service's `handle` returned for the message, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl OutputEvent {
    /// How many messages this event reports: 1 for a live one.
    pub fn messages(&self) -> u64 {
        self.messages.unwrap_or(1)
    }
}

/// An AMQP URL without its password (`amqp://user:***@host...`), for reports and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Lower-case hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_json_is_tagged_and_round_trips() {
        let m = Input::Data {
            seq: 7,
            t_pub_ns: 11,
            payload: "ab".into(),
        };
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"kind":"data","seq":7,"t_pub_ns":11,"payload":"ab"}"#);
        assert_eq!(serde_json::from_str::<Input>(&j).unwrap(), m);
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }
}
