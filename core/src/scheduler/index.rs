//! What is free where, indexed so a pass over 100,000 jobs stays fast: per GPU kind (model and
//! memory), the schedulable nodes ordered by how many GPUs of that kind they have free. Best fit
//! is then a range query; "does anything fit at all" is a look at the largest entry.

use std::collections::{BTreeSet, HashMap};

use super::{Gpu, Node, NodeAssignment, Unfit, gpu_matches, memory_bytes};
use crate::spec::Resources;

/// What is free on one node.
#[derive(Debug, Clone)]
pub(crate) struct NodeFree {
    pub gpus: Vec<bool>,
    pub cpus: f64,
    pub memory: u64,
}

impl NodeFree {
    fn matching_free(&self, node: &Node, r: &Resources) -> usize {
        node.gpus.iter().zip(&self.gpus).filter(|(g, free)| **free && g.healthy && gpu_matches(g, r)).count()
    }

    pub fn fits(&self, node: &Node, r: &Resources) -> bool {
        self.cpus + 1e-9 >= r.cpus
            && self.memory >= memory_bytes(r)
            && (r.gpus == 0 || self.matching_free(node, r) >= r.gpus as usize)
    }

    /// As if a job holding `nodes` with `r` per rank had stopped: its rank here gives back
    /// what it held.
    pub fn release(&mut self, r: &Resources, nodes: &[NodeAssignment], node: &Node) {
        for a in nodes.iter().filter(|a| a.node == node.name) {
            self.cpus += r.cpus;
            self.memory += memory_bytes(r);
            for (i, g) in node.gpus.iter().enumerate() {
                if a.gpu_uuids.contains(&g.uuid) {
                    self.gpus[i] = true;
                }
            }
        }
    }
}

/// A GPU kind: every GPU with this name and memory size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    name: String,
    memory: u64,
}

pub(crate) struct FleetIndex {
    nodes: Vec<Node>,
    free: Vec<NodeFree>,
    names: HashMap<String, usize>,
    kinds: Vec<Kind>,
    /// Per node: (kind, indices of that node's GPUs of the kind).
    node_kinds: Vec<Vec<(usize, Vec<usize>)>>,
    /// Per kind: (free healthy GPUs of the kind, node), schedulable nodes only.
    by_kind: Vec<BTreeSet<(u32, usize)>>,
    /// Per kind: healthy GPUs of the kind per schedulable node, sorted (capacity, not usage).
    totals: Vec<Vec<u32>>,
    /// Per node and GPU: its NVLink domain, where it has NVLink peers.
    nvlink: Vec<Vec<Option<u32>>>,
    /// Per node: whether the inventory reported any topology (NVLink, NUMA) for its GPUs.
    topology: Vec<bool>,
    /// Schedulable nodes, fewest GPUs first: CPU-only jobs keep off GPU nodes when they can.
    cpu_order: Vec<usize>,
    max_cpus: f64,
    max_memory: u64,
}

impl FleetIndex {
    pub fn new(nodes: &[Node]) -> FleetIndex {
        let mut kinds: Vec<Kind> = Vec::new();
        let mut kind_ids: HashMap<Kind, usize> = HashMap::new();
        let mut node_kinds = Vec::with_capacity(nodes.len());
        for node in nodes {
            let mut mine: Vec<(usize, Vec<usize>)> = Vec::new();
            for (i, g) in node.gpus.iter().enumerate() {
                let kind = Kind { name: g.name.clone(), memory: g.memory_total_bytes };
                let id = *kind_ids.entry(kind.clone()).or_insert_with(|| {
                    kinds.push(kind);
                    kinds.len() - 1
                });
                match mine.iter_mut().find(|(k, _)| *k == id) {
                    Some((_, idx)) => idx.push(i),
                    None => mine.push((id, vec![i])),
                }
            }
            node_kinds.push(mine);
        }
        let mut index = FleetIndex {
            free: nodes
                .iter()
                .map(|n| NodeFree {
                    gpus: n.gpus.iter().map(|g| g.healthy).collect(),
                    cpus: n.cpus,
                    memory: n.memory_bytes,
                })
                .collect(),
            names: nodes.iter().enumerate().map(|(i, n)| (n.name.clone(), i)).collect(),
            nvlink: nodes.iter().map(|n| super::topology::nvlink_domains(&n.gpus)).collect(),
            topology: nodes
                .iter()
                .map(|n| n.gpus.iter().any(|g| g.numa_node.is_some() || !g.nvlink_peers.is_empty()))
                .collect(),
            by_kind: vec![BTreeSet::new(); kinds.len()],
            totals: vec![Vec::new(); kinds.len()],
            kinds,
            node_kinds,
            cpu_order: Vec::new(),
            max_cpus: 0.0,
            max_memory: 0,
            nodes: nodes.to_vec(),
        };
        for (n, node) in nodes.iter().enumerate().filter(|(_, n)| n.schedulable) {
            for (k, idx) in &index.node_kinds[n] {
                let healthy = idx.iter().filter(|&&i| node.gpus[i].healthy).count() as u32;
                index.by_kind[*k].insert((healthy, n));
                index.totals[*k].push(healthy);
            }
            index.cpu_order.push(n);
            index.max_cpus = index.max_cpus.max(node.cpus);
            index.max_memory = index.max_memory.max(node.memory_bytes);
        }
        for t in &mut index.totals {
            t.sort_unstable();
        }
        index.cpu_order.sort_by_key(|&n| (nodes[n].gpus.len(), n));
        index
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.names.get(name).copied()
    }

    pub fn free_of(&self, n: usize) -> NodeFree {
        self.free[n].clone()
    }

    pub fn fits_now(&self, n: usize, r: &Resources) -> bool {
        self.nodes[n].schedulable && self.free[n].fits(&self.nodes[n], r)
    }

    /// Whether the node's capacity (not what is free now) could ever hold one rank.
    pub fn could_ever_fit(&self, n: usize, r: &Resources) -> bool {
        let node = &self.nodes[n];
        let gpus = node.gpus.iter().filter(|g| g.healthy && gpu_matches(g, r)).count();
        node.cpus + 1e-9 >= r.cpus && node.memory_bytes >= memory_bytes(r) && gpus >= r.gpus as usize
    }

    fn matching_kinds(&self, r: &Resources) -> Vec<usize> {
        let probe =
            |k: &Kind| Gpu { name: k.name.clone(), memory_total_bytes: k.memory, healthy: true, ..Gpu::default() };
        (0..self.kinds.len()).filter(|&k| gpu_matches(&probe(&self.kinds[k]), r)).collect()
    }

    /// Why a job can never run on this fleet as it is, if it cannot.
    pub fn impossible(&self, r: &Resources) -> Option<Unfit> {
        if self.cpu_order.is_empty() {
            return Some(Unfit::NoNodes);
        }
        if r.cpus > self.max_cpus + 1e-9 {
            return Some(Unfit::Cpus { want: r.cpus, most: self.max_cpus });
        }
        if memory_bytes(r) > self.max_memory {
            return Some(Unfit::Memory { gb: r.memory_gb });
        }
        if r.gpus == 0 {
            return (self.cpu_order.len() < r.nodes as usize)
                .then_some(Unfit::Nodes { connected: self.cpu_order.len() });
        }
        let kinds = self.matching_kinds(r);
        let mut enough = 0;
        let mut most = 0;
        for k in &kinds {
            let t = &self.totals[*k];
            enough += t.len() - t.partition_point(|&c| c < r.gpus);
            most = most.max(t.last().copied().unwrap_or(0));
        }
        if enough >= r.nodes as usize {
            return None;
        }
        Some(if most < r.gpus { Unfit::GpusPerNode { most } } else { Unfit::GpuNodes { enough } })
    }

    /// The most matching GPUs free on any one node.
    pub fn largest_free_block(&self, r: &Resources) -> usize {
        self.matching_kinds(r)
            .iter()
            .filter_map(|&k| self.by_kind[k].last().map(|(c, _)| *c as usize))
            .max()
            .unwrap_or(0)
    }

    /// Best-fit nodes for every rank of a job (distinct nodes), among those `allowed`.
    pub fn find(&self, r: &Resources, allowed: &dyn Fn(usize) -> bool) -> Option<Vec<usize>> {
        let want = r.nodes as usize;
        let mut chosen: Vec<(u32, usize)> = Vec::with_capacity(want);
        if r.gpus == 0 {
            for &n in &self.cpu_order {
                if allowed(n) && self.free[n].fits(&self.nodes[n], r) {
                    chosen.push((0, n));
                    if chosen.len() == want {
                        break;
                    }
                }
            }
        } else {
            for k in self.matching_kinds(r) {
                let mut found = 0;
                for &(count, n) in self.by_kind[k].range((r.gpus, 0)..) {
                    if found == want {
                        break;
                    }
                    if chosen.iter().any(|c| c.1 == n) || !allowed(n) || !self.free[n].fits(&self.nodes[n], r) {
                        continue;
                    }
                    chosen.push((count, n));
                    found += 1;
                }
            }
            chosen.sort_unstable();
            chosen.truncate(want);
        }
        (chosen.len() == want).then(|| chosen.into_iter().map(|(_, n)| n).collect())
    }

    /// Takes one rank's resources on node `n`, choosing the GPUs; returns their UUIDs.
    pub fn take_best(&mut self, n: usize, r: &Resources) -> Vec<String> {
        let node = &self.nodes[n];
        let usable = (0..node.gpus.len())
            .filter(|&i| self.free[n].gpus[i] && node.gpus[i].healthy && gpu_matches(&node.gpus[i], r));
        let picked: Vec<usize> = if self.topology[n] {
            let candidates: Vec<usize> = usable.collect();
            let nvlink = |g: usize| self.nvlink[n][g];
            let numa = |g: usize| node.gpus[g].numa_node;
            super::topology::pick(&candidates, r.gpus as usize, &[&nvlink, &numa])
        } else {
            usable.take(r.gpus as usize).collect()
        };
        let uuids = picked.iter().map(|&i| node.gpus[i].uuid.clone()).collect();
        self.occupy(n, r, &picked);
        uuids
    }

    /// Marks what a running job holds on node `n`.
    pub fn take(&mut self, n: usize, r: &Resources, uuids: &[String]) {
        let picked: Vec<usize> = (0..self.nodes[n].gpus.len())
            .filter(|&i| uuids.contains(&self.nodes[n].gpus[i].uuid) && self.free[n].gpus[i])
            .collect();
        self.occupy(n, r, &picked);
    }

    fn occupy(&mut self, n: usize, r: &Resources, gpus: &[usize]) {
        let schedulable = self.nodes[n].schedulable;
        for (k, idx) in &self.node_kinds[n] {
            let before = self.count_free(n, idx);
            let after = before - idx.iter().filter(|i| gpus.contains(i)).count() as u32;
            if schedulable && before != after {
                self.by_kind[*k].remove(&(before, n));
                self.by_kind[*k].insert((after, n));
            }
        }
        let free = &mut self.free[n];
        for &i in gpus {
            free.gpus[i] = false;
        }
        free.cpus -= r.cpus;
        free.memory = free.memory.saturating_sub(memory_bytes(r));
    }

    fn count_free(&self, n: usize, idx: &[usize]) -> u32 {
        idx.iter().filter(|&&i| self.free[n].gpus[i] && self.nodes[n].gpus[i].healthy).count() as u32
    }
}
