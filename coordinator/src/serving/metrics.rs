//! Serving in `/metrics`: what the coordinator routed (requests by model and status, their
//! latency), and what each replica reports through its metrics file (its batches' sizes, its
//! queue). Replicas' counters are per replica, so a restarted one reads as a counter reset.

use std::fmt::Write;

use super::LATENCY_BUCKETS;
use crate::control::Coordinator;
use crate::http::{escape, header};
use crate::records::{JobRecord, JobState};

/// Batch-size buckets (rows) a replica reports as `serve_batch_le_N`, cumulative, and
/// `serve_batch_le_inf`; with `serve_batches`, `serve_batch_rows` and `serve_queue_depth`.
pub const BATCH_BUCKETS: [u32; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

pub fn write(out: &mut String, c: &Coordinator, jobs: &[JobRecord]) {
    let stats = c.serving.stats.snapshot();
    header(
        out,
        "gantry_serve_requests_total",
        "counter",
        "Inference requests the coordinator routed, by model and HTTP status.",
    );
    for (model, m) in &stats {
        let mut codes: Vec<_> = m.codes.iter().collect();
        codes.sort();
        for (code, n) in codes {
            let _ = writeln!(out, "gantry_serve_requests_total{{model=\"{}\",code=\"{code}\"}} {n}", escape(model));
        }
    }
    header(
        out,
        "gantry_serve_request_seconds",
        "histogram",
        "Time from a request's arrival to its answer, through the coordinator.",
    );
    for (model, m) in &stats {
        let model = escape(model);
        let mut seen = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            seen += m.latency[i];
            let _ = writeln!(out, "gantry_serve_request_seconds_bucket{{model=\"{model}\",le=\"{bound}\"}} {seen}");
        }
        let total = m.requests();
        let _ = writeln!(out, "gantry_serve_request_seconds_bucket{{model=\"{model}\",le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "gantry_serve_request_seconds_sum{{model=\"{model}\"}} {}", m.latency_sum);
        let _ = writeln!(out, "gantry_serve_request_seconds_count{{model=\"{model}\"}} {total}");
    }
    let serving: std::collections::HashMap<&str, &str> = jobs
        .iter()
        .filter(|j| j.is_serving() && j.state == JobState::Running)
        .map(|j| (j.id.as_str(), j.spec.name.as_str()))
        .collect();
    let replicas = jobs.iter().filter(|j| j.state == JobState::Running).filter_map(|j| {
        let model = serving.get(j.replica_of.as_deref()?)?;
        let latest = c.metrics.latest(&j.id).into_iter().next()?.points.pop()?;
        Some((escape(model), escape(&j.id), latest.values))
    });
    let replicas: Vec<_> = replicas.collect();
    header(out, "gantry_serve_batch_size", "histogram", "Examples in each forward pass of a replica.");
    for (model, replica, values) in &replicas {
        let labels = format!("model=\"{model}\",replica=\"{replica}\"");
        let value = |name: &str| values.get(name).copied().unwrap_or(0.0);
        for b in BATCH_BUCKETS {
            let _ = writeln!(
                out,
                "gantry_serve_batch_size_bucket{{{labels},le=\"{b}\"}} {}",
                value(&format!("serve_batch_le_{b}"))
            );
        }
        let _ = writeln!(out, "gantry_serve_batch_size_bucket{{{labels},le=\"+Inf\"}} {}", value("serve_batches"));
        let _ = writeln!(out, "gantry_serve_batch_size_sum{{{labels}}} {}", value("serve_batch_rows"));
        let _ = writeln!(out, "gantry_serve_batch_size_count{{{labels}}} {}", value("serve_batches"));
    }
    header(out, "gantry_serve_queue_depth", "gauge", "Requests waiting at a replica for a batch.");
    for (model, replica, values) in &replicas {
        let depth = values.get("serve_queue_depth").copied().unwrap_or(0.0);
        let _ = writeln!(out, "gantry_serve_queue_depth{{model=\"{model}\",replica=\"{replica}\"}} {depth}");
    }
}
