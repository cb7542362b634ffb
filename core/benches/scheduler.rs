//! `cargo bench --bench scheduler`: the pure scheduler at fleet scale. One JSON object per line;
//! each figure is the median of several runs, with a same-run baseline where one makes sense.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use gantry_core::Resources;
use gantry_core::scheduler::*;

/// Counts live and peak heap bytes, for memory per queued job.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const RUNS: usize = 5;

fn nodes(n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| Node {
            name: format!("node-{i:05}"),
            schedulable: true,
            cpus: 128.0,
            memory_bytes: 2048 << 30,
            gpus: (0..8)
                .map(|g| Gpu {
                    uuid: format!("GPU-{i:05}-{g}"),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_bytes: 80 << 30,
                    healthy: true,
                    ..Gpu::default()
                })
                .collect(),
        })
        .collect()
}

fn jobs(n: usize, gpus: u32, nodes: u32) -> Vec<PendingJob> {
    (0..n)
        .map(|i| PendingJob {
            id: format!("{i}"),
            priority: 50,
            seq: i as u64,
            queue: ["research", "prod", "batch"][i % 3].into(),
            resources: Resources { gpus, nodes, cpus: 1.0, memory_gb: 1.0, ..Resources::default() },
            max_duration_ms: Some(3_600_000),
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `f` RUNS times; returns the median seconds and the last result.
fn time<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut secs = Vec::new();
    let mut out = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        out = Some(f());
        secs.push(t.elapsed().as_secs_f64());
    }
    (median(secs), out.unwrap())
}

/// The baseline: plain first fit, a linear scan of the nodes for every job.
fn first_fit(nodes: &[Node], pending: &[PendingJob]) -> usize {
    let mut free: Vec<u32> = nodes.iter().map(|n| n.gpus.len() as u32).collect();
    let mut placed = 0;
    for job in pending {
        if let Some(n) = free.iter().position(|&f| f >= job.resources.gpus) {
            free[n] -= job.resources.gpus;
            placed += 1;
        }
    }
    placed
}

fn main() {
    // 1. Single-GPU jobs: 5,000 agents x 8 GPUs, 100,000 queued. One pass places 40,000.
    let snap = Snapshot { now_ms: 0, nodes: nodes(5000), pending: jobs(100_000, 1, 1), ..Default::default() };
    let (secs, plan) = time(|| schedule(&snap));
    let (base_secs, base_placed) = time(|| first_fit(&snap.nodes, &snap.pending));
    println!(
        "{}",
        serde_json::json!({
            "bench": "single_gpu_placements", "agents": 5000, "gpus_per_agent": 8, "queued": 100_000,
            "placed": plan.placements.len(), "pass_s": secs, "placements_per_s": plan.placements.len() as f64 / secs,
            "baseline": "linear first-fit (no policy, counts only)", "baseline_placed": base_placed,
            "baseline_placements_per_s": base_placed as f64 / base_secs, "runs": RUNS, "goal_placements_per_s": 20_000
        })
    );

    // 2. A full pass over 100,000 pending jobs that cannot start (the fleet is full).
    let mut full = snap.clone();
    full.running = plan
        .placements
        .iter()
        .map(|p| RunningJob {
            id: p.job_id.clone(),
            priority: 50,
            queue: "research".into(),
            resources: Resources { gpus: 1, ..Resources::default() },
            nodes: p.nodes.clone(),
            started_at_ms: 0,
            max_duration_ms: Some(3_600_000),
            stopping: false,
            stopping_for: None,
        })
        .collect();
    full.pending = jobs(100_000, 1, 1);
    let (secs, plan_full) = time(|| schedule(&full));
    println!(
        "{}",
        serde_json::json!({
            "bench": "full_pass_all_waiting", "running": full.running.len(), "pending": full.pending.len(),
            "waiting": plan_full.waiting.len(), "pass_s": secs, "runs": RUNS, "goal_pass_s": 1.0
        })
    );

    // 3. Gangs of 8 nodes x 8 GPUs at 50% occupancy (2,500 of 5,000 nodes busy).
    let mut half = Snapshot { now_ms: 0, nodes: nodes(5000), ..Default::default() };
    half.running = (0..2500)
        .map(|i| RunningJob {
            id: format!("busy-{i}"),
            priority: 50,
            queue: "research".into(),
            resources: Resources { gpus: 8, ..Resources::default() },
            nodes: vec![NodeAssignment {
                node: format!("node-{:05}", i * 2),
                gpu_uuids: (0..8).map(|g| format!("GPU-{:05}-{g}", i * 2)).collect(),
            }],
            started_at_ms: 0,
            max_duration_ms: Some(3_600_000),
            stopping: false,
            stopping_for: None,
        })
        .collect();
    half.pending = jobs(1000, 8, 8);
    let (secs, gang_plan) = time(|| schedule(&half));
    println!(
        "{}",
        serde_json::json!({
            "bench": "gangs_8x8_half_full", "agents": 5000, "busy_agents": 2500, "pending_gangs": 1000,
            "placed_gangs": gang_plan.placements.len(), "pass_s": secs,
            "gangs_per_s": gang_plan.placements.len() as f64 / secs, "runs": RUNS, "goal_gangs_per_s": 500
        })
    );

    // 4. Memory per queued job: the snapshot's share, and the peak during a pass.
    drop((plan, plan_full, gang_plan, full, half));
    let before = LIVE.load(Ordering::Relaxed);
    let pending = jobs(100_000, 1, 1);
    let held = LIVE.load(Ordering::Relaxed) - before;
    let snap = Snapshot { now_ms: 0, nodes: snap.nodes, pending, ..Default::default() };
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let plan = schedule(&snap);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    println!(
        "{}",
        serde_json::json!({
            "bench": "memory_per_queued_job", "queued": 100_000,
            "snapshot_bytes_per_job": held as f64 / 100_000.0,
            "pass_peak_bytes_per_job": peak as f64 / 100_000.0,
            "placed": plan.placements.len(), "goal_bytes_per_job": 2048
        })
    );
}
