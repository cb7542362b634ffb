//! Evaluation on the held-out examples, and the end of a run: the last weights' figures, a last
//! checkpoint, and the line and [`Outcome`] that say how the run ended.

use std::io::Write;

use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

use super::{Outcome, TrainBackend, Trainable, Training, emit};
use crate::datasets::{Examples, Target};
use crate::error::JobsError;
use crate::input::Input;
use crate::models::ModelOps;
use crate::precision::Compute;

/// The loss a step minimises: cross-entropy over classes, or the mean squared error of a
/// regression's one output (on the standardised target).
pub(super) fn loss<B: Backend>(ce: &CrossEntropyLoss<B>, logits: Tensor<B, 2>, target: Target<B>) -> Tensor<B, 1> {
    match target {
        Target::Classes(y) => ce.forward(logits, y),
        Target::Values(y) => {
            let error = logits.reshape([y.dims()[0]]) - y;
            (error.clone() * error).mean()
        }
    }
}

/// The held-out samples as tensors, built once.
pub(super) struct TestSet<B: ModelOps> {
    x: Input<B>,
    y: Target<B>,
    /// Predictions made: one per target.
    n: usize,
    /// Evaluated in the precision the run trains in.
    compute: Compute,
}

impl<B: ModelOps> TestSet<B> {
    pub(super) fn new<E: Examples>(examples: &E, device: &B::Device, compute: Compute) -> Self {
        let all: Vec<usize> = (0..examples.len()).collect();
        let (x, y) = examples.batch::<B>(&all, device);
        let n = match &y {
            Target::Classes(y) => y.dims()[0],
            Target::Values(y) => y.dims()[0],
        };
        TestSet { x, y, n, compute }
    }

    /// What the second figure of `evaluate` is, as lines and metrics name it.
    pub(super) fn score_name(&self) -> &'static str {
        match self.y {
            Target::Classes(_) => "test_accuracy",
            Target::Values(_) => "test_r2",
        }
    }

    /// Mean cross-entropy and accuracy; for a regression, the mean squared error and R² (the
    /// share of the held-out targets' variance the predictions explain).
    pub(super) fn evaluate<T: TrainBackend<InnerBackend = B>, M: Trainable<T>>(&self, model: &M) -> (f64, f64) {
        // `valid()` drops autodiff: no graph is recorded for evaluation.
        let logits = self.compute.forward(&model.valid(), self.x.clone());
        match &self.y {
            Target::Classes(y) => {
                let ce = CrossEntropyLossConfig::new().init::<B>(&logits.device());
                let loss = ce.forward(logits.clone(), y.clone());
                let predicted = logits.argmax(1).reshape([self.n]);
                let correct = predicted.equal(y.clone()).int().sum().into_scalar().elem::<i64>();
                (loss.into_scalar().elem::<f64>(), correct as f64 / self.n as f64)
            }
            Target::Values(y) => {
                let host = |t: Tensor<B, 1>| t.into_data().convert::<f32>().to_vec::<f32>().expect("f32 values");
                let (predicted, actual) = (host(logits.reshape([self.n])), host(y.clone()));
                regression_figures(&predicted, &actual)
            }
        }
    }
}

/// Mean squared error and R² of `predicted` against `actual`.
fn regression_figures(predicted: &[f32], actual: &[f32]) -> (f64, f64) {
    let n = actual.len().max(1) as f64;
    let mean = actual.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
    let sse: f64 = predicted.iter().zip(actual).map(|(p, a)| (f64::from(*p) - f64::from(*a)).powi(2)).sum();
    let sst: f64 = actual.iter().map(|a| (f64::from(*a) - mean).powi(2)).sum();
    (sse / n, if sst > 0.0 { 1.0 - sse / sst } else { 0.0 })
}

impl<B: TrainBackend, M: Trainable<B>, E: Examples> Training<'_, B, M, E> {
    /// Ends the run where it stands: the held-out figures of its weights, a last checkpoint,
    /// and the `done` or `stopped` line.
    pub(super) fn finish(mut self, out: &mut dyn Write) -> Result<Outcome, JobsError> {
        // A stop after an epoch's last batch leaves the position at the next epoch's start.
        let pos = self.pos.normalised(self.per_epoch);
        let stopped = self.stopped && pos.epoch < self.spec.epochs;
        let (test_loss, test_accuracy) = match self.evaluated {
            Some(figures) => figures,
            None => self.test.evaluate(&self.model),
        };
        self.save(pos, out)?;
        let shown = self.last_checkpoint.as_deref().map_or_else(|| "none".to_string(), |p| p.display().to_string());
        if stopped {
            emit(out, format_args!("stopped step={} checkpoint={shown}", pos.step))?;
        } else {
            let score = self.test.score_name();
            emit(out, format_args!("done steps={} {score}={test_accuracy:.4} checkpoint={shown}", pos.step))?;
        }
        let last_checkpoint = self.last_checkpoint;
        Ok(Outcome { steps: pos.step, epochs_done: pos.epoch, test_accuracy, test_loss, last_checkpoint, stopped })
    }
}
