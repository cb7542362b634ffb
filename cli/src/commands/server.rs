//! The long-running commands: `coordinator`, `agent`, and `dev` (both in one process).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use gantry_coordinator::auth::Role;
use gantry_coordinator::auth::tokens::SeedToken;
use gantry_coordinator::tls::TlsOptions;
use gantry_coordinator::{Config, Settings};
use gantry_core::scheduler::Queue;
use tokio::net::TcpListener;
use tracing::info;

#[derive(Args)]
pub struct CoordinatorArgs {
    /// gRPC address (the CLI and agents).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// HTTP address: `/healthz` and `/metrics`.
    #[arg(long, default_value = "127.0.0.1:7080")]
    http: String,
    /// Where state, logs and checkpoints live [default: ~/.local/share/gantry; as root
    /// /var/lib/gantry].
    #[arg(long, env = "GANTRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The state store.
    #[arg(long, default_value = "embedded", value_parser = ["embedded", "etcd"])]
    store: String,
    /// etcd endpoints, comma-separated (with --store etcd).
    #[arg(long, default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// The key prefix in etcd: one etcd can hold several gantry clusters.
    #[arg(long, default_value = "/gantry")]
    etcd_prefix: String,
    /// Seconds a silent leader keeps leadership (its etcd lease).
    #[arg(long, default_value = "3s", value_parser = duration)]
    leader_ttl: Duration,
    /// The host other coordinators use to reach this one (with --store etcd) [default: the
    /// --listen and --http addresses as given].
    #[arg(long)]
    advertise_host: Option<String>,
    /// Keep checkpoint files and logs in object storage, `s3://BUCKET[/PREFIX]`, which every
    /// coordinator sharing etcd reads. Credentials, region and endpoint come from the usual AWS_*
    /// variables (AWS_ENDPOINT_URL and AWS_ALLOW_HTTP=true for MinIO and the like).
    #[arg(long, env = "GANTRY_OBJECT_STORE")]
    object_store: Option<String>,
    /// Use this file's secret as the admin token (a Kubernetes Secret, say) instead of making
    /// one at first start.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Agents join with this file's secret: the agent token named `agents`.
    #[arg(long)]
    agent_token_file: Option<PathBuf>,
    /// Prometheus scrapes /metrics with this file's secret: the viewer token named `prometheus`.
    #[arg(long)]
    metrics_token_file: Option<PathBuf>,
    /// A host name the HTTP side answers to, besides IP addresses, localhost and
    /// --advertise-host (repeatable): any other Host header is refused, against DNS rebinding.
    #[arg(long = "allowed-host")]
    allowed_hosts: Vec<String>,
    /// No TLS and no tokens: anyone who reaches the ports may do anything. Refused unless every
    /// listen address is loopback.
    #[arg(long)]
    insecure: bool,
    /// Serve with this certificate (PEM, with its chain) instead of one made by gantry's CA for
    /// the listen addresses, --advertise-host and --allowed-host.
    #[arg(long, requires = "tls_key", conflicts_with = "insecure")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Sign agents' certificates (and the server's) with this CA instead of the one gantry makes
    /// under DATA_DIR/tls: every coordinator of an HA control plane is given the same.
    #[arg(long, requires = "ca_key", conflicts_with = "insecure")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    #[command(flatten)]
    timing: Timing,
}

#[derive(Args, Clone)]
struct Timing {
    /// An agent silent this long is lost and its jobs are requeued. An agent cut off from every
    /// coordinator stops its jobs itself before that (SIGTERM 2 s before, SIGKILL 1 s before;
    /// 20% and 10% under 10 s), so that no job runs twice.
    #[arg(long, default_value = "9s", value_parser = duration)]
    agent_timeout: Duration,
    /// Time a cancelled or preempted job gets between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = duration)]
    grace_period: Duration,
    /// A queue's share of the fleet: NAME=WEIGHT or NAME=WEIGHT:GPU_QUOTA (repeatable).
    /// Unlisted queues have weight 1 and no quota.
    #[arg(long = "queue", value_parser = queue)]
    queues: Vec<Queue>,
}

impl Timing {
    fn settings(&self) -> Settings {
        Settings {
            agent_timeout: self.agent_timeout,
            grace_period: self.grace_period,
            queues: self.queues.clone(),
            ..Settings::default()
        }
    }
}

fn queue(text: &str) -> Result<Queue, String> {
    let usage = || format!("`{text}`: expected NAME=WEIGHT or NAME=WEIGHT:GPU_QUOTA, e.g. research=2:16");
    let (name, rest) = text.split_once('=').ok_or_else(usage)?;
    let (weight, quota) = match rest.split_once(':') {
        Some((w, q)) => (w, Some(q.parse::<u32>().map_err(|_| usage())?)),
        None => (rest, None),
    };
    let weight: f64 = weight.parse().map_err(|_| usage())?;
    if name.is_empty() || !(weight.is_finite() && weight > 0.0) {
        return Err(usage());
    }
    Ok(Queue { name: name.to_string(), weight, gpu_quota: quota })
}

#[derive(Args)]
pub struct AgentArgs {
    /// The coordinator's gRPC URL.
    #[arg(long, env = "GANTRY_COORDINATOR")]
    coordinator: String,
    /// The CA certificate the coordinator's TLS certificate must chain to (its DATA_DIR/tls/ca.crt).
    #[arg(long, env = "GANTRY_CA")]
    ca: Option<PathBuf>,
    /// An agent token (`gantry token create NAME --role agent`), for a coordinator with auth.
    #[arg(long, env = "GANTRY_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The agent token from this file (a mounted Secret).
    #[arg(long, conflicts_with = "join_token")]
    join_token_file: Option<PathBuf>,
    /// This machine's name in the fleet [default: the hostname].
    #[arg(long)]
    name: Option<String>,
    /// Where jobs run and checkpoints are written [default: ~/.local/share/gantry/agent; as root
    /// /var/lib/gantry/agent].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The NVML library to load instead of the system's libnvidia-ml.so.1.
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
    /// The IP other agents reach this one at (a gang's MASTER_ADDR) [default: this machine's
    /// address on the route to the coordinator].
    #[arg(long)]
    advertise_addr: Option<String>,
    /// The user jobs run as when the agent runs as root: never root itself.
    #[arg(long, default_value = "nobody")]
    job_user: String,
    /// The container engine's socket, for jobs with an `image:` (Docker's API; Podman serves it
    /// too) [default: /var/run/docker.sock where it exists]. `none`: no container jobs here.
    #[arg(long, env = "GANTRY_CONTAINER_ENGINE")]
    container_engine: Option<String>,
    /// How a container job's GPUs reach it: `nvidia` (the NVIDIA Container Toolkit's device
    /// requests, exactly the placed GPUs) or `none` (only CUDA_VISIBLE_DEVICES names them).
    #[arg(long, default_value = "nvidia")]
    container_gpus: String,
    /// Registry credentials for pulling jobs' images, a file in Docker's config.json layout
    /// (`{"auths": {"REGISTRY": {"auth": "BASE64(user:password)"}}}`; a mounted Secret).
    #[arg(long, env = "GANTRY_REGISTRY_AUTH")]
    registry_auth: Option<PathBuf>,
    /// How much of pushed data sets (`dataset://`) this node keeps in WORK_DIR/datasets, in GiB;
    /// beyond it the least recently used versions no running job reads are evicted.
    #[arg(long, default_value_t = DATASET_CACHE_GB)]
    dataset_cache_gb: f64,
}

const DATASET_CACHE_GB: f64 = 50.0;

#[derive(Args)]
pub struct DevArgs {
    /// Where state, logs, checkpoints and job directories live [default: ~/.local/share/gantry;
    /// as root /var/lib/gantry].
    #[arg(long, env = "GANTRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    #[arg(long, default_value = "127.0.0.1:7080")]
    http: String,
    /// Submit this job spec, follow it to the end, then stop (exit status: the job's).
    #[arg(long)]
    run: Option<PathBuf>,
    /// The NVML library to load instead of the system's libnvidia-ml.so.1.
    #[arg(long)]
    nvml_lib: Option<PathBuf>,
    #[command(flatten)]
    timing: Timing,
}

pub fn duration(text: &str) -> Result<Duration, String> {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().map(Duration::from_millis).map_err(|_| format!("`{text}` is not a duration"));
    }
    gantry_core::spec::parse_duration(text).map(Duration::from_secs).map_err(|e| e.to_string())
}

/// `~/.local/share/gantry`; for root, `/var/lib/gantry`: root's home is closed to other users,
/// and the job user must pass through to its jobs' directories.
fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/gantry");
    }
    match std::env::var_os("HOME") {
        Some(home) => Path::new(&home).join(".local/share/gantry"),
        None => PathBuf::from("gantry-data"),
    }
}

/// Logs go to stderr; `GANTRY_LOG_FORMAT=json` for JSON lines, `RUST_LOG` to filter.
pub fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // With stderr gone, tracing's own report of the failed write would panic (`eprintln!`).
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    if std::env::var("GANTRY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// `--insecure` and `gantry dev` serve without auth: only where nobody else can connect.
fn insecure_only_on_loopback(what: &str, addrs: &[&str]) -> anyhow::Result<()> {
    for addr in addrs {
        let loopback = addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.ip().is_loopback())
            .unwrap_or_else(|_| addr.rsplit_once(':').is_some_and(|(host, _)| host == "localhost"));
        if !loopback {
            anyhow::bail!(
                "{what} serves without auth, so it listens on loopback only; {addr} is not (drop {what} to serve with TLS and tokens)"
            );
        }
    }
    Ok(())
}

fn read_secret(path: &Path, what: &str) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} from {}", path.display()))?;
    Ok(text.trim().to_string())
}

fn seed_tokens(args: &CoordinatorArgs) -> anyhow::Result<Vec<SeedToken>> {
    let mut seeds = Vec::new();
    if let Some(path) = &args.admin_token_file {
        seeds.push(SeedToken { name: "admin".into(), role: Role::Admin, secret: read_secret(path, "admin token")? });
    }
    if let Some(path) = &args.agent_token_file {
        seeds.push(SeedToken { name: "agents".into(), role: Role::Agent, secret: read_secret(path, "agent token")? });
    }
    if let Some(path) = &args.metrics_token_file {
        let secret = read_secret(path, "metrics token")?;
        seeds.push(SeedToken { name: "prometheus".into(), role: Role::Viewer, secret });
    }
    Ok(seeds)
}

pub async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    if args.insecure {
        insecure_only_on_loopback("--insecure", &[&args.listen, &args.http])?;
    }
    init_logging("info");
    if args.insecure {
        tracing::warn!("--insecure: plaintext and no auth; anyone on this machine can run anything");
    }
    let grpc = bind(&args.listen, "gRPC").await?;
    let http = bind(&args.http, "HTTP").await?;
    // With etcd, a coordinator forwards every connection to the leader until it leads itself;
    // then it listens again, as the leader.
    let (store, grpc, http) = match args.store.as_str() {
        "etcd" => {
            let store = etcd_store(&args, grpc, http).await?;
            (Some(store), bind(&args.listen, "gRPC").await?, bind(&args.http, "HTTP").await?)
        }
        _ => (None, grpc, http),
    };
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let tls = (!args.insecure).then(|| TlsOptions {
        dir: data_dir.join("tls"),
        names: certificate_names(&args),
        server: args.tls_cert.clone().zip(args.tls_key.clone()),
        ca: args.ca_cert.clone().zip(args.ca_key.clone()),
    });
    let config = Config {
        tls,
        tokens: seed_tokens(&args)?,
        data_dir,
        settings: Settings {
            auth: !args.insecure,
            allowed_hosts: args.allowed_hosts.iter().chain(&args.advertise_host).cloned().collect(),
            ..args.timing.settings()
        },
        store,
        object_store: args.object_store,
    };
    gantry_coordinator::serve(config, grpc, http, shutdown_signal()).await?;
    Ok(())
}

/// What the server certificate gantry makes is for: the listen addresses (every local name when
/// one is 0.0.0.0 or ::), loopback, and the names people reach the coordinator by.
fn certificate_names(args: &CoordinatorArgs) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    for addr in [&args.listen, &args.http] {
        match addr.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() => names.push(gantry_agent::inventory::hostname()),
            Ok(a) => names.push(a.ip().to_string()),
            // host:port with a name
            Err(_) => names.extend(addr.rsplit_once(':').map(|(host, _)| host.to_string())),
        }
    }
    names.extend(args.advertise_host.iter().cloned());
    names.extend(args.allowed_hosts.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    names
}

/// Campaigns for leadership, forwarding connections on `grpc` and `http` to the leader
/// meanwhile; returns the store once this coordinator leads (the listeners are closed by then).
#[cfg(feature = "etcd")]
async fn etcd_store(
    args: &CoordinatorArgs,
    grpc: TcpListener,
    http: TcpListener,
) -> anyhow::Result<std::sync::Arc<dyn gantry_coordinator::store::StateStore>> {
    use super::standby::{Port, advertise, forward};
    use gantry_coordinator::store::{EtcdOptions, EtcdStore};
    let endpoints: Vec<String> = args.etcd.split(',').map(|e| e.trim().to_string()).collect();
    let reach = |addr: std::net::SocketAddr| match &args.advertise_host {
        Some(host) => format!("{host}:{}", addr.port()),
        None => addr.to_string(),
    };
    let options = EtcdOptions {
        endpoints: endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        name: advertise(&reach(grpc.local_addr()?), &reach(http.local_addr()?)),
        lease_ttl: args.leader_ttl,
    };
    let prefix = args.etcd_prefix.clone();
    let standby = tokio::spawn(async move {
        tokio::join!(
            forward(grpc, Port::Grpc, endpoints.clone(), prefix.clone()),
            forward(http, Port::Http, endpoints, prefix)
        )
    });
    info!(etcd = %args.etcd, "connecting to etcd; forwarding to the leader until this coordinator leads");
    let store = tokio::task::spawn_blocking(move || EtcdStore::connect(options)).await?;
    // Stop forwarding and close the listeners; the caller listens again as the leader.
    standby.abort();
    let _ = standby.await;
    let store = store.with_context(|| format!("cannot use etcd at {}", args.etcd))?;
    Ok(std::sync::Arc::new(store))
}

#[cfg(not(feature = "etcd"))]
async fn etcd_store(
    args: &CoordinatorArgs,
    _grpc: TcpListener,
    _http: TcpListener,
) -> anyhow::Result<std::sync::Arc<dyn gantry_coordinator::store::StateStore>> {
    anyhow::bail!(
        "this gantry was built without etcd support (etcd {} given); build it with `--features etcd`",
        args.etcd
    )
}

fn agent_config(
    coordinator: String,
    token: Option<String>,
    name: Option<String>,
    work_dir: PathBuf,
    nvml_lib: Option<PathBuf>,
    advertise_addr: Option<String>,
    job_user: String,
) -> anyhow::Result<gantry_agent::Config> {
    let name = name.unwrap_or_else(gantry_agent::inventory::hostname);
    let train_program = std::env::current_exe().context("cannot find the gantry binary to run training jobs")?;
    Ok(gantry_agent::Config {
        coordinator,
        token,
        name,
        work_dir,
        nvml_lib,
        train_program,
        advertise_addr,
        job_user,
        ca_pem: None,
        container_engine: default_container_engine(),
        container_gpu_driver: Some("nvidia".into()),
        registry_auth: None,
        dataset_cache_bytes: (DATASET_CACHE_GB * (1u64 << 30) as f64) as u64,
    })
}

/// Docker's socket, where this machine has one.
fn default_container_engine() -> Option<String> {
    let socket = "/var/run/docker.sock";
    std::path::Path::new(socket).exists().then(|| socket.to_string())
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    init_logging("info");
    let work_dir = args.work_dir.unwrap_or_else(|| default_data_dir().join("agent"));
    let token = match (&args.join_token, &args.join_token_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => Some(read_secret(path, "join token")?),
        (None, None) => None,
    };
    // An empty one (an unset variable in a unit file) is none.
    let token = token.filter(|t| !t.trim().is_empty());
    let mut config =
        agent_config(args.coordinator, token, args.name, work_dir, args.nvml_lib, args.advertise_addr, args.job_user)?;
    config.ca_pem = args.ca.as_deref().map(crate::client::read_ca).transpose()?;
    match args.container_engine.as_deref() {
        Some("none") => config.container_engine = None,
        Some(socket) => config.container_engine = Some(socket.to_string()),
        None => {}
    }
    config.registry_auth = args.registry_auth;
    if !(args.dataset_cache_gb >= 0.0 && args.dataset_cache_gb.is_finite()) {
        anyhow::bail!("--dataset-cache-gb: must be 0 or more, got {}", args.dataset_cache_gb);
    }
    config.dataset_cache_bytes = (args.dataset_cache_gb * (1u64 << 30) as f64) as u64;
    config.container_gpu_driver = match args.container_gpus.as_str() {
        "none" => None,
        "nvidia" => Some("nvidia".into()),
        other => anyhow::bail!("--container-gpus: `{other}` is neither nvidia nor none"),
    };
    gantry_agent::run(config, shutdown_signal()).await?;
    Ok(())
}

/// Returns the process exit status: with `--run`, 0 only if the job succeeded.
pub async fn dev(args: DevArgs) -> anyhow::Result<i32> {
    insecure_only_on_loopback("gantry dev", &[&args.listen, &args.http])?;
    // With --run the job's own output is the point: only problems are logged.
    init_logging(if args.run.is_some() { "warn" } else { "info" });
    tracing::warn!("gantry dev: plaintext and no auth, for this machine only (gantry coordinator serves with tokens)");
    let data_dir = args.data_dir.unwrap_or_else(default_data_dir);
    let grpc = bind(&args.listen, "gRPC").await?;
    let http = bind(&args.http, "HTTP").await?;
    let url = format!("http://{}", grpc.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let settings = Settings { auth: false, ..args.timing.settings() };
    let config =
        Config { data_dir: data_dir.clone(), settings, store: None, object_store: None, tokens: Vec::new(), tls: None };
    let coordinator = tokio::spawn(gantry_coordinator::serve(config, grpc, http, stopped(stop_rx.clone())));
    let agent_config = agent_config(
        url.clone(),
        None,
        Some("local".into()),
        data_dir.join("agent"),
        args.nvml_lib,
        None,
        "nobody".into(),
    )?;
    // An agent that cannot start (a work directory the job user cannot reach) ends the run with
    // its reason, rather than leaving the job queued for an agent that never comes.
    let (agent_failed, mut agent_failure) = tokio::sync::oneshot::channel();
    let agent = tokio::spawn({
        let stop = stopped(stop_rx.clone());
        async move {
            let result = gantry_agent::run(agent_config, stop).await;
            if result.is_err() {
                let _ = agent_failed.send(());
            }
            result
        }
    });

    let code = match args.run {
        Some(file) => {
            let target = crate::client::Target { urls: url.clone(), token: None, ca_pem: None };
            let result = tokio::select! {
                result = super::jobs::run_to_end(&target, &file, &data_dir) => Some(result),
                Ok(()) = &mut agent_failure => None,
            };
            let _ = stop_tx.send(true);
            match result {
                Some(result) => result?,
                None => 1,
            }
        }
        None => {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = stopped(stop_rx.clone()) => {}
                Ok(()) = &mut agent_failure => {}
            }
            let _ = stop_tx.send(true);
            0
        }
    };
    agent.await?.context("agent")?;
    coordinator.await?.context("coordinator")?;
    Ok(code)
}
