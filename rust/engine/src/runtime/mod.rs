//! Where the broker and the service instances run. The docker runtime is the one implemented;
//! a local-process runtime and an external broker are planned beside it (DESIGN.md).

mod api_shim;
pub mod docker;
