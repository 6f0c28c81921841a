//! What the core's unit and property tests share.

use super::Ledger;
use ms2m_wire::state::ServiceState;

/// The core of the reference service.
pub(super) type Core = super::Core<ServiceState>;

/// A checkpoint of `state` as the library writes one (the state's snapshot, sealed).
pub(super) trait Sealed {
    fn checkpoint(&self) -> Vec<u8>;
}

impl Sealed for ServiceState {
    fn checkpoint(&self) -> Vec<u8> {
        let ledger = Ledger {
            last_seq: self.last_seq,
            count: self.count,
            chain: self.chain,
        };
        ledger.seal(self.to_snapshot())
    }
}
