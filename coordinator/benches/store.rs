//! `cargo bench --bench store` (add `--features etcd` for the etcd rows): durable state changes
//! per second, each committed before it is acknowledged, from many concurrent writers, as the
//! coordinator's gRPC handlers are. Same-run baseline: a plain write + fdatasync loop on the same
//! disk. Then a restart with 100,000 jobs and 5,000 agents' records: how long until a submit is
//! accepted again. One JSON object per line.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gantry_coordinator::records::AgentRecord;
use gantry_coordinator::store::{EmbeddedStore, StateStore};
use gantry_coordinator::{Coordinator, Settings};

#[cfg(feature = "etcd")]
#[path = "../tests/support/etcd_server.rs"]
mod etcd_server;

/// Concurrent writers, as the coordinator's request handlers are: group commit carries more
/// changes per fsync the more writers wait, so each backend is measured at several.
const WRITERS: [usize; 3] = [16, 64, 128];
/// Writers filling the restart scenario.
const FILLERS: usize = 64;
const WINDOW: Duration = Duration::from_secs(5);
const RESTART_JOBS: usize = 100_000;
const RESTART_AGENTS: usize = 5_000;

/// Parsed once: the bench measures the store, not YAML.
fn spec() -> gantry_core::JobSpec {
    static SPEC: std::sync::OnceLock<gantry_core::JobSpec> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        gantry_core::JobSpec::from_yaml("name: bench\nresources: {gpus: 1}\ncommand: [\"python3\", \"train.py\"]\n")
            .unwrap()
    })
    .clone()
}

/// fdatasync'd 512-byte appends per second, one writer: what the disk gives a naive store.
fn fsync_baseline(dir: &std::path::Path) -> f64 {
    let mut file = std::fs::File::create(dir.join("fsync.bin")).unwrap();
    let record = [7u8; 512];
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < WINDOW {
        file.write_all(&record).unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Durable changes per second from `writers` threads: a submit, then a change to that job (the
/// coordinator's two most common writes).
fn changes_per_second(store: Arc<dyn StateStore>, writers: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..writers {
            let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let job = store.submit(spec(), "alice", 0).unwrap();
                    store
                        .update(&job.id, |j| {
                            j.message = "placed".into();
                            true
                        })
                        .unwrap();
                    done.fetch_add(2, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(WINDOW);
        stop.store(true, Ordering::Relaxed);
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Fills a store with the restart scenario's records, from many writers.
fn fill(store: &Arc<dyn StateStore>) {
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..FILLERS {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= RESTART_JOBS {
                        return;
                    }
                    store.submit(spec(), "alice", 0).unwrap();
                    if i < RESTART_AGENTS {
                        let inventory = vec![1u8; 600];
                        let record = AgentRecord {
                            name: format!("node-{i:05}"),
                            inventory,
                            drained: false,
                            registered_at_ms: 0,
                        };
                        store.put_agent(&record).unwrap();
                    }
                }
            });
        }
    });
}

/// Opens a coordinator on `open()` and submits once: seconds until that submit is accepted.
fn restart(open: impl FnOnce() -> Arc<dyn StateStore>, data_dir: &std::path::Path) -> f64 {
    let start = Instant::now();
    let coordinator = Coordinator::with_store(open(), data_dir, Settings::default()).unwrap();
    coordinator.submit(spec(), "alice").unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(coordinator.store.jobs().unwrap().len(), RESTART_JOBS + 1);
    secs
}

/// One line per number of writers; the store is dropped (closed) at the end.
fn rates(store: Arc<dyn StateStore>, backend: &str, goal: u64, baseline: f64) {
    for writers in WRITERS {
        let rate = changes_per_second(store.clone(), writers);
        print(serde_json::json!({
            "bench": "store", "backend": backend, "writers": writers, "changes_per_s": rate,
            "vs_fsync_loop": rate / baseline, "goal_changes_per_s": goal
        }));
    }
}

fn print(value: serde_json::Value) {
    println!("{value}");
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let baseline = fsync_baseline(dir.path());
    print(
        serde_json::json!({"bench": "store", "backend": "fsync loop (baseline)", "writers": 1, "changes_per_s": baseline}),
    );

    let path = dir.path().join("state.redb");
    rates(Arc::new(EmbeddedStore::open(&path).unwrap()), "embedded", 50_000, baseline);

    let fresh = dir.path().join("restart.redb");
    let filling = Instant::now();
    fill(&(Arc::new(EmbeddedStore::open(&fresh).unwrap()) as Arc<dyn StateStore>));
    let fill_s = filling.elapsed().as_secs_f64();
    let secs = restart(|| Arc::new(EmbeddedStore::open(&fresh).unwrap()), &dir.path().join("coordinator"));
    print(serde_json::json!({
        "bench": "store_restart", "backend": "embedded", "jobs": RESTART_JOBS, "agents": RESTART_AGENTS,
        "fill_s": fill_s, "first_submit_accepted_after_s": secs, "goal_s": 5
    }));

    etcd(dir.path(), baseline);
}

#[cfg(feature = "etcd")]
fn etcd(dir: &std::path::Path, baseline: f64) {
    use gantry_coordinator::store::{EtcdOptions, EtcdStore};

    let server = etcd_server::EtcdServer::start();
    let options = |prefix: &str| EtcdOptions {
        endpoints: vec![server.url.clone()],
        prefix: prefix.into(),
        name: "bench".into(),
        lease_ttl: Duration::from_secs(3),
    };
    rates(Arc::new(EtcdStore::connect(options("/rate")).unwrap()), "etcd (one local member)", 7_500, baseline);

    let filling = Instant::now();
    fill(&(Arc::new(EtcdStore::connect(options("/restart")).unwrap()) as Arc<dyn StateStore>));
    let fill_s = filling.elapsed().as_secs_f64();
    let secs = restart(|| Arc::new(EtcdStore::connect(options("/restart")).unwrap()), &dir.join("coordinator-etcd"));
    print(serde_json::json!({
        "bench": "store_restart", "backend": "etcd (one local member)", "jobs": RESTART_JOBS,
        "agents": RESTART_AGENTS, "fill_s": fill_s, "first_submit_accepted_after_s": secs, "goal_s": 5
    }));
}

#[cfg(not(feature = "etcd"))]
fn etcd(_: &std::path::Path, _: f64) {
    print(serde_json::json!({"bench": "store", "backend": "etcd", "skipped": "built without --features etcd"}));
}
