//! Placement as a pure function: a [`Snapshot`] of the fleet, the running jobs and the queue in,
//! a [`Plan`] out. No I/O, no clock: `now_ms` is data, so every decision replays in a test.
//!
//! The policy, in the order it applies:
//! - **Priority, then fair share.** Jobs are considered highest priority first, across all
//!   queues; among equal priorities the next job comes from the queue with the lowest weighted
//!   dominant share (dominant-resource fairness over GPUs and CPUs), then submit order. A queue's
//!   `gpu_quota` caps the GPUs its running jobs may hold.
//! - **Best fit.** A job goes to the node where it leaves the fewest matching GPUs free, so small
//!   jobs fill partly used nodes and whole nodes stay whole for whole-node jobs. CPU-only jobs
//!   prefer nodes with the fewest GPUs. A gang (`nodes: N`) gets N distinct nodes at once or none.
//! - **Topology.** On a node, a rank's GPUs come from one NVLink domain, then one NUMA node,
//!   where the inventory reports them; again best fit, so well-connected groups stay whole
//!   ([`topology`]).
//! - **Preemption.** A job that cannot fit may stop running jobs of strictly lower priority: on
//!   the node(s) where that costs the lowest victim priority, then the fewest GPUs. Victims are
//!   listed in the plan; the job waits until they have stopped (no more victims meanwhile), and
//!   those nodes take nothing else in the meantime.
//! - **Backfill (EASY).** The first job that must wait for resources gets a reservation: the
//!   earliest time enough of it frees up, from running jobs' `max_duration`. Later jobs may use
//!   the reserved nodes only if they declare a `max_duration` that ends before it, and the
//!   reserved job's share of its queue's quota not at all (the same holds for a job waiting on
//!   preemption victims). The first job that must wait, and every job room is held
//!   for, keep their turn at their priority in the next passes ([`Snapshot::ahead`]), so
//!   neither a reservation nor room being freed wanders to another job as queue shares shift.
//! - **Explanations.** Every waiting job gets a reason, its position, and, for the reserved job,
//!   an estimated start.

mod index;
mod reason;
mod topology;

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use crate::spec::Resources;
use index::FleetIndex;
pub use reason::{Short, Start, Unfit, WaitCode, WaitReason, describe};

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now_ms: u64,
    pub nodes: Vec<Node>,
    pub running: Vec<RunningJob>,
    /// Jobs waiting to be placed, in any order.
    pub pending: Vec<PendingJob>,
    /// Queue settings; a queue not listed has weight 1 and no quota.
    pub queues: Vec<Queue>,
    /// Jobs that keep their turn ahead of the others of their priority, in this order: the
    /// previous pass's [`Plan::ahead`]. So shifting queue shares cannot hand a reservation, or
    /// the room stopping jobs free, to another job pass after pass.
    pub ahead: Vec<String>,
    /// Pending jobs' nodes to avoid (their attempts failed there): job id -> node names. Such a
    /// job goes elsewhere, unless no other node could ever take it.
    pub avoid: BTreeMap<String, Vec<String>>,
    /// Pending jobs' nodes that already hold what they need (their container image): job id ->
    /// node names. Such nodes are preferred where the job fits them.
    pub warm: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// False for a node that must receive nothing new (lost, draining).
    pub schedulable: bool,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, Default)]
pub struct Gpu {
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    /// An unhealthy GPU receives nothing new.
    pub healthy: bool,
    /// Where the inventory says: the GPU's NUMA node, and the UUIDs it reaches over NVLink.
    pub numa_node: Option<u32>,
    pub nvlink_peers: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PendingJob {
    pub id: String,
    pub priority: u32,
    /// Submit order; earlier runs first among equal priorities.
    pub seq: u64,
    pub queue: String,
    pub resources: Resources,
    pub max_duration_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RunningJob {
    pub id: String,
    pub priority: u32,
    pub queue: String,
    pub resources: Resources,
    /// One entry per rank.
    pub nodes: Vec<NodeAssignment>,
    pub started_at_ms: u64,
    pub max_duration_ms: Option<u64>,
    /// Already told to stop (preempted or cancelled): its resources free up soon.
    pub stopping: bool,
    /// Preempted for a pending job: the room it frees on the claimed nodes is that job's alone.
    pub stopping_for: Option<Claim>,
}

/// Nodes held for a pending job while the jobs preempted for it stop.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub job_id: String,
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Queue {
    pub name: String,
    pub weight: f64,
    pub gpu_quota: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    /// Running jobs to stop so that a higher-priority job can run.
    pub preemptions: Vec<Preemption>,
    /// Jobs left waiting, in the order they would be considered.
    pub waiting: Vec<Waiting>,
    /// The first job that had to wait for room, and every job room is held for (it preempts,
    /// waits for stopping jobs, or holds the backfill reservation), in the order considered:
    /// the next snapshot's `ahead`.
    pub ahead: Vec<String>,
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
pub struct Preemption {
    pub job_id: String,
    pub for_job: String,
    /// The nodes held for `for_job` (record them with the victim: see [`RunningJob::stopping_for`]).
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub job_id: String,
    pub reason: WaitReason,
    /// 1-based position among waiting jobs.
    pub position: u32,
    pub estimated_start_ms: Option<u64>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub(crate) fn memory_bytes(r: &Resources) -> u64 {
    (r.memory_gb * GIB) as u64
}

/// Places what fits under the policy above. Deterministic: the same snapshot gives the same plan,
/// and the snapshot after applying a plan gives a plan that changes nothing more.
pub fn schedule(snapshot: &Snapshot) -> Plan {
    let (mut plan, settled) = Pass::new(snapshot).run();
    if settled {
        return plan;
    }
    // A pass can change what it saw earlier in itself: victims chosen late free room that jobs
    // considered before could not count on (a reservation, say), and a job placed elsewhere
    // lets go of room claimed for it. Pass again over the applied result, as the next pass
    // would, until a pass does nothing more. Each round places or stops jobs, so this ends.
    let mut world = snapshot.clone();
    let mut placements = Vec::new();
    let mut preemptions = Vec::new();
    loop {
        if plan.placements.is_empty() && plan.preemptions.is_empty() {
            break;
        }
        apply(&mut world, &plan);
        placements.append(&mut plan.placements);
        preemptions.append(&mut plan.preemptions);
        plan = Pass::new(&world).run().0;
    }
    // The last round saw the victims stopping; say what the job is waiting for.
    for w in &mut plan.waiting {
        let victims: Vec<String> =
            preemptions.iter().filter(|p| p.for_job == w.job_id).map(|p| p.job_id.clone()).collect();
        if !victims.is_empty() {
            w.reason = WaitReason::Preempting { victims };
        }
    }
    plan.placements = placements;
    plan.preemptions = preemptions;
    plan
}

/// What the coordinator does with a plan, on the snapshot: placed jobs run from now, victims
/// stop with the room they free claimed for the job they stop for.
fn apply(world: &mut Snapshot, plan: &Plan) {
    let placed: HashMap<&str, &Placement> = plan.placements.iter().map(|p| (p.job_id.as_str(), p)).collect();
    for job in world.pending.iter().filter(|j| placed.contains_key(j.id.as_str())) {
        world.running.push(RunningJob {
            id: job.id.clone(),
            priority: job.priority,
            queue: job.queue.clone(),
            resources: job.resources.clone(),
            nodes: placed[job.id.as_str()].nodes.clone(),
            started_at_ms: world.now_ms,
            max_duration_ms: job.max_duration_ms,
            stopping: false,
            stopping_for: None,
        });
    }
    world.pending.retain(|j| !placed.contains_key(j.id.as_str()));
    for p in &plan.preemptions {
        if let Some(victim) = world.running.iter_mut().find(|r| r.id == p.job_id) {
            victim.stopping = true;
            victim.stopping_for = Some(Claim { job_id: p.for_job.clone(), nodes: p.nodes.clone() });
        }
    }
    world.ahead = plan.ahead.clone();
}

struct QueueUsage {
    weight: f64,
    quota: Option<u32>,
    gpus: f64,
    cpus: f64,
    /// GPUs of the quota held for this pass's waiting jobs that have room held for them.
    held: u32,
}

/// A reservation for the first job that must wait: where and from when.
struct Reservation {
    job_id: String,
    start_ms: u64,
    nodes: HashSet<usize>,
}

struct Pass<'a> {
    snap: &'a Snapshot,
    fleet: FleetIndex,
    queues: BTreeMap<&'a str, QueueUsage>,
    total_gpus: f64,
    total_cpus: f64,
    /// Running jobs on each node (indices into `snap.running`), for preemption and reservations.
    running_on: Vec<Vec<usize>>,
    /// Jobs placed in this pass with a `max_duration`, for the reservation's what-if, and per
    /// node the indices of those with a rank there.
    placed: Vec<PlacedNow>,
    placed_on: Vec<Vec<usize>>,
    /// Whether a job placed in this pass let go of room claimed for it.
    claim_released: bool,
    victims: HashSet<usize>,
    /// Nodes whose stopping jobs were preempted for a pending job: only that job may use them.
    claims: HashMap<usize, &'a str>,
    /// Nodes kept for a higher-priority job waiting on its preemption victims: nothing else
    /// goes there in this pass.
    held: HashSet<usize>,
    reservation: Option<Reservation>,
    min_victim_priority: Option<u32>,
    any_stopping: bool,
    /// The nodes the job being considered avoids.
    avoided: HashSet<usize>,
    plan: Plan,
}

impl<'a> Pass<'a> {
    fn new(snap: &'a Snapshot) -> Self {
        let mut fleet = FleetIndex::new(&snap.nodes);
        let mut running_on = vec![Vec::new(); snap.nodes.len()];
        let mut queues: BTreeMap<&str, QueueUsage> = BTreeMap::new();
        for q in &snap.queues {
            queues.insert(
                &q.name,
                QueueUsage { weight: q.weight.max(1e-6), quota: q.gpu_quota, gpus: 0.0, cpus: 0.0, held: 0 },
            );
        }
        let mut min_victim_priority: Option<u32> = None;
        for (i, job) in snap.running.iter().enumerate() {
            let usage = queues.entry(&job.queue).or_insert_with(default_queue);
            usage.gpus += (job.resources.gpus * job.nodes.len() as u32) as f64;
            usage.cpus += job.resources.cpus * job.nodes.len() as f64;
            for a in &job.nodes {
                if let Some(n) = fleet.node_index(&a.node) {
                    fleet.take(n, &job.resources, &a.gpu_uuids);
                    running_on[n].push(i);
                }
            }
            if !job.stopping {
                min_victim_priority = Some(min_victim_priority.map_or(job.priority, |p| p.min(job.priority)));
            }
        }
        let pending: HashSet<&str> = snap.pending.iter().map(|j| j.id.as_str()).collect();
        let mut claims = HashMap::new();
        for job in snap.running.iter().filter(|r| r.stopping) {
            if let Some(claim) = job.stopping_for.as_ref().filter(|c| pending.contains(c.job_id.as_str())) {
                for n in claim.nodes.iter().filter_map(|name| fleet.node_index(name)) {
                    claims.insert(n, claim.job_id.as_str());
                }
            }
        }
        let total_gpus = snap.nodes.iter().map(|n| n.gpus.len()).sum::<usize>().max(1) as f64;
        let total_cpus = snap.nodes.iter().map(|n| n.cpus).sum::<f64>().max(1.0);
        Pass {
            snap,
            fleet,
            queues,
            total_gpus,
            total_cpus,
            running_on,
            placed: Vec::new(),
            placed_on: vec![Vec::new(); snap.nodes.len()],
            claim_released: false,
            victims: HashSet::new(),
            claims,
            held: HashSet::new(),
            reservation: None,
            min_victim_priority,
            any_stopping: snap.running.iter().any(|r| r.stopping),
            avoided: HashSet::new(),
            plan: Plan::default(),
        }
    }

    /// The plan, and whether it is settled: nothing it did changed what it saw earlier.
    fn run(mut self) -> (Plan, bool) {
        // Each queue's jobs in order; the heap yields the queue with the lowest weighted share.
        let mut per_queue: BTreeMap<&str, Vec<&PendingJob>> = BTreeMap::new();
        for job in &self.snap.pending {
            per_queue.entry(&job.queue).or_default().push(job);
            self.queues.entry(&job.queue).or_insert_with(default_queue);
        }
        // Rank among the jobs kept ahead; the rest after them.
        let ahead: HashMap<&str, usize> = self.snap.ahead.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
        let rank_ahead = |j: &PendingJob| ahead.get(j.id.as_str()).copied().unwrap_or(usize::MAX);
        for jobs in per_queue.values_mut() {
            jobs.sort_by(|a, b| {
                b.priority
                    .cmp(&a.priority)
                    .then(rank_ahead(a).cmp(&rank_ahead(b)))
                    .then(a.seq.cmp(&b.seq))
                    .then(a.id.cmp(&b.id))
            });
            jobs.reverse(); // pop from the end
        }
        // Highest priority first across all queues; among equal priorities, the last pass's
        // jobs kept ahead, then the queue with the lowest weighted share. So no job is ever placed
        // ahead of a higher-priority one.
        let head = |jobs: &Vec<&PendingJob>| {
            jobs.last().map_or((Reverse(0), usize::MAX), |j| (Reverse(j.priority), rank_ahead(j)))
        };
        let mut heap: BinaryHeap<Reverse<(HeadKey, Share, &str)>> =
            per_queue.iter().map(|(q, jobs)| Reverse((head(jobs), self.share(q), *q))).collect();
        while let Some(Reverse((_, _, queue))) = heap.pop() {
            let jobs = per_queue.get_mut(queue).expect("queue in heap");
            let Some(job) = jobs.pop() else { continue };
            self.consider(job);
            if !jobs.is_empty() {
                heap.push(Reverse((head(jobs), self.share(queue), queue)));
            }
        }
        for (i, w) in self.plan.waiting.iter_mut().enumerate() {
            w.position = i as u32 + 1;
        }
        let settled = self.plan.preemptions.is_empty() && !self.claim_released;
        (self.plan, settled)
    }

    fn share(&self, queue: &str) -> Share {
        let q = &self.queues[queue];
        let dominant = (q.gpus / self.total_gpus).max(q.cpus / self.total_cpus);
        Share(dominant / q.weight)
    }

    fn consider(&mut self, job: &PendingJob) {
        let r = &job.resources;
        let gpus_wanted = r.gpus * r.nodes;
        let ends_at = job.max_duration_ms.map(|d| self.snap.now_ms + d);
        let q = &self.queues[job.queue.as_str()];
        if let Some(quota) = q.quota {
            // A job that waits with room held for it (a reservation, nodes held while its
            // victims stop) also holds its share of the quota, even against jobs that would end
            // in time: otherwise it would find the quota taken at its turn.
            let held = q.held;
            if q.gpus + (gpus_wanted + held) as f64 > quota as f64 {
                let reason = WaitReason::Quota { queue: job.queue.clone(), in_use: q.gpus as u32, quota, held };
                return self.wait(job, reason, None);
            }
        }
        if let Some(why) = self.fleet.impossible(r) {
            return self.wait(job, WaitReason::CannotFit { needs: r.clone(), why }, None);
        }
        self.avoided = self.avoided_by(job);
        let reservation = &self.reservation;
        let held = &self.held;
        let avoided = &self.avoided;
        let allowed = |n: usize| {
            !held.contains(&n)
                && !avoided.contains(&n)
                && match reservation {
                    // Backfill: a reserved node takes only jobs that end before the reservation starts.
                    Some(res) if res.nodes.contains(&n) => ends_at.is_some_and(|end| end <= res.start_ms),
                    _ => true,
                }
        };
        let warm: HashSet<usize> = self
            .snap
            .warm
            .get(&job.id)
            .map(|names| names.iter().filter_map(|n| self.fleet.node_index(n)).collect())
            .unwrap_or_default();
        let found = match warm.is_empty() {
            true => self.fleet.find(r, &allowed),
            false => self.fleet.find(r, &|n| allowed(n) && warm.contains(&n)).or_else(|| self.fleet.find(r, &allowed)),
        };
        match found {
            Some(nodes) => self.place(job, nodes, ends_at),
            None => self.blocked(job),
        }
    }

    /// The nodes `job` avoids, unless fewer than its gang's nodes would be left that could ever
    /// take it: then none, since waiting for ever is worse than another try there.
    fn avoided_by(&self, job: &PendingJob) -> HashSet<usize> {
        let Some(names) = self.snap.avoid.get(&job.id).filter(|a| !a.is_empty()) else { return HashSet::new() };
        let avoided: HashSet<usize> = names.iter().filter_map(|n| self.fleet.node_index(n)).collect();
        let others = (0..self.snap.nodes.len())
            .filter(|&n| {
                !avoided.contains(&n) && self.snap.nodes[n].schedulable && self.fleet.could_ever_fit(n, &job.resources)
            })
            .count();
        if others >= job.resources.nodes as usize { avoided } else { HashSet::new() }
    }

    fn place(&mut self, job: &PendingJob, nodes: Vec<usize>, ends_at: Option<u64>) {
        let r = &job.resources;
        let mut assignments = Vec::with_capacity(nodes.len());
        for &n in &nodes {
            let gpus = self.fleet.take_best(n, r);
            assignments.push(NodeAssignment { node: self.snap.nodes[n].name.clone(), gpu_uuids: gpus });
        }
        let usage = self.queues.get_mut(job.queue.as_str()).expect("queue known");
        usage.gpus += (r.gpus * r.nodes) as f64;
        usage.cpus += r.cpus * r.nodes as f64;
        if let Some(ends_at) = ends_at {
            for &n in &nodes {
                self.placed_on[n].push(self.placed.len());
            }
            self.placed.push(PlacedNow { ends_at, resources: r.clone(), assignments: assignments.clone() });
        }
        // Placed, it needs the room claimed for it no more: others may have it, as they will
        // in the next pass.
        if !self.claims.is_empty() {
            let before = self.claims.len();
            self.claims.retain(|_, c| *c != job.id);
            self.claim_released |= self.claims.len() != before;
        }
        self.plan.placements.push(Placement { job_id: job.id.clone(), nodes: assignments });
    }

    /// The job fits the fleet but not now: preempt for it, reserve for it, or explain.
    fn blocked(&mut self, job: &PendingJob) {
        if self.plan.ahead.is_empty() {
            self.plan.ahead.push(job.id.clone());
        }
        let r = &job.resources;
        let free = self.fleet.largest_free_block(r);
        let short = if r.gpus > 0 && free < r.gpus as usize {
            Short::Gpus { largest_free: free }
        } else if r.nodes > 1 {
            Short::Nodes
        } else {
            Short::CpusOrMemory
        };
        let reserved_ahead = self.reservation.as_ref().is_some_and(|res| res.job_id != job.id);
        let kept = |n: &usize| self.held.contains(n) || self.claims.get(n).is_some_and(|c| *c != job.id);
        let any_kept = !self.held.is_empty() || !self.claims.is_empty();
        let held_for_higher = any_kept
            && self.held.iter().chain(self.claims.keys()).filter(|n| kept(n)).any(|&n| self.fleet.fits_now(n, r));
        // Stopping jobs' room goes to the first blocked job it suits, which keeps it.
        if self.any_stopping || self.min_victim_priority.is_some_and(|p| p < job.priority) {
            match self.preempt_for(job) {
                Preempt::Victims(victims, nodes) => {
                    let names: Vec<String> = nodes.iter().map(|&n| self.snap.nodes[n].name.clone()).collect();
                    self.held.extend(nodes);
                    let ids: Vec<String> = victims.iter().map(|&v| self.snap.running[v].id.clone()).collect();
                    for &v in &victims {
                        self.victims.insert(v);
                        self.plan.preemptions.push(Preemption {
                            job_id: self.snap.running[v].id.clone(),
                            for_job: job.id.clone(),
                            nodes: names.clone(),
                        });
                    }
                    self.hold_for(job);
                    return self.wait(job, WaitReason::Preempting { victims: ids }, None);
                }
                Preempt::AlreadyStopping(nodes) => {
                    self.held.extend(nodes);
                    self.hold_for(job);
                    return self.wait(job, WaitReason::WaitingForStopping, None);
                }
                Preempt::No => {}
            }
        }
        let mut estimate = None;
        let mut start = Start::NotEstimated;
        if self.reservation.is_none() {
            if let Some(res) = self.reserve(job) {
                estimate = Some(res.start_ms);
                self.hold_for(job);
                start = Start::Reserved { in_ms: res.start_ms - self.snap.now_ms };
                self.reservation = Some(res);
            } else {
                start = Start::Unknown;
            }
        }
        let reason = WaitReason::NoRoom { needs: r.clone(), short, reserved_ahead, held_for_higher, start };
        self.wait(job, reason, estimate)
    }

    /// Room is held for `job` (victims stopping, a reservation): it holds its share of its
    /// queue's quota too, and keeps its place in the next passes.
    fn hold_for(&mut self, job: &PendingJob) {
        let q = self.queues.get_mut(job.queue.as_str()).expect("queue known");
        q.held += job.resources.gpus * job.resources.nodes;
        if !self.plan.ahead.contains(&job.id) {
            self.plan.ahead.push(job.id.clone());
        }
    }

    fn wait(&mut self, job: &PendingJob, reason: WaitReason, estimated_start_ms: Option<u64>) {
        self.plan.waiting.push(Waiting { job_id: job.id.clone(), reason, position: 0, estimated_start_ms });
    }

    /// Victims for `job`: per node, the cheapest set of lower-priority running jobs whose
    /// resources would let it fit; then the `nodes` cheapest nodes.
    fn preempt_for(&self, job: &PendingJob) -> Preempt {
        let r = &job.resources;
        // Nodes held for another preemptor, or reserved for a job ahead of this one, are not ours.
        let ours = |n: usize| {
            !self.held.contains(&n)
                && self.claims.get(&n).is_none_or(|c| *c == job.id)
                && self.reservation.as_ref().is_none_or(|res| res.job_id == job.id || !res.nodes.contains(&n))
        };
        let usable = |n: usize| ours(n) && !self.avoided.contains(&n);
        // A victim with a rank on a node kept for another job would hand that job's room to this
        // one once it stops: such jobs are not candidates.
        let spans_others =
            |victim: &RunningJob| victim.nodes.iter().filter_map(|a| self.fleet.node_index(&a.node)).any(|n| !ours(n));
        let mut options: Vec<(Cost, usize, Vec<usize>)> = Vec::new();
        let mut stopping_would_do = Vec::new();
        for n in 0..self.snap.nodes.len() {
            if !self.snap.nodes[n].schedulable || !usable(n) {
                continue;
            }
            let mut free = self.fleet.free_of(n);
            let mut stopping = free.clone();
            let mut candidates: Vec<usize> = Vec::new();
            for &j in &self.running_on[n] {
                let running = &self.snap.running[j];
                if running.stopping || self.victims.contains(&j) {
                    stopping.release(&running.resources, &running.nodes, &self.snap.nodes[n]);
                } else if running.priority < job.priority && !spans_others(running) {
                    candidates.push(j);
                }
            }
            if stopping.fits(&self.snap.nodes[n], r) {
                stopping_would_do.push(n);
                continue;
            }
            // Lowest priority first, then the fewest GPUs.
            candidates.sort_by_key(|&j| {
                let rj = &self.snap.running[j];
                (rj.priority, rj.resources.gpus, Reverse(rj.started_at_ms), rj.id.clone())
            });
            let node = &self.snap.nodes[n];
            let mut chosen = Vec::new();
            for j in candidates {
                if free.fits(node, r) {
                    break;
                }
                free.release(&self.snap.running[j].resources, &self.snap.running[j].nodes, node);
                chosen.push(j);
            }
            // Spare any victim the job fits without (a CPU job chosen before the GPU job that
            // actually blocks), costliest first.
            if free.fits(node, r) {
                for k in (0..chosen.len()).rev() {
                    let mut without = self.fleet.free_of(n);
                    for &j in chosen.iter().enumerate().filter(|(i, _)| *i != k).map(|(_, j)| j) {
                        without.release(&self.snap.running[j].resources, &self.snap.running[j].nodes, node);
                    }
                    if without.fits(node, r) {
                        chosen.remove(k);
                    }
                }
            }
            if !chosen.is_empty() && free.fits(node, r) {
                let cost = Cost {
                    max_priority: chosen.iter().map(|&j| self.snap.running[j].priority).max().unwrap_or(0),
                    gpus: chosen.iter().map(|&j| self.snap.running[j].resources.gpus).sum(),
                    jobs: chosen.len(),
                };
                options.push((cost, n, chosen));
            }
        }
        if stopping_would_do.len() >= r.nodes as usize {
            // The nodes claimed for it when its victims were chosen come first, so a later pass
            // holds the same nodes as the pass that preempted.
            stopping_would_do.sort_by_key(|n| (self.claims.get(n) != Some(&job.id.as_str()), *n));
            stopping_would_do.truncate(r.nodes as usize);
            return Preempt::AlreadyStopping(stopping_would_do);
        }
        options.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        // Nodes where it fits now (or once stopping jobs end) count; victims make up the rest,
        // and all of them are held for it.
        let need = r.nodes as usize - stopping_would_do.len();
        if options.len() < need {
            return Preempt::No;
        }
        let chosen: Vec<(Cost, usize, Vec<usize>)> = options.into_iter().take(need).collect();
        let mut nodes = stopping_would_do;
        nodes.extend(chosen.iter().map(|c| c.1));
        let mut victims: Vec<usize> = chosen.into_iter().flat_map(|(_, _, v)| v).collect();
        victims.sort();
        victims.dedup();
        Preempt::Victims(victims, nodes)
    }

    /// EASY backfill's reservation: per node, when enough frees up for one rank of `job`
    /// (running jobs end at start + max_duration; jobs placed in this pass likewise).
    fn reserve(&self, job: &PendingJob) -> Option<Reservation> {
        let r = &job.resources;
        let now = self.snap.now_ms;
        let mut ready: Vec<(u64, usize)> = Vec::new();
        for n in 0..self.snap.nodes.len() {
            let claimed = self.claims.get(&n).is_some_and(|c| *c != job.id);
            let kept = claimed || self.held.contains(&n) || self.avoided.contains(&n);
            if !self.snap.nodes[n].schedulable || kept || !self.fleet.could_ever_fit(n, r) {
                continue;
            }
            let mut free = self.fleet.free_of(n);
            let mut ends: Vec<(u64, NodeFreeDelta)> = Vec::new();
            for &j in &self.running_on[n] {
                let rj = &self.snap.running[j];
                let end = if rj.stopping || self.victims.contains(&j) {
                    Some(now)
                } else {
                    rj.max_duration_ms.map(|d| (rj.started_at_ms + d).max(now))
                };
                let Some(end) = end else { continue };
                ends.push((end, NodeFreeDelta::Running(j)));
            }
            for &p in &self.placed_on[n] {
                ends.push((self.placed[p].ends_at, NodeFreeDelta::Placed(p)));
            }
            ends.sort_by_key(|e| e.0);
            let node = &self.snap.nodes[n];
            if free.fits(node, r) {
                ready.push((now, n));
                continue;
            }
            for (end, delta) in ends {
                match delta {
                    NodeFreeDelta::Running(j) => {
                        let rj = &self.snap.running[j];
                        free.release(&rj.resources, &rj.nodes, node)
                    }
                    NodeFreeDelta::Placed(p) => {
                        let placed = &self.placed[p];
                        free.release(&placed.resources, &placed.assignments, node)
                    }
                }
                if free.fits(node, r) {
                    ready.push((end, n));
                    break;
                }
            }
        }
        if ready.len() < r.nodes as usize {
            return None;
        }
        ready.sort();
        let chosen = &ready[..r.nodes as usize];
        Some(Reservation {
            job_id: job.id.clone(),
            start_ms: chosen.iter().map(|c| c.0).max().unwrap_or(now),
            nodes: chosen.iter().map(|c| c.1).collect(),
        })
    }
}

struct PlacedNow {
    ends_at: u64,
    resources: Resources,
    assignments: Vec<NodeAssignment>,
}

enum NodeFreeDelta {
    Running(usize),
    Placed(usize),
}

/// Victims (with the nodes they free), or the nodes where stopping jobs already make room.
enum Preempt {
    Victims(Vec<usize>, Vec<usize>),
    AlreadyStopping(Vec<usize>),
    No,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Cost {
    max_priority: u32,
    gpus: u32,
    jobs: usize,
}

/// A queue's head job, for the heap: its priority (highest first), then its rank among the jobs
/// kept ahead (`usize::MAX` for the rest).
type HeadKey = (Reverse<u32>, usize);

/// A queue's weighted dominant share; totally ordered for the heap.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Share(f64);
impl Eq for Share {}
impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn default_queue() -> QueueUsage {
    QueueUsage { weight: 1.0, quota: None, gpus: 0.0, cpus: 0.0, held: 0 }
}

pub(crate) fn gpu_matches(gpu: &Gpu, want: &Resources) -> bool {
    let model_ok = want.gpu_model.as_ref().is_none_or(|m| gpu.name.to_lowercase().contains(&m.to_lowercase()));
    let memory_ok = want.gpu_memory_gb.is_none_or(|gb| gpu.memory_total_bytes as f64 >= gb * GIB * 0.98);
    model_ok && memory_ok
}

#[cfg(test)]
mod tests;
