//! An example ms2m service in Rust: a large in-memory hash map.
//!
//! The map has `MS2M_STATE_BYTES / 64` entries (at least 1,024) of a `u64` key and a 56-byte
//! value. Each message picks a key from its payload's hash and folds the payload into that
//! key's value. The snapshot writes the entries in the map's own order, which differs between
//! processes (Rust's hash maps are randomly seeded), so two equal states can give different
//! bytes: the service defines its own digest, over the entries sorted by key.
//!
//! Build with `cargo build --release -p large-map`; a testbed starts it with
//! `tb.deploy("map", host="edge-1", command=["target/release/large-map"], state_bytes=64 << 20)`.

use ms2m_service::{Message, Result, Service};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

const VALUE: usize = 56;
const ENTRY: usize = 8 + VALUE;

struct LargeMap {
    entries: HashMap<u64, [u8; VALUE]>,
}

impl LargeMap {
    fn new(state_bytes: usize) -> Self {
        let n = (state_bytes / ENTRY).max(1024) as u64;
        let entries = (0..n).map(|k| (k, [(k % 251) as u8; VALUE])).collect();
        LargeMap { entries }
    }
}

impl Service for LargeMap {
    fn handle(&mut self, msg: &Message<'_>) -> Result<Option<String>> {
        let h = Sha256::digest(msg.payload.as_bytes());
        let key = u64::from_le_bytes(h[..8].try_into()?) % self.entries.len() as u64;
        let value = self.entries.entry(key).or_insert([0; VALUE]);
        for (v, b) in value.iter_mut().zip(h.iter().cycle()) {
            *v ^= b;
        }
        Ok(Some(format!("{key}")))
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.entries.len() * ENTRY);
        for (k, v) in &self.entries {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(v);
        }
        Ok(out)
    }

    fn restore(&mut self, data: Vec<u8>) -> Result<()> {
        if !data.len().is_multiple_of(ENTRY) {
            return Err(format!(
                "{} bytes is not a whole number of {ENTRY}-byte entries",
                data.len()
            )
            .into());
        }
        let entries = data
            .chunks_exact(ENTRY)
            .map(|e| {
                (
                    u64::from_le_bytes(e[..8].try_into().expect("8 bytes")),
                    e[8..].try_into().expect("56 bytes"),
                )
            })
            .collect();
        self.entries = entries;
        Ok(())
    }

    fn digest(&self) -> Result<String> {
        let mut keys: Vec<&u64> = self.entries.keys().collect();
        keys.sort_unstable();
        let mut h = Sha256::new();
        for k in keys {
            h.update(k.to_le_bytes());
            h.update(self.entries[k]);
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

fn main() {
    ms2m_service::main(|config| LargeMap::new(config.state_bytes))
}
