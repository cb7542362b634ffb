//! gantry's agent: one per machine. It reports the machine's GPUs (through NVML, or none), keeps
//! one session open to the coordinator, runs the job ranks placed on it, and streams their logs,
//! checkpoints and exits back.
//!
//! Jobs outlive the connection: while the coordinator is away, jobs keep running, output is
//! buffered, and exits are repeated in every heartbeat until the coordinator releases them.

mod checkpoints;
pub mod container;
mod coordinators;
mod datasets;
mod error;
mod fence;
pub mod inventory;
pub mod isolation;
mod join;
mod logship;
mod metrics;
mod runner;
mod serving;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_core::JobSpec;
use gantry_proto::{PROTOCOL_VERSION, v1};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

pub use checkpoints::{Described, describe_files};
use coordinators::Coordinators;
pub use error::{Error, Result};
use inventory::Inventory;

pub struct Config {
    /// The coordinator's gRPC URL, e.g. `http://127.0.0.1:7070`; with an HA control plane,
    /// several separated by commas.
    pub coordinator: String,
    /// An agent token (`gantry token create NAME --role agent`), exchanged for a client
    /// certificate when the agent first joins a coordinator with auth; `None` without auth, or
    /// once joined.
    pub token: Option<String>,
    pub name: String,
    pub work_dir: PathBuf,
    pub nvml_lib: Option<PathBuf>,
    /// The `gantry` binary, run for `train:` jobs.
    pub train_program: PathBuf,
    /// The IP other agents reach this one at; by default the local end of the route to the
    /// coordinator.
    pub advertise_addr: Option<String>,
    /// The user jobs run as when the agent runs as root (`--job-user`; never root).
    pub job_user: String,
    /// The CA certificate (PEM) an `https://` coordinator's certificate must chain to (`--ca`).
    pub ca_pem: Option<String>,
    /// The container engine's socket, for jobs with an `image:`; none: such jobs fail here.
    pub container_engine: Option<String>,
    /// The driver of a container job's GPU device requests (`nvidia`); none: the placed GPUs are
    /// named in `CUDA_VISIBLE_DEVICES` only.
    pub container_gpu_driver: Option<String>,
    /// Registry credentials for pulling jobs' images, in Docker's `config.json` layout.
    pub registry_auth: Option<PathBuf>,
    /// How much of pushed data sets the node keeps (`WORK_DIR/datasets`) beyond what runs.
    pub dataset_cache_bytes: u64,
}

type RankKey = (String, u32, u32);

struct Held {
    report: v1::JobReport,
    stop: watch::Sender<Option<Duration>>,
    metrics: metrics::MetricsTail,
    /// Stopped by this agent, cut off from every coordinator (see [`fence`]).
    fenced: bool,
    /// A serve replica's port while it answers ready (see [`serving`]), else 0.
    serve_port: Arc<std::sync::atomic::AtomicU32>,
}

struct Agent {
    config: Config,
    coordinators: Coordinators,
    inventory: Inventory,
    isolation: Arc<isolation::Isolation>,
    /// Where jobs with an `image:` run.
    engine: Option<container::Engine>,
    /// The images the engine holds, refreshed every [`IMAGES_EVERY`] (reported in the inventory).
    images: Mutex<Vec<String>>,
    /// Every rank held: running, or exited and not yet released. A std mutex: never held across
    /// an await.
    jobs: Mutex<BTreeMap<RankKey, Held>>,
    /// The open session's sender, if any: exits go out at once when it is there.
    outbound: Mutex<Option<mpsc::Sender<v1::AgentMessage>>>,
    /// Which heartbeats a coordinator acknowledged, and when this agent must stop its jobs.
    heard: Mutex<fence::Heard>,
    /// Pushed data sets on this node, shared by its jobs.
    datasets: Arc<datasets::DatasetCache>,
}

/// Runs the agent until `shutdown` completes; then stops its jobs (SIGTERM with a grace period).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let tls = tokio::select! {
        tls = join::client_tls(&config) => tls?,
        _ = &mut shutdown => return Ok(()),
    };
    let coordinators = Coordinators::new(&config.coordinator, &tls)?;
    std::fs::create_dir_all(&config.work_dir).map_err(Error::io(format!("creating {}", config.work_dir.display())))?;
    let agent_key = agent_key(&config.work_dir);
    let isolation = Arc::new(isolation::Isolation::detect(&config.job_user, &agent_key)?);
    if let Some(user) = &isolation.user {
        // The job user must pass through the work directory to its own (not list it).
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(&config.work_dir).map_err(Error::io(format!("reading {}", config.work_dir.display())))?;
        let mode = meta.permissions().mode() | 0o111;
        isolation::check_reachable(&config.work_dir, user)?;
        std::fs::set_permissions(&config.work_dir, std::fs::Permissions::from_mode(mode))
            .map_err(Error::io(format!("chmod {}", config.work_dir.display())))?;
    }
    let inventory = Inventory::detect(config.nvml_lib.as_deref());
    let engine = match &config.container_engine {
        Some(socket) => container_engine(socket, &agent_key, &config).await?,
        None => None,
    };
    let datasets = Arc::new(datasets::DatasetCache::new(config.work_dir.join("datasets"), config.dataset_cache_bytes));
    let agent = Arc::new(Agent {
        datasets,
        config,
        coordinators,
        inventory,
        isolation,
        engine,
        images: Mutex::new(Vec::new()),
        jobs: Mutex::new(BTreeMap::new()),
        outbound: Mutex::new(None),
        heard: Mutex::new(fence::Heard::default()),
    });
    let _fencing = AbortOnDrop(tokio::spawn(agent.clone().fence_when_cut_off()));
    let _images = AbortOnDrop(tokio::spawn(agent.clone().watch_images()));
    let sessions = {
        let agent = agent.clone();
        async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match agent.clone().session().await {
                    Err(Error::Fatal(msg)) => return Err(Error::Fatal(msg)),
                    Err(e) => warn!(error = %e, "coordinator session ended; reconnecting"),
                    Ok(()) => warn!("coordinator closed the session; reconnecting"),
                }
                *agent.outbound.lock().expect("outbound lock") = None;
                // Another coordinator may lead now.
                agent.coordinators.next();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    let result = tokio::select! {
        r = sessions => r,
        _ = shutdown => Ok(()),
    };
    // The machine is leaving, not the jobs failing: their exits (143 after our SIGTERM) must
    // not reach the coordinator as failures. Silent, the agent is taken as lost and its jobs are
    // requeued without counting against max_restarts, to resume from their checkpoints.
    *agent.outbound.lock().expect("outbound lock") = None;
    agent.stop_all().await;
    result
}

/// The name of the agent that works in `work_dir` among others on the machine, the same across
/// its restarts: its cgroups' and its containers' label.
pub fn agent_key(work_dir: &std::path::Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(work_dir.to_string_lossy().as_bytes());
    format!("agent-{}", &hex::encode(digest)[..12])
}

/// Connects to the container engine and removes what a previous run of this agent (the same
/// work directory: `agent_key`) left there
/// (its ranks are not held any more: the coordinator places them again). An engine that does
/// not answer is no reason to stop: jobs without an image still run, and those with one fail
/// saying why.
async fn container_engine(socket: &str, agent_key: &str, config: &Config) -> Result<Option<container::Engine>> {
    // Bad credentials are the operator's mistake, said at once; a missing engine is the node's.
    let auth = match &config.registry_auth {
        Some(path) => container::RegistryAuth::from_file(path)?,
        None => container::RegistryAuth::default(),
    };
    let engine = match container::Engine::connect(socket, agent_key, config.container_gpu_driver.clone(), auth) {
        Ok(engine) => engine,
        Err(e) => {
            warn!(engine = %socket, error = %e, "no container engine: jobs with an image cannot run here");
            return Ok(None);
        }
    };
    match engine.remove_leftovers().await {
        Ok(n) => info!(engine = %socket, leftovers_removed = n, "container engine ready for jobs with an image"),
        Err(e) => {
            warn!(engine = %socket, error = %e, "the container engine does not answer: jobs with an image will fail")
        }
    }
    Ok(Some(engine))
}

/// How often the agent reads which images its engine holds.
const IMAGES_EVERY: Duration = Duration::from_secs(10);

impl Agent {
    /// Keeps [`Agent::images`] current, for the scheduler's preference for nodes that hold a
    /// job's image.
    async fn watch_images(self: Arc<Self>) {
        let Some(engine) = self.engine.clone() else { return };
        loop {
            match engine.images().await {
                Ok(images) => *self.images.lock().expect("images lock poisoned") = images,
                Err(e) => debug!(error = %e, "could not list the engine's images"),
            }
            tokio::time::sleep(IMAGES_EVERY).await;
        }
    }

    /// The machine as it stands: GPUs, CPUs, memory and the images its engine holds.
    fn inventory(&self) -> v1::Inventory {
        v1::Inventory { images: self.images.lock().expect("images lock poisoned").clone(), ..self.inventory.read() }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<RankKey, Held>> {
        self.jobs.lock().expect("jobs lock poisoned")
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, fence::Heard> {
        self.heard.lock().expect("heard lock poisoned")
    }

    /// Where serve replicas listen: the IP the coordinator reaches this agent at
    /// (`--advertise-addr`, else the local end of the route to the coordinator), else loopback.
    fn advertised_ip(&self) -> String {
        match &self.config.advertise_addr {
            Some(addr) => addr.clone(),
            None => self.coordinators.local_ip().unwrap_or_else(|| "127.0.0.1".into()),
        }
    }

    fn heartbeat(&self) -> v1::AgentMessage {
        let now_ms = now_ms();
        let seq = self.heard().sent(tokio::time::Instant::now());
        let mut jobs = Vec::new();
        let mut metrics = Vec::new();
        for ((job_id, attempt, rank), held) in self.jobs().iter_mut() {
            let mut report = held.report.clone();
            if report.phase == v1::job_report::Phase::Running as i32 {
                report.serve_port = held.serve_port.load(std::sync::atomic::Ordering::Relaxed);
            }
            jobs.push(report);
            let points = held.metrics.read_new(now_ms);
            if !points.is_empty() {
                metrics.push(v1::RankMetrics {
                    job_id: job_id.clone(),
                    attempt: *attempt,
                    rank: *rank,
                    points,
                    straggler: false,
                });
            }
        }
        v1::AgentMessage {
            name: self.config.name.clone(),
            msg: Some(v1::agent_message::Msg::Heartbeat(v1::Heartbeat {
                inventory: Some(self.inventory()),
                jobs,
                metrics,
                seq,
            })),
        }
    }

    /// Registers, opens the session, and serves it until it breaks.
    async fn session(self: Arc<Self>) -> Result<()> {
        let mut client = self.coordinators.client();
        let reply = client
            .register(v1::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: self.config.name.clone(),
                inventory: Some(self.inventory()),
                advertise_addr: match &self.config.advertise_addr {
                    Some(addr) => addr.clone(),
                    None => self.coordinators.local_ip().unwrap_or_default(),
                },
            })
            .await;
        let reply = match reply {
            Err(s) if s.code() == tonic::Code::FailedPrecondition || s.code() == tonic::Code::InvalidArgument => {
                return Err(Error::Fatal(format!("coordinator refused registration: {}", s.message())));
            }
            // The certificate kept is no longer on record (it expired, or the join token was
            // replaced): with a join token at hand, get a new one. A revoked token's join is
            // refused, which stops the agent.
            Err(s) if s.code() == tonic::Code::Unauthenticated && self.config.token.is_some() => {
                warn!(error = %s.message(), "the coordinator refused this agent's certificate; joining again");
                let tls = join::join_again(&self.config).await?;
                self.coordinators.use_tls(&tls)?;
                return Err(Error::Rpc(s));
            }
            r => r?.into_inner(),
        };
        let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(100));
        self.heard().set_policy(fence::Policy::from_reply(&reply));
        let (tx, rx) = mpsc::channel(256);
        // The first message lists every rank held, so the coordinator can reconcile.
        tx.send(self.heartbeat()).await.expect("receiver alive");
        let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        *self.outbound.lock().expect("outbound lock") = Some(tx.clone());
        info!(coordinator = %self.coordinators.url(), name = %self.config.name, "session open");

        // Heartbeats end with the session, also when the session is dropped unfinished (the
        // agent shutting down): a beat sent after that would report the exits of the jobs the
        // agent is stopping (143) as failures, where its silence should requeue them.
        let _beats = AbortOnDrop({
            let agent = self.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    if tx.send(agent.heartbeat()).await.is_err() {
                        return;
                    }
                }
            })
        });
        let opened = tokio::time::Instant::now();
        let mut check = tokio::time::interval(interval);
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => self.handle(msg),
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.into()),
                },
                _ = check.tick() => {
                    if self.heard().session_stale(opened, tokio::time::Instant::now(), interval) {
                        return Err(Error::Rpc(tonic::Status::unavailable(
                            "the coordinator acknowledges no heartbeat: trying the next one",
                        )));
                    }
                }
            }
        }
    }

    fn handle(self: &Arc<Self>, msg: v1::CoordinatorMessage) {
        use v1::coordinator_message::Msg;
        match msg.msg {
            Some(Msg::Assign(a)) => self.start(a),
            Some(Msg::Cancel(c)) => {
                let grace = Duration::from_millis(c.grace_period_ms);
                for ((job, attempt, _), held) in self.jobs().iter() {
                    if *job == c.job_id && *attempt == c.attempt {
                        let _ = held.stop.send(Some(grace));
                    }
                }
            }
            Some(Msg::Ack(ack)) => self.heard().acked(ack.seq),
            Some(Msg::Release(r)) => {
                self.jobs().retain(|(job, attempt, _), held| {
                    !(*job == r.job_id
                        && *attempt == r.attempt
                        && held.report.phase == v1::job_report::Phase::Exited as i32)
                });
            }
            None => {}
        }
    }

    /// Starts an assigned rank, once: a repeated assignment is ignored.
    fn start(self: &Arc<Self>, a: v1::Assignment) {
        let key = (a.job_id.clone(), a.attempt, a.rank);
        let spec = match a.spec.clone().map(JobSpec::try_from) {
            Some(Ok(spec)) => spec,
            other => {
                warn!(job = %a.job_id, error = ?other.map(|r| r.err()), "assignment without a usable spec");
                return;
            }
        };
        let (stop_tx, stop_rx) = watch::channel(None);
        let serve_port = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let dir =
            self.config.work_dir.join("jobs").join(&a.job_id).join(format!("attempt-{}-rank-{}", a.attempt, a.rank));
        {
            let mut jobs = self.jobs();
            if jobs.contains_key(&key) {
                return;
            }
            let report = v1::JobReport {
                job_id: a.job_id.clone(),
                attempt: a.attempt,
                rank: a.rank,
                phase: v1::job_report::Phase::Running as i32,
                ..Default::default()
            };
            let metrics = metrics::MetricsTail::new(runner::metrics_file(&dir));
            jobs.insert(
                key.clone(),
                Held { report, stop: stop_tx, metrics, fenced: false, serve_port: serve_port.clone() },
            );
        }
        let launch = runner::Launch {
            assignment: a,
            spec,
            dir,
            train_program: self.config.train_program.clone(),
            kernel_cache: self.config.work_dir.join("kernel-cache"),
            datasets: self.datasets.clone(),
            coordinators: self.coordinators.clone(),
            isolation: self.isolation.clone(),
            engine: self.engine.clone(),
            serve_host: self.advertised_ip(),
            serve_port,
        };
        let agent = self.clone();
        tokio::spawn(async move {
            let mut report = runner::run(launch, stop_rx).await;
            if let Some(held) = agent.jobs().get_mut(&key) {
                if held.fenced {
                    report.fenced = true;
                    report.message = format!("stopped by its agent, cut off from the coordinator ({})", report.message);
                }
                held.report = report.clone();
            }
            let outbound = agent.outbound.lock().expect("outbound lock").clone();
            if let Some(tx) = outbound {
                // A heartbeat first: it carries the metrics the rank wrote just before it
                // exited, which would otherwise go with its slot once the exit is released.
                let _ = tx.send(agent.heartbeat()).await;
                let msg = v1::AgentMessage {
                    name: agent.config.name.clone(),
                    msg: Some(v1::agent_message::Msg::Job(report)),
                };
                let _ = tx.send(msg).await;
            }
        });
    }

    /// One running copy: when no coordinator has acknowledged a heartbeat for the time the
    /// coordinator gave ([`fence::Policy`]), stop every running rank, so they have ended before
    /// the coordinator can declare this agent lost and place them elsewhere.
    async fn fence_when_cut_off(self: Arc<Self>) {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let Some(grace) = self.heard().fence_now(tokio::time::Instant::now()) else { continue };
            let mut stopped = 0;
            for ((job, attempt, rank), held) in self.jobs().iter_mut() {
                if held.fenced || held.report.phase == v1::job_report::Phase::Exited as i32 {
                    continue;
                }
                warn!(job = %job, attempt, rank, ?grace, "no coordinator has heard this agent: stopping the job (fence)");
                held.fenced = true;
                let _ = held.stop.send(Some(grace));
                stopped += 1;
            }
            if stopped > 0 {
                warn!(
                    jobs = stopped,
                    "cut off from every coordinator: stopped its jobs before they can be placed again"
                );
            }
        }
    }

    /// Stops every running rank and waits (bounded) for them to end.
    async fn stop_all(&self) {
        let grace = Duration::from_secs(10);
        let running: Vec<watch::Sender<Option<Duration>>> = self
            .jobs()
            .values()
            .filter(|h| h.report.phase != v1::job_report::Phase::Exited as i32)
            .map(|h| h.stop.clone())
            .collect();
        if running.is_empty() {
            return;
        }
        info!(jobs = running.len(), "agent stopping: stopping its jobs");
        for stop in &running {
            let _ = stop.send(Some(grace));
        }
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            let left = self.jobs().values().any(|h| h.report.phase != v1::job_report::Phase::Exited as i32);
            if !left {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
