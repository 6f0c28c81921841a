//! Control contract between the migration manager and an instance.
//!
//! Commands go to the instance's control queue ([`crate::names::control_queue`]); replies go to
//! the queue named in the command's `reply_to`. Every control message body is an envelope:
//! a 4-byte little-endian length `n`, `n` bytes of JSON, then an optional binary attachment
//! (a small snapshot, for `restore` commands and `checkpoint`/`snapshot` replies that do not
//! stream). An instance handles control messages between two data messages, never during one.
//!
//! Checkpoints of any size are streamed instead: the source writes the snapshot to a queue of
//! its own as [`ChunkHeader`] envelopes of at most [`StreamTo::chunk_bytes`] each (every one
//! far below the broker's message limit) and replies with a [`Checkpoint`] (size, chunk count,
//! SHA-256); the manager relays that description in a [`Command::Fetch`], the target reads and
//! checks the chunks, and a [`Command::Restore`] without attachment applies what was fetched.
//! The manager never holds the state.

use serde::{Deserialize, Serialize};

/// A command, with the correlation id its reply will carry and where to send the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub corr: String,
    pub reply_to: String,
    #[serde(flatten)]
    pub command: Command,
}

/// The `finish_replay` a stopping source sends its target: `{"corr", "reply_to", "cmd":
/// "finish_replay", "until_seq": <the source's last_seq>, "go_live": true}` to `queue` (the
/// target's control queue). The stop position goes from the source to the target in one hop
/// instead of two through the manager, which is that much less downtime; the reply still
/// goes to the manager (`reply_to`, `corr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HandOver {
    pub queue: String,
    pub corr: String,
    pub reply_to: String,
}

/// What the manager asks of an instance. Every command gets exactly one reply; a refused one
/// gets a reply with `error` set and changes nothing (see `rust/wire/README.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Reply with the instance's position.
    Status,
    /// Start consuming the primary queue as the live instance. Refused while a replay is open:
    /// `FinishReplay { go_live: true }` is the way from replay to live.
    StartLive,
    /// Keep serving until `last_seq >= after_seq` (at once when absent), then stop consuming the
    /// primary queue; messages fetched but not processed go back to the queue. Replies
    /// `stop_live` with the last processed sequence number. A second one that would wait is
    /// refused while one waits; one that stops at once answers the waiting one too. With
    /// `hand_over`, the instance sends the target's `finish_replay` itself once it has stopped,
    /// right after its own reply.
    StopLive {
        after_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hand_over: Option<HandOver>,
    },
    /// Accept the next barrier that carries `id` (one barrier, once): a barrier the manager did
    /// not arm is refused as input from someone else (it would stream the state wherever its
    /// `reply_to` says). A new `arm_barrier` replaces one not used yet.
    ArmBarrier { id: String },
    /// Take a snapshot of the state and stream it to `stream` (the reply then describes it in
    /// `checkpoint`, once every chunk is confirmed by the broker); without `stream`, reply with
    /// the snapshot as attachment.
    Snapshot {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<StreamTo>,
    },
    /// Read a streamed checkpoint from its queue, check its size and SHA-256, and keep it for
    /// the next `restore`. Replies once all of it is in (or with why it is not).
    Fetch(Checkpoint),
    /// Replace the state with the attached snapshot or, without attachment, with the checkpoint
    /// fetched last. Refused while live or replaying.
    Restore,
    /// Replay `queue` without side effects: skip messages at or below `last_seq`, apply the
    /// rest, but never one above `until_seq` when given (those are dropped). Refused while live
    /// or already replaying.
    Replay {
        queue: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until_seq: Option<u64>,
    },
    /// Stop applying replayed messages: at once, or with `after_seq` once `last_seq >=
    /// after_seq` (the same rule as `StopLive`'s, so a source and its level target stop at the
    /// same message). Replies at once with the position reached: at or above `after_seq` means
    /// paused there, below it means the pause is pending. Refused while a `FinishReplay` waits.
    PauseReplay {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_seq: Option<u64>,
    },
    /// Apply replayed messages until `last_seq >= until_seq`, stop replaying, then (with
    /// `go_live`) start consuming the primary queue. Replies once live (or once replayed).
    /// Refused while another one waits or while the replay's queue is still being opened.
    FinishReplay { until_seq: u64, go_live: bool },
    /// Take the stream up after `after_seq` (with `next_above`: at the next input above it,
    /// whatever its seq): for an instance started empty in place of one that died with its
    /// state, which holds nothing of what came before. Refused once anything was applied, or
    /// while live or replaying.
    Adopt {
        after_seq: u64,
        #[serde(default)]
        next_above: bool,
    },
    /// Reply with the digest of the whole state.
    Digest,
    /// Stop everything and exit the process, first answering with an error every command still
    /// waiting for a condition.
    Shutdown,
}

impl Command {
    /// The command's wire name (its `cmd` tag), for logs and error messages without `Debug`
    /// formatting.
    pub fn name(&self) -> &'static str {
        self.reply_kind().name()
    }

    /// The kind of the reply this command gets.
    pub fn reply_kind(&self) -> ReplyKind {
        match self {
            Command::Status => ReplyKind::Status,
            Command::StartLive => ReplyKind::StartLive,
            Command::StopLive { .. } => ReplyKind::StopLive,
            Command::ArmBarrier { .. } => ReplyKind::ArmBarrier,
            Command::Snapshot { .. } => ReplyKind::Snapshot,
            Command::Fetch(_) => ReplyKind::Fetch,
            Command::Restore => ReplyKind::Restore,
            Command::Replay { .. } => ReplyKind::Replay,
            Command::PauseReplay { .. } => ReplyKind::PauseReplay,
            Command::FinishReplay { .. } => ReplyKind::FinishReplay,
            Command::Adopt { .. } => ReplyKind::Adopt,
            Command::Digest => ReplyKind::Digest,
            Command::Shutdown => ReplyKind::Shutdown,
        }
    }
}

/// What a [`Reply`] answers: the command's wire name, or `checkpoint` for a barrier.
///
/// Typed so that a caller matches on it instead of comparing strings; the JSON is the same
/// snake_case string as the command's `cmd` tag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyKind {
    /// The default only so that [`Reply`] can derive `Default`; status is the harmless answer.
    #[default]
    Status,
    StartLive,
    StopLive,
    ArmBarrier,
    Snapshot,
    Fetch,
    Restore,
    Replay,
    PauseReplay,
    FinishReplay,
    Adopt,
    Digest,
    Shutdown,
    /// Not a command: the answer to a barrier met on the live queue.
    Checkpoint,
}

impl ReplyKind {
    /// Every kind, in declaration order.
    pub const ALL: [ReplyKind; 14] = [
        ReplyKind::Status,
        ReplyKind::StartLive,
        ReplyKind::StopLive,
        ReplyKind::ArmBarrier,
        ReplyKind::Snapshot,
        ReplyKind::Fetch,
        ReplyKind::Restore,
        ReplyKind::Replay,
        ReplyKind::PauseReplay,
        ReplyKind::FinishReplay,
        ReplyKind::Adopt,
        ReplyKind::Digest,
        ReplyKind::Shutdown,
        ReplyKind::Checkpoint,
    ];

    /// The wire name, as serialized.
    pub fn name(self) -> &'static str {
        match self {
            ReplyKind::Status => "status",
            ReplyKind::StartLive => "start_live",
            ReplyKind::StopLive => "stop_live",
            ReplyKind::ArmBarrier => "arm_barrier",
            ReplyKind::Snapshot => "snapshot",
            ReplyKind::Fetch => "fetch",
            ReplyKind::Restore => "restore",
            ReplyKind::Replay => "replay",
            ReplyKind::PauseReplay => "pause_replay",
            ReplyKind::FinishReplay => "finish_replay",
            ReplyKind::Adopt => "adopt",
            ReplyKind::Digest => "digest",
            ReplyKind::Shutdown => "shutdown",
            ReplyKind::Checkpoint => "checkpoint",
        }
    }
}

impl std::fmt::Display for ReplyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An instance's answer to a command (or to a barrier, with kind `checkpoint`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub corr: String,
    pub instance: String,
    /// The command answered, or `checkpoint` for a barrier.
    pub kind: ReplyKind,
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
    /// How long the last message applied (live or replayed) waited between its publication
    /// (its `t_pub_ns`) and the start of its processing: how far the instance trails the input.
    /// The cutover compares a target's with its source's (0 before any message).
    #[serde(default)]
    pub queued_ns: u64,
    /// The checkpoint streamed (`checkpoint` and `snapshot` replies with a stream) or fetched
    /// (`fetch` replies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

/// Where to stream a checkpoint: the queue, and the largest chunk to write to it.
///
/// With `listen` (a direct transfer, as the paper's rsync from host to host), the source writes
/// nothing to the broker: it listens on that address (`ip:port`, port 0 for any free one) and
/// sends the same chunk envelopes, each behind a 4-byte little-endian length, to whoever
/// connects, until all of them went out on one connection (the reader closes once it has
/// checked them); `queue` then only names the checkpoint in messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamTo {
    pub queue: String,
    pub chunk_bytes: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

/// A checkpoint written to `queue` as `chunks` chunks, `bytes` in all, whose concatenation has
/// the SHA-256 `sha256` (lower-case hex). With `addr`, the chunks are not on `queue`: the source
/// serves them on that TCP address (see [`StreamTo::listen`]); in a `fetch` command, `addr` is
/// where the target connects (the manager may put a link's relay in between).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub queue: String,
    pub bytes: u64,
    pub chunks: u32,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

impl Checkpoint {
    /// Where the chunks are read from: the source's address, or the queue.
    pub fn origin(&self) -> &str {
        self.addr.as_deref().unwrap_or(&self.queue)
    }
}

/// The header of one message on a checkpoint queue; the chunk's bytes are its attachment.
/// Chunks are published in order: `index` from 0 to `count - 1`, `offset` where the chunk's
/// bytes start in the snapshot, `total` the snapshot's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    pub index: u32,
    pub count: u32,
    pub offset: u64,
    pub total: u64,
}

impl ChunkHeader {
    /// The chunks of a snapshot of `total` bytes cut at `chunk_bytes` (an empty snapshot is one
    /// empty chunk, so that every stream ends with a message).
    pub fn split(
        total: u64,
        chunk_bytes: u32,
    ) -> impl Iterator<Item = (ChunkHeader, std::ops::Range<usize>)> {
        let size = u64::from(chunk_bytes.max(1));
        let count = total.div_ceil(size).max(1);
        (0..count).map(move |i| {
            let offset = i * size;
            let end = (offset + size).min(total);
            let header = ChunkHeader {
                index: i as u32,
                count: count as u32,
                offset,
                total,
            };
            (header, offset as usize..end as usize)
        })
    }
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

/// Where to answer a control message that [`decode`] refused, when its JSON still names a
/// `corr` and a `reply_to` (an unknown command, a field of the wrong type): the sender gets
/// an error reply instead of a timeout.
pub fn reply_address(body: &[u8]) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Address {
        corr: String,
        reply_to: String,
    }
    let n = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
    let json = body.get(4..)?.get(..n)?;
    let a: Address = serde_json::from_slice(json).ok()?;
    Some((a.corr, a.reply_to))
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

    /// One command of each kind, with the wire name it must keep.
    fn every_command() -> Vec<(Command, &'static str)> {
        vec![
            (Command::Status, "status"),
            (Command::ArmBarrier { id: "b".into() }, "arm_barrier"),
            (Command::StartLive, "start_live"),
            (
                Command::StopLive {
                    after_seq: Some(3),
                    hand_over: None,
                },
                "stop_live",
            ),
            (Command::Snapshot { stream: None }, "snapshot"),
            (Command::Fetch(Checkpoint::default()), "fetch"),
            (Command::Restore, "restore"),
            (
                Command::Replay {
                    queue: "q".into(),
                    until_seq: None,
                },
                "replay",
            ),
            (Command::PauseReplay { after_seq: None }, "pause_replay"),
            (Command::PauseReplay { after_seq: Some(7) }, "pause_replay"),
            (
                Command::FinishReplay {
                    until_seq: 4,
                    go_live: false,
                },
                "finish_replay",
            ),
            (
                Command::Adopt {
                    after_seq: 9,
                    next_above: true,
                },
                "adopt",
            ),
            (Command::Digest, "digest"),
            (Command::Shutdown, "shutdown"),
        ]
    }

    #[test]
    fn command_names_match_their_cmd_tags() {
        for (command, wire) in every_command() {
            let json = serde_json::to_value(&command).unwrap();
            assert_eq!(json["cmd"], wire, "{command:?}");
            assert_eq!(command.name(), wire);
            assert_eq!(command.reply_kind().name(), wire);
        }
    }

    #[test]
    fn a_pause_replay_without_after_seq_reads_as_before() {
        let c: Command = serde_json::from_str(r#"{"cmd": "pause_replay"}"#).unwrap();
        assert_eq!(c, Command::PauseReplay { after_seq: None });
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#"{"cmd":"pause_replay"}"#);
    }

    #[test]
    fn reply_kind_json_names_are_unchanged() {
        let expected = [
            "status",
            "start_live",
            "stop_live",
            "arm_barrier",
            "snapshot",
            "fetch",
            "restore",
            "replay",
            "pause_replay",
            "finish_replay",
            "adopt",
            "digest",
            "shutdown",
            "checkpoint",
        ];
        for (kind, wire) in ReplyKind::ALL.into_iter().zip(expected) {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{wire}\""));
            assert_eq!(kind.name(), wire);
            assert_eq!(kind.to_string(), wire);
            let back: ReplyKind = serde_json::from_str(&format!("\"{wire}\"")).unwrap();
            assert_eq!(back, kind);
        }
    }

    #[test]
    fn reply_round_trips_with_each_kind() {
        for kind in ReplyKind::ALL {
            let reply = Reply {
                corr: "1".into(),
                instance: "a".into(),
                kind,
                last_seq: 5,
                ..Reply::default()
            };
            let body = encode(&reply, b"");
            let json = String::from_utf8(body[4..].to_vec()).unwrap();
            assert!(
                json.contains(&format!(r#""kind":"{}""#, kind.name())),
                "{json}"
            );
            let (back, _): (Reply, _) = decode(&body).unwrap();
            assert_eq!(back, reply);
        }
    }

    #[test]
    fn unknown_reply_kind_is_refused() {
        let body =
            br#"{"corr":"1","instance":"a","kind":"stopped","last_seq":0,"count":0,"t_ns":0}"#;
        let mut framed = (body.len() as u32).to_le_bytes().to_vec();
        framed.extend_from_slice(body);
        assert!(decode::<Reply>(&framed).is_err());
    }

    #[test]
    fn snapshot_without_stream_keeps_its_old_json() {
        let (env, _): (Envelope, _) = decode(&encode(
            &serde_json::json!({"corr": "1", "reply_to": "m", "cmd": "snapshot"}),
            b"",
        ))
        .unwrap();
        assert_eq!(env.command, Command::Snapshot { stream: None });
        let fetch = Command::Fetch(Checkpoint {
            queue: "q".into(),
            bytes: 9,
            chunks: 2,
            sha256: "ab".into(),
            addr: None,
        });
        let json = serde_json::to_value(&fetch).unwrap();
        assert_eq!(json["cmd"], "fetch");
        assert_eq!(json["queue"], "q");
        assert_eq!(serde_json::from_value::<Command>(json).unwrap(), fetch);
    }

    #[test]
    fn chunks_cover_the_snapshot_in_order() {
        let chunks: Vec<_> = ChunkHeader::split(10, 4).collect();
        assert_eq!(chunks.len(), 3);
        assert_eq!(
            chunks[2].0,
            ChunkHeader {
                index: 2,
                count: 3,
                offset: 8,
                total: 10
            }
        );
        assert_eq!(
            chunks.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
            [0..4, 4..8, 8..10]
        );
        let empty: Vec<_> = ChunkHeader::split(0, 4).collect();
        assert_eq!(
            empty,
            [(
                ChunkHeader {
                    index: 0,
                    count: 1,
                    offset: 0,
                    total: 0
                },
                0..0
            )]
        );
        assert_eq!(ChunkHeader::split(8, 4).count(), 2);
    }

    #[test]
    fn truncated_envelope_is_refused() {
        assert!(decode::<Reply>(&[9, 0, 0, 0, b'{']).is_err());
        assert!(decode::<Reply>(&[1]).is_err());
    }
}
