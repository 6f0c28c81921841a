//! The reference service's state as a [`Service`]: the checker's reference fold applies the
//! confirmed log through the same [`ServiceState::apply`], and its digest is the state's own.

use crate::{Message, Result, Service};
use ms2m_wire::state::ServiceState;

impl Service for ServiceState {
    fn handle(&mut self, msg: &Message<'_>) -> Result<Option<String>> {
        self.apply(msg.seq, msg.payload.as_bytes());
        Ok(None)
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        Ok(self.to_snapshot())
    }

    fn snapshot_into(&self, buf: Vec<u8>) -> Result<Vec<u8>> {
        Ok(self.to_snapshot_into(buf))
    }

    /// Only states worth a buffer kept mapped: below a MiB fresh memory costs little.
    fn snapshot_size_hint(&self) -> Option<usize> {
        (self.snapshot_len() >= 1 << 20).then(|| self.snapshot_len() + crate::TRAILER_LEN)
    }

    fn restore(&mut self, data: Vec<u8>) -> Result<()> {
        *self = ServiceState::from_snapshot_vec(data)?;
        Ok(())
    }

    fn digest(&self) -> Result<String> {
        Ok(ServiceState::digest(self))
    }
}
