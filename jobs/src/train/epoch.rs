//! One epoch of a run: its batches in the epoch's order, each one optimizer step (gradients
//! summed across ranks when data parallel), checkpoints every `checkpoint_every_steps`, the
//! stop flag between steps, and the epoch's line with its held-out figures.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::ElementConversion;

use super::eval::TestSet;
use super::setup::{Group, Start, shard};
use super::{Run, TrainBackend, Trainable, Training, append_line, emit};
use crate::datasets::{self, Examples, Prepared};
use crate::error::JobsError;
use crate::grad_sync;
use crate::precision::Compute;

/// What one step gives the epoch's tally.
struct Step {
    /// The global batch's mean loss (this process's, when alone).
    loss: f64,
    /// Samples this process trained on.
    samples: usize,
    /// Whether the ranks agreed to stop after this step.
    stop: bool,
}

/// An epoch's figures, over the steps this process took in it.
#[derive(Default)]
struct Tally {
    loss_sum: f64,
    batches: u64,
    samples: usize,
    /// Time the steps waited for their batch to be ready.
    input_wait: Duration,
}

/// Batches gathered ahead of the step that needs them: enough to hide a slow one.
const PREFETCH: usize = 2;

/// One batch as the loader hands it over.
struct Loaded {
    /// The global batch's size, and this rank's share of it.
    batch: usize,
    shard: usize,
    /// The share's data; none when this rank's share is empty.
    prepared: Option<Prepared>,
}

impl<'a, B: TrainBackend, M: Trainable<B>, E: Examples> Training<'a, B, M, E> {
    pub(super) fn new(
        run: Run<'a, B>,
        compute: Compute,
        train_set: &'a E,
        test: TestSet<B::InnerBackend>,
        per_epoch: u64,
        group: Group,
        start: Start<B, M>,
    ) -> Self {
        let Run { spec, env, device, began, .. } = run;
        let checkpoint_dir = if group.rank == 0 { env.checkpoint_dir.as_deref() } else { None };
        Training {
            spec,
            env,
            device,
            began,
            arch: start.arch,
            compute,
            train_set,
            test,
            loss_fn: CrossEntropyLossConfig::new().init::<B>(device),
            per_epoch,
            group,
            checkpoint_dir,
            first_step: start.pos.step,
            model: start.model,
            optim: start.optim,
            pos: start.pos,
            evaluated: None,
            last_checkpoint: None,
            stopped: false,
        }
    }

    /// Trains what is left of epoch `pos.epoch` and reports it, or stops at the stop flag
    /// (`stopped`): a process alone checks it before each step; ranks decide together, in each
    /// step's exchange, and finish the epoch first when that step was its last.
    pub(super) fn epoch(self, out: &mut dyn Write) -> Result<Self, JobsError> {
        let (spec, n) = (self.spec, self.train_set.len());
        let batch_size = spec.batch_size as usize;
        let order = datasets::epoch_order(spec.seed, self.pos.epoch, n);
        let (train_set, rank, world, epoch) = (self.train_set, self.group.rank, self.group.world, self.pos.epoch);
        let batches = self.pos.batch_in_epoch as usize..self.per_epoch as usize;
        std::thread::scope(move |scope| {
            // The next batches are gathered on another thread while a step runs; a step that
            // finds none ready waits, and that wait is the loader's cost (`input_wait_ms`).
            let (tx, rx) = mpsc::sync_channel(PREFETCH);
            scope.spawn(move || {
                for b in batches {
                    let batch = &order[b * batch_size..((b + 1) * batch_size).min(n)];
                    let indices = shard(rank, world, batch);
                    let prepared = (!indices.is_empty()).then(|| train_set.prepare(indices, epoch));
                    let loaded = Loaded { batch: batch.len(), shard: indices.len(), prepared };
                    if tx.send(loaded).is_err() {
                        // The epoch ended early (the stop flag): no one wants the rest.
                        return;
                    }
                }
            });
            self.steps(rx, out)
        })
    }

    /// The steps of the epoch, each on the next batch `batches` brings, then the epoch's line.
    fn steps(mut self, batches: Receiver<Loaded>, out: &mut dyn Write) -> Result<Self, JobsError> {
        let started = Instant::now();
        let mut tally = Tally::default();
        while self.pos.batch_in_epoch < self.per_epoch {
            if self.group.ring.is_none() && self.env.stop.load(Ordering::SeqCst) {
                self.stopped = true;
                return Ok(self);
            }
            let waiting = Instant::now();
            let loaded = batches.recv().map_err(|_| JobsError::Spec("the batch loader stopped".into()))?;
            tally.input_wait += waiting.elapsed();
            let (step, grads) = self.gradients(loaded)?;
            self.model = self.optim.step(self.spec.learning_rate, self.model, grads);
            self.stepped(out)?;
            tally.loss_sum += step.loss;
            tally.batches += 1;
            tally.samples += step.samples;
            if step.stop {
                self.stopped = true;
                if self.pos.batch_in_epoch < self.per_epoch {
                    return Ok(self);
                }
            }
        }
        self.pos.epoch += 1;
        self.pos.batch_in_epoch = 0;
        self.report(&tally, started.elapsed(), out)?;
        Ok(self)
    }

    /// This process's gradients for its share of a batch, summed over the ranks when data
    /// parallel, without those of a frozen backbone.
    fn gradients(&mut self, loaded: Loaded) -> Result<(Step, GradientsParams), JobsError> {
        let (mut grads, mut loss) = match loaded.prepared {
            None => (GradientsParams::new(), 0.0),
            Some(prepared) => {
                let (x, y) = prepared.tensors::<B>(self.device);
                let loss = super::eval::loss(&self.loss_fn, self.compute.forward(&self.model, x), y);
                let value = loss.clone().into_scalar().elem::<f64>();
                (GradientsParams::from_grads(loss.backward(), &self.model), value)
            }
        };
        let mut stop = false;
        if let Some(ring) = self.group.ring.as_mut() {
            // Each rank's mean gradient, weighted by its share of the batch, summed: the
            // global batch's mean gradient, as one process would compute it.
            let share = loaded.shard as f32 / loaded.batch as f32;
            let mut extra = [loss as f32 * share, f32::from(u8::from(self.env.stop.load(Ordering::SeqCst)))];
            grad_sync::all_reduce(ring, &self.model, &mut grads, share, &mut extra)?;
            loss = f64::from(extra[0]);
            stop = extra[1] > 0.0;
        }
        if self.spec.freeze_backbone {
            // No gradient, no update: the optimizer leaves these weights as they are.
            for (id, rank) in self.model.backbone() {
                match rank {
                    1 => drop(grads.remove::<B::InnerBackend, 1>(id)),
                    2 => drop(grads.remove::<B::InnerBackend, 2>(id)),
                    _ => drop(grads.remove::<B::InnerBackend, 4>(id)),
                }
            }
        }
        Ok((Step { loss, samples: loaded.shard, stop }, grads))
    }

    /// After an update: the first step's line, the position, and a checkpoint when one is due.
    fn stepped(&mut self, out: &mut dyn Write) -> Result<(), JobsError> {
        if self.pos.step == self.first_step {
            // Set-up, data, and on a GPU the kernels' compilation and autotuning. GPU work is
            // queued: wait for the step to finish before reading the clock.
            let _ = B::sync(self.device);
            let seconds = self.began.elapsed().as_secs_f64();
            emit(out, format_args!("first_step step={} seconds={seconds:.3}", self.pos.step + 1))?;
        }
        self.pos.step += 1;
        self.pos.batch_in_epoch += 1;
        self.evaluated = None;
        if self.pos.step.is_multiple_of(self.spec.checkpoint_every_steps) {
            self.save(self.pos.normalised(self.per_epoch), out)?;
        }
        Ok(())
    }

    /// The epoch line, with the held-out figures of the epoch's weights, and the same as a
    /// metrics line when there is a metrics file.
    fn report(&mut self, tally: &Tally, took: Duration, out: &mut dyn Write) -> Result<(), JobsError> {
        let (test_loss, acc) = self.test.evaluate(&self.model);
        self.evaluated = Some((test_loss, acc));
        let score = self.test.score_name();
        let train_secs = took.as_secs_f64();
        let loss = tally.loss_sum / tally.batches.max(1) as f64;
        let samples_per_s = tally.samples as f64 / train_secs.max(1e-9);
        emit(
            out,
            format_args!(
                "epoch={} step={} loss={loss:.6} test_loss={test_loss:.6} {score}={acc:.4} \
                 samples_per_s={samples_per_s:.0}",
                self.pos.epoch, self.pos.step,
            ),
        )?;
        if let Some(file) = &self.env.metrics_file {
            let step_time_ms = 1000.0 * train_secs / tally.batches.max(1) as f64;
            let input_wait_ms = 1000.0 * tally.input_wait.as_secs_f64() / tally.batches.max(1) as f64;
            let mut line = serde_json::json!({
                "step": self.pos.step, "epoch": self.pos.epoch, "loss": loss, "test_loss": test_loss,
                "samples_per_s": samples_per_s, "step_time_ms": step_time_ms, "input_wait_ms": input_wait_ms,
            });
            line[score] = acc.into();
            append_line(file, &line.to_string())?;
        }
        Ok(())
    }
}
