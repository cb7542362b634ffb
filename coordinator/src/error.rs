//! Everything the coordinator can fail with, in domain terms, and the one place where each
//! kind of failure becomes a gRPC status and an HTTP status ([`Code`]).

use axum::http::StatusCode;
use tonic::Status;

/// A source error of any backend (redb, etcd, object storage), kept with its chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No job has this id.
    #[error("job {0} not found")]
    JobNotFound(String),
    /// No agent has registered under this name.
    #[error("no node named {0} (see gantry nodes)")]
    NodeNotFound(String),
    /// The job exists but has no such checkpoint (`step` None: none at all yet).
    #[error("job {job} has no checkpoint {}", step.map_or("yet".to_string(), |s| format!("at step {s}")))]
    CheckpointNotFound { job: String, step: Option<u64> },
    #[error("no data set version {0} was pushed")]
    DatasetVersionNotFound(String),
    #[error("no data set `{0}` was pushed")]
    DatasetNotFound(String),
    /// Something a job that has not ended still needs; the words say what and which job.
    #[error("{0}")]
    InUse(String),
    /// A job spec the validation refused: the field and why.
    #[error("invalid job spec: {0}")]
    InvalidSpec(#[source] gantry_core::spec::SpecError),
    /// A request that names something wrongly or leaves something out; the words say what.
    #[error("{0}")]
    InvalidArgument(String),
    /// An agent opened a session before registering.
    #[error("agent {0} must register before opening a session")]
    NotRegistered(String),
    /// An agent speaking another protocol version.
    #[error(
        "agent speaks protocol version {agent}, this coordinator speaks {ours}: run the same gantry release on both"
    )]
    ProtocolMismatch { agent: u32, ours: u32 },
    /// A checkpoint or data set kept in object storage, on a coordinator started without it.
    #[error("{what} is in object storage ({location}), but this coordinator was started without --object-store")]
    NoObjectStore { what: String, location: String },
    /// Uploaded bytes that do not match their digest.
    #[error("data corrupted in transit: {0}")]
    DataLoss(String),
    /// Object storage failed or is out of reach, while doing `context`.
    #[error("file storage: {context}: {source}")]
    Storage { context: String, source: BoxError },
    /// The state store (redb or etcd) failed or is out of reach.
    #[error("store ({backend}): {source}")]
    Store { backend: &'static str, source: BoxError },
    /// A stored record that does not decode.
    #[error("store record is corrupt: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// No token, or one that is unknown, revoked or expired.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role does not allow this; the words say who and what.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A request over one of the coordinator's limits; the words name the limit.
    #[error("{0}")]
    LimitExceeded(String),
    /// Something with this name exists already (a token).
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A certificate or key that cannot be made, read or used; `context` says which.
    #[error("TLS: {context}: {reason}")]
    Tls { context: String, reason: String },
    /// Output (logs, a checkpoint) of an attempt the coordinator has moved on from.
    #[error("job {job}: attempt {attempt} is over ({why}); its output is refused")]
    StaleAttempt { job: String, attempt: u32, why: String },
    /// A write refused because this coordinator no longer holds leadership.
    #[error("not the leader: {0}")]
    Fenced(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an error is, for whoever asked: the only thing the gRPC and HTTP edges
/// look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The request is wrong: fix it and retry.
    InvalidArgument,
    /// The request carries no valid credentials.
    Unauthenticated,
    /// The caller may not do this.
    PermissionDenied,
    NotFound,
    /// The request is fine but the state does not allow it now.
    Conflict,
    /// Over a limit (size, count or rate): smaller, fewer or later.
    TooMany,
    /// Try again (later, or at another coordinator).
    Unavailable,
    DataLoss,
    Internal,
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn tls<E: std::fmt::Display>(context: impl Into<String>) -> impl FnOnce(E) -> Error {
        let context = context.into();
        move |e| Error::Tls { context, reason: e.to_string() }
    }

    pub fn store(backend: &'static str) -> impl FnOnce(BoxError) -> Error {
        move |source| Error::Store { backend, source }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::JobNotFound(_)
            | Error::NodeNotFound(_)
            | Error::CheckpointNotFound { .. }
            | Error::DatasetVersionNotFound(_)
            | Error::DatasetNotFound(_) => Code::NotFound,
            Error::InvalidSpec(_) | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::LimitExceeded(_) => Code::TooMany,
            Error::AlreadyExists(_)
            | Error::NotRegistered(_)
            | Error::ProtocolMismatch { .. }
            | Error::NoObjectStore { .. }
            | Error::StaleAttempt { .. }
            | Error::InUse(_) => Code::Conflict,
            Error::DataLoss(_) => Code::DataLoss,
            Error::Storage { .. } | Error::Store { .. } | Error::Fenced(_) => Code::Unavailable,
            Error::Codec(_) | Error::Io { .. } | Error::Tls { .. } => Code::Internal,
        }
    }
}

impl Code {
    pub fn grpc(self) -> tonic::Code {
        match self {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::NotFound => tonic::Code::NotFound,
            Code::Conflict => tonic::Code::FailedPrecondition,
            Code::TooMany => tonic::Code::ResourceExhausted,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::DataLoss => tonic::Code::DataLoss,
            Code::Internal => tonic::Code::Internal,
        }
    }

    pub fn http(self) -> StatusCode {
        match self {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Conflict => StatusCode::CONFLICT,
            Code::TooMany => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            // The bytes were refused: nothing the client can retry differently is known.
            Code::DataLoss | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Logs what the caller cannot fix, once, where the error leaves the coordinator.
fn log(e: &Error) {
    match e.code() {
        Code::Unavailable => tracing::warn!(error = %e, "unavailable"),
        Code::Internal | Code::DataLoss => tracing::error!(error = %e, "internal error"),
        _ => {}
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        log(&e);
        Status::new(e.code().grpc(), e.to_string())
    }
}

impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        log(&self);
        (self.code().http(), format!("{self}\n")).into_response()
    }
}

/// redb splits its errors by operation; they all become one store error here.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store { backend: "embedded", source: Box::new(redb::Error::from(e)) }
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_error_has_one_grpc_and_one_http_status() {
        let table = [
            (Code::InvalidArgument, tonic::Code::InvalidArgument, 400),
            (Code::Unauthenticated, tonic::Code::Unauthenticated, 401),
            (Code::PermissionDenied, tonic::Code::PermissionDenied, 403),
            (Code::NotFound, tonic::Code::NotFound, 404),
            (Code::Conflict, tonic::Code::FailedPrecondition, 409),
            (Code::TooMany, tonic::Code::ResourceExhausted, 429),
            (Code::Unavailable, tonic::Code::Unavailable, 503),
            (Code::DataLoss, tonic::Code::DataLoss, 500),
            (Code::Internal, tonic::Code::Internal, 500),
        ];
        for (code, grpc, http) in table {
            assert_eq!((code.grpc(), code.http().as_u16()), (grpc, http), "{code:?}");
        }
    }

    #[test]
    fn domain_errors_map_to_what_they_mean() {
        let spec_error = gantry_core::JobSpec::from_yaml("name: x\n").unwrap_err();
        let cases = [
            (Error::JobNotFound("4".into()), 404),
            (Error::NodeNotFound("a".into()), 404),
            (Error::CheckpointNotFound { job: "4".into(), step: Some(10) }, 404),
            (Error::InvalidSpec(spec_error), 400),
            (Error::NotRegistered("a".into()), 409),
            (Error::Unauthenticated("no token".into()), 401),
            (Error::PermissionDenied("alice may not drain".into()), 403),
            (Error::AlreadyExists("token ci".into()), 409),
            (Error::LimitExceeded("alice has 10000 queued jobs".into()), 429),
            (Error::Fenced("b leads".into()), 503),
            (Error::store("etcd")("connection refused".into()), 503),
            (Error::Io { context: "reading".into(), source: std::io::Error::other("disk") }, 500),
        ];
        for (e, http) in cases {
            assert_eq!(e.code().http().as_u16(), http, "{e}");
        }
    }
}
