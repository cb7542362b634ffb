//! The training loop. `train` picks the device and `train_on` the model and data set; then a
//! run goes through phases, each in its own module: [`setup`] (weights, optimizer and position:
//! fresh, resumed, or initialised from another job; and the data-parallel group), [`epoch`]
//! (the optimizer steps of one epoch, checkpoints, the stop flag, the epoch's line) and
//! [`eval`] (the held-out figures, and the run's end: a last checkpoint and its outcome).

mod epoch;
mod eval;
mod setup;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::ndarray::NdArrayDevice;
use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::Optimizer;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::tensor::backend::AutodiffBackend;
use gantry_core::spec::{DatasetKind, DatasetSpec, ModelKind, TrainSpec};

use self::eval::TestSet;
use self::setup::Group;
use crate::checkpoint::{self, CheckpointState, FORMAT_VERSION};
use crate::datasets::{self, Examples, Samples};
use crate::device::{self, Device};
use crate::env::RunEnv;
use crate::error::JobsError;
use crate::input::InputShape;
use crate::models::{Arch, Cnn, Mlp, ModelOps, Net, Transformer};
use crate::precision::Compute;

/// The CPU backend; f32 so checkpoints round-trip bit-exactly.
type Cpu = NdArray<f32>;

/// A backend the loop trains on: autodiff over an inner backend that evaluates, both with the
/// CNN's conv block.
trait TrainBackend: AutodiffBackend<InnerBackend: ModelOps> + ModelOps {}
impl<B: AutodiffBackend<InnerBackend: ModelOps> + ModelOps> TrainBackend for B {}

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
    /// too); for text, of every next character of the held-out tail. For a regression, R².
    pub test_accuracy: f64,
    /// Mean cross-entropy (nats) on the same samples; for a regression, the mean squared error
    /// on the standardised target.
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

impl Position {
    /// A position just past an epoch's last batch is the start of the next epoch.
    fn normalised(self, per_epoch: u64) -> Position {
        match self.batch_in_epoch >= per_epoch {
            true => Position { epoch: self.epoch + 1, batch_in_epoch: 0, ..self },
            false => self,
        }
    }
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

/// The spec's own rules (the coordinator checked them at submit; a spec file given directly to
/// `gantry train` was not).
fn check_spec(spec: &TrainSpec) -> Result<(), JobsError> {
    spec.validate().map_err(|e| JobsError::Spec(e.to_string()))
}

/// The model and data set of `spec`, on backend `B`.
fn train_on<B: TrainBackend>(run: Run<B>, out: &mut dyn Write) -> Result<Outcome, JobsError> {
    let spec = run.spec;
    let arch = |input: InputShape| Arch { model: spec.model.clone(), input };
    match (spec.model.kind, &spec.dataset) {
        (ModelKind::Transformer, DatasetSpec::Builtin(DatasetKind::Genesis)) => {
            let (train_set, test_set) = datasets::genesis()?.windows(spec.model.context() as usize);
            train_model::<B, Transformer<B>, _>(run, arch(InputShape::text()), out, &train_set, &test_set)
        }
        (ModelKind::Transformer, DatasetSpec::Text { path, holdout }) => {
            let context = spec.model.context() as usize;
            let corpus = datasets::Corpus::read(Path::new(path), holdout, context)?;
            let (train_set, test_set) = corpus.windows(context);
            train_model::<B, Transformer<B>, _>(run, arch(InputShape::text()), out, &train_set, &test_set)
        }
        (ModelKind::Mlp, DatasetSpec::Builtin(DatasetKind::Digits)) => {
            let (train_set, test_set) = digits_subset(spec)?;
            train_model::<B, Mlp<B>, _>(run, arch(InputShape::digits()), out, &train_set, &test_set)
        }
        (ModelKind::Cnn, DatasetSpec::Builtin(DatasetKind::Digits)) => {
            let (train_set, test_set) = digits_subset(spec)?;
            train_model::<B, Cnn<B>, _>(run, arch(InputShape::digits()), out, &train_set, &test_set)
        }
        (ModelKind::Cnn | ModelKind::Mlp, DatasetSpec::Images { path, augment, holdout, .. }) => {
            let image = spec.image().expect("an image folder has a size").map(|v| v as usize);
            let images = datasets::Images::read(Path::new(path), image, *augment, holdout, spec.seed)?;
            let arch = arch(images.shape);
            match spec.model.kind {
                ModelKind::Cnn => train_model::<B, Cnn<B>, _>(run, arch, out, &images.train, &images.test),
                _ => train_model::<B, Mlp<B>, _>(run, arch, out, &images.train, &images.test),
            }
        }
        (ModelKind::Mlp, DatasetSpec::Table { path, label, holdout, regression }) => {
            let table = datasets::Table::read(Path::new(path), label, holdout, spec.seed, *regression)?;
            let arch = arch(table.shape);
            match table.sets {
                datasets::TableSets::Classes(train, test) => train_model::<B, Mlp<B>, _>(run, arch, out, &train, &test),
                datasets::TableSets::Values(train, test) => train_model::<B, Mlp<B>, _>(run, arch, out, &train, &test),
            }
        }
        // `check_spec` refused these already.
        (kind, dataset) => Err(JobsError::Spec(format!("model {kind} does not train on {dataset}"))),
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

/// Trains model `M` on `train_set`, evaluating it on `test_set`: the phases, in order.
fn train_model<B: TrainBackend, M: Trainable<B>, E: Examples>(
    run: Run<B>,
    arch: Arch,
    out: &mut dyn Write,
    train_set: &E,
    test_set: &E,
) -> Result<Outcome, JobsError> {
    let spec = run.spec;
    let (compute, note) = Compute::choose::<B>(spec.precision, run.device, run.shown, run.no_bf16);
    if let Some(note) = note {
        emit(out, format_args!("[gantry] {note}"))?;
    }
    let per_epoch = datasets::batches_per_epoch(train_set.len(), spec.batch_size as usize) as u64;
    let (start, how) = setup::start::<B, M>(&run, &arch, per_epoch)?;
    emit(
        out,
        format_args!(
            "start model={} dataset={} params={} train_samples={} test_samples={} epochs={} batch_size={} precision={} device={}",
            spec.model,
            spec.dataset,
            start.model.num_params(),
            train_set.len(),
            test_set.len(),
            spec.epochs,
            spec.batch_size,
            compute.precision,
            run.shown,
        ),
    )?;

    if let Some(how) = how {
        emit(out, format_args!("{how}"))?;
    }
    let group = setup::join(run.env, out)?;
    let test = TestSet::new(test_set, run.device, compute);
    let mut training = Training::new(run, compute, train_set, test, per_epoch, group, start);
    while training.pos.epoch < spec.epochs && !training.stopped {
        training = training.epoch(out)?;
    }
    training.finish(out)
}

/// A run under way: what every step reads, and the weights, optimizer and position the steps
/// move on. Methods that update the model take it by value, as burn's optimizer takes the model.
struct Training<'a, B: TrainBackend, M: Trainable<B>, E: Examples> {
    spec: &'a TrainSpec,
    env: &'a RunEnv,
    device: &'a B::Device,
    began: Instant,
    /// What the model is built as, for checkpoints.
    arch: Arch,
    compute: Compute,
    train_set: &'a E,
    test: TestSet<B::InnerBackend>,
    loss_fn: CrossEntropyLoss<B>,
    per_epoch: u64,
    group: Group,
    /// Every rank holds the same weights: rank 0 alone writes them.
    checkpoint_dir: Option<&'a Path>,
    /// The first step this process takes is the one that says how long it took to get there.
    first_step: u64,

    model: M,
    optim: Adam<M, B>,
    pos: Position,
    /// The test loss and accuracy of the current weights, when known (saves re-evaluating).
    evaluated: Option<(f64, f64)>,
    last_checkpoint: Option<PathBuf>,
    /// The stop flag was seen: the run ends at `pos`.
    stopped: bool,
}

impl<B: TrainBackend, M: Trainable<B>, E: Examples> Training<'_, B, M, E> {
    /// Writes a checkpoint of the current weights and optimizer state, to continue at `pos`
    /// (on rank 0, where there is a checkpoint dir).
    fn save(&mut self, pos: Position, out: &mut dyn Write) -> Result<(), JobsError> {
        let Some(dir) = self.checkpoint_dir else { return Ok(()) };
        let (spec, env) = (self.spec, self.env);
        let state = CheckpointState {
            job_id: env.job_id.clone(),
            step: pos.step,
            epoch: pos.epoch,
            batch_in_epoch: pos.batch_in_epoch,
            seed: spec.seed,
            model: spec.model.kind.to_string(),
            dataset: spec.dataset.to_string(),
            format_version: FORMAT_VERSION,
            model_spec: self.arch.model.clone(),
            input: self.arch.input.clone(),
        };
        let metadata = std::collections::BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("gantry.model".to_string(), spec.model.to_string()),
            ("gantry.dataset".to_string(), spec.dataset.to_string()),
            ("gantry.step".to_string(), pos.step.to_string()),
        ]);
        let exported = crate::export::safetensors(&self.model.valid().export(), &metadata);
        let (model, optim) = (self.model.clone().into_record(), self.optim.to_record());
        let (path, written) = checkpoint::save::<B, _, _>(dir, &state, model, optim, &exported)?;
        if written {
            emit(out, format_args!("checkpoint step={} path={}", pos.step, checkpoint::checkpoint_name(pos.step)))?;
        }
        self.last_checkpoint = Some(path);
        Ok(())
    }
}

/// Writes one progress line and flushes it: the agent and tests read them as they come.
fn emit(out: &mut dyn Write, line: std::fmt::Arguments) -> Result<(), JobsError> {
    writeln!(out, "{line}").and_then(|()| out.flush()).map_err(JobsError::Output)
}

/// Appends one line; the whole line goes in one write, so a reader never sees half of it.
fn append_line(file: &Path, line: &str) -> Result<(), JobsError> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).map_err(JobsError::Output)?;
    f.write_all(format!("{line}\n").as_bytes()).map_err(JobsError::Output)
}
