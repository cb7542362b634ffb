//! What the server counts: requests by HTTP status, their latency, the sizes of the batches the
//! model ran, and the requests waiting for it; rendered as Prometheus text (`GET /metrics`) or
//! taken as a [`StatsSnapshot`] (the replica command writes them as JSON lines).
//!
//! The counters and histograms sit behind one mutex rather than in atomics: a request updates
//! several numbers at once (its code, a bucket, the sum and count), and behind one lock a scrape
//! never sees them apart (a histogram whose count is not the sum of its buckets). The lock is
//! held for a few additions, next to a model's forward pass that takes milliseconds. The queue
//! depth alone is an atomic: admission checks and bumps it in one step (`fetch_update`) on
//! every request.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the latency buckets, in seconds (plus `+Inf`).
pub const LATENCY_BUCKETS: [f64; 13] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Upper bounds of the batch-size buckets, in rows (plus `+Inf`).
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The server's counters for one model.
#[derive(Debug)]
pub struct Stats {
    model: String,
    /// Requests admitted and not yet taken into a batch.
    pub(crate) queue_depth: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<u16, u64>,
    latency: Histogram,
    batch_size: Histogram,
}

/// Counts per bucket (not cumulative; the last is `+Inf`), their sum and count.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, value: f64) {
        let bucket = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
        self.count += 1;
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = self
            .counts
            .iter()
            .enumerate()
            .map(|(i, n)| {
                cumulative += n;
                Bucket { le: self.bounds.get(i).map_or_else(|| "+Inf".to_string(), f64::to_string), count: cumulative }
            })
            .collect();
        HistogramSnapshot { buckets, sum: self.sum, count: self.count }
    }
}

/// The numbers of [`Stats`] at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsSnapshot {
    pub model: String,
    /// Inference requests by HTTP status code ("200", "400", ...).
    pub requests: BTreeMap<String, u64>,
    pub request_seconds: HistogramSnapshot,
    pub batch_size: HistogramSnapshot,
    pub queue_depth: usize,
}

/// A histogram as Prometheus has it: cumulative buckets, the last `le` being `+Inf`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistogramSnapshot {
    pub buckets: Vec<Bucket>,
    pub sum: f64,
    pub count: u64,
}

/// Observations at most `le` (a number as Prometheus writes it, or `+Inf`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    pub le: String,
    pub count: u64,
}

impl Stats {
    /// Counters for the model served as `model`, all zero.
    pub fn new(model: &str) -> Stats {
        Stats {
            model: model.to_string(),
            queue_depth: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: Histogram::new(&LATENCY_BUCKETS),
                batch_size: Histogram::new(&BATCH_BUCKETS),
            }),
        }
    }

    /// One inference request answered with `code` after `elapsed`.
    pub fn record_request(&self, code: u16, elapsed: Duration) {
        let mut inner = self.lock();
        *inner.requests.entry(code).or_default() += 1;
        inner.latency.observe(elapsed.as_secs_f64());
    }

    /// One forward pass over `rows` rows.
    pub fn record_batch(&self, rows: usize) {
        self.lock().batch_size.observe(rows as f64);
    }

    /// Requests admitted and waiting for the model.
    pub fn queue_depth(&self) -> usize {
        self.queue_depth.load(Ordering::SeqCst)
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let inner = self.lock();
        StatsSnapshot {
            model: self.model.clone(),
            requests: inner.requests.iter().map(|(code, n)| (code.to_string(), *n)).collect(),
            request_seconds: inner.latency.snapshot(),
            batch_size: inner.batch_size.snapshot(),
            queue_depth: self.queue_depth(),
        }
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let model = escape(&s.model);
        let mut out = String::new();
        out.push_str("# HELP gantry_serve_requests_total Inference requests answered, by HTTP status code.\n");
        out.push_str("# TYPE gantry_serve_requests_total counter\n");
        for (code, n) in &s.requests {
            let _ = writeln!(out, "gantry_serve_requests_total{{model=\"{model}\",code=\"{code}\"}} {n}");
        }
        let histograms = [
            (
                "gantry_serve_request_seconds",
                "Time from an inference request's arrival to its answer.",
                &s.request_seconds,
            ),
            ("gantry_serve_batch_size", "Rows in each forward pass of the model.", &s.batch_size),
        ];
        for (name, help, h) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for b in &h.buckets {
                let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"{}\"}} {}", b.le, b.count);
            }
            let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {}", h.count);
        }
        out.push_str("# HELP gantry_serve_queue_depth Inference requests waiting for the model.\n");
        out.push_str("# TYPE gantry_serve_queue_depth gauge\n");
        let _ = writeln!(out, "gantry_serve_queue_depth{{model=\"{model}\"}} {}", s.queue_depth);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Only additions happen under the lock: a panic there leaves the numbers usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A label value as Prometheus's text format quotes it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_rendered_with_their_labels() {
        let stats = Stats::new("mlp");
        stats.record_request(200, Duration::from_millis(3));
        stats.record_request(200, Duration::from_secs(9));
        stats.record_request(503, Duration::from_micros(100));
        for rows in [1, 3, 3, 300] {
            stats.record_batch(rows);
        }
        let s = stats.snapshot();
        assert_eq!(s.requests, BTreeMap::from([("200".into(), 2), ("503".into(), 1)]));
        let count = |h: &HistogramSnapshot, le: &str| h.buckets.iter().find(|b| b.le == le).unwrap().count;
        assert_eq!(count(&s.request_seconds, "0.0005"), 1);
        assert_eq!(count(&s.request_seconds, "0.005"), 2);
        assert_eq!(count(&s.request_seconds, "5"), 2);
        assert_eq!(count(&s.request_seconds, "+Inf"), 3);
        assert_eq!((count(&s.batch_size, "1"), count(&s.batch_size, "4"), count(&s.batch_size, "256")), (1, 3, 3));
        assert_eq!((s.batch_size.count, s.batch_size.sum), (4, 307.0));

        let text = stats.render();
        for line in [
            "gantry_serve_requests_total{model=\"mlp\",code=\"200\"} 2",
            "gantry_serve_request_seconds_bucket{model=\"mlp\",le=\"+Inf\"} 3",
            "gantry_serve_request_seconds_count{model=\"mlp\"} 3",
            "gantry_serve_batch_size_bucket{model=\"mlp\",le=\"2\"} 1",
            "gantry_serve_batch_size_sum{model=\"mlp\"} 307",
            "gantry_serve_queue_depth{model=\"mlp\"} 0",
            "# TYPE gantry_serve_batch_size histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
        }
        assert_eq!(escape("a\"b\\"), "a\\\"b\\\\");
    }
}
