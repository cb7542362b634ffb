//! gantry's gRPC protocol: the generated messages and services, the protocol version, and the
//! conversions between wire messages and the core's domain types. Conversions from the wire are
//! `TryFrom` and refuse a missing field with a clear error rather than guessing.

#[allow(clippy::large_enum_variant, clippy::doc_lazy_continuation)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

mod convert;

pub use convert::{ConvertError, job_state_name, parse_job_state};

/// Agents and coordinators speak the same protocol only when these match; a mismatch is refused
/// at registration.
pub const PROTOCOL_VERSION: u32 = 1;
