use tonic::Status;

/// Everything the coordinator can fail with. Mapped to gRPC status codes in one place, below.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {0}")]
    Store(#[from] redb::Error),
    #[error("store record is corrupt: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    NotFound(String),
    #[error("data corrupted in transit: {0}")]
    DataLoss(String),
    #[error("checkpoint storage: {context}: {reason}")]
    Storage { context: String, reason: String },
    #[error("etcd: {0}")]
    Etcd(String),
    /// A write refused because this coordinator no longer holds leadership.
    #[error("not the leader: {0}")]
    Fenced(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// redb splits its errors by operation; they all become one store error here.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.into())
            }
        }
    )*};
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match &e {
            Error::JobNotFound(_) | Error::NotFound(_) => Status::not_found(e.to_string()),
            Error::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            Error::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
            Error::DataLoss(_) => Status::data_loss(e.to_string()),
            Error::Etcd(_) | Error::Fenced(_) => Status::unavailable(e.to_string()),
            // Object storage out of reach: agents retry their uploads.
            Error::Storage { .. } => {
                tracing::warn!(error = %e, "checkpoint storage failed");
                Status::unavailable(e.to_string())
            }
            Error::Store(_) | Error::Codec(_) | Error::Io { .. } => {
                tracing::error!(error = %e, "internal error");
                Status::internal(e.to_string())
            }
        }
    }
}
