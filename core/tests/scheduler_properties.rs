//! The scheduler's promises, checked on many random fleets, running sets and queues, and on the
//! counterexamples proptest once found for them (`regressions`).

use std::collections::{HashMap, HashSet};

use gantry_core::Resources;
use gantry_core::scheduler::*;
use proptest::prelude::*;

mod regressions;

const GIB: u64 = 1 << 30;

fn arb_node(i: usize) -> impl Strategy<Value = Node> {
    (
        0usize..=8,
        prop::bool::ANY,
        4u32..=32,
        prop::collection::vec(prop::bool::weighted(0.9), 8),
        prop::bool::weighted(0.9),
        prop::bool::ANY,
    )
        .prop_map(move |(gpus, h100, cpus, healthy, schedulable, topology)| Node {
            name: format!("n{i}"),
            schedulable,
            cpus: cpus as f64,
            memory_bytes: 64 * GIB,
            gpus: (0..gpus)
                .map(|g| Gpu {
                    uuid: format!("n{i}-g{g}"),
                    name: if h100 { "NVIDIA H100 80GB HBM3".into() } else { "NVIDIA A100-SXM4-40GB".into() },
                    memory_total_bytes: if h100 { 80 * GIB } else { 40 * GIB },
                    healthy: healthy[g],
                    // Half the nodes say how they are wired: bridged pairs, four GPUs per NUMA node.
                    numa_node: topology.then_some(g as u32 / 4),
                    nvlink_peers: if topology && (g ^ 1) < gpus { vec![format!("n{i}-g{}", g ^ 1)] } else { vec![] },
                })
                .collect(),
        })
}

fn arb_job(i: usize) -> impl Strategy<Value = PendingJob> {
    (
        0u32..=8,
        prop_oneof![8 => Just(1u32), 1 => 2u32..=3],
        0u32..=100,
        0usize..3,
        prop::option::of(1u64..=7200),
        prop::option::of(prop_oneof![Just("H100".to_string()), Just("A100".to_string())]),
        1u32..=8,
    )
        .prop_map(move |(gpus, nodes, priority, queue, secs, model, cpus)| PendingJob {
            id: format!("j{i}"),
            priority,
            seq: i as u64,
            queue: ["a", "b", "c"][queue].into(),
            resources: Resources {
                nodes,
                gpus,
                gpu_model: if gpus > 0 { model } else { None },
                cpus: cpus as f64,
                memory_gb: 4.0,
                ..Resources::default()
            },
            max_duration_ms: secs.map(|s| s * 1000),
        })
}

/// A consistent world: the running jobs are what an earlier pass placed.
fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (1usize..=8, 0usize..=20, 0usize..=30, 0u64..3_600_000).prop_flat_map(|(n_nodes, n_first, n_pending, now)| {
        let nodes: Vec<_> = (0..n_nodes).map(arb_node).collect();
        let first: Vec<_> = (0..n_first).map(arb_job).collect();
        let pending: Vec<_> = (0..n_pending).map(|i| arb_job(1000 + i)).collect();
        let stopping = prop::collection::vec(prop::bool::weighted(0.1), n_first);
        // Sometimes one of the pending jobs was at the front of the line in an earlier pass.
        let front = prop::option::of(0..n_pending.max(1));
        (nodes, first, pending, stopping, front).prop_map(move |(nodes, first, pending, stopping, front)| {
            let earlier = schedule(&Snapshot { nodes: nodes.clone(), pending: first.clone(), ..Default::default() });
            let running = earlier
                .placements
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    let job = first.iter().find(|j| j.id == p.job_id).unwrap();
                    RunningJob {
                        id: job.id.clone(),
                        priority: job.priority,
                        queue: job.queue.clone(),
                        resources: job.resources.clone(),
                        nodes: p.nodes.clone(),
                        started_at_ms: 0,
                        max_duration_ms: job.max_duration_ms,
                        stopping: stopping[k],
                        stopping_for: None,
                    }
                })
                .collect();
            Snapshot {
                now_ms: now,
                nodes,
                running,
                pending,
                queues: vec![
                    Queue { name: "a".into(), weight: 1.0, gpu_quota: None },
                    Queue { name: "b".into(), weight: 2.0, gpu_quota: Some(12) },
                ],
                ahead: front.filter(|i| *i < n_pending).map(|i| format!("j{}", 1000 + i)).into_iter().collect(),
                avoid: Default::default(),
                warm: Default::default(),
            }
        })
    })
}

fn resources_of<'a>(s: &'a Snapshot, id: &str) -> &'a Resources {
    s.pending.iter().find(|j| j.id == id).map(|j| &j.resources).unwrap()
}

/// The snapshot after applying a plan: placements run, victims are stopping.
fn apply(s: &Snapshot, plan: &Plan) -> Snapshot {
    let mut next = s.clone();
    let placed: HashSet<&str> = plan.placements.iter().map(|p| p.job_id.as_str()).collect();
    for p in &plan.placements {
        let job = s.pending.iter().find(|j| j.id == p.job_id).unwrap();
        next.running.push(RunningJob {
            id: job.id.clone(),
            priority: job.priority,
            queue: job.queue.clone(),
            resources: job.resources.clone(),
            nodes: p.nodes.clone(),
            started_at_ms: s.now_ms,
            max_duration_ms: job.max_duration_ms,
            stopping: false,
            stopping_for: None,
        });
    }
    for v in &plan.preemptions {
        let victim = next.running.iter_mut().find(|r| r.id == v.job_id).unwrap();
        victim.stopping = true;
        victim.stopping_for = Some(Claim { job_id: v.for_job.clone(), nodes: v.nodes.clone() });
    }
    next.pending.retain(|j| !placed.contains(j.id.as_str()));
    next.ahead = plan.ahead.clone();
    next
}

/// The promises, each a check over one snapshot: the property tests below run them on random
/// snapshots, and the scenario tests in `regressions` on the cases that once broke them.
mod promise {
    use super::*;

    /// Every promise, in the order the property tests list them.
    pub fn all(s: &Snapshot) -> Result<(), TestCaseError> {
        no_gpu_is_double_booked_and_no_capacity_exceeded(s)?;
        gangs_are_all_or_nothing_on_matching_healthy_gpus(s)?;
        scheduling_the_applied_result_again_changes_nothing(s)?;
        a_job_that_fits_waits_only_for_a_stated_reason(s)?;
        preemption_only_hits_lower_priority(s)?;
        the_same_snapshot_gives_the_same_plan(s)
    }

    pub fn no_gpu_is_double_booked_and_no_capacity_exceeded(s: &Snapshot) -> Result<(), TestCaseError> {
        let plan = schedule(s);
        let after = apply(s, &plan);
        let mut gpus = HashSet::new();
        let mut cpus: HashMap<&str, f64> = HashMap::new();
        let mut mem: HashMap<&str, f64> = HashMap::new();
        for r in &after.running {
            for a in &r.nodes {
                for g in &a.gpu_uuids {
                    prop_assert!(gpus.insert(g.clone()), "GPU {} given twice", g);
                }
                *cpus.entry(&a.node).or_default() += r.resources.cpus;
                *mem.entry(&a.node).or_default() += r.resources.memory_gb;
            }
        }
        for n in &s.nodes {
            prop_assert!(cpus.get(n.name.as_str()).copied().unwrap_or(0.0) <= n.cpus + 1e-9);
            prop_assert!(mem.get(n.name.as_str()).copied().unwrap_or(0.0) * GIB as f64 <= n.memory_bytes as f64);
        }
        Ok(())
    }

    pub fn gangs_are_all_or_nothing_on_matching_healthy_gpus(s: &Snapshot) -> Result<(), TestCaseError> {
        let plan = schedule(s);
        let nodes: HashMap<&str, &Node> = s.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        for p in &plan.placements {
            let r = resources_of(s, &p.job_id);
            prop_assert_eq!(p.nodes.len(), r.nodes as usize);
            let distinct: HashSet<&str> = p.nodes.iter().map(|a| a.node.as_str()).collect();
            prop_assert_eq!(distinct.len(), r.nodes as usize);
            for a in &p.nodes {
                let node = nodes[a.node.as_str()];
                prop_assert!(node.schedulable);
                prop_assert_eq!(a.gpu_uuids.len(), r.gpus as usize);
                for uuid in &a.gpu_uuids {
                    let g = node.gpus.iter().find(|g| &g.uuid == uuid).unwrap();
                    prop_assert!(g.healthy);
                    if let Some(m) = &r.gpu_model {
                        prop_assert!(g.name.contains(m.as_str()));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn scheduling_the_applied_result_again_changes_nothing(s: &Snapshot) -> Result<(), TestCaseError> {
        let plan = schedule(s);
        let applied = apply(s, &plan);
        let again = schedule(&applied);
        // Nothing more: no new victim, no placement. (Stopping jobs, victims chosen in the first
        // pass and backfill reservations included: the scheduler settles these itself.)
        prop_assert!(again.preemptions.is_empty(), "preempted {:?} on the second pass", again.preemptions);
        prop_assert!(again.placements.is_empty(), "placed {:?} on the second pass", again.placements);
        Ok(())
    }

    pub fn a_job_that_fits_waits_only_for_a_stated_reason(s: &Snapshot) -> Result<(), TestCaseError> {
        let plan = schedule(s);
        let after = apply(s, &plan);
        for w in &plan.waiting {
            if w.reason.waits_by_policy() {
                continue;
            }
            let r = resources_of(s, &w.job_id);
            prop_assert!(!fits_somewhere(&after, r), "{} waits ({}) but fits", w.job_id, w.reason);
        }
        Ok(())
    }

    pub fn preemption_only_hits_lower_priority(s: &Snapshot) -> Result<(), TestCaseError> {
        let plan = schedule(s);
        for p in &plan.preemptions {
            let victim = s.running.iter().find(|r| r.id == p.job_id).unwrap();
            let job = s.pending.iter().find(|j| j.id == p.for_job).unwrap();
            prop_assert!(victim.priority < job.priority);
            prop_assert!(!victim.stopping);
        }
        Ok(())
    }

    pub fn the_same_snapshot_gives_the_same_plan(s: &Snapshot) -> Result<(), TestCaseError> {
        prop_assert_eq!(schedule(s), schedule(s));
        Ok(())
    }
}

proptest! {
    // 1,000 cases in CI; PROPTEST_CASES=N asks for more.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_gpu_is_double_booked_and_no_capacity_exceeded(s in arb_snapshot()) {
        promise::no_gpu_is_double_booked_and_no_capacity_exceeded(&s)?;
    }

    #[test]
    fn gangs_are_all_or_nothing_on_matching_healthy_gpus(s in arb_snapshot()) {
        promise::gangs_are_all_or_nothing_on_matching_healthy_gpus(&s)?;
    }

    #[test]
    fn scheduling_the_applied_result_again_changes_nothing(s in arb_snapshot()) {
        promise::scheduling_the_applied_result_again_changes_nothing(&s)?;
    }

    #[test]
    fn a_job_that_fits_waits_only_for_a_stated_reason(s in arb_snapshot()) {
        promise::a_job_that_fits_waits_only_for_a_stated_reason(&s)?;
    }

    #[test]
    fn preemption_only_hits_lower_priority(s in arb_snapshot()) {
        promise::preemption_only_hits_lower_priority(&s)?;
    }

    #[test]
    fn the_same_snapshot_gives_the_same_plan(s in arb_snapshot()) {
        promise::the_same_snapshot_gives_the_same_plan(&s)?;
    }
}

/// Whether `r` fits right now on `r.nodes` distinct nodes (a brute-force check).
fn fits_somewhere(s: &Snapshot, r: &Resources) -> bool {
    let mut count = 0;
    for n in s.nodes.iter().filter(|n| n.schedulable) {
        let here: Vec<&RunningJob> = s.running.iter().filter(|j| j.nodes.iter().any(|a| a.node == n.name)).collect();
        let used_cpus: f64 = here.iter().map(|j| j.resources.cpus).sum();
        let used_mem: f64 = here.iter().map(|j| j.resources.memory_gb).sum();
        let busy: HashSet<&String> =
            here.iter().flat_map(|j| j.nodes.iter().flat_map(|a| a.gpu_uuids.iter())).collect();
        let free_gpus = n
            .gpus
            .iter()
            .filter(|g| g.healthy && !busy.contains(&g.uuid))
            .filter(|g| r.gpu_model.as_ref().is_none_or(|m| g.name.to_lowercase().contains(&m.to_lowercase())))
            .count();
        let fits = n.cpus - used_cpus + 1e-9 >= r.cpus
            && (n.memory_bytes as f64) >= (used_mem + r.memory_gb) * GIB as f64
            && free_gpus >= r.gpus as usize;
        if fits {
            count += 1;
        }
    }
    count >= r.nodes as usize
}
