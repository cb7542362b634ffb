//! The loop on a CPU backend that has bf16 (ndarray has not); the public API's tests are in
//! `tests/training.rs`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::backend::Autodiff;
use burn_flex::{Flex, FlexDevice};
use gantry_core::spec::{DatasetKind, ModelKind, ModelSpec, Precision, TrainSpec};

use super::{Outcome, Run, train_on};
use crate::checkpoint::MODEL_FILE;
use crate::device::Device;
use crate::env::RunEnv;

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
        model: ModelSpec::of(ModelKind::Transformer),
        dataset: DatasetKind::Genesis.into(),
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
    let (half, out) = run(&TrainSpec { precision: Precision::Bf16, ..spec.clone() }, "bf16");
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
    let spec = TrainSpec { epochs: 3, checkpoint_every_steps: 30, precision: Precision::Bf16, ..TrainSpec::default() };
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
        let spec = TrainSpec { model: ModelSpec::of(model), epochs: 8, ..TrainSpec::default() };
        let (full, _) = train_on_flex(&spec);
        let (half, out) = train_on_flex(&TrainSpec { precision: Precision::Bf16, ..spec.clone() });
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
