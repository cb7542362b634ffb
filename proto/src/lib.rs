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

/// Adds `authorization: Bearer TOKEN` to every call of a client, when it has a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl Bearer {
    /// `None` sends no header (a coordinator without auth). A token that cannot be a header
    /// value (a control character, say) is an error here rather than a confusing refusal later.
    pub fn new(token: Option<&str>) -> Result<Bearer, ConvertError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| ConvertError { field: "token", reason: "holds characters a token cannot have".into() }),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// A client with its token.
pub type Authed = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;
