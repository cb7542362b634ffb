//! Runs a rank in a container from the job's `image:`, through the container engine's API on
//! this host (the Docker Engine API; Podman serves it too). The container sees what a process
//! rank sees: the same environment, its attempt directory mounted at the same path (so
//! `GANTRY_CHECKPOINT_DIR` and the rest mean the same inside), the host's network (so
//! `MASTER_ADDR` and the coordinator are reachable as from the agent), the job user, and the
//! spec's CPUs and memory as its limits. Every container carries labels naming its agent, job,
//! attempt and rank, so that a restarted agent finds what its previous run left.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as EngineError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use gantry_core::PullPolicy;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// The label that names the agent a container belongs to.
const AGENT_LABEL: &str = "gantry.agent";
/// Seconds the engine has to answer a call (a stop waits for the container, so it is long).
const ENGINE_TIMEOUT_SECS: u64 = 120;
/// The API version the agent speaks: Docker 20.10's, which newer engines and Podman still serve.
const API: bollard::ClientVersion = bollard::ClientVersion { major_version: 1, minor_version: 41 };

/// This agent's container engine.
#[derive(Clone)]
pub struct Engine {
    docker: Docker,
    /// The agent's key (its work directory's), on every container's label and in its name:
    /// unique among the agents of one machine, and the same across an agent's restarts.
    agent: String,
    /// `nvidia`: GPUs are passed by the NVIDIA Container Toolkit's device requests. None: only
    /// `CUDA_VISIBLE_DEVICES` names them (hosts without the toolkit, and tests).
    gpu_driver: Option<String>,
    registry_auth: RegistryAuth,
}

/// One rank to run in a container.
pub struct Rank<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    pub rank: u32,
    pub image: &'a str,
    pub pull: PullPolicy,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    /// The attempt's directory, mounted read-write at the same path, and the working directory.
    pub dir: &'a std::path::Path,
    /// More host paths mounted at the same path: read-only (gantry's binary, for a `train:` job)
    /// or read-write (the agent's kernel cache).
    pub mounts: Vec<(&'a std::path::Path, Access)>,
    /// `uid:gid` the rank runs as.
    pub user: String,
    pub cpus: f64,
    pub memory_gb: f64,
    pub gpu_uuids: &'a [String],
}

/// Registry credentials, from a file in Docker's `config.json` layout
/// (`{"auths": {"REGISTRY": {"auth": "base64(user:password)"}}}`, or `username` and `password`
/// in place of `auth`): the agent's own configuration, never a job's.
#[derive(Debug, Clone, Default)]
pub struct RegistryAuth {
    by_registry: HashMap<String, (String, String)>,
}

impl RegistryAuth {
    pub fn from_file(path: &std::path::Path) -> Result<RegistryAuth> {
        let text = std::fs::read_to_string(path).map_err(Error::io(format!("reading {}", path.display())))?;
        RegistryAuth::parse(&text).map_err(|why| Error::Fatal(format!("{}: {why}", path.display())))
    }

    fn parse(text: &str) -> std::result::Result<RegistryAuth, String> {
        use base64::Engine as _;
        let config: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let auths = config.get("auths").and_then(|a| a.as_object()).ok_or("no `auths` object")?;
        let mut by_registry = HashMap::new();
        for (registry, entry) in auths {
            let field = |name: &str| entry.get(name).and_then(|v| v.as_str()).map(str::to_string);
            let pair = match (field("auth"), field("username"), field("password")) {
                (Some(auth), _, _) => {
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|e| format!("{registry}: `auth` is not base64: {e}"))?;
                    let text = String::from_utf8(decoded).map_err(|_| format!("{registry}: `auth` is not text"))?;
                    let (user, password) =
                        text.split_once(':').ok_or_else(|| format!("{registry}: `auth` is not user:password"))?;
                    (user.to_string(), password.to_string())
                }
                (None, Some(user), Some(password)) => (user, password),
                _ => return Err(format!("{registry}: neither `auth` nor `username` and `password`")),
            };
            by_registry.insert(registry_host(registry), pair);
        }
        Ok(RegistryAuth { by_registry })
    }

    /// The credentials for pulling `image`, if any are configured for its registry.
    fn for_image(&self, image: &str) -> Option<bollard::auth::DockerCredentials> {
        let registry = image_registry(image);
        let (user, password) = self.by_registry.get(&registry)?;
        Some(bollard::auth::DockerCredentials {
            username: Some(user.clone()),
            password: Some(password.clone()),
            serveraddress: Some(registry),
            ..Default::default()
        })
    }
}

/// Docker Hub's name in credentials, however a config spells it.
const DOCKER_HUB: &str = "docker.io";

/// A registry key of a config (`https://index.docker.io/v1/`, `registry.local:5000`) as a host.
fn registry_host(key: &str) -> String {
    let host = key.trim_start_matches("https://").trim_start_matches("http://");
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.into(),
        _ => host.to_string(),
    }
}

/// The registry an image reference names: its first part when that is a host (has a dot or a
/// port, or is localhost), else Docker Hub.
fn image_registry(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => registry_host(first),
        _ => DOCKER_HUB.into(),
    }
}

/// How a container may use a mounted path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// How a container ended.
pub struct Ended {
    pub code: i32,
    pub oom_killed: bool,
}

impl Engine {
    /// The engine at `socket` (a path, or `unix://PATH`), for the agent `agent` (its key).
    pub fn connect(
        socket: &str,
        agent: &str,
        gpu_driver: Option<String>,
        registry_auth: RegistryAuth,
    ) -> Result<Engine> {
        let path = socket.strip_prefix("unix://").unwrap_or(socket);
        let docker = Docker::connect_with_unix(path, ENGINE_TIMEOUT_SECS, &API)
            .map_err(|e| Error::ContainerEngine(format!("{socket}: {e}")))?
            .with_request_modifier(url_safe_registry_auth);
        Ok(Engine { docker, agent: agent.to_string(), gpu_driver, registry_auth })
    }

    /// Removes every container a previous run of this agent left (killed with -9, say): its
    /// ranks are not held any more, and the coordinator places them again.
    pub async fn remove_leftovers(&self) -> Result<usize> {
        let filters = HashMap::from([("label", vec![format!("{AGENT_LABEL}={}", self.agent)])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let found = self.docker.list_containers(Some(options)).await.map_err(engine_error)?;
        for c in &found {
            let Some(id) = &c.id else { continue };
            warn!(container = %id, names = ?c.names, "removing a container a previous run of this agent left");
            self.remove(id).await;
        }
        Ok(found.len())
    }

    /// The images the engine holds, as [`gantry_core::spec::normalize_image`] writes them.
    pub async fn images(&self) -> Result<Vec<String>> {
        let images = self
            .docker
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(engine_error)?;
        let mut names: Vec<String> = images
            .into_iter()
            .flat_map(|i| i.repo_tags.into_iter().chain(i.repo_digests))
            .filter(|t| !t.starts_with("<none>"))
            .map(|t| gantry_core::spec::normalize_image(&t))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Runs `rank` to its end: pulls its image as its policy says, starts it, sends its output
    /// lines to `lines`, and stops it (SIGTERM, SIGKILL after the grace period) when `stop` asks.
    /// The container is removed whatever happens.
    pub async fn run(
        &self,
        rank: &Rank<'_>,
        lines: &mpsc::Sender<String>,
        stop: &mut watch::Receiver<Option<Duration>>,
    ) -> Result<Ended> {
        self.ensure_image(rank.image, rank.pull, lines).await?;
        let name = container_name(&self.agent, rank);
        // A container of the same name is a leftover of this very rank: not ours to reuse.
        self.remove(&name).await;
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body(&self.agent, self.gpu_driver.as_deref(), rank),
            )
            .await
            .map_err(|e| match e {
                EngineError::DockerResponseServerError { status_code: 404, message } => {
                    Error::ImageMissing { image: rank.image.to_string(), why: message }
                }
                e => engine_error(e),
            })?;
        let id = created.id;
        let ended = self.run_created(&id, rank, lines, stop).await;
        self.remove(&id).await;
        ended
    }

    async fn run_created(
        &self,
        id: &str,
        rank: &Rank<'_>,
        lines: &mpsc::Sender<String>,
        stop: &mut watch::Receiver<Option<Duration>>,
    ) -> Result<Ended> {
        self.docker.start_container(id, None).await.map_err(engine_error)?;
        // "not-running", asked once it has started: an exit before the engine reads the request
        // still answers it. (The request leaves only when first polled, so "next-exit" waited for
        // ever on a container that a stop at once had already ended.)
        let wait_options = WaitContainerOptionsBuilder::default().condition("not-running").build();
        let mut wait = Box::pin(self.docker.wait_container(id, Some(wait_options)));
        info!(job = %rank.job_id, attempt = rank.attempt, rank = rank.rank, container = %id, image = %rank.image, "job started");
        let logs = tokio::spawn(forward_logs(self.docker.clone(), id.to_string(), lines.clone()));
        let exit = tokio::select! {
            exit = wait.next() => exit,
            grace = async { stop.wait_for(|s| s.is_some()).await.ok().and_then(|g| *g) } => {
                let grace = grace.unwrap_or(Duration::from_secs(10));
                info!(job = %rank.job_id, ?grace, "stopping job: SIGTERM to its container");
                self.signal(id, "SIGTERM").await;
                match tokio::time::timeout(grace, wait.next()).await {
                    Ok(exit) => exit,
                    Err(_) => {
                        warn!(job = %rank.job_id, "grace period over: SIGKILL");
                        self.signal(id, "SIGKILL").await;
                        wait.next().await
                    }
                }
            }
        };
        info!(job = %rank.job_id, attempt = rank.attempt, rank = rank.rank, "job processes ended");
        let _ = logs.await;
        let code = match exit {
            Some(Ok(r)) => r.status_code,
            // The engine reports every non-zero exit as an error carrying the code.
            Some(Err(EngineError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => return Err(engine_error(e)),
            None => return Err(Error::ContainerEngine("the engine stopped answering about the container".into())),
        };
        let state = self.docker.inspect_container(id, None).await.map_err(engine_error)?.state.unwrap_or_default();
        Ok(Ended { code: state.exit_code.unwrap_or(code) as i32, oom_killed: state.oom_killed.unwrap_or(false) })
    }

    /// Makes sure the engine holds `image`, pulling it as `policy` says.
    async fn ensure_image(&self, image: &str, policy: PullPolicy, lines: &mpsc::Sender<String>) -> Result<()> {
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(EngineError::DockerResponseServerError { status_code: 404, .. }) => false,
            Err(e) => return Err(engine_error(e)),
        };
        match (policy, present) {
            (PullPolicy::IfNotPresent, true) => return Ok(()),
            (PullPolicy::Never, true) => return Ok(()),
            (PullPolicy::Never, false) => {
                return Err(Error::ImageMissing {
                    image: image.to_string(),
                    why: "the node does not hold it and image_pull_policy is never".into(),
                });
            }
            _ => {}
        }
        let _ = lines.send(format!("[gantry] pulling image {image}")).await;
        // Always with a tag (`:latest` where none is given): without one the engine would pull
        // every tag of the repository.
        let options =
            CreateImageOptionsBuilder::default().from_image(&gantry_core::spec::normalize_image(image)).build();
        let credentials = self.registry_auth.for_image(image);
        let mut pull = self.docker.create_image(Some(options), None, credentials);
        let mut failed = None;
        while let Some(step) = pull.next().await {
            if let Err(e) = step {
                failed = Some(e.to_string());
                break;
            }
        }
        // The engine's own word on whether the pull worked (a finished pull may still end its
        // stream with an error).
        match (failed, self.docker.inspect_image(image).await) {
            (_, Ok(_)) => Ok(()),
            (Some(why), Err(_)) => Err(Error::ImagePull { image: image.to_string(), why }),
            (None, Err(e)) => Err(Error::ImagePull { image: image.to_string(), why: e.to_string() }),
        }
    }

    async fn signal(&self, id: &str, signal: &str) {
        let options = KillContainerOptionsBuilder::default().signal(signal).build();
        if let Err(e) = self.docker.kill_container(id, Some(options)).await {
            // It may have ended on its own meanwhile.
            info!(container = %id, signal, error = %e, "could not signal the container");
        }
    }

    async fn remove(&self, id: &str) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) | Err(EngineError::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(e) => warn!(container = %id, error = %e, "could not remove the container"),
        }
    }
}

/// What the engine is asked to create for `rank` of agent `agent` (its key).
fn body(agent: &str, gpu_driver: Option<&str>, rank: &Rank<'_>) -> ContainerCreateBody {
    let dir = rank.dir.display().to_string();
    let labels = HashMap::from([
        (AGENT_LABEL.to_string(), agent.to_string()),
        ("gantry.job".to_string(), rank.job_id.to_string()),
        ("gantry.attempt".to_string(), rank.attempt.to_string()),
        ("gantry.rank".to_string(), rank.rank.to_string()),
    ]);
    let device_requests = match (gpu_driver, rank.gpu_uuids.is_empty()) {
        (Some(driver), false) => Some(vec![DeviceRequest {
            driver: Some(driver.to_string()),
            device_ids: Some(rank.gpu_uuids.to_vec()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]),
        _ => None,
    };
    let memory_bytes = (rank.memory_gb > 0.0).then_some((rank.memory_gb * (1u64 << 30) as f64) as i64);
    let host_config = HostConfig {
        binds: Some(
            std::iter::once(format!("{dir}:{dir}:rw"))
                .chain(rank.mounts.iter().map(|(path, access)| {
                    let mode = if *access == Access::ReadOnly { "ro" } else { "rw" };
                    format!("{p}:{p}:{mode}", p = path.display())
                }))
                .collect(),
        ),
        network_mode: Some("host".into()),
        // An init as PID 1 passes SIGTERM on and reaps what the job leaves.
        init: Some(true),
        // Zero asks for no share, as for processes: no limit.
        nano_cpus: (rank.cpus > 0.0).then_some((rank.cpus * 1e9) as i64),
        memory: memory_bytes,
        // No swap beyond the limit: over it, the job is killed for memory as a process is.
        memory_swap: memory_bytes,
        device_requests,
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(rank.image.to_string()),
        // The job's command replaces the image's entrypoint, as Kubernetes' `command:` does.
        entrypoint: rank.argv.first().map(|program| vec![program.clone()]),
        cmd: Some(rank.argv.iter().skip(1).cloned().collect()),
        env: Some(rank.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: Some(dir),
        user: Some(rank.user.clone()),
        labels: Some(labels),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The engine decodes `X-Registry-Auth` as URL-safe base64; bollard writes the standard
/// alphabet, whose `+` and `/` would make the engine drop the credentials.
fn url_safe_registry_auth(mut request: bollard::BollardRequest) -> bollard::BollardRequest {
    let fixed = request
        .headers()
        .get("X-Registry-Auth")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.replace('+', "-").replace('/', "_"))
        .and_then(|v| http::HeaderValue::from_str(&v).ok());
    if let Some(value) = fixed {
        request.headers_mut().insert("X-Registry-Auth", value);
    }
    request
}

/// `gantry-AGENTKEY-JOB-ATTEMPT-RANK`, in the characters a container name may hold.
fn container_name(agent: &str, rank: &Rank<'_>) -> String {
    let name = format!("gantry-{agent}-{}-{}-{}", rank.job_id, rank.attempt, rank.rank);
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' }).collect()
}

/// Sends the container's output, stdout and stderr, to `lines`, a line at a time.
async fn forward_logs(docker: Docker, id: String, lines: mpsc::Sender<String>) {
    let options = LogsOptionsBuilder::default().follow(true).stdout(true).stderr(true).build();
    let mut logs = docker.logs(&id, Some(options));
    // Per stream: chunks need not end at a line's end.
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(Ok(chunk)) = logs.next().await {
        let (buffer, bytes) = match chunk {
            LogOutput::StdOut { message } | LogOutput::Console { message } => (&mut out, message),
            LogOutput::StdErr { message } => (&mut err, message),
            LogOutput::StdIn { .. } => continue,
        };
        buffer.extend_from_slice(&bytes);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if lines.send(text).await.is_err() {
                return;
            }
        }
    }
    for rest in [out, err] {
        if !rest.is_empty() {
            let _ = lines.send(String::from_utf8_lossy(&rest).into_owned()).await;
        }
    }
}

fn engine_error(e: EngineError) -> Error {
    Error::ContainerEngine(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_in_dockers_layout_and_chosen_by_the_images_registry() {
        // "alice:s3cret" and Docker Hub under its legacy key.
        let config = r#"{"auths": {
            "registry.local:5000": {"auth": "YWxpY2U6czNjcmV0"},
            "https://index.docker.io/v1/": {"username": "bob", "password": "hub"}
        }}"#;
        let auth = RegistryAuth::parse(config).unwrap();
        let user = |image: &str| auth.for_image(image).and_then(|c| c.username);
        assert_eq!(user("registry.local:5000/team/train:v1").as_deref(), Some("alice"));
        assert_eq!(user("pytorch/pytorch:2.11").as_deref(), Some("bob"));
        assert_eq!(user("python").as_deref(), Some("bob"));
        assert_eq!(user("other.example/x:1"), None);
        for bad in [r#"{}"#, r#"{"auths": {"r": {"auth": "!!"}}}"#, r#"{"auths": {"r": {}}}"#] {
            assert!(RegistryAuth::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_registry_auth_header_goes_url_safe() {
        let request = http::Request::builder()
            .header("X-Registry-Auth", "ab+c/d=")
            .body(bollard::body_full(Default::default()))
            .unwrap();
        let fixed = url_safe_registry_auth(request);
        assert_eq!(fixed.headers()["X-Registry-Auth"], "ab-c_d=");
    }

    #[test]
    fn a_container_gets_its_gpus_limits_mounts_user_and_command() {
        let env = [("RANK".to_string(), "1".to_string())];
        let argv = ["python3".to_string(), "train.py".to_string()];
        let gpus = ["GPU-a".to_string(), "GPU-b".to_string()];
        let ro = std::path::Path::new("/opt/gantry");
        let rank = Rank {
            job_id: "12",
            attempt: 3,
            rank: 1,
            image: "img:1",
            pull: PullPolicy::Never,
            argv: &argv,
            env: &env,
            dir: std::path::Path::new("/w/12"),
            mounts: vec![(ro, Access::ReadOnly)],
            user: "65534:65534".into(),
            cpus: 2.5,
            memory_gb: 0.5,
            gpu_uuids: &gpus,
        };
        let b = body("agent-1", Some("nvidia"), &rank);
        let host = b.host_config.clone().unwrap();
        let request = &host.device_requests.unwrap()[0];
        assert_eq!((request.driver.as_deref(), request.device_ids.as_deref()), (Some("nvidia"), Some(&gpus[..])));
        assert_eq!(
            (host.nano_cpus, host.memory, host.memory_swap),
            (Some(2_500_000_000), Some(1 << 29), Some(1 << 29))
        );
        assert_eq!(host.binds.unwrap(), ["/w/12:/w/12:rw", "/opt/gantry:/opt/gantry:ro"]);
        assert_eq!(host.network_mode.as_deref(), Some("host"));
        assert_eq!((b.entrypoint.unwrap(), b.cmd.unwrap()), (vec![argv[0].clone()], vec![argv[1].clone()]));
        assert_eq!((b.user.as_deref(), b.working_dir.as_deref()), (Some("65534:65534"), Some("/w/12")));
        assert_eq!(b.env.unwrap(), ["RANK=1"]);
        assert_eq!(b.labels.unwrap()["gantry.agent"], "agent-1");
        // Without the toolkit, or for a CPU job: no device request at all.
        assert!(body("agent-1", None, &rank).host_config.unwrap().device_requests.is_none());
        let cpu = Rank { gpu_uuids: &[], cpus: 0.0, memory_gb: 0.0, ..rank };
        let host = body("agent-1", Some("nvidia"), &cpu).host_config.unwrap();
        assert_eq!((host.device_requests, host.nano_cpus, host.memory), (None, None, None), "zero asks for no limit");
    }

    #[test]
    fn container_names_hold_only_what_the_engine_takes() {
        let env = [];
        let rank = Rank {
            job_id: "12",
            attempt: 3,
            rank: 1,
            image: "x",
            pull: PullPolicy::Never,
            argv: &[],
            env: &env,
            dir: std::path::Path::new("/w"),
            mounts: Vec::new(),
            user: "0:0".into(),
            cpus: 1.0,
            memory_gb: 1.0,
            gpu_uuids: &[],
        };
        assert_eq!(container_name("node a/1", &rank), "gantry-node-a-1-12-3-1");
    }
}
