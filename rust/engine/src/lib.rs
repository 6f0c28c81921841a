//! ms2m engine: live migration of stateful, message-driven microservices, measured at the
//! message level.
//!
//! Start at [`testbed::Testbed`]: it starts a broker ([`runtime`]), deploys the reference
//! service, drives an open-loop [`workload`], runs a migration [`strategies`] phase by phase,
//! and turns the recorded [`history`] into a [`report::Report`] through the [`metrics`] and
//! the [`checker`]. The wire contract with instances lives in the `ms2m-wire` crate.

pub mod amqp_url;
pub mod broker;
pub mod checker;
pub mod config;
pub mod error;
pub mod export;
pub mod history;
pub mod journal;
pub mod metrics;
pub mod net;
pub mod recorder;
pub mod report;
pub mod runtime;
pub mod stats;
pub mod strategies;
pub mod testbed;
pub mod workload;

pub use config::{ServiceSpec, TestbedConfig};
pub use error::{Error, Result};
pub use report::Report;
pub use strategies::{MigrationOptions, PhaseName, Strategy};
pub use testbed::{ServiceInfo, Testbed};
pub use workload::WorkloadSpec;
