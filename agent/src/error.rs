/// What the agent can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("coordinator: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("cannot reach the coordinator: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Retrying cannot help (e.g. a protocol mismatch): the agent stops.
    #[error("{0}")]
    Fatal(String),
    #[error("checkpoint {0}")]
    Checkpoint(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
