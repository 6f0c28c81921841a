//! The engine's error type. Each kind maps to its own Python exception class (see the
//! `ms2m-py` crate). This module depends on no other module of the engine: an aborted
//! migration's report travels beside its error ([`crate::testbed::MigrationError`]), not in it.

/// What went wrong, with what to do about it in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration was refused before anything started.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The runtime (Docker daemon, images, rabbitmq-server) cannot be used on this machine.
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
    #[error("docker: {context}: {source}")]
    Docker {
        context: String,
        #[source]
        source: DockerCause,
    },
    /// An instance of a service exited before it was ready, or was not ready in time: the
    /// service's own failure (its log is quoted), not the runtime's.
    #[error("{0}")]
    NotReady(String),
    /// An instance answered a command with an error.
    #[error("{instance} refused {command}: {reason}")]
    Instance {
        instance: String,
        /// The command's wire name.
        command: &'static str,
        reason: String,
    },
    /// A migration could not complete; it was rolled back and the source kept serving where
    /// it could.
    #[error("migration failed{}: {reason}", in_phase(*.phase))]
    MigrationFailed {
        /// The report name of the phase in progress (None: none had begun).
        phase: Option<&'static str>,
        reason: String,
    },
    /// An instance or the broker did not answer in time.
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

/// The typed cause of a [`Error::Docker`]: testcontainers' error, or the Docker API's when the
/// engine talks to the daemon directly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DockerCause {
    #[error(transparent)]
    Testcontainers(#[from] testcontainers::TestcontainersError),
    #[error(transparent)]
    Api(#[from] testcontainers::bollard::errors::Error),
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

    /// A Docker error with what was being done.
    pub(crate) fn docker(context: impl Into<String>, source: impl Into<DockerCause>) -> Error {
        Error::Docker {
            context: context.into(),
            source: source.into(),
        }
    }
}

fn in_phase(phase: Option<&str>) -> String {
    phase.map(|p| format!(" in phase {p}")).unwrap_or_default()
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
