//! The one error type of the crate.

use std::path::PathBuf;

use burn::record::RecorderError;

/// Everything that can stop a training run before it finishes, and why a GPU the run was given
/// is not used (those end up in a note, and the run goes on on the CPU or in f32).
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    /// The spec asks for something this runtime cannot run.
    #[error("invalid training spec: {0}")]
    Spec(String),

    /// The spec names another job's checkpoint but the runner passed none to start from.
    #[error("init_from `{0}` is set but no checkpoint was given to start from (GANTRY_RESUME_DIR)")]
    InitFromMissing(String),

    /// Input given to a loaded model for inference that it cannot read (the message says why).
    #[error("{0}")]
    BadInput(String),

    /// The embedded data set could not be parsed (a build problem, not a user one).
    #[error("dataset line {line}: {reason}")]
    Dataset { line: usize, reason: String },

    /// Writing a progress line failed.
    #[error("cannot write training output")]
    Output(#[source] std::io::Error),

    /// Registering the SIGTERM handler failed.
    #[error("cannot install the SIGTERM handler")]
    Signal(#[source] std::io::Error),

    /// A file or directory of a checkpoint could not be read or written.
    #[error("checkpoint I/O on {path}")]
    CheckpointIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint's `state.json` is not valid.
    #[error("checkpoint state {path} is not valid")]
    CheckpointState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// burn could not encode or decode a model or optimizer record.
    #[error("checkpoint record {path} cannot be read or written")]
    CheckpointRecord {
        path: PathBuf,
        #[source]
        source: RecorderError,
    },

    /// A checkpoint was read but does not fit this run (other model, wrong shapes, bad position).
    #[error("checkpoint {path} cannot be used: {reason}")]
    CheckpointMismatch { path: PathBuf, reason: String },

    /// Weights to start from (a SafeTensors file) cannot be read or do not fit the model.
    #[error("cannot start from {path}: {reason}")]
    Weights { path: PathBuf, reason: String },

    /// A data set file cannot be read or does not parse: where, and why.
    #[error("data set {path}{}: {reason}", at.as_ref().map(|a| format!(" {a}")).unwrap_or_default())]
    DataFile { path: PathBuf, at: Option<String>, reason: String },

    /// A GPU named for the run lacks what the CUDA backend needs besides it: the driver's
    /// library, NVRTC, the CUDA headers (one entry each). The run trains on the CPU and says so.
    #[error("missing {}", .0.join("; "))]
    GpuMissing(Vec<String>),

    /// A GPU named for the run did not compute a test kernel right: the backend's error, its
    /// panic, or the wrong result. The run trains on the CPU and says so.
    #[error("{0}")]
    GpuFailed(String),

    /// The driver did not tell a GPU's compute capability (its error, as the driver gives it):
    /// the run then computes in f32 whatever the spec asks.
    #[error("{0}")]
    GpuAttribute(String),

    /// The data-parallel group could not be formed from the environment.
    #[error("data-parallel group: {0}")]
    Group(String),

    /// Talking to another rank failed (it stopped, or the network did).
    #[error("data-parallel group: {context}")]
    GroupIo {
        context: String,
        #[source]
        source: std::io::Error,
    },
}
