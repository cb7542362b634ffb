//! A run's set-up: the weights, optimizer state and position it starts from (fresh from the
//! seed, a restart of the same job, or another job's weights), checked against the spec before
//! anything trains; and the data-parallel group it trains in.

use std::io::Write;
use std::path::Path;

use burn::module::Module;
use burn::optim::{AdamConfig, Optimizer};
use gantry_core::spec::TrainSpec;

use super::{Adam, OptimRecord, Position, Run, TrainBackend, Trainable, emit};
use crate::checkpoint::{self, CheckpointState, MODEL_FILE, OPTIMIZER_FILE};
use crate::dist::Ring;
use crate::env::RunEnv;
use crate::error::JobsError;

/// Where a run starts.
pub(super) struct Start<B: TrainBackend, M: Trainable<B>> {
    pub(super) model: M,
    pub(super) optim: Adam<M, B>,
    pub(super) pos: Position,
}

/// Fresh weights from the seed; or, when `env.resume_dir` names a checkpoint, its weights, and
/// for a restart of this job (`env.job_id`) its optimizer state and position too.
pub(super) fn start<B: TrainBackend, M: Trainable<B>>(
    run: &Run<B>,
    per_epoch: u64,
    out: &mut dyn Write,
) -> Result<Start<B, M>, JobsError> {
    let (spec, env, device) = (run.spec, run.env, run.device);
    let mut model = M::init(spec.seed, device);
    let mut optim = AdamConfig::new().init::<B, M>();
    let mut pos = Position { step: 0, epoch: 0, batch_in_epoch: 0 };

    let Some(dir) = &env.resume_dir else {
        if let Some(from) = &spec.init_from {
            return Err(JobsError::InitFromMissing(from.clone()));
        }
        return Ok(Start { model, optim, pos });
    };
    let state = checkpoint::read_state(dir)?;
    check_compatible(dir, &state, spec)?;
    let record: <M as Module<B>>::Record = checkpoint::load_record(dir, MODEL_FILE, device)?;
    M::check_record(&record, &dir.join(MODEL_FILE))?;
    model = model.load_record(record);
    if state.job_id.is_some() && state.job_id == env.job_id {
        // A restart of this very job: continue the same run.
        pos = resume_position(dir, &state, spec, per_epoch)?;
        let record: OptimRecord<M, B> = checkpoint::load_record(dir, OPTIMIZER_FILE, device)?;
        check_optimizer_record(dir, &record, &model, pos.step, spec.freeze_backbone)?;
        optim = optim.load_record(record);
        emit(out, format_args!("resumed step={} epoch={} from={}", pos.step, pos.epoch, dir.display()))?;
    } else {
        // Another job's weights: transfer learning, with a fresh optimizer from step 0.
        if spec.new_head {
            model = model.with_head_of(M::init(spec.seed, device));
        }
        emit(out, format_args!("initialised weights from={}", dir.display()))?;
    }
    Ok(Start { model, optim, pos })
}

/// This process's place in a data-parallel run (every rank trains the same model on its share
/// of each global batch), or a group of one.
pub(super) struct Group {
    pub(super) rank: usize,
    pub(super) world: usize,
    /// The connection to the other ranks; none when training alone.
    pub(super) ring: Option<Ring>,
}

impl Group {
    /// Rank `rank`'s part of a global batch: contiguous, sizes differing by at most one.
    pub(super) fn shard<'b>(&self, batch: &'b [usize]) -> &'b [usize] {
        let n = batch.len();
        &batch[self.rank * n / self.world..(self.rank + 1) * n / self.world]
    }
}

/// Joins the group `env.dist` describes, if any.
pub(super) fn join(env: &RunEnv, out: &mut dyn Write) -> Result<Group, JobsError> {
    let Some(dist) = &env.dist else { return Ok(Group { rank: 0, world: 1, ring: None }) };
    let ring = Ring::join(dist)?;
    emit(out, format_args!("joined rank={} world_size={}", dist.rank, dist.world_size))?;
    Ok(Group { rank: dist.rank, world: dist.world_size, ring: Some(ring) })
}

/// Any checkpoint we load weights from must hold this model for this data set.
fn check_compatible(dir: &Path, state: &CheckpointState, spec: &TrainSpec) -> Result<(), JobsError> {
    if state.model != spec.model.name() || state.dataset != spec.dataset.name() {
        return Err(JobsError::CheckpointMismatch {
            path: dir.to_path_buf(),
            reason: format!(
                "it holds model `{}` on `{}`, this job trains `{}` on `{}`",
                state.model, state.dataset, spec.model, spec.dataset
            ),
        });
    }
    Ok(())
}

/// Where a restart continues; refuses states that cannot come from this spec (another seed or
/// batch size would silently change the run).
fn resume_position(
    dir: &Path,
    state: &CheckpointState,
    spec: &TrainSpec,
    per_epoch: u64,
) -> Result<Position, JobsError> {
    let mismatch = |reason: String| Err(JobsError::CheckpointMismatch { path: dir.to_path_buf(), reason });
    if state.seed != spec.seed {
        return mismatch(format!("it was trained with seed {}, the spec says {}", state.seed, spec.seed));
    }
    let consistent = state.batch_in_epoch < per_epoch
        && u64::from(state.epoch).checked_mul(per_epoch).and_then(|s| s.checked_add(state.batch_in_epoch))
            == Some(state.step);
    if !consistent {
        return mismatch(format!(
            "step {} at epoch {} batch {} does not fit batch_size {} ({per_epoch} batches an epoch)",
            state.step, state.epoch, state.batch_in_epoch, spec.batch_size
        ));
    }
    Ok(Position { step: state.step, epoch: state.epoch, batch_in_epoch: state.batch_in_epoch })
}

/// Adam's state is keyed by parameter id: state under other ids would be silently ignored and
/// the run would no longer continue the same run. Before the first step there is none.
fn check_optimizer_record<B: TrainBackend, M: Trainable<B>>(
    dir: &Path,
    record: &OptimRecord<M, B>,
    model: &M,
    step: u64,
    frozen: bool,
) -> Result<(), JobsError> {
    let mut expected = model.param_ids();
    if frozen {
        // Frozen layers get no updates, so no optimizer state either.
        let backbone: Vec<_> = model.backbone().into_iter().map(|(id, _)| id).collect();
        expected.retain(|id| !backbone.contains(id));
    }
    let mut found: Vec<_> = record.keys().copied().collect();
    expected.sort();
    found.sort();
    if (step == 0 && found.is_empty()) || found == expected {
        return Ok(());
    }
    Err(JobsError::CheckpointMismatch {
        path: dir.join(OPTIMIZER_FILE),
        reason: format!("optimizer state is for {} other parameters, not this model's", found.len()),
    })
}
