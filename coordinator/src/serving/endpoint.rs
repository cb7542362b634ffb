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

/// Forwards to the replica with the fewest requests in flight. One that cannot be reached (it
/// just died, or was told to stop) is skipped for the next, and the routes are read again once
/// before giving up, so a replica replaced in the meantime costs no request. One whose answer
/// broke off after the request was sent is retried on one other replica only: a request that
/// kills replicas must not go round all of them.
async fn forward(c: &Coordinator, who: &Principal, name: &str, method: &str, tail: &str, body: Bytes) -> Response {
    if let Err(e) = authorize(who, Action::Infer) {
        return error(StatusCode::FORBIDDEN, e.to_string());
    }
    let Some(mut routes) = c.serving.model(name) else { return unknown(name) };
    // Names may hold spaces; nothing else they may hold needs escaping in a path.
    let escaped = name.replace(' ', "%20");
    let path = match tail {
        "" => format!("/v2/models/{escaped}"),
        tail => format!("/v2/models/{escaped}/{tail}"),
    };
    let (mut tried, mut broken, mut reread) = (Vec::new(), 0, false);
    let mut last = String::new();
    loop {
        let Some((route, _in_flight)) = c.serving.pick(&routes, &tried) else {
            match (reread, c.serving.model(name)) {
                (false, Some(fresh)) => {
                    reread = true;
                    routes = fresh;
                    continue;
                }
                _ => break,
            }
        };
        match c.serving.pool.send(&route.addr, method, &path, body.clone()).await {
            Ok(answer) => {
                let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let kind = answer.content_type.unwrap_or_else(|| "application/json".into());
                return (status, [(header::CONTENT_TYPE, kind)], answer.body).into_response();
            }
            Err(failure) => {
                let (e, sent) = match failure {
                    Failure::Unreachable(e) => (e, false),
                    Failure::Broken(e) => (e, true),
                };
                warn!(model = %name, replica = %route.job_id, error = %e, sent, "replica did not answer");
                last = e;
                tried.push(route.job_id);
                broken += usize::from(sent);
                if broken > 1 {
                    break;
                }
            }
        }
    }
    match tried.is_empty() {
        true => error(StatusCode::SERVICE_UNAVAILABLE, format!("model {name} has no ready replica")),
        false => error(StatusCode::BAD_GATEWAY, format!("no replica of model {name} answered (last: {last})")),
    }
}
