//! The one error type of the crate, and the HTTP status each kind of error answers with.

use axum::http::StatusCode;

/// Why the server did not start or stopped, and why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is not valid for this model; the message names the field, e.g.
    /// `inputs[0].shape: expected [N, 64], got [3, 65]`.
    #[error("{0}")]
    BadRequest(String),

    /// The request names a model this server does not serve.
    #[error("unknown model \"{asked}\": this server serves \"{served}\"")]
    UnknownModel { asked: String, served: String },

    /// The request names a version of the model this server does not serve.
    #[error("model \"{model}\" has no version \"{asked}\": this server serves version \"{served}\"")]
    UnknownVersion { model: String, asked: String, served: String },

    /// `max_queue` requests were already waiting for the model: refused at once, never queued.
    #[error("the queue is full ({0} requests waiting for the model): retry later")]
    QueueFull(usize),

    /// The model thread has stopped taking requests (the server is shutting down).
    #[error("the server is shutting down")]
    ShuttingDown,

    /// The model failed on a batch (its error, or its panic), or answered with the wrong number
    /// of values.
    #[error("model error: {0}")]
    Model(String),

    /// The model's metadata is not one the server can serve (one input, FP32 `[-1, F]` or
    /// BYTES `[-1]`; one output `probabilities`, FP32 `[-1, C]`).
    #[error("invalid model metadata: {0}")]
    Metadata(String),

    /// The batching settings cannot work (a batch or queue of 0).
    #[error("invalid batching settings: {0}")]
    Settings(String),

    /// The model's thread could not be started.
    #[error("cannot start the model thread")]
    Thread(#[source] std::io::Error),

    /// Serving HTTP on the listener failed.
    #[error("serving HTTP")]
    Http(#[source] std::io::Error),
}

impl ServeError {
    /// The HTTP status a request that ends in this error gets; the one place kinds map to codes.
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::UnknownModel { .. } | ServeError::UnknownVersion { .. } => StatusCode::NOT_FOUND,
            ServeError::QueueFull(_) | ServeError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Model(_)
            | ServeError::Metadata(_)
            | ServeError::Settings(_)
            | ServeError::Thread(_)
            | ServeError::Http(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_request_error_has_its_status() {
        assert_eq!(ServeError::BadRequest("x".into()).status(), 400);
        let unknown = ServeError::UnknownModel { asked: "a".into(), served: "b".into() };
        assert_eq!(unknown.status(), 404);
        assert_eq!(unknown.to_string(), "unknown model \"a\": this server serves \"b\"");
        assert_eq!(ServeError::QueueFull(3).status(), 503);
        assert_eq!(ServeError::Model("boom".into()).status(), 500);
    }
}
