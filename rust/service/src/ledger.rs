//! What the library itself keeps of every instance, beside the service's own state: the last
//! seq applied (replay skips what a restored state already holds), how many were applied, and a
//! hash chain over the inputs (the output events carry it, so two instances that applied the
//! same messages in the same order say so whatever the service does with them).
//!
//! A checkpoint is the service's snapshot followed by [`TRAILER_LEN`] bytes:
//! `chain[32] | u64 last_seq | u64 count | "MS2MLDG1"`, little-endian. A trailer rather than a
//! header: appending to a snapshot of hundreds of MiB, and cutting it off again, copies nothing.

const MAGIC: &[u8; 8] = b"MS2MLDG1";
/// Bytes the ledger adds to a service's snapshot.
pub const TRAILER_LEN: usize = 32 + 8 + 8 + MAGIC.len();

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ledger {
    pub last_seq: u64,
    pub count: u64,
    /// `chain' = SHA-256(chain || seq as u64 little-endian || payload)`.
    pub chain: [u8; 32],
}

impl Ledger {
    /// Records that `seq` was applied.
    pub fn apply(&mut self, seq: u64, payload: &[u8]) {
        self.chain = ms2m_wire::state::next_chain(&self.chain, seq, payload);
        self.last_seq = seq;
        self.count += 1;
    }

    /// Appends the trailer to a service's snapshot.
    pub fn seal(&self, mut snapshot: Vec<u8>) -> Vec<u8> {
        snapshot.reserve_exact(TRAILER_LEN);
        snapshot.extend_from_slice(&self.chain);
        snapshot.extend_from_slice(&self.last_seq.to_le_bytes());
        snapshot.extend_from_slice(&self.count.to_le_bytes());
        snapshot.extend_from_slice(MAGIC);
        snapshot
    }

    /// Splits a checkpoint into its ledger and the service's snapshot.
    pub fn open(mut checkpoint: Vec<u8>) -> Result<(Ledger, Vec<u8>), String> {
        let Some(at) = checkpoint.len().checked_sub(TRAILER_LEN) else {
            return Err(format!(
                "invalid checkpoint: {} bytes, shorter than its {TRAILER_LEN}-byte trailer",
                checkpoint.len()
            ));
        };
        let t = &checkpoint[at..];
        if &t[48..] != MAGIC {
            return Err(
                "invalid checkpoint: no ms2m trailer at its end (not a checkpoint of \
                        an ms2m service)"
                    .into(),
            );
        }
        let u64_at = |i: usize| u64::from_le_bytes(t[i..i + 8].try_into().expect("8 bytes"));
        let ledger = Ledger {
            chain: t[..32].try_into().expect("32 bytes"),
            last_seq: u64_at(32),
            count: u64_at(40),
        };
        checkpoint.truncate(at);
        Ok((ledger, checkpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_snapshot_opens_to_the_same_ledger_and_bytes() {
        let mut l = Ledger::default();
        l.apply(1, b"a");
        l.apply(2, b"b");
        let (back, snap) = Ledger::open(l.seal(b"state".to_vec())).unwrap();
        assert_eq!((back, snap.as_slice()), (l, &b"state"[..]));
        let (back, snap) = Ledger::open(l.seal(Vec::new())).unwrap();
        assert_eq!((back, snap.len()), (l, 0));
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        assert!(Ledger::open(vec![0; 10]).unwrap_err().contains("shorter"));
        assert!(Ledger::open(vec![0; 100])
            .unwrap_err()
            .contains("no ms2m trailer"));
    }
}
