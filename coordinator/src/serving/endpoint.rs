//! The coordinator's Open Inference Protocol endpoint (KServe v2, JSON over HTTP):
//! `/v2/models/NAME/infer`, `/v2/models/NAME/ready` and `/v2/models/NAME`, each forwarded to
//! a ready replica of the serve job named NAME. Errors are the protocol's `{"error": "..."}`.

use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::warn;

use super::proxy::Failure;
use crate::auth::{Action, Principal, authorize};
use crate::control::Coordinator;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message.into() }))).into_response()
}

pub async fn infer(
    State(c): State<Arc<Coordinator>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let began = Instant::now();
    let response = forward(&c, &who, &name, "POST", "infer", body).await;
    if c.serving.model(&name).is_some() {
        c.serving.stats.record(&name, response.status().as_u16(), began.elapsed().as_secs_f64());
    }
    response
}

pub async fn metadata(
    State(c): State<Arc<Coordinator>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    forward(&c, &who, &name, "GET", "", Bytes::new()).await
}

/// 200 when at least one replica answers; 503 while none does.
pub async fn ready(
    State(c): State<Arc<Coordinator>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    if let Err(e) = authorize(&who, Action::Infer) {
        return error(StatusCode::FORBIDDEN, e.to_string());
    }
    match c.serving.model(&name) {
        None => unknown(&name),
        Some(m) if m.replicas.is_empty() => {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("model {name} has no ready replica"))
        }
        Some(m) => {
            axum::Json(serde_json::json!({ "name": name, "ready": true, "replicas": m.replicas.len() })).into_response()
        }
    }
}

fn unknown(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("unknown model `{name}`: no serve job of that name is running (`gantry endpoints` lists them)"),
    )
}

/// Forwards to the replica with the fewest requests in flight; one that cannot be reached is
/// skipped for the next, so a replica that just died costs no request.
async fn forward(c: &Coordinator, who: &Principal, name: &str, method: &str, tail: &str, body: Bytes) -> Response {
    if let Err(e) = authorize(who, Action::Infer) {
        return error(StatusCode::FORBIDDEN, e.to_string());
    }
    let Some(routes) = c.serving.model(name) else { return unknown(name) };
    let path = match tail {
        "" => format!("/v2/models/{name}"),
        tail => format!("/v2/models/{name}/{tail}"),
    };
    let mut tried = Vec::new();
    let mut last = String::new();
    while let Some((route, _in_flight)) = c.serving.pick(&routes, &tried) {
        match c.serving.pool.send(&route.addr, method, &path, body.clone()).await {
            Ok(answer) => {
                let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let kind = answer.content_type.unwrap_or_else(|| "application/json".into());
                return (status, [(header::CONTENT_TYPE, kind)], answer.body).into_response();
            }
            Err(Failure::Unreachable(e) | Failure::Broken(e)) => {
                warn!(model = %name, replica = %route.job_id, error = %e, "replica did not answer: trying another");
                last = e;
                tried.push(route.job_id);
            }
        }
    }
    match tried.is_empty() {
        true => error(StatusCode::SERVICE_UNAVAILABLE, format!("model {name} has no ready replica")),
        false => error(StatusCode::BAD_GATEWAY, format!("no replica of model {name} answered (last: {last})")),
    }
}
