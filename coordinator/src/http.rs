//! The coordinator's HTTP side: `/healthz` for probes, `/metrics` in Prometheus text format, and
//! the web page (`/`) with the JSON it polls (`/api/...`).

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Router};

use crate::auth::{Action, Principal, authorize};
use crate::control::Coordinator;
use crate::records::JobState;
use crate::service::Reasons;

pub fn router(coordinator: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/fleet", get(api_fleet))
        .route("/api/jobs", get(api_jobs))
        .route("/api/endpoints", get(api_endpoints))
        .route("/api/jobs/{id}/logs", get(api_logs))
        .route("/api/jobs/{id}/metrics", get(api_metrics))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v2/models/{name}", get(crate::serving::endpoint::metadata))
        .route("/v2/models/{name}/ready", get(crate::serving::endpoint::ready))
        .route(
            "/v2/models/{name}/infer",
            // As large a request as a replica takes.
            post(crate::serving::endpoint::infer).layer(axum::extract::DefaultBodyLimit::max(16 << 20)),
        )
        .route("/login", get(crate::auth::http::login_form).post(crate::auth::http::login))
        .route("/logout", post(crate::auth::http::logout))
        .layer(axum::middleware::from_fn_with_state(coordinator.clone(), crate::auth::http::require_token))
        .with_state(coordinator)
}

/// The caller, if it may see the fleet.
fn sees_fleet(who: &Principal) -> Result<(), crate::Error> {
    authorize(who, Action::SeeFleet)
}

/// Job `id`, if the caller may read it.
fn readable(c: &Coordinator, who: &Principal, id: &str) -> Result<(), crate::Error> {
    let job = c.store.job(id)?;
    authorize(who, Action::ReadJob { owner: &job.owner })
}

const PAGE: &str = include_str!("web/index.html");

async fn page(Extension(who): Extension<Principal>) -> Result<axum::response::Html<&'static str>, crate::Error> {
    sees_fleet(&who)?;
    Ok(axum::response::Html(PAGE))
}

/// Errors answer with the status [`crate::Code::http`] gives their kind.
type ApiResult = Result<axum::Json<serde_json::Value>, crate::Error>;

async fn api_fleet(State(c): State<Arc<Coordinator>>, Extension(who): Extension<Principal>) -> ApiResult {
    sees_fleet(&who)?;
    let gpus = c.gpus()?;
    let usage = c.usage_by_node()?;
    let nodes: Vec<serde_json::Value> = c
        .nodes()
        .into_iter()
        .map(|n| {
            let here = usage.get(&n.name).cloned().unwrap_or_default();
            serde_json::json!({
                "name": n.name, "connected": n.connected, "drained": c.drained(&n.name), "cpus": n.inventory.cpus,
                "cpus_used": here.cpus_used, "gpus": n.inventory.gpus.len(), "jobs": here.jobs,
            })
        })
        .collect();
    let gpus: Vec<serde_json::Value> = gpus
        .into_iter()
        .map(|(node, g, job)| {
            serde_json::json!({
                "node": node, "index": g.index, "uuid": g.uuid, "name": g.name,
                "memory_total_bytes": g.memory_total_bytes, "memory_used_bytes": g.memory_used_bytes,
                "utilization_percent": g.utilization_percent, "temperature_c": g.temperature_c,
                "power_mw": g.power_mw, "healthy": g.healthy, "health_reason": g.health_reason, "job_id": job,
                "numa_node": g.numa_node, "nvlink_peers": g.nvlink_peers, "xid_errors": g.xid_errors,
                "mig_instances": g.mig_instances.len(),
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "nodes": nodes, "gpus": gpus })))
}

/// Jobs in the order `gantry jobs` shows them.
async fn api_jobs(State(c): State<Arc<Coordinator>>, Extension(who): Extension<Principal>) -> ApiResult {
    sees_fleet(&who)?;
    let jobs = c.listed_jobs()?;
    let out: Vec<serde_json::Value> = jobs
        .iter()
        .map(|(j, w)| {
            let queued = j.state == JobState::Queued;
            let reasons = Reasons::of(j, w.as_ref());
            serde_json::json!({
                "id": j.id, "name": j.spec.name, "owner": j.owner, "state": crate::service::state_name(j.state),
                "attempt": j.user_attempt(), "queue": j.spec.queue, "priority": j.spec.priority,
                "queue_position": w.as_ref().filter(|_| queued).map(|w| w.position),
                "pending_reason": reasons.pending.as_ref().map(|p| &p.1),
                "pending_code": reasons.pending.as_ref().map(|p| p.0),
                "stop_reason": reasons.stopping.as_ref().map(|s| &s.1),
                "stop_code": reasons.stopping.as_ref().map(|s| s.0),
                "message": j.message,
            })
        })
        .collect();
    Ok(axum::Json(serde_json::Value::Array(out)))
}

/// Served models with their ready replicas, requests so far, errors and p99 latency (the
/// upper bound of the histogram bucket it falls in; "+Inf" past the last).
async fn api_endpoints(State(c): State<Arc<Coordinator>>, Extension(who): Extension<Principal>) -> ApiResult {
    sees_fleet(&who)?;
    let stats: std::collections::HashMap<String, crate::serving::ModelStats> =
        c.serving.stats.snapshot().into_iter().collect();
    let out: Vec<serde_json::Value> = c
        .endpoints()?
        .into_iter()
        .map(|e| {
            let s = stats.get(&e.model).cloned().unwrap_or_default();
            let errors: u64 = s.codes.iter().filter(|(code, _)| **code >= 500).map(|(_, n)| n).sum();
            let p99 =
                s.quantile(0.99).map(|q| if q.is_finite() { serde_json::json!(q) } else { serde_json::json!("+Inf") });
            serde_json::json!({
                "model": e.model, "job_id": e.job_id, "from": e.from, "replicas_wanted": e.replicas_wanted,
                "ready": e.replicas.iter().filter(|r| r.state == "ready").count(),
                "requests": s.requests(), "errors": errors, "p99_seconds": p99,
            })
        })
        .collect();
    Ok(axum::Json(serde_json::Value::Array(out)))
}

#[derive(serde::Deserialize)]
struct After {
    #[serde(default)]
    after: usize,
}

/// A job's log lines from number `after` on (all attempts and ranks, in order).
async fn api_logs(
    State(c): State<Arc<Coordinator>>,
    Extension(who): Extension<Principal>,
    axum::extract::Path(id): axum::extract::Path<String>,
    axum::extract::Query(q): axum::extract::Query<After>,
) -> ApiResult {
    readable(&c, &who, &id)?;
    c.logs.restore(&id).await?;
    let lines = c.logs.read_new(&id, &mut Default::default())?;
    let next = lines.len();
    let fresh: Vec<String> = lines.into_iter().skip(q.after).map(|l| l.text).collect();
    Ok(axum::Json(serde_json::json!({ "lines": fresh, "next": next })))
}

/// A job's metric points, per rank of its newest attempt, oldest first.
async fn api_metrics(
    State(c): State<Arc<Coordinator>>,
    Extension(who): Extension<Principal>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult {
    readable(&c, &who, &id)?;
    let ranks: Vec<serde_json::Value> = c
        .metrics
        .series(&id)
        .into_iter()
        .map(|r| {
            let points: Vec<serde_json::Value> = r
                .points
                .iter()
                .map(|p| serde_json::json!({ "step": p.step, "time_ms": p.time_ms, "values": p.values }))
                .collect();
            serde_json::json!({ "rank": r.rank, "attempt": r.attempt, "points": points })
        })
        .collect();
    let stragglers: Vec<u32> = c.metrics.latest(&id).iter().filter(|r| r.straggler).map(|r| r.rank).collect();
    Ok(axum::Json(serde_json::json!({ "ranks": ranks, "stragglers": stragglers })))
}

async fn healthz(State(c): State<Arc<Coordinator>>) -> (StatusCode, &'static str) {
    // Healthy means the store answers.
    match c.store.jobs() {
        Ok(_) => (StatusCode::OK, "ok\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
    }
}

async fn metrics(State(c): State<Arc<Coordinator>>, Extension(who): Extension<Principal>) -> (StatusCode, String) {
    if let Err(e) = sees_fleet(&who) {
        return (e.code().http(), format!("{e}\n"));
    }
    match render_metrics(&c) {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {e}\n")),
    }
}

/// Prometheus text format. GPU metrics use DCGM-exporter's names and units, so dashboards built
/// for DCGM work unchanged; labels name the GPU, its node and the job on it.
fn render_metrics(c: &Coordinator) -> crate::Result<String> {
    let jobs = c.store.jobs()?;
    let mut out = String::new();
    header(&mut out, "gantry_jobs", "gauge", "Jobs by state.");
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
    header(&mut out, "gantry_queue_depth", "gauge", "Queued jobs per queue.");
    let mut depth: std::collections::BTreeMap<&str, usize> = Default::default();
    for j in jobs.iter().filter(|j| j.state == JobState::Queued) {
        *depth.entry(j.spec.queue.as_str()).or_default() += 1;
    }
    for (queue, n) in depth {
        let _ = writeln!(out, "gantry_queue_depth{{queue=\"{}\"}} {n}", escape(queue));
    }
    header(&mut out, "gantry_oldest_pending_seconds", "gauge", "How long the oldest queued job has waited.");
    let now = c.now_ms();
    let oldest =
        jobs.iter().filter(|j| j.state == JobState::Queued).map(|j| now - j.submitted_at_ms).max().unwrap_or(0);
    let _ = writeln!(out, "gantry_oldest_pending_seconds {}", oldest.max(0) as f64 / 1000.0);
    header(&mut out, "gantry_placements_total", "counter", "Jobs placed since the coordinator started.");
    let _ = writeln!(out, "gantry_placements_total {}", c.placements());
    header(
        &mut out,
        "gantry_placements_refused_total",
        "counter",
        "Placements not applied because a node changed between the snapshot and the commit.",
    );
    let _ = writeln!(out, "gantry_placements_refused_total {}", c.stale_placements());
    header(
        &mut out,
        "gantry_stale_attempt_reports_total",
        "counter",
        "Logs, checkpoints, metrics, exits and running reports from attempts the coordinator had moved on from (refused).",
    );
    for kind in crate::stale::StaleKind::ALL {
        let _ = writeln!(out, "gantry_stale_attempt_reports_total{{kind=\"{}\"}} {}", kind.label(), c.stale.get(kind));
    }
    // Why each queued job waits and why each stopping job stops, in the words `gantry job` uses.
    let (mut pending, mut stopping) = (String::new(), String::new());
    for (j, w) in c.listed_jobs()? {
        let reasons = Reasons::of(&j, w.as_ref());
        for (lines, reason) in [(&mut pending, reasons.pending), (&mut stopping, reasons.stopping)] {
            if let Some((code, words)) = reason {
                let _ =
                    writeln!(lines, "{{job=\"{}\",code=\"{code}\",reason=\"{}\"}} 1", escape(&j.id), escape(&words));
            }
        }
    }
    let families = [
        ("gantry_job_pending_reason", "1 for each queued job, labelled with why it waits.", pending),
        ("gantry_job_stop_reason", "1 for each running job being stopped, labelled with why.", stopping),
    ];
    for (name, help, lines) in families {
        header(&mut out, name, "gauge", help);
        for line in lines.lines() {
            let _ = writeln!(out, "{name}{line}");
        }
    }

    let nodes = c.nodes();
    header(&mut out, "gantry_agents_connected", "gauge", "Agents with an open session.");
    let _ = writeln!(out, "gantry_agents_connected {}", nodes.iter().filter(|n| n.connected).count());

    let gpus = c.gpus()?;
    let label = |node: &str, g: &gantry_proto::v1::GpuInfo, job: &Option<String>| {
        format!(
            "gpu=\"{}\",UUID=\"{}\",modelName=\"{}\",Hostname=\"{}\",job=\"{}\"",
            g.index,
            escape(&g.uuid),
            escape(&g.name),
            escape(node),
            escape(job.as_deref().unwrap_or(""))
        )
    };
    type Field = fn(&gantry_proto::v1::GpuInfo) -> Option<f64>;
    let fields: [(&str, &str, Field); 5] = [
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |g| g.utilization_percent.map(f64::from)),
        ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", |g| {
            g.memory_used_bytes.map(|b| (b / (1 << 20)) as f64)
        }),
        ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", |g| {
            g.memory_used_bytes.map(|b| (g.memory_total_bytes.saturating_sub(b) / (1 << 20)) as f64)
        }),
        ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |g| g.temperature_c.map(f64::from)),
        ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |g| g.power_mw.map(|p| p as f64 / 1000.0)),
    ];
    for (name, help, value) in fields {
        header(&mut out, name, "gauge", help);
        for (node, g, job) in &gpus {
            // A field the GPU does not report is left out, not written as zero.
            if let Some(v) = value(g) {
                let _ = writeln!(out, "{name}{{{}}} {v}", label(node, g, job));
            }
        }
    }
    header(&mut out, "gantry_gpu_healthy", "gauge", "1 if the GPU takes new work, 0 if unhealthy.");
    for (node, g, job) in &gpus {
        let _ = writeln!(out, "gantry_gpu_healthy{{{}}} {}", label(node, g, job), u8::from(g.healthy));
    }
    header(&mut out, "gantry_job_metric", "gauge", "The latest value each rank of a running job reported.");
    let mut stragglers = Vec::new();
    for j in jobs.iter().filter(|j| j.state == JobState::Running) {
        for rank in c.metrics.latest(&j.id) {
            if rank.straggler {
                stragglers.push((escape(&j.id), rank.rank));
            }
            for (name, v) in rank.points.iter().flat_map(|p| &p.values) {
                let (job, metric) = (escape(&j.id), escape(name));
                let _ =
                    writeln!(out, "gantry_job_metric{{job=\"{job}\",rank=\"{}\",name=\"{metric}\"}} {v}", rank.rank);
            }
        }
    }
    header(
        &mut out,
        "gantry_job_straggler",
        "gauge",
        "1 for a rank whose steps take far longer than its job's others.",
    );
    for (job, rank) in stragglers {
        let _ = writeln!(out, "gantry_job_straggler{{job=\"{job}\",rank=\"{rank}\"}} 1");
    }
    crate::serving::metrics::write(&mut out, c, &jobs);
    Ok(out)
}

pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
