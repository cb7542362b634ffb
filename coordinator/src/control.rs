//! The coordinator's decisions: queue a job, place what fits (through the pure scheduler), record
//! what agents report, requeue work from lost agents. The gRPC services are thin layers over this.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gantry_core::JobSpec;
use gantry_core::scheduler::{self, Gpu, Node, PendingJob, RunningJob, Snapshot};
use gantry_proto::v1;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use crate::checkpoints::CheckpointStorage;
use crate::error::{Error, Result};
use crate::fleet::{AgentConn, Fleet, Session};
use crate::job_metrics::JobMetrics;
use crate::logs::LogStore;
use crate::records::{AgentRecord, CheckpointRecord, JobRecord, JobState, RankPlacement};
use crate::store::{EmbeddedStore, StateStore};

/// Settings with defaults that suit one machine; tests shorten the timeouts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// An agent silent this long is lost: its jobs are requeued.
    pub agent_timeout: Duration,
    /// How long a cancelled job has between SIGTERM and SIGKILL.
    pub grace_period: Duration,
    pub heartbeat_interval: Duration,
    /// Queue weights and GPU quotas; unlisted queues have weight 1 and no quota.
    pub queues: Vec<scheduler::Queue>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            agent_timeout: Duration::from_secs(20),
            grace_period: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            queues: Vec::new(),
        }
    }
}

pub struct Coordinator {
    pub store: Arc<dyn StateStore>,
    pub logs: LogStore,
    pub checkpoints: CheckpointStorage,
    pub settings: Settings,
    /// A std mutex: held for map updates only, never across an await.
    fleet: Mutex<Fleet>,
    /// Why each queued job waits, and where it stands: from the last scheduling pass.
    waiting: Mutex<HashMap<String, scheduler::Waiting>>,
    /// The jobs the last pass kept ahead of their priority (see `Snapshot::ahead`). In memory:
    /// after a restart the first pass works them out again.
    ahead: Mutex<Vec<String>>,
    wake: Notify,
    /// Ticks whenever a job changes state: log followers wait on it.
    jobs_changed: watch::Sender<u64>,
    started: Instant,
    placements: std::sync::atomic::AtomicU64,
    /// What jobs report about their training (loss, accuracy, ...), in memory.
    pub metrics: JobMetrics,
}

/// What running jobs hold on one node.
#[derive(Debug, Clone, Default)]
pub struct NodeUsage {
    pub jobs: Vec<String>,
    pub cpus_used: f64,
    pub memory_used_bytes: u64,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Threads applying one pass's placements.
const PLACING_THREADS: usize = 16;

/// Ports for torchrun's MASTER_PORT: spread by job id so jobs on one node rarely collide.
fn master_port(job_id: &str) -> u32 {
    29500 + (job_id.parse::<u64>().unwrap_or(0) % 2000) as u32
}

impl Coordinator {
    /// A coordinator on the embedded store under `data_dir`.
    pub fn open(data_dir: &std::path::Path, settings: Settings) -> Result<Coordinator> {
        std::fs::create_dir_all(data_dir).map_err(Error::io(format!("creating {}", data_dir.display())))?;
        let store = Arc::new(EmbeddedStore::open(&data_dir.join("state.redb"))?);
        Coordinator::with_store(store, data_dir, settings)
    }

    /// A coordinator on `store`; logs and checkpoint files live under `data_dir`.
    pub fn with_store(
        store: Arc<dyn StateStore>,
        data_dir: &std::path::Path,
        settings: Settings,
    ) -> Result<Coordinator> {
        std::fs::create_dir_all(data_dir).map_err(Error::io(format!("creating {}", data_dir.display())))?;
        let jobs_dir = data_dir.join("jobs");
        let mut fleet = Fleet::default();
        // Agents registered before a restart are known, but not connected, until they return.
        for agent in store.agents()? {
            let inventory = prost::Message::decode(agent.inventory.as_slice()).unwrap_or_default();
            fleet.agents.insert(
                agent.name.clone(),
                AgentConn {
                    inventory,
                    addr: String::new(),
                    last_seen: Instant::now(),
                    session: None,
                    drained: agent.drained,
                },
            );
        }
        Ok(Coordinator {
            store,
            logs: LogStore::new(jobs_dir.clone()),
            checkpoints: CheckpointStorage::on_disk(jobs_dir),
            settings,
            fleet: Mutex::new(fleet),
            waiting: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            jobs_changed: watch::channel(0).0,
            started: Instant::now(),
            placements: Default::default(),
            metrics: JobMetrics::default(),
            ahead: Mutex::default(),
        })
    }

    fn fleet(&self) -> std::sync::MutexGuard<'_, Fleet> {
        self.fleet.lock().expect("fleet lock poisoned")
    }

    fn changed(&self) {
        self.jobs_changed.send_modify(|v| *v += 1);
        self.wake.notify_one();
    }

    pub fn subscribe_jobs(&self) -> watch::Receiver<u64> {
        self.jobs_changed.subscribe()
    }

    // ---- users --------------------------------------------------------------------------------

    pub fn submit(&self, spec: JobSpec) -> Result<JobRecord> {
        spec.validate().map_err(|e| Error::InvalidArgument(format!("invalid job spec: {e}")))?;
        if let Some(from) = spec.train.as_ref().and_then(|t| t.init_from.as_ref()) {
            let (job, _) = gantry_core::spec::parse_checkpoint_ref(from)
                .map_err(|e| Error::InvalidArgument(format!("train.init_from: {e}")))?;
            self.store
                .job(&job)
                .map_err(|_| Error::InvalidArgument(format!("train.init_from: job {job} does not exist")))?;
        }
        let job = self.store.submit(spec, now_ms())?;
        info!(job = %job.id, name = %job.spec.name, "job queued");
        self.changed();
        Ok(job)
    }

    pub fn cancel(&self, id: &str) -> Result<JobRecord> {
        let now = now_ms();
        let updated = self.store.update(id, |job| {
            if job.state.is_terminal() || job.cancel_requested {
                return false;
            }
            job.cancel_requested = true;
            if job.state == JobState::Queued {
                job.state = JobState::Cancelled;
                job.ended_at_ms = Some(now);
                job.message = "cancelled before it started".into();
            }
            true
        })?;
        let job = match updated {
            Some(job) => job,
            None => return self.store.job(id),
        };
        if job.state == JobState::Running {
            self.stop_ranks(&job, None);
        }
        info!(job = %id, "cancel requested");
        self.changed();
        Ok(job)
    }

    /// Sends SIGTERM-with-grace to every rank of the job's current attempt, except `except`.
    fn stop_ranks(&self, job: &JobRecord, except: Option<u32>) {
        let Some(attempt) = job.current_attempt() else { return };
        let fleet = self.fleet();
        for rank in attempt.placement.iter().filter(|r| Some(r.rank) != except) {
            if let Some(tx) = fleet.sender(&rank.node) {
                let _ = tx.try_send(self.cancel_message(&job.id, job.attempt));
            }
        }
    }

    /// A job on a GPU that turned unhealthy is stopped with its grace period (time to
    /// checkpoint) and requeued elsewhere; it does not count as a failed attempt.
    fn stop_jobs_on_unhealthy_gpus(&self, node: &str, unhealthy: &[(String, String)]) -> Result<()> {
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            if job.cancel_requested || job.preempted_by.is_some() {
                continue;
            }
            let Some(attempt) = job.current_attempt() else { continue };
            let hit = attempt
                .placement
                .iter()
                .filter(|r| r.node == node)
                .flat_map(|r| r.gpu_uuids.iter())
                .find_map(|uuid| unhealthy.iter().find(|(u, _)| u == uuid));
            if let Some((uuid, reason)) = hit {
                warn!(job = %job.id, gpu = %uuid, reason = %reason, "GPU unhealthy: stopping its job to requeue it");
                self.preempt(&job.id, &format!("GPU {uuid} unhealthy ({reason})"), &[])?;
            }
        }
        Ok(())
    }

    /// Stops a running job so a higher-priority one can run; it returns to the queue and
    /// resumes from its latest checkpoint, without counting as a failed attempt.
    fn preempt(&self, id: &str, for_job: &str, nodes: &[String]) -> Result<()> {
        let updated = self.store.update(id, |job| {
            if job.state != JobState::Running || job.preempted_by.is_some() || job.cancel_requested {
                return false;
            }
            job.preempted_by = Some(for_job.to_string());
            job.preempted_for_nodes = nodes.to_vec();
            true
        })?;
        if let Some(job) = updated {
            info!(job = %id, for_job, "preempting");
            self.stop_ranks(&job, None);
            self.changed();
        }
        Ok(())
    }

    fn cancel_message(&self, job_id: &str, attempt: u32) -> v1::CoordinatorMessage {
        v1::CoordinatorMessage {
            msg: Some(v1::coordinator_message::Msg::Cancel(v1::Cancel {
                job_id: job_id.to_string(),
                attempt,
                grace_period_ms: self.settings.grace_period.as_millis() as u64,
            })),
        }
    }

    /// Every GPU of the fleet with its node and the running job on it (if any).
    pub fn gpus(&self) -> Result<Vec<(String, v1::GpuInfo, Option<String>)>> {
        let mut on_gpu = HashMap::new();
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            for rank in job.current_attempt().map(|a| a.placement.as_slice()).unwrap_or(&[]) {
                for uuid in &rank.gpu_uuids {
                    on_gpu.insert(uuid.clone(), job.id.clone());
                }
            }
        }
        Ok(self
            .nodes()
            .into_iter()
            .flat_map(|(node, _, inventory, _)| {
                let on_gpu = &on_gpu;
                inventory.gpus.into_iter().map(move |g| {
                    let job = on_gpu.get(&g.uuid).cloned();
                    (node.clone(), g, job)
                })
            })
            .collect())
    }

    /// Per node: its running jobs and the CPUs and memory they hold.
    pub fn usage_by_node(&self) -> Result<HashMap<String, NodeUsage>> {
        let mut usage: HashMap<String, NodeUsage> = HashMap::new();
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            for rank in job.current_attempt().map(|a| a.placement.as_slice()).unwrap_or(&[]) {
                let entry = usage.entry(rank.node.clone()).or_default();
                entry.jobs.push(job.id.clone());
                entry.cpus_used += job.spec.resources.cpus;
                entry.memory_used_bytes += job.spec.memory_bytes();
            }
        }
        Ok(usage)
    }

    /// Jobs placed since this coordinator started.
    pub fn placements(&self) -> u64 {
        self.placements.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn waiting(&self, id: &str) -> Option<scheduler::Waiting> {
        self.waiting.lock().expect("waiting lock poisoned").get(id).cloned()
    }

    /// Every job with its place in the queue, in the order people read them (the CLI, the web
    /// page and `gantry top` all show this order): see [`display_order`].
    pub fn listed_jobs(&self) -> Result<Vec<(JobRecord, Option<scheduler::Waiting>)>> {
        let jobs = self.store.jobs()?;
        let mut jobs: Vec<_> = {
            let waiting = self.waiting.lock().expect("waiting lock poisoned");
            jobs.into_iter()
                .map(|j| {
                    let w = waiting.get(&j.id).cloned();
                    (j, w)
                })
                .collect()
        };
        display_order(&mut jobs);
        Ok(jobs)
    }

    pub fn nodes(&self) -> Vec<(String, bool, v1::Inventory, Instant)> {
        self.fleet()
            .agents
            .iter()
            .map(|(name, a)| (name.clone(), a.session.is_some(), a.inventory.clone(), a.last_seen))
            .collect()
    }

    pub fn drained(&self, name: &str) -> bool {
        self.fleet().agents.get(name).is_some_and(|a| a.drained)
    }

    /// Drains (or undrains) a node: it keeps its running jobs and receives nothing new.
    pub fn drain(&self, name: &str, drained: bool) -> Result<()> {
        if !self.store.set_drained(name, drained)? {
            return Err(Error::NotFound(format!("no node named {name} (see gantry nodes)")));
        }
        if let Some(agent) = self.fleet().agents.get_mut(name) {
            agent.drained = drained;
        }
        info!(node = %name, drained, "node drain changed");
        self.changed();
        Ok(())
    }

    // ---- agents -------------------------------------------------------------------------------

    pub fn register_agent(&self, name: &str, inventory: v1::Inventory, addr: String) -> Result<()> {
        let bytes = prost::Message::encode_to_vec(&inventory);
        let drained = self.fleet().agents.get(name).is_some_and(|a| a.drained);
        let record = AgentRecord { name: name.to_string(), inventory: bytes, registered_at_ms: now_ms(), drained };
        self.store.put_agent(&record)?;
        let mut fleet = self.fleet();
        let entry = fleet.agents.entry(name.to_string()).or_insert_with(|| AgentConn {
            inventory: inventory.clone(),
            addr: addr.clone(),
            last_seen: Instant::now(),
            session: None,
            drained,
        });
        entry.inventory = inventory;
        entry.addr = addr;
        entry.last_seen = Instant::now();
        info!(agent = %name, gpus = entry.inventory.gpus.len(), "agent registered");
        Ok(())
    }

    /// Opens an agent's session. The first heartbeat lists every job the agent holds: reconcile
    /// it against what the store expects on that node before anything new is sent there.
    pub fn attach_session(
        &self,
        name: &str,
        first: v1::Heartbeat,
        tx: mpsc::Sender<v1::CoordinatorMessage>,
    ) -> Result<u64> {
        {
            let fleet = self.fleet();
            if !fleet.agents.contains_key(name) {
                return Err(Error::FailedPrecondition(format!("agent {name} must register before opening a session")));
            }
        }
        let held: BTreeMap<(String, u32, u32), v1::JobReport> =
            first.jobs.iter().map(|r| ((r.job_id.clone(), r.attempt, r.rank), r.clone())).collect();
        // Reconcile while the node is still unschedulable, so nothing placed on it now can be
        // mistaken for a job it lost.
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            let Some(attempt) = job.current_attempt() else { continue };
            for rank in attempt.placement.iter().filter(|r| r.node == name) {
                if !held.contains_key(&(job.id.clone(), job.attempt, rank.rank)) {
                    warn!(job = %job.id, agent = %name, "agent no longer holds the job");
                    self.end_attempt(
                        &job.id,
                        job.attempt,
                        rank.rank,
                        None,
                        format!("lost: agent {name} no longer had it"),
                    )?;
                }
            }
        }
        let session = {
            let mut fleet = self.fleet();
            let id = fleet.next_session_id();
            let agent = fleet.agents.get_mut(name).expect("checked above");
            agent.session = Some(Session { id, tx: tx.clone() });
            agent.last_seen = Instant::now();
            if let Some(inv) = first.inventory.clone() {
                agent.inventory = inv;
            }
            id
        };
        for report in first.jobs {
            self.job_report(name, report)?;
        }
        info!(agent = %name, session, "agent session open");
        self.changed();
        Ok(session)
    }

    pub fn detach_session(&self, name: &str, session: u64) {
        let mut fleet = self.fleet();
        if let Some(agent) = fleet.agents.get_mut(name)
            && agent.session.as_ref().is_some_and(|s| s.id == session)
        {
            agent.session = None;
            info!(agent = %name, "agent session closed");
        }
    }

    pub fn heartbeat(&self, name: &str, hb: v1::Heartbeat) -> Result<()> {
        let unhealthy: Vec<(String, String)> = hb
            .inventory
            .as_ref()
            .map(|inv| {
                inv.gpus.iter().filter(|g| !g.healthy).map(|g| (g.uuid.clone(), g.health_reason.clone())).collect()
            })
            .unwrap_or_default();
        {
            let mut fleet = self.fleet();
            if let Some(agent) = fleet.agents.get_mut(name) {
                agent.last_seen = Instant::now();
                if let Some(inv) = hb.inventory {
                    agent.inventory = inv;
                }
            }
        }
        if !unhealthy.is_empty() {
            self.stop_jobs_on_unhealthy_gpus(name, &unhealthy)?;
        }
        for m in hb.metrics {
            self.metrics.record(m);
        }
        // Every report, not only exits: a running attempt the coordinator moved on from is
        // stopped, and a stop the agent missed while away is sent again.
        for report in hb.jobs {
            self.job_report(name, report)?;
        }
        Ok(())
    }

    /// What an agent says about one attempt. Idempotent: agents repeat exits until released.
    pub fn job_report(&self, name: &str, report: v1::JobReport) -> Result<()> {
        let job = match self.store.job(&report.job_id) {
            Ok(job) => job,
            Err(Error::JobNotFound(_)) => {
                self.release(name, &report.job_id, report.attempt);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let expected = job.state == JobState::Running
            && job.attempt == report.attempt
            && job
                .current_attempt()
                .is_some_and(|a| a.placement.iter().any(|r| r.rank == report.rank && r.node == name));
        if report.phase == v1::job_report::Phase::Exited as i32 {
            if expected {
                let code = report.exit_code.unwrap_or_else(|| -report.signal.unwrap_or(9));
                let why = if report.message.is_empty() { describe_exit(&report) } else { report.message.clone() };
                self.end_attempt(&job.id, report.attempt, report.rank, Some(code), why)?;
            }
            self.release(name, &report.job_id, report.attempt);
        } else if !expected {
            // The agent runs something the coordinator moved on from (requeued while it was away).
            warn!(job = %job.id, attempt = report.attempt, agent = %name, "stopping a stale attempt");
            if let Some(tx) = self.fleet().sender(name) {
                let _ = tx.try_send(self.cancel_message(&job.id, report.attempt));
            }
        } else if job.cancel_requested
            || job.preempted_by.is_some()
            || job.current_attempt().is_some_and(|a| !a.outcome.is_empty())
        {
            // Told to stop: repeated until it has, in case the agent was away when it was sent.
            if let Some(tx) = self.fleet().sender(name) {
                let _ = tx.try_send(self.cancel_message(&job.id, report.attempt));
            }
        }
        Ok(())
    }

    fn release(&self, name: &str, job_id: &str, attempt: u32) {
        if let Some(tx) = self.fleet().sender(name) {
            let _ = tx.try_send(v1::CoordinatorMessage {
                msg: Some(v1::coordinator_message::Msg::Release(v1::Release { job_id: job_id.to_string(), attempt })),
            });
        }
    }

    /// Records that a rank ended (`code` None: it was lost). The first failing rank decides the
    /// attempt's outcome and the other ranks are stopped; the attempt ends only once every rank
    /// has ended, so a requeued job never starts while ranks of its last attempt still run.
    /// Idempotent: a rank's second report changes nothing.
    fn end_attempt(&self, id: &str, attempt: u32, rank: u32, code: Option<i32>, why: String) -> Result<()> {
        let now = now_ms();
        let mut stop_others = false;
        let updated = self.store.update(id, |job| {
            if job.state != JobState::Running || job.attempt != attempt {
                return false;
            }
            let max_restarts = job.spec.max_restarts;
            let cancel = job.cancel_requested;
            let current = job.current_attempt_mut().expect("a running job has an attempt");
            if current.rank_exits.contains_key(&rank) {
                return false;
            }
            current.rank_exits.insert(rank, code.unwrap_or(-1));
            let world = current.placement.len();
            if code != Some(0) && current.outcome.is_empty() {
                current.outcome = why.clone();
                current.exit_code = code;
                current.lost = code.is_none();
                stop_others = current.rank_exits.len() < world;
            }
            if current.rank_exits.len() < world {
                return true; // other ranks still running (or being stopped)
            }
            current.ended_at_ms = Some(now);
            let all_ok = current.outcome.is_empty();
            if all_ok {
                current.outcome = "succeeded".into();
                current.exit_code = Some(0);
            }
            let (lost, outcome) = (current.lost, current.outcome.clone());
            if cancel {
                job.state = JobState::Cancelled;
                job.message = "cancelled".into();
            } else if let Some(by) = job.preempted_by.take() {
                // Whatever the exit (a job may save and exit 0 on SIGTERM), a preempted run is
                // requeued and is not a failed attempt.
                job.preemptions += 1;
                job.preempted_for_nodes.clear();
                job.state = JobState::Queued;
                let why = if by.starts_with("GPU ") { by } else { format!("preempted by job {by}") };
                job.message = format!("{why}; requeued to resume from its latest checkpoint");
                return true;
            } else if all_ok {
                job.state = JobState::Succeeded;
                job.message.clear();
            } else if lost || job.user_attempt() <= max_restarts {
                // Lost nodes do not make a job fail; failures count against max_restarts.
                job.state = JobState::Queued;
                job.message = format!("attempt {attempt} ended ({outcome}); requeued");
                return true;
            } else {
                job.state = JobState::Failed;
                job.message = format!("{outcome} (attempt {attempt} of {})", max_restarts + 1);
            }
            job.ended_at_ms = Some(now);
            true
        })?;
        if let Some(job) = updated {
            info!(job = %id, attempt, rank, state = ?job.state, reason = %why, "rank ended");
            if stop_others {
                self.stop_ranks(&job, None);
            }
            self.changed();
        }
        Ok(())
    }

    /// Requeues work from agents that have been silent past the timeout, and closes their
    /// sessions: a cut-off network leaves the connection open, silent, with nobody to notice.
    /// (When the network returns, the agent sees its session end, and opens a new one.) Agents
    /// known from before a restart count from the restart, so they have the same time to come
    /// back.
    pub fn reap_lost_agents(&self) -> Result<()> {
        let timeout = self.settings.agent_timeout;
        let (lost, known): (Vec<String>, Vec<String>) = {
            let mut fleet = self.fleet();
            let lost: Vec<String> =
                fleet.agents.iter().filter(|(_, a)| a.last_seen.elapsed() > timeout).map(|(n, _)| n.clone()).collect();
            for name in &lost {
                let agent = fleet.agents.get_mut(name).expect("listed above");
                if agent.session.take().is_some() {
                    warn!(agent = %name, silent_s = agent.last_seen.elapsed().as_secs(), "agent silent: closing its session");
                }
            }
            (lost, fleet.agents.keys().cloned().collect())
        };
        let grace_over = self.started.elapsed() > timeout;
        for job in self.store.jobs()?.into_iter().filter(|j| j.state == JobState::Running) {
            let Some(attempt) = job.current_attempt() else { continue };
            let gone = attempt.placement.iter().filter(|r| {
                !attempt.rank_exits.contains_key(&r.rank)
                    && (lost.contains(&r.node) || (grace_over && !known.contains(&r.node)))
            });
            for rank in gone {
                warn!(job = %job.id, agent = %rank.node, "agent lost; ending its rank");
                self.end_attempt(&job.id, job.attempt, rank.rank, None, format!("agent {} lost", rank.node))?;
            }
        }
        Ok(())
    }

    // ---- placement ----------------------------------------------------------------------------

    /// Waits for something to change (or a tick), then places what fits. Runs until the process
    /// ends.
    pub async fn run_scheduler(&self) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if let Err(e) = self.reap_lost_agents().and_then(|_| self.schedule_pass()) {
                warn!(error = %e, "scheduling pass failed");
            }
        }
    }

    /// One pass: snapshot, pure placement, apply each placement if its job is unchanged.
    pub fn schedule_pass(&self) -> Result<()> {
        let jobs = self.store.jobs()?;
        let (snapshot, versions) = self.snapshot(&jobs);
        let plan = scheduler::schedule(&snapshot);
        *self.ahead.lock().expect("ahead lock poisoned") = plan.ahead.clone();
        {
            let mut waiting = self.waiting.lock().expect("waiting lock poisoned");
            waiting.clear();
            for w in &plan.waiting {
                waiting.insert(w.job_id.clone(), w.clone());
            }
        }
        for p in &plan.preemptions {
            self.preempt(&p.job_id, &p.for_job, &p.nodes)?;
        }
        let by_id: HashMap<&str, &JobRecord> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
        let place = |placement: &scheduler::Placement| {
            let job = by_id[placement.job_id.as_str()];
            self.place(job, versions[&job.id], placement)
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

    /// Starts the attempt a placement gives, if the job is unchanged since `version`, and sends
    /// its ranks to their agents.
    fn place(&self, job: &JobRecord, version: u64, placement: &scheduler::Placement) -> Result<()> {
        let resume = match self.resume_point(job) {
            Ok(r) => r,
            Err(why) => return self.fail_before_start(&job.id, why),
        };
        let ranks: Vec<RankPlacement> = placement
            .nodes
            .iter()
            .enumerate()
            .map(|(rank, n)| RankPlacement { rank: rank as u32, node: n.node.clone(), gpu_uuids: n.gpu_uuids.clone() })
            .collect();
        let Some(started) = self.store.start_attempt(&job.id, version, ranks.clone(), now_ms())? else {
            return Ok(()); // changed since the snapshot: the next pass sees it fresh
        };
        self.placements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(job = %started.id, attempt = started.attempt, nodes = ?ranks.iter().map(|r| &r.node).collect::<Vec<_>>(), "job placed");
        self.send_assignments(&started, &ranks, resume);
        self.changed();
        Ok(())
    }

    fn snapshot(&self, jobs: &[JobRecord]) -> (Snapshot, HashMap<String, u64>) {
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
                        // A GPU in MIG mode is usable only through its instances, which jobs
                        // cannot ask for yet: no whole-GPU job goes there.
                        healthy: g.healthy && g.mig_enabled != Some(true),
                        numa_node: g.numa_node,
                        nvlink_peers: g.nvlink_peers.clone(),
                    })
                    .collect(),
            })
            .collect();
        let mut pending = Vec::new();
        let mut running = Vec::new();
        let mut versions = HashMap::new();
        let max_duration_ms = |job: &JobRecord| job.spec.max_duration_secs.map(|s| s * 1000);
        for job in jobs {
            match job.state {
                JobState::Queued if !job.cancel_requested => {
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
                        // Cancelled, preempted, or ending after a rank failed.
                        stopping: job.cancel_requested || job.preempted_by.is_some() || !attempt.outcome.is_empty(),
                        stopping_for: job
                            .preempted_by
                            .clone()
                            .map(|job_id| scheduler::Claim { job_id, nodes: job.preempted_for_nodes.clone() }),
                    });
                }
                _ => {}
            }
        }
        let revision = jobs.iter().map(|j| j.version).sum();
        let queues = self.settings.queues.clone();
        let ahead = self.ahead.lock().expect("ahead lock poisoned").clone();
        (Snapshot { revision, now_ms: now_ms() as u64, nodes, running, pending, queues, ahead }, versions)
    }

    /// Where a placed job starts from: its own latest checkpoint on a restart, else `init_from`.
    fn resume_point(&self, job: &JobRecord) -> std::result::Result<Option<v1::CheckpointRef>, String> {
        let own = self.store.checkpoints(&job.id).map_err(|e| e.to_string())?;
        if let Some(latest) = own.last() {
            return Ok(Some(v1::CheckpointRef { job_id: job.id.clone(), step: latest.step }));
        }
        let Some(from) = job.spec.train.as_ref().and_then(|t| t.init_from.as_ref()) else { return Ok(None) };
        let (other, step) = gantry_core::spec::parse_checkpoint_ref(from)?;
        let theirs = self.store.checkpoints(&other).map_err(|e| e.to_string())?;
        let found = match step {
            Some(step) => theirs.iter().find(|c| c.step == step),
            None => theirs.last(),
        };
        match found {
            Some(c) => Ok(Some(v1::CheckpointRef { job_id: other, step: c.step })),
            None => Err(format!(
                "train.init_from: job {other} has no checkpoint{}",
                step.map(|s| format!(" at step {s}")).unwrap_or_default()
            )),
        }
    }

    fn fail_before_start(&self, id: &str, why: String) -> Result<()> {
        let now = now_ms();
        self.store.update(id, |job| {
            if job.state != JobState::Queued {
                return false;
            }
            job.state = JobState::Failed;
            job.message = why.clone();
            job.ended_at_ms = Some(now);
            true
        })?;
        warn!(job = %id, reason = %why, "job failed before it started");
        self.changed();
        Ok(())
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
                    master_port: master_port(&job.id),
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

    // ---- checkpoints --------------------------------------------------------------------------

    pub fn commit_checkpoint(&self, record: CheckpointRecord) -> Result<CheckpointRecord> {
        // A step already recorded keeps its first record: its files are the ones on disk.
        if let Some(existing) = self.store.checkpoints(&record.job_id)?.into_iter().find(|c| c.step == record.step) {
            return Ok(existing);
        }
        let mut record = record;
        record.committed_at_ms = now_ms();
        self.store.put_checkpoint(&record)?;
        info!(job = %record.job_id, step = record.step, bytes = record.bytes, "checkpoint committed");
        Ok(record)
    }

    /// The checkpoint a download asks for: the given step, or the latest.
    pub fn find_checkpoint(&self, job_id: &str, step: Option<u64>) -> Result<CheckpointRecord> {
        self.store.job(job_id)?;
        let all = self.store.checkpoints(job_id)?;
        let found = match step {
            Some(step) => all.into_iter().find(|c| c.step == step),
            None => all.into_iter().last(),
        };
        found.ok_or_else(|| {
            Error::NotFound(match step {
                Some(s) => format!("job {job_id} has no checkpoint at step {s}"),
                None => format!("job {job_id} has no checkpoint yet"),
            })
        })
    }
}

fn describe_exit(report: &v1::JobReport) -> String {
    match (report.exit_code, report.signal) {
        (Some(0), _) => "exited 0".into(),
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "ended".into(),
    }
}

/// The queue first, in the order it will run; then running jobs; then the rest; newest first
/// within the last two.
pub fn display_order(jobs: &mut [(JobRecord, Option<scheduler::Waiting>)]) {
    jobs.sort_by_key(|(j, w)| match j.state {
        JobState::Queued => (0, w.as_ref().map_or(i64::from(u32::MAX), |w| i64::from(w.position)), j.seq),
        JobState::Running => (1, -(j.seq as i64), j.seq),
        _ => (2, -(j.seq as i64), j.seq),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_list_queue_in_run_order_then_running_then_the_rest_newest_first() {
        let spec = JobSpec::from_yaml("name: j\ncommand: [\"true\"]\n").unwrap();
        let job = |seq, state| JobRecord { state, ..crate::store::new_job(seq, spec.clone(), 0) };
        let waiting = |position| {
            Some(scheduler::Waiting {
                job_id: String::new(),
                reason: String::new(),
                position,
                estimated_start_ms: None,
            })
        };
        let mut jobs = vec![
            (job(1, JobState::Succeeded), None),
            (job(2, JobState::Running), None),
            (job(3, JobState::Queued), waiting(2)),
            (job(4, JobState::Failed), None),
            (job(5, JobState::Queued), waiting(1)),
            (job(6, JobState::Running), None),
        ];
        display_order(&mut jobs);
        let order: Vec<u64> = jobs.iter().map(|(j, _)| j.seq).collect();
        assert_eq!(order, [5, 3, 6, 2, 4, 1]);
    }
}
