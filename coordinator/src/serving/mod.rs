//! Serve jobs: a `serve:` job is a model behind the coordinator's `/v2/models/NAME`, answered
//! by replicas that are jobs of their own (placed, restarted and fenced like any job). What the
//! replicas should be is [`rollout`]'s pure decision, applied each pass by
//! `control/serving.rs`; which replica answers a request is [`Serving::pick`] (least
//! outstanding requests), and [`proxy`] carries it there.

pub mod endpoint;
pub mod metrics;
pub mod proxy;
pub mod rollout;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use gantry_core::JobSpec;

/// Restarts of one replica (with `retry`'s backoff, up to 5 minutes apart) before it ends
/// failed: a model that must answer is restarted for a long while, but its record of attempts
/// does not grow without end; a replica that ends failed is replaced by a new one.
pub const REPLICA_RESTARTS: u32 = 100;

/// A replica runs the serve job's spec, as one copy, restarted on its own up to
/// [`REPLICA_RESTARTS`] times.
pub fn replica_spec(serve_job: &JobSpec) -> JobSpec {
    JobSpec { replicas: 1, max_restarts: REPLICA_RESTARTS, ..serve_job.clone() }
}

/// One replica requests may go to.
#[derive(Debug, Clone)]
pub struct Route {
    pub job_id: String,
    /// `host:port`
    pub addr: String,
    outstanding: Arc<AtomicUsize>,
}

/// A served model's ready replicas, as of the last pass.
#[derive(Debug, Clone, Default)]
pub struct ModelRoutes {
    /// The serve job.
    pub job_id: String,
    pub replicas: Vec<Route>,
}

/// Ready replicas agents reported: the port each answers on, for the attempt that reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyPort {
    pub attempt: u32,
    pub port: u16,
}

/// What the coordinator knows of serving in memory: agents report readiness with every
/// heartbeat, and each pass rebuilds the routes, so nothing here needs to outlive a restart.
#[derive(Default)]
pub struct Serving {
    /// Std locks: held for map reads and writes only, never across an await.
    ready: Mutex<HashMap<String, ReadyPort>>,
    routes: RwLock<HashMap<String, Arc<ModelRoutes>>>,
    /// Requests in flight per replica job; kept across rebuilds of the routes.
    outstanding: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    pub pool: proxy::Pool,
    pub stats: RouteStats,
}

impl Serving {
    /// An agent says a replica answers on `port` (0: not, or no longer).
    pub fn report(&self, job_id: &str, attempt: u32, port: u16) {
        let mut ready = self.ready.lock().expect("ready lock poisoned");
        if port == 0 {
            ready.remove(job_id);
        } else {
            ready.insert(job_id.to_string(), ReadyPort { attempt, port });
        }
    }

    pub fn ready_port(&self, job_id: &str) -> Option<ReadyPort> {
        self.ready.lock().expect("ready lock poisoned").get(job_id).copied()
    }

    /// Forgets replicas that are not among `live`.
    pub fn retain(&self, live: &dyn Fn(&str) -> bool) {
        self.ready.lock().expect("ready lock poisoned").retain(|id, _| live(id));
        self.outstanding.lock().expect("outstanding lock poisoned").retain(|id, _| live(id));
    }

    /// Replaces the routes: model name -> (serve job, ready replicas as `(job id, host:port)`).
    pub fn set_routes(&self, routes: HashMap<String, (String, Vec<(String, String)>)>) {
        let mut outstanding = self.outstanding.lock().expect("outstanding lock poisoned");
        let built = routes
            .into_iter()
            .map(|(model, (job_id, replicas))| {
                let replicas = replicas
                    .into_iter()
                    .map(|(id, addr)| {
                        let outstanding = outstanding.entry(id.clone()).or_default().clone();
                        Route { job_id: id, addr, outstanding }
                    })
                    .collect();
                (model, Arc::new(ModelRoutes { job_id, replicas }))
            })
            .collect();
        *self.routes.write().expect("routes lock poisoned") = built;
    }

    pub fn model(&self, name: &str) -> Option<Arc<ModelRoutes>> {
        self.routes.read().expect("routes lock poisoned").get(name).cloned()
    }

    /// The replica with the fewest requests in flight, skipping `tried`; the returned guard
    /// counts this request until dropped.
    pub fn pick(&self, routes: &ModelRoutes, tried: &[String]) -> Option<(Route, InFlight)> {
        let route = routes
            .replicas
            .iter()
            .filter(|r| !tried.contains(&r.job_id))
            .min_by_key(|r| r.outstanding.load(Ordering::Relaxed))?;
        route.outstanding.fetch_add(1, Ordering::Relaxed);
        Some((route.clone(), InFlight(route.outstanding.clone())))
    }
}

/// One request in flight to a replica.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upper bounds (seconds) of the route's latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Requests through the coordinator, by model and status, and their latency.
#[derive(Default)]
pub struct RouteStats {
    /// A std mutex: one map update per request, never held across an await.
    by_model: Mutex<HashMap<String, ModelStats>>,
}

#[derive(Default, Clone)]
pub struct ModelStats {
    pub codes: HashMap<u16, u64>,
    /// Counts per bucket of [`LATENCY_BUCKETS`] (not cumulative), the last one past them all.
    pub latency: [u64; LATENCY_BUCKETS.len() + 1],
    pub latency_sum: f64,
}

impl RouteStats {
    pub fn record(&self, model: &str, code: u16, seconds: f64) {
        let mut all = self.by_model.lock().expect("stats lock poisoned");
        let m = all.entry(model.to_string()).or_default();
        *m.codes.entry(code).or_default() += 1;
        let bucket = LATENCY_BUCKETS.iter().position(|b| seconds <= *b).unwrap_or(LATENCY_BUCKETS.len());
        m.latency[bucket] += 1;
        m.latency_sum += seconds;
    }

    pub fn snapshot(&self) -> Vec<(String, ModelStats)> {
        let mut all: Vec<_> =
            self.by_model.lock().expect("stats lock poisoned").iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl ModelStats {
    pub fn requests(&self) -> u64 {
        self.codes.values().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (None before any request).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(serving: &Serving) -> Arc<ModelRoutes> {
        serving.set_routes(HashMap::from([(
            "m".to_string(),
            ("1".to_string(), vec![("2".into(), "a:1".into()), ("3".into(), "b:1".into())]),
        )]));
        serving.model("m").unwrap()
    }

    #[test]
    fn requests_go_to_the_replica_with_the_fewest_in_flight() {
        let serving = Serving::default();
        let m = routes(&serving);
        let (first, _a) = serving.pick(&m, &[]).unwrap();
        let (second, b) = serving.pick(&m, &[]).unwrap();
        assert_ne!(first.job_id, second.job_id, "the busy one is skipped");
        drop(b);
        let (third, _c) = serving.pick(&m, &[]).unwrap();
        assert_eq!(third.job_id, second.job_id, "it is free again");
        // Counts survive a rebuild of the routes.
        let m = routes(&serving);
        let (fourth, _d) = serving.pick(&m, &[]).unwrap();
        assert!(fourth.job_id != first.job_id || fourth.job_id != third.job_id);
        assert!(serving.pick(&m, &["2".into(), "3".into()]).is_none(), "none left to try");
    }

    #[test]
    fn latency_quantiles_come_from_the_histogram() {
        let stats = RouteStats::default();
        for _ in 0..98 {
            stats.record("m", 200, 0.0008);
        }
        stats.record("m", 200, 0.03);
        stats.record("m", 503, 0.0001);
        let (_, m) = stats.snapshot().remove(0);
        assert_eq!(m.requests(), 100);
        assert_eq!(m.quantile(0.5), Some(0.001));
        assert_eq!(m.quantile(0.995), Some(0.05));
        assert_eq!(m.codes[&503], 1);
    }
}
