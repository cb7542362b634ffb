//! What the runner (the agent, or the CLI locally) tells a training process: which job it is,
//! where checkpoints go, where to resume from, and when to stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::dist::DistEnv;
use crate::error::JobsError;

/// A run's environment.
#[derive(Debug, Clone, Default)]
pub struct RunEnv {
    /// `GANTRY_JOB_ID`: tells a restart of this job (resume) from another job's checkpoint
    /// (initialise weights only).
    pub job_id: Option<String>,
    /// `GANTRY_CHECKPOINT_DIR`: where `step-<N>` directories are written; none are without it.
    pub checkpoint_dir: Option<PathBuf>,
    /// `GANTRY_RESUME_DIR`: a `step-<N>` directory to start from.
    pub resume_dir: Option<PathBuf>,
    /// `GANTRY_METRICS_FILE`: each epoch's figures are appended there as a JSON line.
    pub metrics_file: Option<PathBuf>,
    /// Set on SIGTERM: training saves a checkpoint and returns at the next step boundary.
    pub stop: Arc<AtomicBool>,
    /// `CUDA_VISIBLE_DEVICES`: the GPUs the process sees; it trains on the first.
    pub gpus: Vec<String>,
    /// `GANTRY_KERNEL_CACHE`: where compiled GPU kernels and autotune results persist. cubecl's
    /// configuration is per process: the first GPU run in a process sets it for the others.
    pub kernel_cache: Option<PathBuf>,
    /// `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` when `WORLD_SIZE` > 1: this process
    /// is one rank of a data-parallel run.
    pub dist: Option<DistEnv>,
}

impl RunEnv {
    /// Reads `GANTRY_JOB_ID`, `GANTRY_CHECKPOINT_DIR`, `GANTRY_RESUME_DIR`,
    /// `GANTRY_METRICS_FILE`, `GANTRY_KERNEL_CACHE` (unset or empty means none),
    /// `CUDA_VISIBLE_DEVICES` and torchrun's variables (refused if
    /// malformed). The stop flag starts cleared.
    pub fn from_env() -> Result<Self, JobsError> {
        let path = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        Ok(RunEnv {
            job_id: std::env::var(crate::JOB_ID_VAR).ok().filter(|v| !v.is_empty()),
            checkpoint_dir: path(crate::CHECKPOINT_DIR_VAR),
            resume_dir: path(crate::RESUME_DIR_VAR),
            metrics_file: path(crate::METRICS_FILE_VAR),
            gpus: crate::device::visible_gpus(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref()),
            kernel_cache: path(crate::KERNEL_CACHE_VAR),
            stop: Arc::new(AtomicBool::new(false)),
            dist: DistEnv::from_env()?,
        })
    }
}

/// Sets `stop` when the process gets SIGTERM, instead of dying: the agent sends it on preemption
/// and cancellation, and the run then saves a checkpoint before it exits.
pub fn install_sigterm_handler(stop: Arc<AtomicBool>) -> Result<(), JobsError> {
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop).map(|_| ()).map_err(JobsError::Signal)
}
