//! Broker names of one service. Every name derives from the service name so that a testbed can
//! host several services on one broker and a leftover can be traced to its owner.

/// Fanout exchange producers publish to.
pub fn input_exchange(service: &str) -> String {
    format!("{service}.in")
}

/// Queue the live instance consumes; bound to the input exchange.
pub fn primary_queue(service: &str) -> String {
    format!("{service}.primary")
}

/// Queue where instances put the input they refuse (see [`crate::Refused`]), each message as
/// it came with its reason in headers; the testbed counts it in every report.
pub fn dead_letter_queue(service: &str) -> String {
    format!("{service}.dead")
}

/// Fanout exchange instances publish their output events to.
pub fn output_exchange(service: &str) -> String {
    format!("{service}.out")
}

/// Queue the testbed's recorder consumes; bound to the output exchange.
pub fn events_queue(service: &str) -> String {
    format!("{service}.events")
}

/// Control queue of one instance.
pub fn control_queue(service: &str, instance: &str) -> String {
    format!("{service}.ctl.{instance}")
}

/// Queue that keeps a copy of the input stream for the target of migration `migration_id`.
pub fn replay_queue(service: &str, migration_id: &str) -> String {
    format!("{service}.replay.{migration_id}")
}

/// The queue a twin instance replays the confirmed log from (the state check of a service
/// without a reference model).
pub fn twin_queue(service: &str) -> String {
    format!("{service}.twin")
}

/// The twin's instance name: never one of the service's numbered instances.
pub fn twin_instance(service: &str) -> String {
    format!("{service}-twin")
}

/// Queue a source streams the checkpoint of migration `migration_id` to, chunk by chunk, for
/// the target to fetch.
pub fn checkpoint_queue(service: &str, migration_id: &str) -> String {
    format!("{service}.ckpt.{migration_id}")
}
