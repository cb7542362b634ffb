//! A run's set-up: the weights, optimizer state and position it starts from (fresh from the
//! seed, a restart of the same job, or another job's weights), checked against the spec before
//! anything trains; and the data-parallel group it trains in.

use std::io::Write;
use std::path::Path;

use burn::module::Module;
use burn::optim::{AdamConfig, Optimizer};
use gantry_core::spec::{ModelKind, ModelSpec, TrainSpec};

use super::{Adam, OptimRecord, Position, Run, TrainBackend, Trainable, emit};
use crate::checkpoint::{self, CheckpointState, MODEL_FILE, OPTIMIZER_FILE};
use crate::dist::Ring;
use crate::env::RunEnv;
use crate::error::JobsError;
use crate::models::{Arch, Weights};

/// Where a run starts.
pub(super) struct Start<B: TrainBackend, M: Trainable<B>> {
    /// What the model is built as (checkpoints record it).
    pub(super) arch: Arch,
    pub(super) model: M,
    pub(super) optim: Adam<M, B>,
    pub(super) pos: Position,
}

/// Fresh weights from the seed; or, when `env.resume_dir` names a checkpoint, its weights, and
/// for a restart of this job (`env.job_id`) its optimizer state and position too; or, first
/// time round, the weights of the SafeTensors file `init_from` names. With it, the line that
/// says where the weights came from.
pub(super) fn start<B: TrainBackend, M: Trainable<B>>(
    run: &Run<B>,
    arch: &Arch,
    per_epoch: u64,
) -> Result<(Start<B, M>, Option<String>), JobsError> {
    let (spec, env, device) = (run.spec, run.env, run.device);
    let mut model = M::init(arch, spec.seed, device);
    let mut optim = AdamConfig::new().init::<B, M>();
    let mut pos = Position { step: 0, epoch: 0, batch_in_epoch: 0 };

    let Some(dir) = &env.resume_dir else {
        if let Some(file) = spec.init_from_file() {
            let mut weights = Weights::read(Path::new(file))?;
            model = model.import(&mut weights);
            weights.finish()?;
            if spec.new_head {
                model = model.with_head_of(M::init(arch, spec.seed, device));
            }
            return Ok((
                Start { arch: arch.clone(), model, optim, pos },
                Some(format!("initialised weights from={file}")),
            ));
        }
        if let Some(from) = &spec.init_from {
            return Err(JobsError::InitFromMissing(from.clone()));
        }
        return Ok((Start { arch: arch.clone(), model, optim, pos }, None));
    };
    let state = checkpoint::read_state(dir)?;
    let restart = state.job_id.is_some() && state.job_id == env.job_id;
    check_compatible(dir, &state, spec, restart)?;
    // Another job's weights with a fresh head may come from a data set of other classes: they
    // load into the model as that job built it, then take this job's head.
    let from = match (restart, spec.new_head) {
        (false, true) => Arch { model: arch.model.clone(), input: state.input.clone() },
        _ => arch.clone(),
    };
    let record: <M as Module<B>>::Record = checkpoint::load_record(dir, MODEL_FILE, device)?;
    M::check_record(&record, &from, &dir.join(MODEL_FILE))?;
    model = M::init(&from, spec.seed, device).load_record(record);
    let how = if restart {
        // A restart of this very job: continue the same run.
        pos = resume_position(dir, &state, spec, per_epoch)?;
        let record: OptimRecord<M, B> = checkpoint::load_record(dir, OPTIMIZER_FILE, device)?;
        check_optimizer_record(dir, &record, &model, pos.step, spec.freeze_backbone)?;
        optim = optim.load_record(record);
        format!("resumed step={} epoch={} from={}", pos.step, pos.epoch, dir.display())
    } else {
        // Another job's weights: transfer learning, with a fresh optimizer from step 0.
        if spec.new_head {
            model = model.with_head_of(M::init(arch, spec.seed, device));
        }
        format!("initialised weights from={}", dir.display())
    };
    Ok((Start { arch: arch.clone(), model, optim, pos }, Some(how)))
}

/// This process's place in a data-parallel run (every rank trains the same model on its share
/// of each global batch), or a group of one.
pub(super) struct Group {
    pub(super) rank: usize,
    pub(super) world: usize,
    /// The connection to the other ranks; none when training alone.
    pub(super) ring: Option<Ring>,
}

/// Rank `rank`'s part of a global batch among `world` ranks: contiguous, sizes differing by at
/// most one.
pub(super) fn shard(rank: usize, world: usize, batch: &[usize]) -> &[usize] {
    let n = batch.len();
    &batch[rank * n / world..(rank + 1) * n / world]
}

/// Joins the group `env.dist` describes, if any.
pub(super) fn join(env: &RunEnv, out: &mut dyn Write) -> Result<Group, JobsError> {
    let Some(dist) = &env.dist else { return Ok(Group { rank: 0, world: 1, ring: None }) };
    let ring = Ring::join(dist)?;
    emit(out, format_args!("joined rank={} world_size={}", dist.rank, dist.world_size))?;
    Ok(Group { rank: dist.rank, world: dist.world_size, ring: Some(ring) })
}

/// Any checkpoint we load weights from must hold this model, with the same sizes; a restart
/// must also be on the same data set (another job's weights may move to other data).
fn check_compatible(dir: &Path, state: &CheckpointState, spec: &TrainSpec, restart: bool) -> Result<(), JobsError> {
    let other_data = restart && state.dataset != spec.dataset.to_string();
    if state.model != spec.model.kind.name() || other_data {
        return Err(JobsError::CheckpointMismatch {
            path: dir.to_path_buf(),
            reason: format!(
                "it holds model `{}` on `{}`, this job trains `{}` on `{}`",
                state.model, state.dataset, spec.model.kind, spec.dataset
            ),
        });
    }
    if !state.model_spec.same_model(&spec.model) {
        return Err(JobsError::CheckpointMismatch {
            path: dir.to_path_buf(),
            reason: format!("it holds {}, this job's model is {}", sized(&state.model_spec), sized(&spec.model)),
        });
    }
    Ok(())
}

/// A model with every size of its kind shown, defaults too.
fn sized(m: &ModelSpec) -> String {
    let shown = match m.kind {
        ModelKind::Mlp => ModelSpec { hidden: Some(m.hidden()), ..ModelSpec::of(m.kind) },
        ModelKind::Cnn => ModelSpec { channels: Some(m.channels()), image: m.image, ..ModelSpec::of(m.kind) },
        ModelKind::Transformer => ModelSpec {
            layers: Some(m.layers()),
            width: Some(m.width()),
            heads: Some(m.heads()),
            context: Some(m.context()),
            ..ModelSpec::of(m.kind)
        },
    };
    shown.to_string()
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
