//! gantry's built-in training runtime: trains the jobs of a spec's `train:` section (an MLP on
//! the digits or a CSV table, a small CNN on the digits, a character-level transformer on
//! Genesis or a text file; MLP and transformer sized by the spec) with burn, on the CPU
//! (ndarray backend) or, built with the `cuda` feature, on the first GPU `CUDA_VISIBLE_DEVICES`
//! names, writing progress lines and atomic checkpoints so the agent can preempt,
//! restart and resume a job exactly where it was, or start a new job from another job's
//! weights. With `WORLD_SIZE` > 1 it trains data-parallel across processes ([`DistEnv`]).
//!
//! [`train`] writes one line per event to its output, flushed at once:
//!
//! ```text
//! [gantry] CUDA_VISIBLE_DEVICES names GPU-... but ...: training on the CPU   (a GPU not used)
//! [gantry] precision bf16 asked for, but device cpu has no bf16: training in f32
//! start model=mlp dataset=digits params=9610 train_samples=1437 test_samples=360 epochs=30 batch_size=64 precision=f32 device=cpu
//! resumed step=30 epoch=1 from=/ckpt/job-1/step-30         (a restart of the same job)
//! initialised weights from=/ckpt/job-0/step-690            (another job's weights, or a
//!                                                           SafeTensors file's)
//! checkpoint step=100 path=step-100                         (path relative to the checkpoint dir)
//! joined rank=1 world_size=2                               (a data-parallel rank)
//! first_step step=1 seconds=0.052                          (from the call to the first step's end)
//! epoch=3 step=69 loss=0.123456 test_loss=0.180000 test_accuracy=0.9500 samples_per_s=12345
//! done steps=690 test_accuracy=0.9694 checkpoint=/ckpt/job-1/step-690   (or checkpoint=none)
//! stopped step=120 checkpoint=/ckpt/job-1/step-120                      (stop flag / SIGTERM)
//! ```
//!
//! `epoch` in an epoch line counts epochs completed; its loss is the mean over the batches of
//! that epoch trained in this process. Steps count optimizer updates from the job's first start.
//! A checkpoint is a directory `step-<N>` holding [`MODEL_FILE`], [`OPTIMIZER_FILE`] and
//! [`STATE_FILE`]; it appears whole (written as `.tmp-step-<N>`, then renamed).

// Models and data sets meet only in `input` (what a model reads) and in `train`, which pairs
// them: neither of `models` and `datasets` uses the other.
mod checkpoint;
mod datasets;
mod device;
mod dist;
mod env;
mod error;
mod export;
mod grad_sync;
mod import;
mod input;
mod models;
mod precision;
mod rng;
pub mod serving;
mod train;

pub use checkpoint::{
    CheckpointState, FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE, SAFETENSORS_FILE, STATE_FILE, checkpoint_name,
};
pub use datasets::{ImageRates, image_folder_rates};
pub use dist::DistEnv;
pub use env::{RunEnv, install_sigterm_handler};
pub use error::JobsError;
pub use input::InputShape;
pub use serving::{Predictor, digits_test_split};
pub use train::{Outcome, train};

/// The job's id, read by [`RunEnv::from_env`].
pub const JOB_ID_VAR: &str = "GANTRY_JOB_ID";
/// Where checkpoints are written, read by [`RunEnv::from_env`].
pub const CHECKPOINT_DIR_VAR: &str = "GANTRY_CHECKPOINT_DIR";
/// A checkpoint to start from, read by [`RunEnv::from_env`].
pub const RESUME_DIR_VAR: &str = "GANTRY_RESUME_DIR";
/// Where metrics go, one JSON object per line, read by [`RunEnv::from_env`].
pub const METRICS_FILE_VAR: &str = "GANTRY_METRICS_FILE";
/// Where a GPU run keeps compiled kernels and autotune results, read by [`RunEnv::from_env`].
pub const KERNEL_CACHE_VAR: &str = "GANTRY_KERNEL_CACHE";
