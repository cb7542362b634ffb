//! Evaluation on the held-out examples, and the end of a run: the last weights' figures, a last
//! checkpoint, and the line and [`Outcome`] that say how the run ended.

use std::io::Write;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{ElementConversion, Int, Tensor};

use super::{Outcome, TrainBackend, Trainable, Training, emit};
use crate::datasets::Examples;
use crate::error::JobsError;
use crate::input::Input;
use crate::models::ConvBlockOps;
use crate::precision::Compute;

/// The held-out samples as tensors, built once.
pub(super) struct TestSet<B: ConvBlockOps> {
    x: Input<B>,
    y: Tensor<B, 1, Int>,
    /// Predictions made: one per target.
    n: usize,
    /// Evaluated in the precision the run trains in.
    compute: Compute,
}

impl<B: ConvBlockOps> TestSet<B> {
    pub(super) fn new<E: Examples>(examples: &E, device: &B::Device, compute: Compute) -> Self {
        let all: Vec<usize> = (0..examples.len()).collect();
        let (x, y) = examples.batch::<B>(&all, device);
        let n = y.dims()[0];
        TestSet { x, y, n, compute }
    }

    /// Mean cross-entropy and accuracy.
    pub(super) fn evaluate<T: TrainBackend<InnerBackend = B>, M: Trainable<T>>(&self, model: &M) -> (f64, f64) {
        // `valid()` drops autodiff: no graph is recorded for evaluation.
        let logits = self.compute.forward(&model.valid(), self.x.clone());
        let loss = CrossEntropyLossConfig::new().init::<B>(&logits.device()).forward(logits.clone(), self.y.clone());
        let predicted = logits.argmax(1).reshape([self.n]);
        let correct = predicted.equal(self.y.clone()).int().sum().into_scalar().elem::<i64>();
        (loss.into_scalar().elem::<f64>(), correct as f64 / self.n as f64)
    }
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
            emit(out, format_args!("done steps={} test_accuracy={test_accuracy:.4} checkpoint={shown}", pos.step))?;
        }
        let last_checkpoint = self.last_checkpoint;
        Ok(Outcome { steps: pos.step, epochs_done: pos.epoch, test_accuracy, test_loss, last_checkpoint, stopped })
    }
}
