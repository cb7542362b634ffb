//! Placement as a pure function: a [`Snapshot`] of the fleet and the queue in, a [`Plan`] out.
//!
//! This is the first-fit placer of the end-to-end system: jobs in priority order (then submit
//! order), each placed on the first nodes with room, a gang (`nodes > 1`) on distinct nodes all
//! at once or not at all. It never reads the clock or does I/O; the coordinator applies the plan
//! only if the state it was computed from (`revision`) is still current.

use std::collections::BTreeSet;

use crate::spec::Resources;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The store revision the snapshot was read at; copied into the plan.
    pub revision: u64,
    pub now_ms: u64,
    pub nodes: Vec<Node>,
    /// Jobs waiting to be placed, in any order.
    pub pending: Vec<PendingJob>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// False for a node that must receive nothing new (lost, draining).
    pub schedulable: bool,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub cpus_used: f64,
    pub memory_used_bytes: u64,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone)]
pub struct Gpu {
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    pub healthy: bool,
    /// Already placed for a running job.
    pub in_use: bool,
}

#[derive(Debug, Clone)]
pub struct PendingJob {
    pub id: String,
    pub priority: u32,
    /// Submit order; earlier runs first among equal priorities.
    pub seq: u64,
    pub resources: Resources,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub revision: u64,
    pub placements: Vec<Placement>,
    /// Jobs left waiting, each with a reason a person understands.
    pub waiting: Vec<Waiting>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub job_id: String,
    /// One entry per rank, in rank order.
    pub nodes: Vec<NodeAssignment>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeAssignment {
    pub node: String,
    pub gpu_uuids: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub job_id: String,
    pub reason: String,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Places what fits. Deterministic: the same snapshot always gives the same plan.
pub fn schedule(snapshot: &Snapshot) -> Plan {
    let mut nodes = snapshot.nodes.clone();
    let mut order: Vec<&PendingJob> = snapshot.pending.iter().collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)).then(a.id.cmp(&b.id)));

    let mut plan = Plan { revision: snapshot.revision, ..Plan::default() };
    for job in order {
        match place(&nodes, &job.resources) {
            Ok(assignments) => {
                reserve(&mut nodes, &job.resources, &assignments);
                plan.placements.push(Placement { job_id: job.id.clone(), nodes: assignments });
            }
            Err(reason) => plan.waiting.push(Waiting { job_id: job.id.clone(), reason }),
        }
    }
    plan
}

/// Finds `nodes` distinct nodes for one job, or says why not.
fn place(nodes: &[Node], want: &Resources) -> Result<Vec<NodeAssignment>, String> {
    let mut chosen = Vec::new();
    let mut used = BTreeSet::new();
    for (i, node) in nodes.iter().enumerate() {
        if chosen.len() == want.nodes as usize {
            break;
        }
        if let Some(gpus) = fits(node, want) {
            used.insert(i);
            chosen.push(NodeAssignment { node: node.name.clone(), gpu_uuids: gpus });
        }
    }
    if chosen.len() == want.nodes as usize {
        return Ok(chosen);
    }
    Err(explain(nodes, want, chosen.len()))
}

/// The GPUs this node would give the job, if everything the job needs fits on it.
fn fits(node: &Node, want: &Resources) -> Option<Vec<String>> {
    if !node.schedulable {
        return None;
    }
    let memory = (want.memory_gb * GIB) as u64;
    if node.cpus - node.cpus_used < want.cpus - 1e-9
        || node.memory_bytes.saturating_sub(node.memory_used_bytes) < memory
    {
        return None;
    }
    let gpus: Vec<String> = node
        .gpus
        .iter()
        .filter(|g| g.healthy && !g.in_use && gpu_matches(g, want))
        .take(want.gpus as usize)
        .map(|g| g.uuid.clone())
        .collect();
    (gpus.len() == want.gpus as usize).then_some(gpus)
}

fn gpu_matches(gpu: &Gpu, want: &Resources) -> bool {
    let model_ok = want.gpu_model.as_ref().is_none_or(|m| gpu.name.to_lowercase().contains(&m.to_lowercase()));
    let memory_ok = want.gpu_memory_gb.is_none_or(|gb| gpu.memory_total_bytes as f64 >= gb * GIB * 0.98);
    model_ok && memory_ok
}

fn reserve(nodes: &mut [Node], want: &Resources, assignments: &[NodeAssignment]) {
    for a in assignments {
        let node = nodes.iter_mut().find(|n| n.name == a.node).expect("assignment names a snapshot node");
        node.cpus_used += want.cpus;
        node.memory_used_bytes += (want.memory_gb * GIB) as u64;
        for g in node.gpus.iter_mut().filter(|g| a.gpu_uuids.contains(&g.uuid)) {
            g.in_use = true;
        }
    }
}

fn explain(nodes: &[Node], want: &Resources, found: usize) -> String {
    let what = describe(want);
    let live: Vec<&Node> = nodes.iter().filter(|n| n.schedulable).collect();
    if live.is_empty() {
        return format!("needs {what}; no agent is connected");
    }
    let matching_gpus = |n: &Node| n.gpus.iter().filter(|g| g.healthy && gpu_matches(g, want)).count();
    if want.gpus > 0 && live.iter().all(|n| matching_gpus(n) < want.gpus as usize) {
        let largest = live.iter().map(|n| matching_gpus(n)).max().unwrap_or(0);
        return format!("needs {what}; no node has that many matching GPUs (the most on one node is {largest})");
    }
    let free = |n: &Node| n.gpus.iter().filter(|g| g.healthy && !g.in_use && gpu_matches(g, want)).count();
    if want.gpus > 0 {
        let largest = live.iter().map(|n| free(n)).max().unwrap_or(0);
        if largest < want.gpus as usize {
            return format!("needs {what}; the largest free block is {largest}");
        }
    }
    if want.nodes > 1 {
        return format!("needs {what}; only {found} of {} nodes have room now", want.nodes);
    }
    format!("needs {what}; waiting for CPUs or memory to free up")
}

fn describe(want: &Resources) -> String {
    let mut parts = Vec::new();
    if want.gpus > 0 {
        let mut g = format!("{} GPU{}", want.gpus, if want.gpus == 1 { "" } else { "s" });
        if let Some(m) = &want.gpu_model {
            g += &format!(" of model {m}");
        }
        if let Some(gb) = want.gpu_memory_gb {
            g += &format!(" with at least {gb} GB");
        }
        parts.push(g);
    }
    parts.push(format!("{} CPUs", want.cpus));
    parts.push(format!("{} GB memory", want.memory_gb));
    let each = if want.nodes > 1 { format!(" on each of {} nodes", want.nodes) } else { " on one node".into() };
    format!("{}{each}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, gpus: usize) -> Node {
        Node {
            name: name.into(),
            schedulable: true,
            cpus: 8.0,
            memory_bytes: 32 << 30,
            cpus_used: 0.0,
            memory_used_bytes: 0,
            gpus: (0..gpus)
                .map(|i| Gpu {
                    uuid: format!("{name}-gpu{i}"),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    memory_total_bytes: 80 << 30,
                    healthy: true,
                    in_use: false,
                })
                .collect(),
        }
    }

    fn job(id: &str, priority: u32, seq: u64, gpus: u32, nodes: u32) -> PendingJob {
        PendingJob { id: id.into(), priority, seq, resources: Resources { gpus, nodes, ..Resources::default() } }
    }

    #[test]
    fn higher_priority_is_placed_first() {
        let s = Snapshot {
            nodes: vec![node("a", 1)],
            pending: vec![job("low", 10, 1, 1, 1), job("high", 90, 2, 1, 1)],
            ..Default::default()
        };
        let plan = schedule(&s);
        assert_eq!(plan.placements.len(), 1);
        assert_eq!(plan.placements[0].job_id, "high");
        assert!(plan.waiting[0].reason.contains("largest free block is 0"), "{:?}", plan.waiting);
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
        assert_eq!(uuids.len(), 2);
        uuids.dedup();
        assert_eq!(uuids.len(), 2);
    }

    #[test]
    fn gang_gets_all_nodes_or_none() {
        let s = Snapshot {
            nodes: vec![node("a", 1), node("b", 1)],
            pending: vec![job("gang3", 50, 1, 1, 3), job("gang2", 50, 2, 1, 2)],
            ..Default::default()
        };
        let plan = schedule(&s);
        assert_eq!(plan.placements.len(), 1);
        assert_eq!(plan.placements[0].job_id, "gang2");
        let nodes: Vec<_> = plan.placements[0].nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(nodes, ["a", "b"]);
        assert!(plan.waiting[0].reason.contains("each of 3 nodes"), "{:?}", plan.waiting);
    }

    #[test]
    fn cpu_jobs_run_on_gpu_less_nodes_and_respect_cpu_capacity() {
        let s = Snapshot {
            nodes: vec![node("cpu", 0)],
            pending: (0..10).map(|i| job(&format!("j{i}"), 50, i, 0, 1)).collect(),
            ..Default::default()
        };
        let plan = schedule(&s);
        assert_eq!(plan.placements.len(), 8, "8 CPUs, 1 CPU each");
        assert!(plan.waiting[0].reason.contains("CPUs or memory"));
    }

    #[test]
    fn unschedulable_nodes_get_nothing() {
        let mut n = node("a", 1);
        n.schedulable = false;
        let plan = schedule(&Snapshot { nodes: vec![n], pending: vec![job("j", 50, 1, 0, 1)], ..Default::default() });
        assert!(plan.placements.is_empty());
        assert!(plan.waiting[0].reason.contains("no agent"));
    }

    #[test]
    fn gpu_model_constraint_is_honoured() {
        let mut j = job("j", 50, 1, 1, 1);
        j.resources.gpu_model = Some("A100".into());
        let plan = schedule(&Snapshot { nodes: vec![node("a", 4)], pending: vec![j], ..Default::default() });
        assert!(plan.placements.is_empty());
        assert!(plan.waiting[0].reason.contains("model A100"), "{:?}", plan.waiting);
    }
}
