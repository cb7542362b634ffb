//! Weights in from the ecosystem: a SafeTensors file written outside gantry (by PyTorch where it
//! is installed, else by numpy in the same layout) is what `init_from: FILE.safetensors` starts
//! from: the runtime's logits are the file's maker's, and a run fine-tunes from it.

use std::path::Path;
use std::process::Command;

use gantry_core::spec::TrainSpec;
use gantry_jobs::{Predictor, RunEnv, digits_test_split, train};

#[test]
fn weights_made_outside_gantry_give_their_makers_logits_and_a_run_starts_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let (x, y) = digits_test_split().unwrap();
    let rows = 64;
    let inputs = serde_json::json!({ "x": &x[..rows * 64], "y": &y[..rows] });
    std::fs::write(dir.path().join("inputs.json"), inputs.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/safetensors_in/make_weights.py");
    let made =
        Command::new("python3").arg(&script).arg(dir.path().join("inputs.json")).arg(dir.path()).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let made: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("logits.json")).unwrap()).unwrap();
    println!("weights made by {}", made["made_by"]);
    let logits: Vec<f64> = serde_json::from_value(made["logits"].clone()).unwrap();

    let weights = dir.path().join("weights.safetensors");
    let spec = TrainSpec { init_from: Some(weights.display().to_string()), epochs: 1, ..TrainSpec::default() };
    spec.validate().unwrap();
    let softmax_of_made = |rows_probs: &[f32], tolerance: f64| {
        for (i, (got, want)) in rows_probs.chunks(10).zip(logits.chunks(10)).enumerate() {
            let max = want.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = want.iter().map(|l| (l - max).exp()).sum();
            for (g, w) in got.iter().zip(want) {
                let expected = (w - max).exp() / sum;
                assert!((f64::from(*g) - expected).abs() < tolerance, "row {i}: {got:?} vs softmax of {want:?}");
            }
        }
    };
    let predictor = Predictor::from_safetensors(&weights, &spec).unwrap();
    softmax_of_made(&predictor.predict_pixels(rows, &x[..rows * 64]).unwrap(), 1e-5);

    // A run starts from the file: with a step size too small to move the weights, its
    // checkpoint after an epoch still gives the maker's logits.
    let still = TrainSpec { learning_rate: 1e-9, ..spec.clone() };
    let checkpoints = dir.path().join("ckpt");
    let env = RunEnv { checkpoint_dir: Some(checkpoints.clone()), ..RunEnv::default() };
    let mut out = Vec::new();
    let outcome = train(&still, &env, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    println!("{out}");
    assert_eq!(out.lines().nth(1), Some(format!("initialised weights from={}", weights.display()).as_str()));
    let trained = Predictor::load(outcome.last_checkpoint.as_ref().unwrap()).unwrap();
    softmax_of_made(&trained.predict_pixels(rows, &x[..rows * 64]).unwrap(), 1e-4);

    // A file whose names are not the model's is refused with the names that differ.
    let cnn = TrainSpec { model: gantry_core::spec::ModelSpec::of(gantry_core::spec::ModelKind::Cnn), ..spec };
    let err = train(&cnn, &RunEnv::default(), &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("missing: conv1.weight [16, 1, 3, 3]"), "{err}");
    assert!(err.contains("not in this model: fc1.bias, fc1.weight, fc2.bias, fc2.weight"), "{err}");
}
