//! The placement loop: snapshot the store and the fleet, run the pure scheduler, apply its plan.
//! Applying re-checks every node of a placement (connected, not drained, its GPUs present and
//! healthy) in the same store transaction that checks the job's version, as Nomad's plan applier
//! does: whatever changed since the snapshot is seen, and the next pass plans again.

use std::collections::HashMap;
use std::time::Duration;

use gantry_core::scheduler::{self, Gpu, Node, PendingJob, RunningJob, Snapshot};
use gantry_proto::v1;
use tracing::{info, warn};

use super::Coordinator;
use crate::error::{Error, Result};
use crate::fleet::Fleet;
use crate::lifecycle::Transition;
use crate::records::{JobRecord, JobState, RankPlacement, StopReason};

/// Threads applying one pass's placements.
const PLACING_THREADS: usize = 16;

/// How often a pass runs when nothing wakes the loop: reaping and backfill follow time.
const TICK: Duration = Duration::from_secs(1);

/// Ports for torchrun's MASTER_PORT: spread by job id so jobs on one node rarely collide, and
/// a new one for each attempt, so a gang that starts again never meets its last attempt's
/// rendezvous (a rank of it may still hold the port, or be cut off yet alive).
fn master_port(job_id: &str, attempt: u32) -> u32 {
    let id = job_id.parse::<u64>().unwrap_or(0);
    29500 + ((id * 7 + attempt as u64) % 2000) as u32
}

/// Why a placement was not applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// The job changed since the snapshot (cancelled, placed, requeued).
    JobChanged,
    /// A node of the placement changed: named, with what is wrong now.
    Node { node: String, why: &'static str },
}

impl Coordinator {
    /// Waits for something to change (or a tick), then places what fits. Runs until the process
    /// ends.
    pub async fn run_scheduler(&self) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            if let Err(e) =
                self.reap_lost_agents().and_then(|_| self.reconcile_serving()).and_then(|_| self.schedule_pass())
            {
                warn!(error = %e, "scheduling pass failed");
            }
        }
    }

    /// One pass: snapshot, pure placement, apply each placement if its job and nodes are
    /// unchanged.
    pub fn schedule_pass(&self) -> Result<()> {
        let jobs = self.store.jobs()?;
        let queued = jobs.iter().filter(|j| j.state == JobState::Queued);
        self.queued_by_user.recount(queued.map(|j| j.owner.as_str()));
        let (snapshot, versions, backing_off) = self.snapshot(&jobs);
        let plan = scheduler::schedule(&snapshot);
        *self.ahead.lock().expect("ahead lock poisoned") = plan.ahead.clone();
        {
            let mut waiting = self.waiting.lock().expect("waiting lock poisoned");
            waiting.clear();
            for w in plan.waiting.iter().chain(&backing_off) {
                waiting.insert(w.job_id.clone(), w.clone());
            }
        }
        for p in &plan.preemptions {
            self.requeue(&p.job_id, StopReason::Preempted { for_job: p.for_job.clone(), nodes: p.nodes.clone() })?;
        }
        let by_id: HashMap<&str, &JobRecord> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        let place = |placement: &scheduler::Placement| {
            let job = by_id[placement.job_id.as_str()];
            self.place(job, versions[&job.id], placement).map(|_| ())
        };
        // Placements commit from several threads at once, so that one group commit of the
        // store carries many of them rather than one fsync each.
        let threads = plan.placements.len().min(PLACING_THREADS);
        if threads <= 1 {
            return plan.placements.iter().try_for_each(place);
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            match plan.placements.get(i) {
                                Some(p) => place(p)?,
                                None => return Ok(()),
                            }
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| w.join().expect("a placing thread panicked"))
        })
    }

    /// Starts the attempt a placement gives, if the job is unchanged since `version` and every
    /// node still takes it, and sends its ranks to their agents. `Ok(Err(_))`: not applied, and
    /// why; the next pass sees the change.
    pub(crate) fn place(
        &self,
        job: &JobRecord,
        version: u64,
        placement: &scheduler::Placement,
    ) -> Result<std::result::Result<(), Refused>> {
        let resume = match self.resume_point(job) {
            Ok(r) => r,
            Err(Error::InvalidArgument(why)) => {
                self.fail_before_start(&job.id, &why)?;
                return Ok(Err(Refused::JobChanged));
            }
            Err(e) => return Err(e),
        };
        let ranks: Vec<RankPlacement> = placement
            .nodes
            .iter()
            .enumerate()
            .map(|(rank, n)| RankPlacement { rank: rank as u32, node: n.node.clone(), gpu_uuids: n.gpu_uuids.clone() })
            .collect();
        let now = self.now_ms();
        let mut outcome = Err(Refused::JobChanged);
        let started = self.store.update(&job.id, |record| {
            // The fleet lock is taken inside the store's update and never the other way round.
            if let Err(refused) = nodes_take(&self.fleet(), &ranks) {
                outcome = Err(refused);
                return false;
            }
            let t = record.start_attempt(version, ranks.clone(), now);
            outcome = if t.changed() { Ok(()) } else { Err(Refused::JobChanged) };
            if let Some(attempt) = record.current_attempt_mut().filter(|_| t.changed()) {
                attempt.resumed_from_step = resume.as_ref().filter(|r| r.job_id == job.id).map(|r| r.step);
            }
            t != Transition::Unchanged
        })?;
        let Some(started) = started else {
            if let Err(Refused::Node { node, why }) = &outcome {
                self.stale_placements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(job = %job.id, node = %node, why, "placement refused: the node changed since the snapshot");
            }
            return Ok(outcome);
        };
        self.placements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(job = %started.id, attempt = started.attempt, nodes = ?ranks.iter().map(|r| &r.node).collect::<Vec<_>>(), "job placed");
        self.send_assignments(&started, &ranks, resume);
        self.changed();
        Ok(Ok(()))
    }

    /// What the pure scheduler sees, the versions of the pending jobs in it, and the queued jobs
    /// held out of it while they wait out a failed attempt's backoff.
    fn snapshot(&self, jobs: &[JobRecord]) -> (Snapshot, HashMap<String, u64>, Vec<scheduler::Waiting>) {
        let now = self.now_ms();
        let fleet = self.fleet();
        let nodes: Vec<Node> = fleet
            .agents
            .iter()
            .map(|(name, a)| Node {
                name: name.clone(),
                schedulable: a.session.is_some() && !a.drained,
                cpus: a.inventory.cpus as f64,
                memory_bytes: a.inventory.memory_bytes,
                gpus: a
                    .inventory
                    .gpus
                    .iter()
                    .map(|g| Gpu {
                        uuid: g.uuid.clone(),
                        name: g.name.clone(),
                        memory_total_bytes: g.memory_total_bytes,
                        healthy: takes_work(g),
                        numa_node: g.numa_node,
                        nvlink_peers: g.nvlink_peers.clone(),
                    })
                    .collect(),
            })
            .collect();
        let mut pending = Vec::new();
        let mut running = Vec::new();
        let mut versions = HashMap::new();
        let mut avoid = std::collections::BTreeMap::new();
        let mut warm = std::collections::BTreeMap::new();
        let mut backing_off = Vec::new();
        let max_duration_ms = |job: &JobRecord| job.spec.max_duration_secs.map(|s| s * 1000);
        // A serve job itself is never placed: its replicas are.
        for job in jobs.iter().filter(|j| !j.is_serving()) {
            match job.state {
                JobState::Queued if !job.cancel_requested => {
                    if let Some(at) = job.retry_at_ms.filter(|at| *at > now) {
                        let reason = scheduler::WaitReason::Backoff { in_ms: (at - now) as u64 };
                        let id = job.id.clone();
                        backing_off.push(scheduler::Waiting {
                            job_id: id,
                            reason,
                            position: 0,
                            estimated_start_ms: None,
                        });
                        continue;
                    }
                    let avoided = job.avoided_nodes();
                    if !avoided.is_empty() {
                        avoid.insert(job.id.clone(), avoided);
                    }
                    if let Some(image) = &job.spec.image {
                        let image = gantry_core::spec::normalize_image(image);
                        let holding: Vec<String> = fleet
                            .agents
                            .iter()
                            .filter(|(_, a)| a.inventory.images.contains(&image))
                            .map(|(name, _)| name.clone())
                            .collect();
                        if !holding.is_empty() {
                            warm.insert(job.id.clone(), holding);
                        }
                    }
                    versions.insert(job.id.clone(), job.version);
                    pending.push(PendingJob {
                        id: job.id.clone(),
                        priority: job.spec.priority,
                        seq: job.seq,
                        queue: job.spec.queue.clone(),
                        resources: job.spec.resources.clone(),
                        max_duration_ms: max_duration_ms(job),
                    });
                }
                JobState::Running => {
                    let Some(attempt) = job.current_attempt() else { continue };
                    let stopping_for = match &job.stopping {
                        Some(StopReason::Preempted { for_job, nodes }) => {
                            Some(scheduler::Claim { job_id: for_job.clone(), nodes: nodes.clone() })
                        }
                        _ => None,
                    };
                    running.push(RunningJob {
                        id: job.id.clone(),
                        priority: job.spec.priority,
                        queue: job.spec.queue.clone(),
                        resources: job.spec.resources.clone(),
                        nodes: attempt
                            .placement
                            .iter()
                            .map(|r| scheduler::NodeAssignment { node: r.node.clone(), gpu_uuids: r.gpu_uuids.clone() })
                            .collect(),
                        started_at_ms: attempt.started_at_ms.max(0) as u64,
                        max_duration_ms: max_duration_ms(job),
                        stopping: job.is_stopping(),
                        stopping_for,
                    });
                }
                _ => {}
            }
        }
        let queues = self.settings.queues.clone();
        let ahead = self.ahead.lock().expect("ahead lock poisoned").clone();
        (Snapshot { now_ms: now as u64, nodes, running, pending, queues, ahead, avoid, warm }, versions, backing_off)
    }

    /// Where a placed job starts from: its own latest checkpoint on a restart, else `init_from`.
    /// `InvalidArgument`: it cannot start (the checkpoint it names does not exist).
    fn resume_point(&self, job: &JobRecord) -> Result<Option<v1::CheckpointRef>> {
        let own = self.store.checkpoints(&job.id)?;
        if let Some(latest) = own.last() {
            return Ok(Some(v1::CheckpointRef { job_id: job.id.clone(), step: latest.step }));
        }
        let Some((field, from)) = job.spec.starts_from() else { return Ok(None) };
        let (job_id, step) = self.named_checkpoint(field, from)?;
        Ok(Some(v1::CheckpointRef { job_id, step }))
    }

    fn send_assignments(&self, job: &JobRecord, ranks: &[RankPlacement], resume: Option<v1::CheckpointRef>) {
        let fleet = self.fleet();
        let master_addr = fleet.agents.get(&ranks[0].node).map(|a| a.addr.clone()).unwrap_or_default();
        for rank in ranks {
            let msg = v1::CoordinatorMessage {
                msg: Some(v1::coordinator_message::Msg::Assign(v1::Assignment {
                    job_id: job.id.clone(),
                    attempt: job.attempt,
                    rank: rank.rank,
                    world_size: ranks.len() as u32,
                    spec: Some(v1::JobSpec::from(&job.spec)),
                    gpu_uuids: rank.gpu_uuids.clone(),
                    master_addr: master_addr.clone(),
                    master_port: master_port(&job.id, job.attempt),
                    resume: resume.clone(),
                })),
            };
            // A full or closed channel means the agent is going away: the reaper requeues.
            match fleet.sender(&rank.node) {
                Some(tx) => {
                    if tx.try_send(msg).is_err() {
                        warn!(job = %job.id, agent = %rank.node, "could not send the assignment");
                    }
                }
                None => warn!(job = %job.id, agent = %rank.node, "agent disconnected before its assignment"),
            }
        }
    }

    /// Placements refused at apply time because a node changed since the snapshot.
    pub fn stale_placements(&self) -> u64 {
        self.stale_placements.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Whether a GPU takes new work. A GPU in MIG mode is usable only through its instances, which
/// jobs cannot ask for yet: no whole-GPU job goes there.
fn takes_work(g: &v1::GpuInfo) -> bool {
    g.healthy && g.mig_enabled != Some(true)
}

/// Whether every node of a placement still takes it, as the fleet is now. (GPUs free of other
/// jobs need no check here: only this loop places, and it planned from every running job.)
fn nodes_take(fleet: &Fleet, ranks: &[RankPlacement]) -> std::result::Result<(), Refused> {
    for rank in ranks {
        let refuse = |why| Err(Refused::Node { node: rank.node.clone(), why });
        let Some(agent) = fleet.agents.get(&rank.node) else { return refuse("unknown") };
        if agent.session.is_none() {
            return refuse("disconnected");
        }
        if agent.drained {
            return refuse("drained");
        }
        for uuid in &rank.gpu_uuids {
            match agent.inventory.gpus.iter().find(|g| &g.uuid == uuid) {
                None => return refuse("a placed GPU is gone from its inventory"),
                Some(g) if !takes_work(g) => return refuse("a placed GPU is unhealthy"),
                Some(_) => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use gantry_core::JobSpec;
    use tokio::sync::mpsc;

    use super::*;
    use crate::control::Settings;

    fn gpu(uuid: &str, healthy: bool) -> v1::GpuInfo {
        v1::GpuInfo {
            uuid: uuid.into(),
            name: "NVIDIA H100".into(),
            memory_total_bytes: 80 << 30,
            healthy,
            ..Default::default()
        }
    }

    fn inventory(healthy: bool) -> v1::Inventory {
        v1::Inventory { cpus: 8, memory_bytes: 64 << 30, gpus: vec![gpu("GPU-0", healthy)], ..Default::default() }
    }

    /// A coordinator with agent `a` (one GPU) connected, a queued one-GPU job, and the plan the
    /// scheduler made for it.
    fn planned()
    -> (tempfile::TempDir, Coordinator, mpsc::Receiver<v1::CoordinatorMessage>, JobRecord, u64, scheduler::Placement)
    {
        let dir = tempfile::tempdir().unwrap();
        let c = Coordinator::open(dir.path(), Settings::default()).unwrap();
        c.register_agent("a", inventory(true), "127.0.0.1".into()).unwrap();
        let (tx, rx) = mpsc::channel(16);
        c.attach_session("a", v1::Heartbeat { inventory: Some(inventory(true)), ..Default::default() }, tx).unwrap();
        let job = c
            .submit(JobSpec::from_yaml("name: j\ncommand: [\"true\"]\nresources: {gpus: 1}\n").unwrap(), "dev")
            .unwrap();
        let (snapshot, versions, _) = c.snapshot(&c.store.jobs().unwrap());
        let plan = scheduler::schedule(&snapshot);
        assert_eq!(plan.placements.len(), 1, "{plan:?}");
        let version = versions[&job.id];
        (dir, c, rx, job, version, plan.placements[0].clone())
    }

    #[test]
    fn a_placement_on_a_node_drained_since_the_snapshot_is_refused() {
        let (_dir, c, _rx, job, version, placement) = planned();
        c.drain("a", true).unwrap();
        let applied = c.place(&job, version, &placement).unwrap();
        assert_eq!(applied, Err(Refused::Node { node: "a".into(), why: "drained" }));
        assert_eq!(c.store.job(&job.id).unwrap().state, JobState::Queued);
        assert_eq!((c.placements(), c.stale_placements()), (0, 1));
    }

    #[test]
    fn a_placement_on_a_gpu_unhealthy_since_the_snapshot_is_refused() {
        let (_dir, c, _rx, job, version, placement) = planned();
        c.heartbeat("a", v1::Heartbeat { inventory: Some(inventory(false)), ..Default::default() }).unwrap();
        let applied = c.place(&job, version, &placement).unwrap();
        assert_eq!(applied, Err(Refused::Node { node: "a".into(), why: "a placed GPU is unhealthy" }));
        assert_eq!(c.store.job(&job.id).unwrap().state, JobState::Queued);
    }

    #[test]
    fn a_placement_on_a_node_disconnected_since_the_snapshot_is_refused() {
        let (_dir, c, rx, job, version, placement) = planned();
        drop(rx);
        let session = 1; // the only session opened
        c.detach_session("a", session);
        let applied = c.place(&job, version, &placement).unwrap();
        assert_eq!(applied, Err(Refused::Node { node: "a".into(), why: "disconnected" }));
    }

    #[test]
    fn an_unchanged_placement_starts_the_job_and_sends_its_assignment() {
        let (_dir, c, mut rx, job, version, placement) = planned();
        assert_eq!(c.place(&job, version, &placement).unwrap(), Ok(()));
        assert_eq!(c.store.job(&job.id).unwrap().state, JobState::Running);
        // After the ack of the session's first heartbeat.
        let sent = std::iter::from_fn(|| rx.try_recv().ok())
            .find(|m| !matches!(m.msg, Some(v1::coordinator_message::Msg::Ack(_))))
            .unwrap();
        assert!(matches!(sent.msg, Some(v1::coordinator_message::Msg::Assign(a)) if a.gpu_uuids == ["GPU-0"]));
        // Applying the same plan again is refused: the job changed.
        assert_eq!(c.place(&job, version, &placement).unwrap(), Err(Refused::JobChanged));
    }
}
