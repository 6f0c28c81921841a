//! Control contract between the migration manager and an instance.
//!
//! Commands go to the instance's control queue ([`crate::names::control_queue`]); replies go to
//! the queue named in the command's `reply_to`. Every control message body is an envelope:
//! a 4-byte little-endian length `n`, `n` bytes of JSON, then an optional binary attachment
//! (the snapshot, for `restore` commands and `checkpoint`/`snapshot` replies). An instance
//! handles control messages between two data messages, never during one.

use serde::{Deserialize, Serialize};

/// A command, with the correlation id its reply will carry and where to send the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub corr: String,
    pub reply_to: String,
    #[serde(flatten)]
    pub command: Command,
}

/// What the manager asks of an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Reply with the instance's position.
    Status,
    /// Start consuming the primary queue as the live instance.
    StartLive,
    /// Keep serving until `last_seq >= after_seq` (at once when absent), then stop consuming the
    /// primary queue; messages fetched but not processed go back to the queue. Replies
    /// `stopped` with the last processed sequence number.
    StopLive { after_seq: Option<u64> },
    /// Reply with a snapshot of the state as attachment.
    Snapshot,
    /// Replace the state with the attached snapshot.
    Restore,
    /// Replay `queue` without side effects: skip messages at or below `last_seq`, apply the
    /// rest, but never one above `until_seq` when given (those are dropped).
    Replay {
        queue: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until_seq: Option<u64>,
    },
    /// Stop applying replayed messages for now; replies with the position reached.
    PauseReplay,
    /// Apply replayed messages until `last_seq >= until_seq`, stop replaying, then (with
    /// `go_live`) start consuming the primary queue. Replies once live (or once replayed).
    FinishReplay { until_seq: u64, go_live: bool },
    /// Reply with the digest of the whole state.
    Digest,
    /// Stop everything and exit the process.
    Shutdown,
}

/// An instance's answer to a command (or to a barrier, with kind `checkpoint`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub corr: String,
    pub instance: String,
    /// The command answered, or `checkpoint` for a barrier.
    pub kind: String,
    /// Present when the command failed; says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub last_seq: u64,
    pub count: u64,
    /// When the instance did what was asked (stopped, went live, restored...), host clock ns.
    pub t_ns: u64,
    /// When the instance began the work (reached the barrier, began restoring...).
    #[serde(default)]
    pub t_begin_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Messages applied in replay mode so far.
    #[serde(default)]
    pub replayed: u64,
    /// Replayed messages skipped because the snapshot already held them.
    #[serde(default)]
    pub skipped: u64,
}

/// Why an envelope could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeError(pub String);

impl std::fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid control message: {}", self.0)
    }
}

impl std::error::Error for EnvelopeError {}

/// Encodes a JSON header and an attachment.
pub fn encode<T: Serialize>(header: &T, attachment: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).expect("control headers serialize");
    let mut out = Vec::with_capacity(4 + json.len() + attachment.len());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(attachment);
    out
}

/// Decodes what [`encode`] wrote.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<(T, &[u8]), EnvelopeError> {
    if body.len() < 4 {
        return Err(EnvelopeError("shorter than its length prefix".into()));
    }
    let n = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
    let rest = &body[4..];
    if rest.len() < n {
        return Err(EnvelopeError(format!(
            "header says {n} bytes of JSON, {} present",
            rest.len()
        )));
    }
    let header =
        serde_json::from_slice(&rest[..n]).map_err(|e| EnvelopeError(format!("JSON: {e}")))?;
    Ok((header, &rest[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_with_attachment() {
        let env = Envelope {
            corr: "7".into(),
            reply_to: "mgr".into(),
            command: Command::FinishReplay {
                until_seq: 9,
                go_live: true,
            },
        };
        let body = encode(&env, b"blob");
        let (back, blob): (Envelope, _) = decode(&body).unwrap();
        assert_eq!(back, env);
        assert_eq!(blob, b"blob");
        let json = String::from_utf8(body[4..body.len() - 4].to_vec()).unwrap();
        assert!(json.contains(r#""cmd":"finish_replay""#), "{json}");
    }

    #[test]
    fn truncated_envelope_is_refused() {
        assert!(decode::<Reply>(&[9, 0, 0, 0, b'{']).is_err());
        assert!(decode::<Reply>(&[1]).is_err());
    }
}
