//! The coordinator's decisions around the pure parts: it keeps the agents' sessions
//! ([`sessions`]), runs the placement loop and applies its plans ([`placement`]), changes jobs
//! through the lifecycle's transitions ([`jobs`]), records checkpoints ([`checkpoints`]) and
//! answers the read views ([`queries`]). The gRPC and HTTP services are thin layers over this.

mod checkpoints;
mod datasets;
mod jobs;
mod placement;
mod queries;
mod s3_paths;
mod serving;
mod sessions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_core::scheduler;
use gantry_proto::v1;
use tokio::sync::{Notify, watch};

use crate::auth::tokens::Tokens;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::files::FileStorage;
use crate::fleet::{AgentConn, Fleet};
use crate::job_metrics::JobMetrics;
use crate::logs::LogStore;
use crate::store::{EmbeddedStore, StateStore};

pub use queries::{NodeUsage, NodeView, display_order};

/// Settings with defaults that suit one machine; tests shorten the timeouts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// An agent silent this long is lost: its jobs are requeued. Agents stop their own jobs
    /// before that when cut off ([`Settings::fencing`]), so a job never runs twice.
    pub agent_timeout: Duration,
    /// How long a cancelled job has between SIGTERM and SIGKILL.
    pub grace_period: Duration,
    pub heartbeat_interval: Duration,
    /// Queue weights and GPU quotas; unlisted queues have weight 1 and no quota.
    pub queues: Vec<scheduler::Queue>,
    /// Where time comes from: the system's, or tokio's paused clock in tests.
    pub clock: Clock,
    /// Every request needs a token (see [`crate::auth`]). Off only for `gantry dev` and
    /// `--insecure` on loopback, where every caller is an admin named `dev`.
    pub auth: bool,
    /// Host names the HTTP side answers to besides IP addresses and `localhost` (the names
    /// people and Prometheus reach it by); any other `Host` is refused against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// What one caller may send, at most.
    pub limits: crate::limits::Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            // Noticed within 10 s: silent 9 s, seen by the next pass (every second).
            agent_timeout: Duration::from_secs(9),
            grace_period: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            queues: Vec::new(),
            clock: Clock::system(),
            auth: true,
            allowed_hosts: Vec::new(),
            limits: Default::default(),
        }
    }
}

/// When an agent cut off from every coordinator stops its jobs: `after` this long without a
/// heartbeat acknowledged, with `grace` between SIGTERM and SIGKILL. Together they end `margin`
/// before the coordinator's `agent_timeout`, when it may place the jobs elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fencing {
    pub after: Duration,
    pub grace: Duration,
    pub margin: Duration,
}

impl Settings {
    /// Derived from `agent_timeout`, so the two cannot disagree. With the default 9 s the agent
    /// stops its jobs after 7 s unheard (SIGTERM), kills them at 8 s, 1 s before the coordinator
    /// gives up on it; an HA failover (a 3 s lease, then agents reconnect) fits inside the 7 s.
    /// The grace is short because a job cut off cannot upload a checkpoint anyway: it resumes
    /// from its latest committed one.
    pub fn fencing(&self) -> Fencing {
        let t = self.agent_timeout;
        let grace = (t / 10).min(Duration::from_secs(1));
        let margin = (t / 10).min(Duration::from_secs(1));
        Fencing { after: t.saturating_sub(grace + margin), grace, margin }
    }
}

pub struct Coordinator {
    pub store: Arc<dyn StateStore>,
    pub logs: LogStore,
    /// Checkpoints and pushed data sets: verified files, on disk or in object storage.
    pub files: FileStorage,
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
    started: tokio::time::Instant,
    placements: std::sync::atomic::AtomicU64,
    /// Placements refused at apply time because a node changed since the snapshot.
    stale_placements: std::sync::atomic::AtomicU64,
    /// What jobs report about their training (loss, accuracy, ...), in memory.
    pub metrics: JobMetrics,
    pub tokens: Tokens,
    /// What came from attempts the coordinator had moved on from.
    pub stale: crate::stale::StaleReports,
    submit_rate: crate::limits::SubmitRate,
    queued_by_user: crate::limits::QueuedByUser,
    /// Serve jobs' ready replicas and the routes to them.
    pub serving: crate::serving::Serving,
    /// Written while pushed data sets' records change (a push's commit, a delete's check and
    /// removal), read while a submit pins and stores a job naming one: a delete never misses a
    /// job pinned meanwhile, nor a push that starts sharing the files it removes, and submits
    /// still share their group commits. Never held across an await.
    dataset_changes: std::sync::RwLock<()>,
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
        let now = settings.clock.now();
        // Agents registered before a restart are known, but not connected, until they return.
        for agent in store.agents()? {
            let inventory = prost::Message::decode(agent.inventory.as_slice()).unwrap_or_default();
            fleet.agents.insert(
                agent.name.clone(),
                AgentConn { inventory, addr: String::new(), last_seen: now, session: None, drained: agent.drained },
            );
        }
        Ok(Coordinator {
            tokens: Tokens::load(store.clone())?,
            store,
            logs: LogStore::new(jobs_dir.clone()),
            files: FileStorage::on_disk(jobs_dir, data_dir.join("datasets")),
            started: now,
            settings,
            fleet: Mutex::new(fleet),
            waiting: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            jobs_changed: watch::channel(0).0,
            placements: Default::default(),
            stale_placements: Default::default(),
            metrics: JobMetrics::default(),
            ahead: Mutex::default(),
            stale: Default::default(),
            submit_rate: Default::default(),
            queued_by_user: Default::default(),
            serving: Default::default(),
            dataset_changes: Default::default(),
        })
    }

    pub fn now_ms(&self) -> i64 {
        self.settings.clock.now_ms()
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

    fn cancel_message(&self, job_id: &str, attempt: u32) -> v1::CoordinatorMessage {
        v1::CoordinatorMessage {
            msg: Some(v1::coordinator_message::Msg::Cancel(v1::Cancel {
                job_id: job_id.to_string(),
                attempt,
                grace_period_ms: self.settings.grace_period.as_millis() as u64,
            })),
        }
    }
}
