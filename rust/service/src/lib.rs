//! Write a stateful, message-driven service that ms2m can migrate.
//!
//! A service is three methods ([`Service`]): apply one message, take a snapshot of the state,
//! restore one. Everything else the wire contract (`rust/wire/README.md`) asks of an instance
//! is this library's: consuming the primary queue, acking only after the output event is
//! confirmed, barrier checkpoints streamed in chunks (through the broker or directly to the
//! target), fetching and restoring them, replaying with no side effects and skipping what a
//! restored state already holds, and every control command. The reference service
//! (`ms2m-service`) is this library's first user; the Python SDK (`ms2m.service`) runs Python
//! classes on it.
//!
//! ```no_run
//! use ms2m_service::{Message, Service};
//!
//! #[derive(Default)]
//! struct Counter(u64);
//!
//! impl Service for Counter {
//!     fn handle(&mut self, msg: &Message<'_>) -> ms2m_service::Result<Option<String>> {
//!         self.0 += msg.payload.len() as u64;
//!         Ok(Some(self.0.to_string()))
//!     }
//!     fn snapshot(&self) -> ms2m_service::Result<Vec<u8>> {
//!         Ok(self.0.to_le_bytes().to_vec())
//!     }
//!     fn restore(&mut self, data: Vec<u8>) -> ms2m_service::Result<()> {
//!         self.0 = u64::from_le_bytes(data.as_slice().try_into()?);
//!         Ok(())
//!     }
//! }
//!
//! fn main() {
//!     ms2m_service::main(|_config| Counter::default())
//! }
//! ```
//!
//! The process takes its parameters from the environment the testbed sets (`MS2M_AMQP_URL`,
//! `MS2M_SERVICE`, `MS2M_INSTANCE`, `MS2M_LIVE`, `MS2M_PROCESSING_MS`, `MS2M_STATE_BYTES`,
//! `MS2M_PREFETCH`) or from the matching flags ([`Config::from_args`]).

mod config;
mod instance;
mod ledger;
mod machine;
mod pipeline;
mod reference;

pub use config::Config;
pub use ledger::TRAILER_LEN;
pub use ms2m_wire::Mode;

use sha2::{Digest, Sha256};

/// What a service's method may fail with: any error, reported with its message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// The result of a service's method.
pub type Result<T> = std::result::Result<T, Error>;

/// One input message, as [`Service::handle`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Its position in the stream: one more than the previous message's.
    pub seq: u64,
    /// The producer's payload.
    pub payload: &'a str,
    /// `Live`, or `Replay` when a migration target catches up: the output is then dropped, and
    /// a service with effects of its own (a database write, a call) must not repeat them.
    pub mode: Mode,
}

/// A migratable service: its state and the three things ms2m does with it.
///
/// The state must be a function of the messages applied, in order, and of nothing else (no
/// clock, no randomness that is not seeded from the messages): a migration's target replays
/// messages onto a restored snapshot and must end where the source would have.
pub trait Service {
    /// Applies one message; the output, if any, goes into its output event (`output`). An
    /// error ends the instance as a crash would: the message is not acked and goes back to the
    /// queue.
    fn handle(&mut self, msg: &Message<'_>) -> Result<Option<String>>;

    /// The whole state as bytes. Taken between two messages; the instance serves on while the
    /// bytes travel. An error fails the checkpoint (the migration rolls back).
    fn snapshot(&self) -> Result<Vec<u8>>;

    /// [`Service::snapshot`] written into `buf`, an empty buffer the library keeps mapped for
    /// the next checkpoint when [`Service::snapshot_size_hint`] says how big one is. A state of
    /// hundreds of MiB is then copied into memory ready for it, not into fresh pages the kernel
    /// must find and zero while the source stands still at the barrier (256 MiB: 84 to 594 ms
    /// into fresh memory here, depending on how fragmented it was). By default `buf` is
    /// dropped and `snapshot` called.
    fn snapshot_into(&self, buf: Vec<u8>) -> Result<Vec<u8>> {
        drop(buf);
        self.snapshot()
    }

    /// About how many bytes a snapshot takes, for a service that implements
    /// [`Service::snapshot_into`]: the library then keeps a buffer that big mapped, filled in
    /// the background at the lowest CPU priority. `None` (the default): no buffer is kept.
    fn snapshot_size_hint(&self) -> Option<usize> {
        None
    }

    /// Replaces the state with a snapshot's. On an error the state must be as it was.
    fn restore(&mut self, data: Vec<u8>) -> Result<()>;

    /// What the twin check compares: two instances that applied the same messages must give
    /// the same digest. By default the SHA-256 of the snapshot (hex); define it when the
    /// snapshot's bytes may differ for equal states (a hash map's iteration order).
    fn digest(&self) -> Result<String> {
        Ok(ms2m_wire::hex(&Sha256::digest(self.snapshot()?)))
    }
}

/// Runs one instance of `service` with `config` until a `shutdown` command, SIGTERM, a broker
/// failure or a failed [`Service::handle`]. Blocks: the instance has a runtime of its own, on
/// this thread, which also spends the processing times.
pub fn run<S: Service>(config: Config, service: S) -> anyhow::Result<()> {
    instance::precise_sleep();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(instance::run(config, service))
}

/// A service binary's `main`: reads the configuration from flags and the environment, builds
/// the service from it and runs it. Exits with 2 on a bad configuration, 1 on a failure.
pub fn main<S: Service>(make: impl FnOnce(&Config) -> S) -> ! {
    let name = std::env::args().next().unwrap_or_else(|| "service".into());
    let config = match Config::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::exit(2);
        }
    };
    let service = make(&config);
    match run(config, service) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::exit(1);
        }
    }
}
