//! The reference service's state and its transition function.
//!
//! The state is a hash chain over every applied message plus a payload buffer of configurable
//! size that each message mutates in a few places. The transition is a pure function, so the
//! checker folds the confirmed message log through the very same code and compares digests.

use sha2::{Digest, Sha256};

const SNAPSHOT_MAGIC: &[u8; 8] = b"MS2MSNAP";
const SNAPSHOT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 8 + 32 + 8;

/// Deterministic state of one service instance.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceState {
    /// Sequence number of the last applied message (0: none yet).
    pub last_seq: u64,
    /// Number of applied messages.
    pub count: u64,
    /// SHA-256 chain: `chain' = H(chain || seq_le || payload)`.
    pub chain: [u8; 32],
    /// The mutable payload whose size the experiment chooses.
    pub data: Vec<u8>,
}

impl std::fmt::Debug for ServiceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceState")
            .field("last_seq", &self.last_seq)
            .field("count", &self.count)
            .field("chain", &crate::hex(&self.chain))
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// Why a snapshot could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotError(pub String);

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid snapshot: {}", self.0)
    }
}

impl std::error::Error for SnapshotError {}

impl ServiceState {
    /// The initial state: zero chain, payload of `state_bytes` bytes filled from a fixed pattern.
    pub fn new(state_bytes: usize) -> Self {
        let mut data = buffer(state_bytes);
        data.extend((0..state_bytes).map(|i| (i % 251) as u8));
        ServiceState {
            last_seq: 0,
            count: 0,
            chain: [0; 32],
            data,
        }
    }

    /// Applies one message.
    pub fn apply(&mut self, seq: u64, payload: &[u8]) {
        self.chain = next_chain(&self.chain, seq, payload);
        self.last_seq = seq;
        self.count += 1;
        let len = self.data.len();
        if len > 0 {
            let mut off = [0u8; 8];
            off.copy_from_slice(&self.chain[..8]);
            let start = (u64::from_le_bytes(off) % len as u64) as usize;
            for (i, b) in self.chain.iter().enumerate() {
                self.data[(start + i) % len] ^= b;
            }
        }
    }

    /// Digest of the whole state (chain, counters and payload), hex.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.chain);
        h.update(self.count.to_le_bytes());
        h.update(self.last_seq.to_le_bytes());
        h.update(&self.data);
        crate::hex(&h.finalize())
    }

    /// Serializes the state (the application-level checkpoint).
    pub fn to_snapshot(&self) -> Vec<u8> {
        self.to_snapshot_into(buffer(self.snapshot_len()))
    }

    /// The size of [`ServiceState::to_snapshot`]'s bytes.
    pub fn snapshot_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// [`ServiceState::to_snapshot`] into `out` (cleared first): a buffer whose pages are
    /// already mapped takes the copy several times faster than fresh memory.
    pub fn to_snapshot_into(&self, mut out: Vec<u8>) -> Vec<u8> {
        out.clear();
        out.reserve(self.snapshot_len());
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.chain);
        out.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// Restores a state from [`ServiceState::to_snapshot`]'s bytes.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let header = SnapshotHeader::parse(bytes)?;
        Ok(header.with_data(bytes[HEADER_LEN..].to_vec()))
    }

    /// [`ServiceState::from_snapshot`] without a second copy of the payload: the snapshot's
    /// buffer becomes the state's (for states of gigabytes, where a copy is a copy too many).
    pub fn from_snapshot_vec(mut bytes: Vec<u8>) -> Result<Self, SnapshotError> {
        let header = SnapshotHeader::parse(&bytes)?;
        bytes.drain(..HEADER_LEN);
        Ok(header.with_data(bytes))
    }
}

/// The hash chain after `seq`: `SHA-256(chain || seq as u64 little-endian || payload)`. The
/// reference state's chain, and the one the service library keeps for every service.
pub fn next_chain(chain: &[u8; 32], seq: u64, payload: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(chain);
    h.update(seq.to_le_bytes());
    h.update(payload);
    h.finalize().into()
}

/// An empty buffer with room for `n` bytes (see [`hint_huge_pages`]).
pub fn buffer(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    hint_huge_pages(&mut v);
    v
}

/// Asks the kernel to back the spare capacity of `v` with huge pages (Linux, transparent huge
/// pages in `madvise` mode; elsewhere nothing). Filling fresh memory of hundreds of MiB is
/// otherwise mostly page faults: copying a 256 MiB state took 460 ms here, 65 ms with the
/// hint, and a source stalls for that long at the barrier. Only a hint: memory stays ordinary.
pub fn hint_huge_pages(v: &mut Vec<u8>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let spare = v.spare_capacity_mut();
        let (begin, len) = (spare.as_mut_ptr() as usize, spare.len());
        let start = begin.next_multiple_of(HUGE);
        let end = (begin + len) & !(HUGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside the vector's own allocation; MADV_HUGEPAGE
            // changes how the kernel backs those pages, never their contents or validity.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

/// A snapshot's header, checked against the snapshot's length.
struct SnapshotHeader {
    last_seq: u64,
    count: u64,
    chain: [u8; 32],
}

impl SnapshotHeader {
    fn parse(bytes: &[u8]) -> Result<Self, SnapshotError> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError("missing MS2MSNAP header".into()));
        }
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError(format!(
                "version {version}, this build reads {SNAPSHOT_VERSION}"
            )));
        }
        let len = u64_at(60);
        if (bytes.len() - HEADER_LEN) as u64 != len {
            return Err(SnapshotError(format!(
                "payload of {} bytes, header says {len}",
                bytes.len() - HEADER_LEN
            )));
        }
        Ok(SnapshotHeader {
            last_seq: u64_at(12),
            count: u64_at(20),
            chain: bytes[28..60].try_into().unwrap(),
        })
    }

    fn with_data(self, data: Vec<u8>) -> ServiceState {
        ServiceState {
            last_seq: self.last_seq,
            count: self.count,
            chain: self.chain,
            data,
        }
    }
}

/// The payload the ms2m workload generator sends with message `seq`: `size` bytes of ASCII,
/// derived from the sequence number, so a checker can regenerate it without storing it.
pub fn workload_payload(seq: u64, size: usize) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..size)
        .map(|_| {
            // xorshift64: cheap, deterministic, and different for every seq.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x & 31) as usize] as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips() {
        let mut s = ServiceState::new(1000);
        for seq in 1..=10 {
            s.apply(seq, workload_payload(seq, 16).as_bytes());
        }
        let back = ServiceState::from_snapshot(&s.to_snapshot()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.digest(), s.digest());
        assert_eq!(ServiceState::from_snapshot_vec(s.to_snapshot()).unwrap(), s);
    }

    #[test]
    fn order_matters() {
        let mut a = ServiceState::new(64);
        let mut b = ServiceState::new(64);
        a.apply(1, b"x");
        a.apply(2, b"y");
        b.apply(2, b"y");
        b.apply(1, b"x");
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn corrupt_snapshot_is_refused() {
        let s = ServiceState::new(10).to_snapshot();
        assert!(ServiceState::from_snapshot(&s[..s.len() - 1]).is_err());
        assert!(ServiceState::from_snapshot(b"nope").is_err());
        assert!(ServiceState::from_snapshot_vec(s[..s.len() - 1].to_vec()).is_err());
    }

    #[test]
    fn zero_sized_state_works() {
        let mut s = ServiceState::new(0);
        s.apply(1, b"");
        assert_eq!(s.count, 1);
    }

    #[test]
    fn payload_is_deterministic_and_sized() {
        assert_eq!(workload_payload(5, 40), workload_payload(5, 40));
        assert_ne!(workload_payload(5, 40), workload_payload(6, 40));
        assert_eq!(workload_payload(5, 40).len(), 40);
    }
}
