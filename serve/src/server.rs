//! The HTTP side: the Open Inference Protocol's routes over one model, and `/metrics`.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::batcher::{Batcher, Settings};
use crate::error::ServeError;
use crate::model::Model;
use crate::protocol::{
    self, BYTES, CONTINUATION, ErrorBody, FP32, InferRequest, InferResponse, ModelMetadata, OutputData, OutputTensor,
    PLATFORM, ServerMetadata, Signature,
};
use crate::stats::Stats;

/// Request bodies up to this size: about 25,000 rows of 64 numbers.
const MAX_BODY: usize = 16 << 20;

/// What the server serves the model as, and how it batches.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model's name in the URLs.
    pub name: String,
    /// The one version served (the checkpoint's step).
    pub version: String,
    pub batching: Settings,
    /// The server's counters; keep a clone to read them while it serves.
    pub stats: Arc<Stats>,
}

impl ServeConfig {
    /// With fresh counters.
    pub fn new(name: &str, version: &str, batching: Settings) -> ServeConfig {
        ServeConfig { name: name.into(), version: version.into(), batching, stats: Arc::new(Stats::new(name)) }
    }
}

struct AppState {
    name: String,
    version: String,
    metadata: ModelMetadata,
    signature: Signature,
    batcher: Batcher,
    stats: Arc<Stats>,
}

/// Serves `model` on `listener` until `shutdown` resolves; then stops accepting, answers the
/// requests under way, lets the model finish what it was given, and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Box<dyn Model>,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let mut metadata = model.metadata();
    metadata.name = config.name.clone();
    metadata.versions = vec![config.version.clone()];
    metadata.platform = PLATFORM.into();
    let signature = Signature::of(&metadata)?;
    let (batcher, thread) = Batcher::start(model, signature.classes, config.batching, config.stats.clone())?;
    let state = Arc::new(AppState {
        name: config.name,
        version: config.version,
        metadata,
        signature,
        batcher,
        stats: config.stats,
    });
    // Answers go out at once, not held back by Nagle's algorithm waiting for an ACK.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let served = axum::serve(listener, router(state.clone())).with_graceful_shutdown(shutdown).await;
    state.batcher.close();
    // The thread ends once it has answered what it was sent.
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    served.map_err(ServeError::Http)
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(|| async { StatusCode::OK }))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata_version))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(model_ready_version))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_version))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        (self.status(), Json(ErrorBody { error: self.to_string() })).into_response()
    }
}

impl AppState {
    /// Refuses a model name (and version) this server does not serve.
    fn check(&self, name: &str, version: Option<&str>) -> Result<(), ServeError> {
        if name != self.name {
            return Err(ServeError::UnknownModel { asked: name.into(), served: self.name.clone() });
        }
        match version {
            Some(v) if v != self.version => Err(ServeError::UnknownVersion {
                model: self.name.clone(),
                asked: v.into(),
                served: self.version.clone(),
            }),
            _ => Ok(()),
        }
    }
}

async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata { name: "gantry".into(), version: env!("CARGO_PKG_VERSION").into(), extensions: Vec::new() })
}

async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, ServeError> {
    state.check(&name, None)?;
    Ok(Json(state.metadata.clone()))
}

async fn model_metadata_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, ServeError> {
    state.check(&name, Some(&version))?;
    Ok(Json(state.metadata.clone()))
}

/// Loaded before the server started: ready whenever it answers.
async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Result<StatusCode, ServeError> {
    state.check(&name, None)?;
    Ok(StatusCode::OK)
}

async fn model_ready_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ServeError> {
    state.check(&name, Some(&version))?;
    Ok(StatusCode::OK)
}

async fn infer(State(state): State<Arc<AppState>>, Path(name): Path<String>, body: Bytes) -> Response {
    timed(&state, infer_body(&state, &name, None, &body)).await
}

async fn infer_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    timed(&state, infer_body(&state, &name, Some(&version), &body)).await
}

/// Answers an inference and counts it, by status, with its latency.
async fn timed(state: &AppState, answer: impl Future<Output = Result<InferResponse, ServeError>>) -> Response {
    let started = Instant::now();
    let response = match answer.await {
        Ok(body) => Json(body).into_response(),
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(model = %state.name, error = %e, "inference failed");
            }
            e.into_response()
        }
    };
    state.stats.record_request(response.status().as_u16(), started.elapsed());
    response
}

async fn infer_body(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    body: &[u8],
) -> Result<InferResponse, ServeError> {
    state.check(name, version)?;
    let request = parse(body)?;
    let checked = protocol::validate(&request, &state.signature)?;
    let rows = checked.input.rows();
    let output = state.batcher.infer(checked.input, checked.generate).await?;
    let mut outputs = Vec::new();
    if checked.probabilities {
        outputs.push(OutputTensor {
            name: state.signature.output_name.clone(),
            shape: vec![rows as i64, state.signature.classes as i64],
            datatype: FP32.into(),
            data: OutputData::Fp32(output.probabilities),
        });
    }
    if let (true, Some(text)) = (checked.continuation, output.continuation) {
        outputs.push(OutputTensor {
            name: CONTINUATION.into(),
            shape: vec![text.len() as i64],
            datatype: BYTES.into(),
            data: OutputData::Bytes(text),
        });
    }
    Ok(InferResponse {
        model_name: state.name.clone(),
        model_version: Some(state.version.clone()),
        id: request.id,
        outputs,
    })
}

/// The body as an inference request; an error names where in it it went wrong.
fn parse(body: &[u8]) -> Result<InferRequest, ServeError> {
    // Tracking the path costs on every number of a good request: only a bad one is parsed
    // again to say where it went wrong.
    if let Ok(request) = serde_json::from_slice(body) {
        return Ok(request);
    }
    let mut json = serde_json::Deserializer::from_slice(body);
    let request = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match path.as_str() {
            // The root, or no place at all (the JSON itself is broken).
            "." | "?" => ServeError::BadRequest(format!("request body: {inner}")),
            _ => ServeError::BadRequest(format!("{path}: {inner}")),
        }
    })?;
    json.end().map_err(|e| ServeError::BadRequest(format!("request body: {e}")))?;
    Ok(request)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.stats.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_body_names_the_field() {
        let err = parse(br#"{"inputs": [{"name": "x", "shape": ["a"], "datatype": "FP32", "data": []}]}"#).unwrap_err();
        assert!(err.to_string().starts_with("inputs[0].shape[0]: invalid type: string \"a\""), "{err}");
        let err = parse(b"{").unwrap_err();
        assert!(err.to_string().starts_with("request body: EOF"), "{err}");
        let err = parse(b"{}").unwrap_err();
        assert!(err.to_string().starts_with("request body: missing field `inputs`"), "{err}");
        let err = parse(br#"{"inputs": []} x"#).unwrap_err();
        assert!(err.to_string().starts_with("request body: trailing characters"), "{err}");
    }
}
