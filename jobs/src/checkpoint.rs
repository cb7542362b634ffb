//! Checkpoints: a directory `step-<N>` holding the model record, the optimizer record and
//! `state.json`. It is written under a temporary name and renamed into place, because the agent
//! takes a `step-<N>` directory appearing as the checkpoint being committed.

use std::fs::{self, File};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use gantry_core::spec::ModelSpec;

use crate::error::JobsError;
use crate::input::InputShape;

/// The model's weights (burn named MessagePack, full precision).
pub const MODEL_FILE: &str = "model.mpk";
/// The same weights in SafeTensors, PyTorch's layout: for use outside gantry.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// The optimizer's state (Adam moments), same encoding.
pub const OPTIMIZER_FILE: &str = "optimizer.mpk";
/// Where the run stood: [`CheckpointState`] as JSON.
pub const STATE_FILE: &str = "state.json";
/// Bumped when the layout or encoding of a checkpoint changes. 2: models are sized, and the
/// state says how (`model_spec`) and what the model reads (`input`).
pub const FORMAT_VERSION: u32 = 2;

/// `state.json`. `epoch` counts the epochs completed and `batch_in_epoch` the batches of the
/// next epoch already trained on, so training continues at batch `batch_in_epoch` of epoch
/// `epoch` (0-based).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub job_id: Option<String>,
    pub step: u64,
    pub epoch: u32,
    pub batch_in_epoch: u64,
    pub seed: u64,
    /// The model's kind (`mlp`) and the data set (`digits`, `table:PATH`), as progress lines
    /// name them.
    pub model: String,
    pub dataset: String,
    pub format_version: u32,
    /// The model with its sizes, as a spec writes it.
    pub model_spec: ModelSpec,
    /// What the model reads and predicts (a table's columns, classes and scaling).
    pub input: InputShape,
}

/// The directory name of the checkpoint taken after `step` optimizer updates.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step}")
}

type Rec = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Writes checkpoint `step-<state.step>` into `dir` unless it already exists, with the model
/// also `exported` as SafeTensors. Returns its path and whether this call wrote it.
pub(crate) fn save<B: Backend, M: Record<B>, O: Record<B>>(
    dir: &Path,
    state: &CheckpointState,
    model: M,
    optimizer: O,
    exported: &[u8],
) -> Result<(PathBuf, bool), JobsError> {
    let name = checkpoint_name(state.step);
    let path = dir.join(&name);
    if path.exists() {
        return Ok((path, false));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JobsError::CheckpointIo { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    // Inside `dir`, so the rename never crosses a file system.
    let tmp = dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        // Left by a process killed mid-write.
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;

    let recorder = Rec::default();
    let encode = |file: &str, bytes: Result<Vec<u8>, _>| {
        bytes.map_err(|source| JobsError::CheckpointRecord { path: tmp.join(file), source })
    };
    let model_bytes = encode(MODEL_FILE, Recorder::<B>::record(&recorder, model, ()))?;
    let optimizer_bytes = encode(OPTIMIZER_FILE, Recorder::<B>::record(&recorder, optimizer, ()))?;
    let state_bytes = serde_json::to_vec_pretty(state)
        .map_err(|source| JobsError::CheckpointState { path: tmp.join(STATE_FILE), source })?;
    let files = [
        (MODEL_FILE, model_bytes.as_slice()),
        (OPTIMIZER_FILE, optimizer_bytes.as_slice()),
        (STATE_FILE, state_bytes.as_slice()),
        (SAFETENSORS_FILE, exported),
    ];
    for (file, bytes) in files {
        write_synced(&tmp.join(file), bytes)?;
    }
    sync_dir(&tmp)?;
    fs::rename(&tmp, &path).map_err(io(&path))?;
    // Makes the rename itself durable.
    sync_dir(dir)?;
    Ok((path, true))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), JobsError> {
    let result = File::create(path).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    result.map_err(|source| JobsError::CheckpointIo { path: path.to_path_buf(), source })
}

fn sync_dir(dir: &Path) -> Result<(), JobsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| JobsError::CheckpointIo { path: dir.to_path_buf(), source })
}

/// Reads `state.json` of the checkpoint directory `dir`.
pub(crate) fn read_state(dir: &Path) -> Result<CheckpointState, JobsError> {
    let path = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|source| JobsError::CheckpointIo { path: path.clone(), source })?;
    let state: CheckpointState =
        serde_json::from_slice(&bytes).map_err(|source| JobsError::CheckpointState { path: path.clone(), source })?;
    if state.format_version != FORMAT_VERSION {
        return Err(JobsError::CheckpointMismatch {
            path,
            reason: format!("format_version {} is not supported (expected {FORMAT_VERSION})", state.format_version),
        });
    }
    Ok(state)
}

/// Reads one record file of the checkpoint directory `dir`.
pub(crate) fn load_record<B: Backend, R: Record<B>>(
    dir: &Path,
    file: &str,
    device: &B::Device,
) -> Result<R, JobsError> {
    let path = dir.join(file);
    let bytes = fs::read(&path).map_err(|source| JobsError::CheckpointIo { path: path.clone(), source })?;
    // burn panics on some malformed input (e.g. a bad parameter id) instead of returning an
    // error; a damaged checkpoint must be reported, not crash the job.
    match catch_unwind(AssertUnwindSafe(|| Recorder::<B>::load::<R>(&Rec::default(), bytes, device))) {
        Ok(Ok(record)) => Ok(record),
        Ok(Err(source)) => Err(JobsError::CheckpointRecord { path, source }),
        Err(_) => Err(JobsError::CheckpointMismatch { path, reason: "the record is corrupt".into() }),
    }
}
