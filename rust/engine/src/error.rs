//! The engine's error type. Each kind maps to its own Python exception class.

/// What went wrong, with what to do about it in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration was refused before anything started.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The runtime (Docker daemon, images) cannot be used on this machine.
    #[error("runtime unavailable: {0}")]
    RuntimeUnavailable(String),
    /// The broker refused or dropped an operation.
    #[error("broker: {context}: {source}")]
    Broker {
        context: String,
        #[source]
        source: lapin::Error,
    },
    /// The broker refused an operation (a negative confirm, a queue that does not exist).
    #[error("broker refused: {0}")]
    BrokerRefused(String),
    /// A container operation failed.
    #[error("docker: {0}")]
    Docker(String),
    /// A migration could not complete; it was rolled back and the source kept serving where
    /// it could. `report` is the checked report of the aborted run, when the engine could
    /// still make one.
    #[error("migration failed in phase {phase}: {reason}")]
    MigrationFailed {
        phase: String,
        reason: String,
        report: Option<Box<crate::report::Report>>,
    },
    /// An instance did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config(_))
    }

    pub fn is_runtime_unavailable(&self) -> bool {
        matches!(self, Error::RuntimeUnavailable(_))
    }

    pub fn is_migration_failed(&self) -> bool {
        matches!(self, Error::MigrationFailed { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a description to broker errors.
pub(crate) trait BrokerContext<T> {
    fn broker(self, context: impl Into<String>) -> Result<T>;
}

impl<T> BrokerContext<T> for std::result::Result<T, lapin::Error> {
    fn broker(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Broker {
            context: context.into(),
            source,
        })
    }
}
