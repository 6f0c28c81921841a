//! Fuzzing of every decoder that reads bytes from the broker: input messages (any AMQP client
//! may publish them), control envelopes and replies, snapshots. None may panic, whatever it is
//! given; each one refuses what it cannot read with an error.
//!
//! The seeds are the corpus in `tests/corpus/` (one valid message of each kind, JSON), framed
//! as the wire frames them; each case mutates one (bytes flipped, inserted, removed, the whole
//! cut short) or is random bytes. Bounded for CI by proptest's case count; a longer hunt:
//! `PROPTEST_CASES=200000 cargo test --release -p ms2m-wire --test fuzz_decoders`.

use ms2m_wire::control::{self, Envelope, Reply};
use ms2m_wire::parse_input;
use ms2m_wire::state::ServiceState;
use proptest::prelude::*;

/// The corpus files whose names start with `prefix`.
fn corpus(prefix: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("tests/corpus")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| std::fs::read(e.path()).expect("a corpus file"))
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no corpus file starts with {prefix}");
    seeds
}

/// A control frame: the JSON after its length, and an attachment.
fn framed(json: &[u8], attachment: &[u8]) -> Vec<u8> {
    let mut out = (json.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(json);
    out.extend_from_slice(attachment);
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => any::<usize>().prop_map(Mutation::Remove),
        1 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len();
        match *m {
            Mutation::Flip(i, b) if n > 0 => bytes[i % n] ^= b,
            Mutation::Insert(i, b) => bytes.insert(i % (n + 1), b),
            Mutation::Remove(i) if n > 0 => {
                bytes.remove(i % n);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
            _ => {}
        }
    }
    bytes
}

/// A seed (mutated) or, now and then, bytes of no origin at all.
fn fuzzed(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => (
            proptest::sample::select(seeds),
            proptest::collection::vec(mutation(), 0..6)
        )
            .prop_map(|(seed, ms)| mutate(seed, &ms)),
        1 => proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

/// A small reference snapshot, as a checkpoint carries one.
fn snapshot_seed() -> Vec<Vec<u8>> {
    let mut s = ServiceState::new(64);
    for seq in 1..=3 {
        s.apply(seq, b"payload");
    }
    vec![s.to_snapshot()]
}

#[test]
fn the_corpus_is_valid() {
    for seed in corpus("input-") {
        parse_input(&seed, 1 << 20).expect("a valid input");
    }
    for seed in corpus("envelope-") {
        control::decode::<Envelope>(&framed(&seed, b"")).expect("a valid envelope");
    }
    for seed in corpus("reply-") {
        control::decode::<Reply>(&framed(&seed, b"")).expect("a valid reply");
    }
    ServiceState::from_snapshot(&snapshot_seed()[0]).expect("a valid snapshot");
}

/// 512 per decoder, or `PROPTEST_CASES`.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn input_decoding_never_panics(body in fuzzed(corpus("input-"))) {
        if let Ok(input) = parse_input(&body, 1 << 20) {
            // Whatever parses is a whole message: written again, it reads the same.
            let again = serde_json::to_vec(&input).expect("an input serializes");
            prop_assert_eq!(parse_input(&again, usize::MAX).ok(), Some(input));
        }
        // An oversized body is refused before it is read.
        let oversized = parse_input(&body, body.len().saturating_sub(1));
        prop_assert!(body.is_empty() || oversized.is_err());
    }

    #[test]
    fn control_decoding_never_panics(
        json in fuzzed(corpus("envelope-").into_iter().chain(corpus("reply-")).collect()),
        attachment in proptest::collection::vec(any::<u8>(), 0..16),
        reframe in any::<bool>(),
    ) {
        // Mutated JSON in a correct frame, or a mutated frame.
        let body = if reframe { framed(&json, &attachment) } else { json.clone() };
        let _ = control::decode::<Envelope>(&body);
        let _ = control::decode::<Reply>(&body);
        let _ = control::reply_address(&body);
    }

    #[test]
    fn snapshot_decoding_never_panics(bytes in fuzzed(snapshot_seed())) {
        let _ = ServiceState::from_snapshot(&bytes);
        let _ = ServiceState::from_snapshot_vec(bytes);
    }
}
