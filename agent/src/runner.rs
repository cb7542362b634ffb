//! Runs one placed job rank as a child process in its own process group: prepares its directory
//! and environment, downloads the checkpoint it resumes from, ships its output and checkpoints,
//! stops it (SIGTERM, then SIGKILL after the grace period) when asked, and reports how it ended.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use gantry_core::JobSpec;
use gantry_proto::v1;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::checkpoints::{self, Uploader};
use crate::container::{self, Engine};
use crate::coordinators::Coordinators;
use crate::error::{Error, Result};
use crate::isolation::{self, Isolation};
use crate::logship::LogShipper;
use crate::serving;

pub struct Launch {
    pub assignment: v1::Assignment,
    pub spec: JobSpec,
    /// This attempt's own directory: checkpoints, the resume download, the train config.
    pub dir: PathBuf,
    /// The `gantry` binary, run as `gantry train --spec FILE` for `train:` jobs.
    pub train_program: PathBuf,
    /// Pushed data sets on this node: a `train:` job's `dataset://` paths are fetched there.
    pub datasets: std::sync::Arc<crate::datasets::DatasetCache>,
    /// This agent's GPU kernel cache, shared by its jobs (`GANTRY_KERNEL_CACHE`): compiled
    /// kernels and autotune results outlive a job, so the next one on this GPU model skips the JIT.
    pub kernel_cache: PathBuf,
    pub coordinators: Coordinators,
    /// The user and cgroup the job runs in.
    pub isolation: std::sync::Arc<Isolation>,
    /// Where jobs with an `image:` run; none when the agent has no container engine.
    pub engine: Option<Engine>,
    /// The address a serve replica listens on: the one the coordinator reaches this agent at.
    pub serve_host: String,
    /// A serve replica's port while it answers ready, else 0: what heartbeats report.
    pub serve_port: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

const CHECKPOINT_POLL: Duration = Duration::from_millis(500);

/// Runs the rank to its end. `stop` turns `Some(grace)` when the job must stop.
pub async fn run(launch: Launch, mut stop: watch::Receiver<Option<Duration>>) -> v1::JobReport {
    let a = &launch.assignment;
    let mut report = v1::JobReport {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        phase: v1::job_report::Phase::Exited as i32,
        ..Default::default()
    };
    let (line_tx, line_rx) = mpsc::channel::<String>(4096);
    let shipper = LogShipper {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        rank: a.rank,
        coordinators: launch.coordinators.clone(),
    };
    let shipping = tokio::spawn(shipper.run(line_rx));

    let outcome = run_child(&launch, &line_tx, &mut stop).await;
    match outcome {
        Ok(Exit { code, signal, why }) => {
            report.exit_code = code;
            report.signal = signal;
            if let Some(why) = why {
                let _ = line_tx.send(format!("[gantry] {why}")).await;
                report.message = why;
            }
        }
        Err(e) => {
            // The node could not run it: no failure of the job's.
            report.node_fault = matches!(e, Error::ContainerEngine(_) | Error::NoContainerEngine(_));
            let message = e.to_string();
            let _ = line_tx.send(format!("[gantry] {message}")).await;
            report.message = message;
        }
    }
    drop(line_tx);
    // All output reaches the coordinator before the exit is reported.
    let _ = shipping.await;
    info!(job = %a.job_id, attempt = a.attempt, rank = a.rank, code = ?report.exit_code, signal = ?report.signal, "job rank ended");
    report
}

struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
    /// What the exit status does not say: the kernel killed it for memory.
    why: Option<String>,
}

async fn run_child(
    launch: &Launch,
    lines: &mpsc::Sender<String>,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Result<Exit> {
    let a = &launch.assignment;
    let checkpoint_dir = launch.dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoint_dir)
        .map_err(Error::io(format!("could not create {}", checkpoint_dir.display())))?;

    let mut resume_dir = None;
    if let Some(r) = &a.resume {
        let dest = launch.dir.join("resume");
        let _ = std::fs::remove_dir_all(&dest);
        let mut client = launch.coordinators.client();
        checkpoints::download(&mut client, r, &dest).await.map_err(|e| Error::ResumeDownload {
            job_id: r.job_id.clone(),
            step: r.step,
            source: Box::new(e),
        })?;
        let _ = lines.send(format!("[gantry] resuming from job {} step {}", r.job_id, r.step)).await;
        resume_dir = Some(dest);
    }

    let mut serve_env = Vec::new();
    // Its `dataset://` and `s3://` references (a train spec's files, a command's `data:`), now
    // paths on this node. The leases keep those copies here until the rank ends.
    let mut spec = launch.spec.clone();
    let mut said = Vec::new();
    let _datasets =
        crate::datasets::resolve(&launch.datasets, spec.fetched_paths_mut(), &launch.coordinators, &mut said).await?;
    for line in said {
        let _ = lines.send(format!("[gantry] {line}")).await;
    }
    let argv = match (&spec.train, &spec.command) {
        (Some(train), _) => {
            let file = launch.dir.join("train.json");
            let text = serde_json::to_vec_pretty(train).map_err(Error::TrainConfig)?;
            std::fs::write(&file, text).map_err(Error::io(format!("could not write {}", file.display())))?;
            vec![
                launch.train_program.display().to_string(),
                "train".into(),
                "--spec".into(),
                file.display().to_string(),
            ]
        }
        (None, Some(argv)) => argv.clone(),
        (None, None) => match &spec.serve {
            Some(serve) => {
                serve_env = serving::env(&launch.spec.name, serve, &launch.serve_host)?;
                vec![launch.train_program.display().to_string(), "serve-model".into()]
            }
            None => return Err(Error::NothingToRun),
        },
    };

    // The job's files are the job user's.
    let isolation = &launch.isolation;
    isolation.hand_over(&launch.dir)?;
    isolation.shared_dir(&launch.kernel_cache)?;
    let mut env: Vec<(String, String)> = launch.spec.env.clone().into_iter().collect();
    env.extend(spec.data);
    env.extend(job_env(a, &checkpoint_dir, resume_dir.as_deref(), &metrics_file(&launch.dir), &launch.kernel_cache));
    let probing =
        serving::probe_target(&serve_env).map(|target| tokio::spawn(serving::probe(target, launch.serve_port.clone())));
    env.extend(serve_env);
    if let Some(user) = &isolation.user {
        // Not root's home: the job's own directory.
        let home = launch.dir.display().to_string();
        env.extend([("HOME".into(), home), ("USER".into(), user.name.clone()), ("LOGNAME".into(), user.name.clone())]);
    }

    let (upload_stop_tx, upload_stop_rx) = watch::channel(false);
    let uploader = Uploader {
        job_id: a.job_id.clone(),
        attempt: a.attempt,
        coordinators: launch.coordinators.clone(),
        dir: checkpoint_dir,
        trusted: launch.dir.clone(),
        done: BTreeSet::new(),
        log: lines.clone(),
    };
    let uploading = tokio::spawn(upload_until_stopped(uploader, upload_stop_rx));
    let exit = match &launch.spec.image {
        Some(image) => {
            // One mount per version, however many references name it: the engine refuses a
            // mount point twice.
            let data: Vec<PathBuf> =
                _datasets.iter().map(crate::datasets::Lease::files).collect::<BTreeSet<_>>().into_iter().collect();
            run_container(launch, image, &argv, &env, &data, lines, stop).await
        }
        None => run_process(launch, &argv, env, lines, stop).await,
    };
    if let Some(probing) = probing {
        probing.abort();
        launch.serve_port.store(0, std::sync::atomic::Ordering::Relaxed);
    }
    // The last checkpoints go up before the exit is reported.
    let _ = upload_stop_tx.send(true);
    let _ = uploading.await;
    exit
}

/// The rank as a process of the job user, in its own process group and cgroup.
async fn run_process(
    launch: &Launch,
    argv: &[String],
    env: Vec<(String, String)>,
    lines: &mpsc::Sender<String>,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Result<Exit> {
    let a = &launch.assignment;
    let isolation = &launch.isolation;
    let cgroup_name = format!("job-{}-{}-{}", a.job_id, a.attempt, a.rank);
    let cgroup = isolation.cgroup(&cgroup_name, launch.spec.resources.cpus, launch.spec.resources.memory_gb)?;

    let mut cmd = tokio::process::Command::new(&argv[0]);
    // The agent's own settings (its join token among them) are not the job's.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GANTRY_") {
            cmd.env_remove(name);
        }
    }
    cmd.args(&argv[1..])
        .current_dir(&launch.dir)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a stop reaches everything it started.
        .process_group(0);
    let procs = cgroup.as_ref().map(|c| c.procs()).unwrap_or_default();
    let user = isolation.user.clone();
    // SAFETY: `enter` makes only async-signal-safe calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || isolation::enter(&procs, user.as_ref()));
    }
    let spawned = cmd.spawn().map_err(Error::io(format!("could not start `{}`", argv[0])));
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            if let Some(cgroup) = cgroup {
                cgroup.remove();
            }
            return Err(e);
        }
    };
    let pgid = child.id().map(|p| p as i32).ok_or(Error::Untracked)?;
    info!(job = %a.job_id, attempt = a.attempt, rank = a.rank, pid = pgid, "job started");

    let readers = [
        tokio::spawn(forward_lines(child.stdout.take().expect("piped"), lines.clone())),
        tokio::spawn(forward_lines(child.stderr.take().expect("piped"), lines.clone())),
    ];
    let status = tokio::select! {
        status = child.wait() => status,
        grace = async { stop.wait_for(|s| s.is_some()).await.ok().and_then(|g| *g) } => {
            let grace = grace.unwrap_or(Duration::from_secs(10));
            info!(job = %a.job_id, ?grace, "stopping job: SIGTERM");
            signal_group(pgid, libc::SIGTERM);
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    warn!(job = %a.job_id, "grace period over: SIGKILL");
                    signal_group(pgid, libc::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    // Whatever the leader left behind in its group, or in its cgroup outside the group, goes
    // with it (and releases the pipes, which the readers below wait for).
    signal_group(pgid, libc::SIGKILL);
    if let Some(cgroup) = &cgroup {
        cgroup.kill_all();
    }
    // The agent's own record of when this copy stopped running (its exit is reported later,
    // once its output has reached a coordinator).
    info!(job = %a.job_id, attempt = a.attempt, rank = a.rank, "job processes ended");
    for r in readers {
        let _ = r.await;
    }
    let why = match cgroup {
        Some(cgroup) => {
            let oom = cgroup.oom_killed().then(|| cgroup.oom_reason());
            let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
            oom
        }
        None => None,
    };
    let status = status.map_err(Error::io("waiting for the job failed"))?;
    use std::os::unix::process::ExitStatusExt;
    // A job that handled its own out-of-memory kill and still succeeded is not a failure.
    let why = why.filter(|_| !status.success());
    Ok(Exit { code: status.code(), signal: status.signal(), why })
}

/// The rank in a container from `image`, through the agent's container engine.
async fn run_container(
    launch: &Launch,
    image: &str,
    argv: &[String],
    env: &[(String, String)],
    data: &[PathBuf],
    lines: &mpsc::Sender<String>,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> Result<Exit> {
    let engine = launch.engine.as_ref().ok_or_else(|| Error::NoContainerEngine(image.to_string()))?;
    let a = &launch.assignment;
    let r = &launch.spec.resources;
    let user = match &launch.isolation.user {
        Some(u) => format!("{}:{}", u.uid, u.gid),
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        None => unsafe { format!("{}:{}", libc::getuid(), libc::getgid()) },
    };
    let rank = container::Rank {
        job_id: &a.job_id,
        attempt: a.attempt,
        rank: a.rank,
        image,
        pull: launch.spec.image_pull_policy,
        argv,
        env,
        dir: &launch.dir,
        // A `train:` job runs gantry's own runtime: this very binary, and the kernel cache.
        mounts: {
            let mut mounts = match launch.spec.train.is_some() || launch.spec.serve.is_some() {
                true => vec![
                    (launch.train_program.as_path(), container::Access::ReadOnly),
                    (launch.kernel_cache.as_path(), container::Access::ReadWrite),
                ],
                false => Vec::new(),
            };
            // The versions its `dataset://` and `s3://` references were fetched to, and no
            // other of the node's cache.
            mounts.extend(data.iter().map(|d| (d.as_path(), container::Access::ReadOnly)));
            mounts
        },
        user,
        cpus: r.cpus,
        memory_gb: r.memory_gb,
        gpu_uuids: &a.gpu_uuids,
    };
    let ended = engine.run(&rank, lines, stop).await?;
    let why = (ended.oom_killed && ended.code != 0).then(|| isolation::oom_reason(r.memory_gb));
    // An exit status past 128 is the signal that ended the container's process.
    let (code, signal) = if ended.code > 128 { (None, Some(ended.code - 128)) } else { (Some(ended.code), None) };
    Ok(Exit { code, signal, why })
}

/// Where a rank appends its metrics (`GANTRY_METRICS_FILE`), in its attempt directory.
pub fn metrics_file(dir: &Path) -> PathBuf {
    dir.join("metrics.jsonl")
}

/// The environment of PRODUCT.md: gantry's names and torchrun's, and the metrics file.
fn job_env(
    a: &v1::Assignment,
    checkpoint_dir: &Path,
    resume_dir: Option<&Path>,
    metrics_file: &Path,
    kernel_cache: &Path,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("GANTRY_JOB_ID".to_string(), a.job_id.clone()),
        ("GANTRY_ATTEMPT".into(), a.attempt.to_string()),
        ("RANK".into(), a.rank.to_string()),
        ("WORLD_SIZE".into(), a.world_size.to_string()),
        ("LOCAL_RANK".into(), "0".into()),
        ("MASTER_ADDR".into(), if a.master_addr.is_empty() { "127.0.0.1".into() } else { a.master_addr.clone() }),
        ("MASTER_PORT".into(), a.master_port.to_string()),
        // Empty for a CPU job: the job sees no GPU rather than every GPU.
        ("CUDA_VISIBLE_DEVICES".into(), a.gpu_uuids.join(",")),
        ("GANTRY_CHECKPOINT_DIR".into(), checkpoint_dir.display().to_string()),
        ("GANTRY_METRICS_FILE".into(), metrics_file.display().to_string()),
        ("GANTRY_KERNEL_CACHE".into(), kernel_cache.display().to_string()),
    ];
    if let Some(dir) = resume_dir {
        env.push(("GANTRY_RESUME_DIR".into(), dir.display().to_string()));
    }
    env
}

fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; it has no memory effects.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// The longest log line shipped; longer output is split so every batch stays under gRPC's
/// message limit.
const MAX_LINE: usize = 64 * 1024;

async fn forward_lines(pipe: impl AsyncRead + Unpin, lines: mpsc::Sender<String>) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                // A progress bar redraws with '\r': each redraw is a line of its own.
                for piece in buf.split(|b| *b == b'\n' || *b == b'\r').filter(|p| !p.is_empty()) {
                    for chunk in piece.chunks(MAX_LINE) {
                        if lines.send(String::from_utf8_lossy(chunk).into_owned()).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

async fn upload_until_stopped(mut uploader: Uploader, mut stop: watch::Receiver<bool>) {
    loop {
        uploader.upload_new().await;
        tokio::select! {
            _ = tokio::time::sleep(CHECKPOINT_POLL) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // The job has ended: what it committed last is uploaded before its exit is reported.
    uploader.upload_new().await;
}
