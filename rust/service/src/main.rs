//! `ms2m-service`: the reference stateful, message-driven microservice.
//!
//! One process is one instance. Its state is [`ms2m_wire::state::ServiceState`]: a hash chain
//! over the messages applied and a buffer of `--state-bytes` that each message mutates, a pure
//! function the checker folds the confirmed log through. It spends `--processing-ms` on every
//! message. All the rest (queues, commands, checkpoints, replay) is the `ms2m_service` library,
//! whose first user it is; the whole contract is in `rust/wire/README.md`.

use ms2m_wire::state::ServiceState;

fn main() {
    ms2m_service::main(|config| ServiceState::new(config.state_bytes))
}
