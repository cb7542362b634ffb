//! The coordinator's HTTP side: `/healthz` for probes and `/metrics` in Prometheus text format.

use std::fmt::Write;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::control::Coordinator;
use crate::records::JobState;

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/metrics", get(metrics)).with_state(coordinator)
}

async fn healthz(State(c): State<Arc<Coordinator>>) -> (StatusCode, &'static str) {
    // Healthy means the store answers.
    match c.store.jobs() {
        Ok(_) => (StatusCode::OK, "ok\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
    }
}

async fn metrics(State(c): State<Arc<Coordinator>>) -> (StatusCode, String) {
    let jobs = match c.store.jobs() {
        Ok(jobs) => jobs,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {e}\n")),
    };
    let mut out = String::new();
    out.push_str("# HELP gantry_jobs Jobs by state.\n# TYPE gantry_jobs gauge\n");
    for (state, name) in [
        (JobState::Queued, "queued"),
        (JobState::Running, "running"),
        (JobState::Succeeded, "succeeded"),
        (JobState::Failed, "failed"),
        (JobState::Cancelled, "cancelled"),
    ] {
        let n = jobs.iter().filter(|j| j.state == state).count();
        let _ = writeln!(out, "gantry_jobs{{state=\"{name}\"}} {n}");
    }
    let nodes = c.nodes();
    out.push_str("# HELP gantry_agents_connected Agents with an open session.\n# TYPE gantry_agents_connected gauge\n");
    let _ = writeln!(out, "gantry_agents_connected {}", nodes.iter().filter(|n| n.1).count());
    out.push_str("# HELP gantry_gpus GPUs reported by agents.\n# TYPE gantry_gpus gauge\n");
    let _ = writeln!(out, "gantry_gpus {}", nodes.iter().map(|n| n.2.gpus.len()).sum::<usize>());
    (StatusCode::OK, out)
}
