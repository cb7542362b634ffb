//! The one error type of the agent crate.
//!
//! A variant's message includes its source's text: the agent renders errors with `to_string()`
//! into job reports and log fields, where nothing walks the source chain.

use nvml_wrapper::error::NvmlError;

/// What the agent can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file, directory, pipe or child process operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The coordinator answered a call with an error.
    #[error("coordinator: {0}")]
    Rpc(#[from] tonic::Status),
    /// No connection to the coordinator could be made.
    #[error("cannot reach the coordinator: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Retrying cannot help (e.g. a protocol mismatch): the agent stops.
    #[error("{0}")]
    Fatal(String),
    /// A checkpoint could not be described, uploaded or downloaded.
    #[error("checkpoint {0}")]
    Checkpoint(String),
    /// A download's files, once written, are not the ones its listing announced.
    #[error("the files received do not match their sha256 listing")]
    Mismatch,
    /// A pushed data set could not be fetched into, or checked in, the node's cache.
    #[error("data set {0}")]
    Dataset(String),
    /// An NVML call failed: the library did not load, or a GPU did not answer. `call` is the
    /// NVML function, as operators find it in NVIDIA's documentation.
    #[error("{call}: {source}")]
    Nvml {
        call: &'static str,
        #[source]
        source: NvmlError,
    },
    /// The driver cannot deliver XID events (it has no event API, or none of its GPUs offers
    /// them): the agent runs without watching them.
    #[error("{0}")]
    XidEventsUnavailable(&'static str),
    /// The checkpoint a job resumes from could not be downloaded before it started.
    #[error("could not download checkpoint step {step} of job {job_id}: {source}")]
    ResumeDownload {
        job_id: String,
        step: u64,
        #[source]
        source: Box<Error>,
    },
    /// A `train:` job's config could not be encoded for `gantry train`.
    #[error("could not write the train config: {0}")]
    TrainConfig(#[source] serde_json::Error),
    /// The assignment's spec has nothing to run (the coordinator validates specs, so a
    /// mismatched coordinator version).
    #[error("the job has none of `train`, `command` and `serve`")]
    NothingToRun,
    /// The job's process ended before its id could be read, so it cannot be signalled.
    #[error("the job exited before it could be tracked")]
    Untracked,
    /// The container engine could not be reached, or refused a call.
    #[error("container engine: {0}")]
    ContainerEngine(String),
    /// A job's image is not on this node and was not to be pulled, or the engine has no such image.
    #[error("image {image} is not on this node: {why}")]
    ImageMissing { image: String, why: String },
    /// Pulling a job's image failed.
    #[error("image pull failed: {image}: {why}")]
    ImagePull { image: String, why: String },
    /// A job with an `image:` reached an agent that runs no container engine.
    #[error("the job runs in image {0}, and this agent has no container engine (--container-engine)")]
    NoContainerEngine(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Tags an NVML failure with the call that failed: `.map_err(Error::nvml("nvmlDeviceGetUUID"))`.
    pub fn nvml(call: &'static str) -> impl FnOnce(NvmlError) -> Error {
        move |source| Error::Nvml { call, source }
    }
}
