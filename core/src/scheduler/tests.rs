//! Scenario tests: one per rule of the policy, named for what they pin.

use super::*;

pub(crate) fn node(name: &str, gpus: usize) -> Node {
    Node {
        name: name.into(),
        schedulable: true,
        cpus: 64.0,
        memory_bytes: 512 << 30,
        gpus: (0..gpus)
            .map(|i| Gpu {
                uuid: format!("{name}-gpu{i}"),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 80 << 30,
                healthy: true,
                ..Gpu::default()
            })
            .collect(),
    }
}

pub(crate) fn job(id: &str, priority: u32, seq: u64, gpus: u32, nodes: u32) -> PendingJob {
    PendingJob {
        id: id.into(),
        priority,
        seq,
        queue: "default".into(),
        resources: Resources { gpus, nodes, ..Resources::default() },
        max_duration_ms: None,
    }
}

fn running(id: &str, priority: u32, node: &str, gpu_idx: std::ops::Range<usize>) -> RunningJob {
    RunningJob {
        id: id.into(),
        priority,
        queue: "default".into(),
        resources: Resources { gpus: gpu_idx.len() as u32, ..Resources::default() },
        nodes: vec![NodeAssignment {
            node: node.into(),
            gpu_uuids: gpu_idx.map(|i| format!("{node}-gpu{i}")).collect(),
        }],
        started_at_ms: 0,
        max_duration_ms: None,
        stopping: false,
        stopping_for: None,
    }
}

fn placed(plan: &Plan) -> Vec<&str> {
    plan.placements.iter().map(|p| p.job_id.as_str()).collect()
}

fn reason(plan: &Plan, id: &str) -> String {
    plan.waiting.iter().find(|w| w.job_id == id).unwrap().reason.to_string()
}

#[test]
fn higher_priority_is_placed_first() {
    let s = Snapshot {
        nodes: vec![node("a", 1)],
        pending: vec![job("low", 10, 1, 1, 1), job("high", 90, 2, 1, 1)],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert_eq!(placed(&plan), ["high"]);
    assert!(reason(&plan, "low").contains("largest free block is 0"), "{:?}", plan.waiting);
    assert_eq!(plan.waiting[0].position, 1);
}

#[test]
fn eight_gpu_job_is_not_admitted_onto_two_four_gpu_fragments() {
    // Two 8-GPU nodes, each half used: 8 GPUs are free in all, but no node has 8.
    let s = Snapshot {
        nodes: vec![node("a", 8), node("b", 8)],
        running: vec![running("r1", 50, "a", 0..4), running("r2", 50, "b", 0..4)],
        pending: vec![job("big", 50, 1, 8, 1)],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert!(plan.placements.is_empty());
    assert!(reason(&plan, "big").contains("needs 8 GPUs") && reason(&plan, "big").contains("largest free block is 4"));
}

#[test]
fn small_jobs_fill_partly_used_nodes_and_keep_whole_nodes_whole() {
    let s = Snapshot {
        nodes: vec![node("empty", 8), node("half", 8)],
        running: vec![running("r", 50, "half", 0..4)],
        pending: vec![job("small", 50, 1, 2, 1), job("whole", 50, 2, 8, 1)],
        ..Default::default()
    };
    let plan = schedule(&s);
    let small = plan.placements.iter().find(|p| p.job_id == "small").unwrap();
    assert_eq!(small.nodes[0].node, "half");
    let whole = plan.placements.iter().find(|p| p.job_id == "whole").unwrap();
    assert_eq!(whole.nodes[0].node, "empty");
}

#[test]
fn a_gpu_is_never_given_twice() {
    let s = Snapshot {
        nodes: vec![node("a", 2)],
        pending: (0..5).map(|i| job(&format!("j{i}"), 50, i, 1, 1)).collect(),
        ..Default::default()
    };
    let plan = schedule(&s);
    let mut uuids: Vec<_> = plan.placements.iter().flat_map(|p| p.nodes[0].gpu_uuids.clone()).collect();
    uuids.sort();
    uuids.dedup();
    assert_eq!(uuids.len(), 2);
    assert_eq!(plan.placements.len(), 2);
}

#[test]
fn gang_gets_all_nodes_or_none() {
    let s = Snapshot {
        nodes: vec![node("a", 1), node("b", 1)],
        pending: vec![job("gang3", 50, 1, 1, 3), job("gang2", 50, 2, 1, 2)],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert_eq!(placed(&plan), ["gang2"]);
    let mut nodes: Vec<_> = plan.placements[0].nodes.iter().map(|n| n.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "b"]);
    assert!(reason(&plan, "gang3").contains("only 2 nodes"), "{:?}", plan.waiting);
}

#[test]
fn cpu_jobs_prefer_nodes_without_gpus_and_respect_cpu_capacity() {
    let mut cpu = node("cpu", 0);
    cpu.cpus = 8.0;
    let s = Snapshot {
        nodes: vec![node("gpu", 8), cpu],
        pending: (0..10).map(|i| job(&format!("j{i}"), 50, i, 0, 1)).collect(),
        ..Default::default()
    };
    let plan = schedule(&s);
    let on_cpu = plan.placements.iter().filter(|p| p.nodes[0].node == "cpu").count();
    assert_eq!(on_cpu, 8, "the CPU node fills first");
    assert_eq!(plan.placements.len(), 10);
}

#[test]
fn unschedulable_nodes_and_unhealthy_gpus_get_nothing() {
    let mut down = node("down", 4);
    down.schedulable = false;
    let mut sick = node("sick", 1);
    sick.gpus[0].healthy = false;
    let plan =
        schedule(&Snapshot { nodes: vec![down, sick], pending: vec![job("j", 50, 1, 1, 1)], ..Default::default() });
    assert!(plan.placements.is_empty());
    assert!(reason(&plan, "j").contains("no node has that many matching GPUs"), "{:?}", plan.waiting);
    let plan = schedule(&Snapshot { nodes: vec![], pending: vec![job("j", 50, 1, 0, 1)], ..Default::default() });
    assert!(reason(&plan, "j").contains("no agent"));
}

#[test]
fn gpu_model_and_memory_constraints_are_honoured() {
    let mut j = job("a100", 50, 1, 1, 1);
    j.resources.gpu_model = Some("A100".into());
    let mut big = job("big-mem", 50, 2, 1, 1);
    big.resources.gpu_memory_gb = Some(141.0);
    let mut ok = job("h100", 50, 3, 1, 1);
    ok.resources.gpu_model = Some("h100".into());
    let plan = schedule(&Snapshot { nodes: vec![node("a", 4)], pending: vec![j, big, ok], ..Default::default() });
    assert_eq!(placed(&plan), ["h100"]);
    assert!(reason(&plan, "a100").contains("model A100"));
    assert!(reason(&plan, "big-mem").contains("at least 141 GB"));
}

#[test]
fn queues_share_the_fleet_by_weight() {
    let mut pending = Vec::new();
    for i in 0..20 {
        let mut a = job(&format!("a{i}"), 50, i, 1, 1);
        a.queue = "research".into();
        let mut b = job(&format!("b{i}"), 50, 100 + i, 1, 1);
        b.queue = "prod".into();
        pending.extend([a, b]);
    }
    let queues = vec![
        Queue { name: "research".into(), weight: 1.0, gpu_quota: None },
        Queue { name: "prod".into(), weight: 3.0, gpu_quota: None },
    ];
    let plan = schedule(&Snapshot { nodes: vec![node("a", 8), node("b", 8)], pending, queues, ..Default::default() });
    let prod = plan.placements.iter().filter(|p| p.job_id.starts_with('b')).count();
    assert_eq!((prod, 16 - prod), (12, 4), "16 GPUs split 3:1");
}

#[test]
fn a_queue_quota_caps_its_gpus() {
    let queues = vec![Queue { name: "default".into(), weight: 1.0, gpu_quota: Some(3) }];
    let pending = (0..5).map(|i| job(&format!("j{i}"), 50, i, 1, 1)).collect();
    let plan = schedule(&Snapshot { nodes: vec![node("a", 8)], pending, queues, ..Default::default() });
    assert_eq!(plan.placements.len(), 3);
    assert!(reason(&plan, "j3").contains("GPU quota (3 of 3 in use)"), "{:?}", plan.waiting);
}

#[test]
fn preemption_takes_the_fewest_gpus_of_the_lowest_priority() {
    let s = Snapshot {
        nodes: vec![node("a", 4), node("b", 4)],
        running: vec![
            running("low-big", 10, "a", 0..4),
            running("low-small", 10, "b", 0..1),
            running("mid", 40, "b", 1..4),
        ],
        pending: vec![job("urgent", 90, 1, 1, 1)],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert!(plan.placements.is_empty(), "it waits for the victim to stop");
    assert_eq!(
        plan.preemptions,
        [Preemption { job_id: "low-small".into(), for_job: "urgent".into(), nodes: vec!["b".into()] }]
    );
    assert!(reason(&plan, "urgent").contains("preempting"));
}

#[test]
fn preemption_never_hits_equal_or_higher_priority() {
    let s = Snapshot {
        nodes: vec![node("a", 1)],
        running: vec![running("same", 50, "a", 0..1)],
        pending: vec![job("j", 50, 1, 1, 1)],
        ..Default::default()
    };
    assert!(schedule(&s).preemptions.is_empty());
}

#[test]
fn no_new_victims_while_earlier_ones_are_stopping() {
    let mut victim = running("victim", 10, "a", 0..1);
    victim.stopping = true;
    let s = Snapshot {
        nodes: vec![node("a", 1)],
        running: vec![victim, running("other", 10, "a", 0..0)],
        pending: vec![job("urgent", 90, 1, 1, 1)],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert!(plan.preemptions.is_empty());
    assert!(reason(&plan, "urgent").contains("waiting for stopping jobs"));
}

#[test]
fn backfill_runs_short_jobs_in_the_gap_but_never_delays_the_reservation() {
    // Node a: 8 GPUs, 4 busy until t=1h. The 8-GPU job is reserved for t=1h.
    let mut busy = running("busy", 50, "a", 0..4);
    busy.max_duration_ms = Some(3_600_000);
    let big = job("big", 50, 1, 8, 1);
    let mut short = job("short", 50, 2, 2, 1);
    short.max_duration_ms = Some(600_000);
    let mut long = job("long", 50, 3, 2, 1);
    long.max_duration_ms = Some(7_200_000);
    let unbounded = job("unbounded", 50, 4, 2, 1);
    let s = Snapshot {
        nodes: vec![node("a", 8)],
        running: vec![busy],
        pending: vec![big, short, long, unbounded],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert_eq!(placed(&plan), ["short"], "{:?}", plan.waiting);
    let big = plan.waiting.iter().find(|w| w.job_id == "big").unwrap();
    assert_eq!(big.estimated_start_ms, Some(3_600_000));
    assert_eq!(big.reason.code(), WaitCode::Reserved);
    assert!(big.reason.to_string().contains("estimated start in 1h"), "{}", big.reason);
    assert!(reason(&plan, "long").contains("reserved for a job ahead"));
}

#[test]
fn an_unreserved_node_still_takes_any_job() {
    let mut busy = running("busy", 50, "a", 0..4);
    busy.max_duration_ms = Some(3_600_000);
    let s = Snapshot {
        nodes: vec![node("a", 8), node("b", 2)],
        running: vec![busy],
        pending: vec![job("big", 50, 1, 8, 1), job("small", 50, 2, 2, 1)],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert_eq!(placed(&plan), ["small"]);
    assert_eq!(plan.placements[0].nodes[0].node, "b");
}

#[test]
fn a_reservation_counts_the_exact_gpus_jobs_placed_in_the_same_pass_free() {
    let mut n0 = node("n0", 3);
    n0.gpus[0].healthy = false;
    let mut j3 = running("j3", 44, "n0", 1..2);
    j3.max_duration_ms = Some(4_273_000);
    let mut quick = job("quick", 56, 1, 1, 1);
    quick.max_duration_ms = Some(1000);
    let two = job("two", 17, 2, 2, 1);
    let s = Snapshot {
        now_ms: 3_134_959,
        nodes: vec![n0],
        running: vec![j3],
        pending: vec![quick, two],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert_eq!(placed(&plan), ["quick"]);
    assert_eq!(plan.waiting[0].estimated_start_ms, Some(4_273_000), "{:?}", plan.waiting);
}

#[test]
fn a_rank_gets_gpus_on_one_numa_node_keeping_the_fuller_one_whole() {
    // Two NUMA nodes of four GPUs; GPUs 0 and 1 are busy, so NUMA 0 has 2 free and NUMA 1 has 4.
    let mut a = node("a", 8);
    for (i, g) in a.gpus.iter_mut().enumerate() {
        g.numa_node = Some(i as u32 / 4);
    }
    let s = Snapshot {
        nodes: vec![a],
        running: vec![running("r", 50, "a", 0..2)],
        pending: vec![job("pair", 50, 1, 2, 1), job("quad", 50, 2, 4, 1)],
        ..Default::default()
    };
    let plan = schedule(&s);
    let gpus = |id: &str| plan.placements.iter().find(|p| p.job_id == id).unwrap().nodes[0].gpu_uuids.clone();
    assert_eq!(gpus("pair"), ["a-gpu2", "a-gpu3"]);
    assert_eq!(gpus("quad"), ["a-gpu4", "a-gpu5", "a-gpu6", "a-gpu7"]);
}

#[test]
fn a_rank_gets_nvlink_bridged_gpus() {
    // Bridged pairs (0,1) and (2,3); the one free GPU of the first pair is left to a single.
    let mut a = node("a", 4);
    for i in 0..4 {
        a.gpus[i].nvlink_peers = vec![format!("a-gpu{}", i ^ 1)];
    }
    let s = Snapshot {
        nodes: vec![a],
        running: vec![running("r", 50, "a", 1..2)],
        pending: vec![job("pair", 50, 1, 2, 1), job("single", 50, 2, 1, 1)],
        ..Default::default()
    };
    let plan = schedule(&s);
    let gpus = |id: &str| plan.placements.iter().find(|p| p.job_id == id).unwrap().nodes[0].gpu_uuids.clone();
    assert_eq!(gpus("pair"), ["a-gpu2", "a-gpu3"]);
    assert_eq!(gpus("single"), ["a-gpu0"]);
}

#[test]
fn preemption_spares_victims_the_job_does_not_need() {
    // The CPU job is the cheapest candidate but frees no GPU: only the GPU job is stopped.
    let s = Snapshot {
        nodes: vec![node("a", 1)],
        running: vec![running("cpu", 10, "a", 0..0), running("gpu", 10, "a", 0..1)],
        pending: vec![job("urgent", 90, 1, 1, 1)],
        ..Default::default()
    };
    let victims: Vec<String> = schedule(&s).preemptions.into_iter().map(|p| p.job_id).collect();
    assert_eq!(victims, ["gpu"]);
}

#[test]
fn a_reserved_job_keeps_its_turn_when_queue_shares_shift() {
    // Two queues, equal priority; queue b runs less, so its job would come first by share.
    let mut busy = running("busy", 50, "a", 0..4);
    busy.max_duration_ms = Some(3_600_000);
    let mut big_a = job("big-a", 50, 1, 8, 1);
    big_a.queue = "qa".into();
    let mut big_b = job("big-b", 50, 2, 8, 1);
    big_b.queue = "qb".into();
    busy.queue = "qa".into();
    let s =
        Snapshot { nodes: vec![node("a", 8)], running: vec![busy], pending: vec![big_a, big_b], ..Default::default() };
    let first = schedule(&s);
    assert_eq!(first.waiting[0].job_id, "big-b", "the lower share goes first");
    assert!(first.waiting[0].estimated_start_ms.is_some());
    // Had the reservation gone to big-a in an earlier pass, big-a keeps it.
    let kept = schedule(&Snapshot { ahead: vec!["big-a".into()], ..s });
    assert_eq!(kept.waiting[0].job_id, "big-a");
    assert!(kept.waiting[0].estimated_start_ms.is_some());
    assert_eq!(kept.ahead, ["big-a"]);
}

#[test]
fn a_quota_keeps_room_for_the_reserved_job() {
    // Quota 8: the 8-GPU job is reserved; a short job of the same queue could fit the idle
    // node but would take the quota it needs at its start.
    let mut busy = running("busy", 50, "a", 0..4);
    busy.max_duration_ms = Some(3_600_000);
    let mut short = job("short", 40, 2, 2, 1);
    short.max_duration_ms = Some(60_000);
    let s = Snapshot {
        nodes: vec![node("a", 8), node("b", 4)],
        running: vec![busy],
        pending: vec![job("big", 50, 1, 8, 1), short],
        queues: vec![Queue { name: "default".into(), weight: 1.0, gpu_quota: Some(12) }],
        ..Default::default()
    };
    let plan = schedule(&s);
    assert!(placed(&plan).is_empty(), "{:?}", plan.placements);
    assert!(reason(&plan, "short").contains("8 held for waiting jobs ahead of it"), "{:?}", plan.waiting);
}

#[test]
fn a_job_avoids_the_nodes_its_attempts_failed_on_while_another_could_take_it() {
    let avoid = |nodes: &[&str]| [("j".to_string(), nodes.iter().map(|n| n.to_string()).collect())].into();
    let s = Snapshot {
        nodes: vec![node("a", 8), node("b", 8)],
        pending: vec![job("j", 50, 1, 4, 1)],
        avoid: avoid(&["a"]),
        ..Default::default()
    };
    assert_eq!(schedule(&s).placements[0].nodes[0].node, "b");
    // b busy: j waits for b rather than go back to a.
    let busy = running("busy", 60, "b", 0..8);
    let plan = schedule(&Snapshot { running: vec![busy.clone()], ..s.clone() });
    assert!(placed(&plan).is_empty(), "{:?}", plan.placements);
    // Nor does it preempt a lower-priority job on a to get there.
    let low = running("low", 10, "a", 0..8);
    let plan = schedule(&Snapshot { running: vec![busy, low], ..s.clone() });
    assert!(plan.preemptions.is_empty(), "{:?}", plan.preemptions);
    // Only a and b could ever take a 2-node gang: avoiding a would leave it waiting for ever.
    let gang = Snapshot { pending: vec![job("j", 50, 1, 4, 2)], ..s.clone() };
    assert_eq!(placed(&schedule(&gang)), ["j"]);
    let plan = schedule(&Snapshot { nodes: vec![node("a", 8)], ..s });
    assert_eq!(plan.placements[0].nodes[0].node, "a", "a is the only node");
}

#[test]
fn a_job_prefers_the_nodes_that_hold_its_image_where_it_fits() {
    let warm = |nodes: &[&str]| [("j".to_string(), nodes.iter().map(|n| n.to_string()).collect())].into();
    let s = Snapshot {
        nodes: vec![node("a", 8), node("b", 8), node("c", 8)],
        pending: vec![job("j", 50, 1, 4, 1)],
        warm: warm(&["c"]),
        ..Default::default()
    };
    assert_eq!(schedule(&s).placements[0].nodes[0].node, "c");
    // c is full: j goes where it fits rather than wait.
    let full = running("busy", 60, "c", 0..8);
    let plan = schedule(&Snapshot { running: vec![full], ..s.clone() });
    assert_ne!(plan.placements[0].nodes[0].node, "c");
    // Without a warm node the choice is the usual one.
    let cold = schedule(&Snapshot { warm: Default::default(), ..s });
    assert_eq!(cold.placements.len(), 1);
}
