//! The training loop: set-up (fresh, resumed or initialised from another job), epochs of
//! optimizer steps, per-epoch evaluation, checkpoints and the stop flag.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};
use gantry_core::spec::{DatasetKind, ModelKind, TrainSpec};

use crate::checkpoint::{self, CheckpointState, FORMAT_VERSION, MODEL_FILE, OPTIMIZER_FILE};
use crate::datasets::{self, Examples, Samples};
use crate::device::{self, Device};
use crate::dist::Ring;
use crate::env::RunEnv;
use crate::error::JobsError;
use crate::grad_sync;
use crate::input::Input;
use crate::models::{Cnn, ConvBlockOps, Mlp, Net, Transformer};
use crate::precision::Compute;

/// The CPU backend; f32 so checkpoints round-trip bit-exactly.
type Cpu = NdArray<f32>;

/// A backend the loop trains on: autodiff over an inner backend that evaluates, both with the
/// CNN's conv block.
trait TrainBackend: AutodiffBackend<InnerBackend: ConvBlockOps> + ConvBlockOps {}
impl<B: AutodiffBackend<InnerBackend: ConvBlockOps> + ConvBlockOps> TrainBackend for B {}

type Adam<M, B> = OptimizerAdaptor<burn::optim::Adam, M, B>;
type OptimRecord<M, B> = <Adam<M, B> as Optimizer<M, B>>::Record;

/// A model the loop can train: it trains on `B` and evaluates on `B`'s inner backend.
trait Trainable<B: TrainBackend>: Net<B> + AutodiffModule<B, InnerModule: Net<B::InnerBackend>> {}
impl<B: TrainBackend, M: Net<B> + AutodiffModule<B, InnerModule: Net<B::InnerBackend>>> Trainable<B> for M {}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Optimizer updates since the job first started (a resumed run counts on).
    pub steps: u64,
    /// Epochs completed since the job first started.
    pub epochs_done: u32,
    /// Accuracy on the held-out samples at the end of the run: for the digits, those of the
    /// run's classes (360 for all ten; with `examples_per_class`, the unused training samples
    /// too); for text, of every next character of the held-out tail.
    pub test_accuracy: f64,
    /// Mean cross-entropy (nats) on the same samples.
    pub test_loss: f64,
    /// The last checkpoint directory written or found, when there is a checkpoint dir.
    pub last_checkpoint: Option<PathBuf>,
    /// Whether the stop flag ended the run before its last epoch.
    pub stopped: bool,
}

/// Where a run stands: `step` updates done, the next one is batch `batch_in_epoch` of epoch
/// `epoch` (both 0-based).
#[derive(Debug, Clone, Copy)]
struct Position {
    step: u64,
    epoch: u32,
    batch_in_epoch: u64,
}

/// Trains `spec`, writing progress lines to `out` (formats in the crate docs). Starts fresh,
/// resumes when `env.resume_dir` is a checkpoint of this job (`env.job_id`), or takes only the
/// weights of another job's checkpoint. Checkpoints go to `env.checkpoint_dir` every
/// `checkpoint_every_steps`, at the end, and when `env.stop` is set (checked between steps).
pub fn train(spec: &TrainSpec, env: &RunEnv, out: &mut dyn Write) -> Result<Outcome, JobsError> {
    let began = Instant::now();
    check_spec(spec)?;
    let choice = device::choose(&env.gpus, env.kernel_cache.as_deref());
    if let Some(note) = &choice.note {
        emit(out, format_args!("[gantry] {note}"))?;
    }
    match choice.device {
        Device::Cpu => {
            let run = Run { spec, env, shown: choice.device, no_bf16: None, began, device: &NdArrayDevice::Cpu };
            train_on::<Autodiff<Cpu>>(run, out)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            let gpu = burn::backend::cuda::CudaDevice::new(n);
            let no_bf16 = choice.no_bf16.as_deref();
            let run = Run { spec, env, shown: choice.device, no_bf16, began, device: &gpu };
            train_on::<Autodiff<burn::backend::Cuda>>(run, out)
        }
    }
}

/// The model and data set of `spec`, on backend `B`.
fn train_on<B: TrainBackend>(run: Run<B>, out: &mut dyn Write) -> Result<Outcome, JobsError> {
    let spec = run.spec;
    match (spec.model, spec.dataset) {
        (ModelKind::Transformer, DatasetKind::Genesis) => {
            let text = datasets::genesis()?;
            train_model::<B, Transformer<B>, _>(run, out, &text.train, &text.test)
        }
        (ModelKind::Mlp, DatasetKind::Digits) => {
            let (train_set, test_set) = digits_subset(spec)?;
            train_model::<B, Mlp<B>, _>(run, out, &train_set, &test_set)
        }
        (ModelKind::Cnn, DatasetKind::Digits) => {
            let (train_set, test_set) = digits_subset(spec)?;
            train_model::<B, Cnn<B>, _>(run, out, &train_set, &test_set)
        }
        // `check_spec` refused these already.
        (ModelKind::Transformer, DatasetKind::Digits) | (ModelKind::Mlp | ModelKind::Cnn, DatasetKind::Genesis) => {
            Err(JobsError::Spec(format!("model {} does not train on {}", spec.model, spec.dataset)))
        }
    }
}

/// The digits the spec trains and tests on: its classes, and at most `examples_per_class` of each.
fn digits_subset(spec: &TrainSpec) -> Result<(Samples, Samples), JobsError> {
    let digits = datasets::digits()?;
    // With few examples per class, the training samples left out are unseen too: they join
    // the held-out ones, so accuracy is measured on hundreds of samples rather than ~36 a class.
    let (train_set, unused) = digits.train.select(&spec.classes, spec.examples_per_class);
    let test_set = digits.test.select(&spec.classes, None).0.join(unused);
    Ok((train_set, test_set))
}

/// What a run is, apart from its model and data.
struct Run<'a, B: TrainBackend> {
    spec: &'a TrainSpec,
    env: &'a RunEnv,
    /// The device as the start line shows it.
    shown: Device,
    /// Why the GPU cannot compute in bf16, where it cannot.
    no_bf16: Option<&'a str>,
    /// When `train` was called: the first step's line says how long it took to get there.
    began: Instant,
    device: &'a B::Device,
}

fn train_model<B: TrainBackend, M: Trainable<B>, E: Examples>(
    run: Run<B>,
    out: &mut dyn Write,
    train_set: &E,
    test_set: &E,
) -> Result<Outcome, JobsError> {
    let Run { spec, env, shown, no_bf16, began, device } = run;
    let (compute, note) = Compute::choose::<B>(spec.precision, device, shown, no_bf16);
    if let Some(note) = note {
        emit(out, format_args!("[gantry] {note}"))?;
    }
    let batch_size = spec.batch_size as usize;
    let n_train = train_set.len();
    let per_epoch = datasets::batches_per_epoch(n_train, batch_size) as u64;

    emit(
        out,
        format_args!(
            "start model={} dataset={} train_samples={n_train} test_samples={} epochs={} batch_size={} precision={} device={shown}",
            spec.model,
            spec.dataset,
            test_set.len(),
            spec.epochs,
            spec.batch_size,
            compute.precision,
        ),
    )?;

    let mut model = M::init(spec.seed, device);
    let mut optim = AdamConfig::new().init::<B, M>();
    let mut pos = Position { step: 0, epoch: 0, batch_in_epoch: 0 };

    match &env.resume_dir {
        Some(dir) => {
            let state = checkpoint::read_state(dir)?;
            check_compatible(dir, &state, spec)?;
            let record: <M as burn::module::Module<B>>::Record = checkpoint::load_record(dir, MODEL_FILE, device)?;
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
        }
        None => {
            if let Some(from) = &spec.init_from {
                return Err(JobsError::InitFromMissing(from.clone()));
            }
        }
    }

    // Data parallel: every rank trains the same model on its share of each global batch.
    let (rank, world) = env.dist.as_ref().map_or((0, 1), |d| (d.rank, d.world_size));
    let mut ring = match &env.dist {
        Some(dist) => {
            let ring = Ring::join(dist)?;
            emit(out, format_args!("joined rank={rank} world_size={world}"))?;
            Some(ring)
        }
        None => None,
    };

    let test = TestSet::<B::InnerBackend>::new(test_set, device, compute);
    let loss_fn = CrossEntropyLossConfig::new().init::<B>(device);
    // Every rank holds the same weights: rank 0 alone writes them.
    let checkpoint_dir = if rank == 0 { env.checkpoint_dir.as_deref() } else { None };
    let mut last_checkpoint = None;
    let mut stopped = false;
    // The test loss and accuracy of the current weights, when known (saves re-evaluating).
    let mut evaluated = None;
    // The first step this process takes is the one that says how long it took to get there.
    let first_step = pos.step;

    'epochs: while pos.epoch < spec.epochs {
        let order = datasets::epoch_order(spec.seed, pos.epoch, n_train);
        let started = Instant::now();
        let (mut loss_sum, mut batches, mut samples) = (0.0f64, 0u64, 0usize);
        while pos.batch_in_epoch < per_epoch {
            // One process stops before a step; ranks decide together, in the step's exchange.
            if ring.is_none() && env.stop.load(Ordering::SeqCst) {
                stopped = true;
                break 'epochs;
            }
            let first = pos.batch_in_epoch as usize * batch_size;
            let batch = &order[first..(first + batch_size).min(n_train)];
            let indices = shard(batch, rank, world);
            let (mut grads, mut loss) = match indices.is_empty() {
                true => (GradientsParams::new(), 0.0),
                false => {
                    let (x, y) = train_set.batch::<B>(indices, device);
                    let loss = loss_fn.forward(compute.forward(&model, x), y);
                    let value = loss.clone().into_scalar().elem::<f64>();
                    (GradientsParams::from_grads(loss.backward(), &model), value)
                }
            };
            let mut stop_now = false;
            if let Some(ring) = ring.as_mut() {
                // Each rank's mean gradient, weighted by its share of the batch, summed: the
                // global batch's mean gradient, as one process would compute it.
                let share = indices.len() as f32 / batch.len() as f32;
                let mut extra = [loss as f32 * share, f32::from(u8::from(env.stop.load(Ordering::SeqCst)))];
                grad_sync::all_reduce(ring, &model, &mut grads, share, &mut extra)?;
                loss = f64::from(extra[0]);
                stop_now = extra[1] > 0.0;
            }
            loss_sum += loss;
            if spec.freeze_backbone {
                // No gradient, no update: the optimizer leaves these weights as they are.
                for (id, rank) in model.backbone() {
                    match rank {
                        1 => drop(grads.remove::<B::InnerBackend, 1>(id)),
                        2 => drop(grads.remove::<B::InnerBackend, 2>(id)),
                        _ => drop(grads.remove::<B::InnerBackend, 4>(id)),
                    }
                }
            }
            model = optim.step(spec.learning_rate, model, grads);

            if pos.step == first_step {
                // Set-up, data, and on a GPU the kernels' compilation and autotuning. GPU work is
                // queued: wait for the step to finish before reading the clock.
                let _ = B::sync(device);
                emit(
                    out,
                    format_args!("first_step step={} seconds={:.3}", pos.step + 1, began.elapsed().as_secs_f64()),
                )?;
            }
            pos.step += 1;
            pos.batch_in_epoch += 1;
            batches += 1;
            samples += indices.len();
            evaluated = None;

            if pos.step.is_multiple_of(spec.checkpoint_every_steps)
                && let Some(dir) = checkpoint_dir
            {
                let at = normalised(pos, per_epoch);
                last_checkpoint = Some(save(dir, at, spec, env, &model, &optim, out)?);
            }
            if stop_now {
                stopped = true;
                break 'epochs;
            }
        }
        let train_secs = started.elapsed().as_secs_f64();
        pos.epoch += 1;
        pos.batch_in_epoch = 0;
        let (test_loss, acc) = test.evaluate(&model);
        evaluated = Some((test_loss, acc));
        let loss = loss_sum / batches.max(1) as f64;
        let samples_per_s = samples as f64 / train_secs.max(1e-9);
        emit(
            out,
            format_args!(
                "epoch={} step={} loss={loss:.6} test_loss={test_loss:.6} test_accuracy={acc:.4} \
                 samples_per_s={samples_per_s:.0}",
                pos.epoch, pos.step,
            ),
        )?;
        if let Some(file) = &env.metrics_file {
            let step_time_ms = 1000.0 * train_secs / batches.max(1) as f64;
            let line = serde_json::json!({
                "step": pos.step, "epoch": pos.epoch, "loss": loss, "test_loss": test_loss, "test_accuracy": acc,
                "samples_per_s": samples_per_s, "step_time_ms": step_time_ms,
            });
            append_line(file, &line.to_string())?;
        }
    }

    // A stop after an epoch's last batch leaves the position at the next epoch's start.
    pos = normalised(pos, per_epoch);
    stopped &= pos.epoch < spec.epochs;
    let (test_loss, test_accuracy) = match evaluated {
        Some(figures) => figures,
        None => test.evaluate(&model),
    };
    if let Some(dir) = checkpoint_dir {
        last_checkpoint = Some(save(dir, pos, spec, env, &model, &optim, out)?);
    }
    let shown = last_checkpoint.as_deref().map_or_else(|| "none".to_string(), |p| p.display().to_string());
    if stopped {
        emit(out, format_args!("stopped step={} checkpoint={shown}", pos.step))?;
    } else {
        emit(out, format_args!("done steps={} test_accuracy={test_accuracy:.4} checkpoint={shown}", pos.step))?;
    }
    Ok(Outcome { steps: pos.step, epochs_done: pos.epoch, test_accuracy, test_loss, last_checkpoint, stopped })
}

/// Rank `rank`'s part of a global batch: contiguous, sizes differing by at most one.
fn shard(batch: &[usize], rank: usize, world: usize) -> &[usize] {
    let n = batch.len();
    &batch[rank * n / world..(rank + 1) * n / world]
}

/// The spec's own rules (the coordinator checked them at submit; a spec file given directly to
/// `gantry train` was not).
fn check_spec(spec: &TrainSpec) -> Result<(), JobsError> {
    spec.validate().map_err(|e| JobsError::Spec(e.to_string()))
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

/// A position just past an epoch's last batch is the start of the next epoch.
fn normalised(pos: Position, per_epoch: u64) -> Position {
    if pos.batch_in_epoch >= per_epoch { Position { epoch: pos.epoch + 1, batch_in_epoch: 0, ..pos } } else { pos }
}

fn save<B: TrainBackend, M: Trainable<B>, O: Optimizer<M, B>>(
    dir: &Path,
    pos: Position,
    spec: &TrainSpec,
    env: &RunEnv,
    model: &M,
    optim: &O,
    out: &mut dyn Write,
) -> Result<PathBuf, JobsError> {
    let state = CheckpointState {
        job_id: env.job_id.clone(),
        step: pos.step,
        epoch: pos.epoch,
        batch_in_epoch: pos.batch_in_epoch,
        seed: spec.seed,
        model: spec.model.to_string(),
        dataset: spec.dataset.to_string(),
        format_version: FORMAT_VERSION,
    };
    let metadata = std::collections::BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("gantry.model".to_string(), spec.model.to_string()),
        ("gantry.dataset".to_string(), spec.dataset.to_string()),
        ("gantry.step".to_string(), pos.step.to_string()),
    ]);
    let exported = crate::export::safetensors(&model.valid().export(), &metadata);
    let (path, written) =
        checkpoint::save::<B, _, _>(dir, &state, model.clone().into_record(), optim.to_record(), &exported)?;
    if written {
        emit(out, format_args!("checkpoint step={} path={}", pos.step, checkpoint::checkpoint_name(pos.step)))?;
    }
    Ok(path)
}

/// The held-out samples as tensors, built once.
struct TestSet<B: Backend> {
    x: Input<B>,
    y: Tensor<B, 1, Int>,
    /// Predictions made: one per target.
    n: usize,
    /// Evaluated in the precision the run trains in.
    compute: Compute,
}

impl<B: ConvBlockOps> TestSet<B> {
    fn new<E: Examples>(examples: &E, device: &B::Device, compute: Compute) -> Self {
        let all: Vec<usize> = (0..examples.len()).collect();
        let (x, y) = examples.batch::<B>(&all, device);
        let n = y.dims()[0];
        TestSet { x, y, n, compute }
    }

    /// Mean cross-entropy and accuracy.
    fn evaluate<T: TrainBackend<InnerBackend = B>, M: Trainable<T>>(&self, model: &M) -> (f64, f64) {
        // `valid()` drops autodiff: no graph is recorded for evaluation.
        let logits = self.compute.forward(&model.valid(), self.x.clone());
        let loss = CrossEntropyLossConfig::new().init::<B>(&logits.device()).forward(logits.clone(), self.y.clone());
        let predicted = logits.argmax(1).reshape([self.n]);
        let correct = predicted.equal(self.y.clone()).int().sum().into_scalar().elem::<i64>();
        (loss.into_scalar().elem::<f64>(), correct as f64 / self.n as f64)
    }
}

/// Writes one progress line and flushes it: the agent and tests read them as they come.
/// Appends one line; the whole line goes in one write, so a reader never sees half of it.
fn append_line(file: &std::path::Path, line: &str) -> Result<(), JobsError> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).map_err(JobsError::Output)?;
    f.write_all(format!("{line}\n").as_bytes()).map_err(JobsError::Output)
}

fn emit(out: &mut dyn Write, line: std::fmt::Arguments) -> Result<(), JobsError> {
    writeln!(out, "{line}").and_then(|()| out.flush()).map_err(JobsError::Output)
}

#[cfg(test)]
mod tests {
    use burn_flex::{Flex, FlexDevice};
    use gantry_core::spec::Precision;

    use super::*;

    /// Trains `spec` on a CPU backend that has bf16 (ndarray has not).
    fn train_on_flex(spec: &TrainSpec) -> (Outcome, String) {
        train_on_flex_in(spec, &RunEnv::default(), None)
    }

    /// Same, in `env`, raising its stop flag once a line starts with `stop_on`.
    fn train_on_flex_in(spec: &TrainSpec, env: &RunEnv, stop_on: Option<&str>) -> (Outcome, String) {
        let mut out = StopOn { text: Vec::new(), prefix: stop_on.map(str::as_bytes), env };
        let run = Run { spec, env, shown: Device::Cpu, no_bf16: None, began: Instant::now(), device: &FlexDevice };
        let outcome = train_on::<Autodiff<Flex>>(run, &mut out).expect("training runs");
        (outcome, String::from_utf8(out.text).unwrap())
    }

    /// Keeps a run's output; raises the stop flag when a line starts with `prefix`.
    struct StopOn<'a> {
        text: Vec<u8>,
        prefix: Option<&'a [u8]>,
        env: &'a RunEnv,
    }

    impl Write for StopOn<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.text.write(buf)
        }

        /// `emit` flushes after each whole line.
        fn flush(&mut self) -> std::io::Result<()> {
            let body = self.text.strip_suffix(b"\n").unwrap_or(&self.text);
            let last = body.rsplit(|b| *b == b'\n').next().unwrap_or_default();
            if self.prefix.is_some_and(|p| last.starts_with(p)) {
                self.env.stop.store(true, Ordering::SeqCst);
            }
            Ok(())
        }
    }

    /// The language model too: layer norms, attention's softmax and the embeddings' gradients
    /// all run in bf16 here, unlike PyTorch's autocast, which keeps the first two in f32. 40
    /// steps (half an epoch; this backend is slow at it) in each precision.
    #[test]
    fn the_transformer_in_bf16_learns_genesis_about_as_well_as_in_f32() {
        let dirs = tempfile::tempdir().unwrap();
        let spec = TrainSpec {
            model: ModelKind::Transformer,
            dataset: DatasetKind::Genesis,
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.003,
            checkpoint_every_steps: 40,
            ..TrainSpec::default()
        };
        let run = |spec: &TrainSpec, dir: &str| {
            let env = RunEnv { checkpoint_dir: Some(dirs.path().join(dir)), ..RunEnv::default() };
            train_on_flex_in(spec, &env, Some("checkpoint step=40 "))
        };
        let started = Instant::now();
        let (full, _) = run(&spec, "f32");
        let (half, out) = run(&TrainSpec { precision: Precision::Bf16, ..spec }, "bf16");
        println!("{out}");
        println!(
            "held-out loss after 40 steps: f32 {:.4}, bf16 {:.4} ({:.1?})",
            full.test_loss,
            half.test_loss,
            started.elapsed()
        );
        assert!(full.stopped && half.stopped && half.steps == 40, "{full:?} {half:?}");
        assert!(out.lines().next().unwrap().contains(" precision=bf16 "), "{out}");
        // From ln(96) = 4.56 nats, the uniform guess.
        assert!(full.test_loss < 3.0, "f32: {}", full.test_loss);
        assert!((half.test_loss - full.test_loss).abs() < 0.05, "bf16 {} vs f32 {}", half.test_loss, full.test_loss);
    }

    /// The weights stay f32 and the bf16 forward pass is deterministic on this backend, so a
    /// bf16 run stopped at a checkpoint and resumed ends with the uninterrupted run's weights.
    #[test]
    fn a_bf16_run_resumes_bit_exactly() {
        let dirs = tempfile::tempdir().unwrap();
        let spec =
            TrainSpec { epochs: 3, checkpoint_every_steps: 30, precision: Precision::Bf16, ..TrainSpec::default() };
        let env = |dir: &str, resume: Option<PathBuf>| RunEnv {
            job_id: Some("job-1".into()),
            checkpoint_dir: Some(dirs.path().join(dir)),
            resume_dir: resume,
            ..RunEnv::default()
        };
        let (full, _) = train_on_flex_in(&spec, &env("full", None), None);
        let (first, _) = train_on_flex_in(&spec, &env("split", None), Some("checkpoint step=30 "));
        assert!(first.stopped && first.steps == 30, "{first:?}");
        let (second, out) = train_on_flex_in(&spec, &env("split", first.last_checkpoint.clone()), None);
        assert!(out.contains("resumed step=30 "), "{out}");
        assert_eq!(second.steps, full.steps);
        let weights = |o: &Outcome| std::fs::read(o.last_checkpoint.as_ref().unwrap().join(MODEL_FILE)).unwrap();
        assert!(weights(&second) == weights(&full), "resumed weights differ");
        assert_eq!(second.test_loss.to_bits(), full.test_loss.to_bits());
    }

    #[test]
    fn training_in_bf16_learns_the_digits_about_as_well_as_f32() {
        for model in [ModelKind::Mlp, ModelKind::Cnn] {
            let spec = TrainSpec { model, epochs: 8, ..TrainSpec::default() };
            let (full, _) = train_on_flex(&spec);
            let (half, out) = train_on_flex(&TrainSpec { precision: Precision::Bf16, ..spec });
            println!("{out}");
            println!("{model} after 8 epochs: f32 {:.4}, bf16 {:.4}", full.test_accuracy, half.test_accuracy);
            assert!(out.lines().next().unwrap().contains(" precision=bf16 "), "{out}");
            assert!(!out.contains("[gantry]"), "{out}");
            // bf16 rounds every activation: not the same run, but as good a model.
            assert_ne!(half.test_loss.to_bits(), full.test_loss.to_bits());
            assert!(full.test_accuracy >= 0.9, "{model} in f32: {}", full.test_accuracy);
            let gap = (half.test_accuracy - full.test_accuracy).abs();
            assert!(gap <= 0.03, "{model}: bf16 {} vs f32 {}", half.test_accuracy, full.test_accuracy);
        }
    }
}
