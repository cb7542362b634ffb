//! gantry's model server: serves a trained model over the Open Inference Protocol (KServe v2,
//! HTTP/JSON), batching requests from many clients into one forward pass on the CPU.
//!
//! - [`protocol`]: the protocol's request and response bodies, and the check of a request
//!   against the model's metadata.
//! - [`Model`]: what the server runs (the CLI implements it over the training runtime).
//! - [`batcher`]: dynamic batching on the one thread that owns the model, and admission.
//! - [`stats`]: the counters behind `/metrics` and the replica's metrics file.
//! - [`serve`]: the HTTP routes, until a shutdown signal.
//!
//! ```text
//! GET  /v2/health/live | /v2/health/ready          200
//! GET  /v2                                          server metadata
//! GET  /v2/models/{name}[/versions/{v}]             model metadata (404 for another name)
//! GET  /v2/models/{name}[/versions/{v}]/ready       200
//! POST /v2/models/{name}[/versions/{v}]/infer       400 bad request, 404, 503 queue full, 500 model error
//! GET  /metrics                                     Prometheus text
//! ```
//!
//! Every error answers `{"error": "..."}`.

pub mod batcher;
mod error;
mod model;
pub mod protocol;
mod server;
pub mod stats;

pub use batcher::{Output, Settings};
pub use error::ServeError;
pub use model::{Input, Model};
pub use protocol::{InferRequest, InferResponse, ModelMetadata, TensorMetadata};
pub use server::{ServeConfig, serve};
pub use stats::{Stats, StatsSnapshot};
