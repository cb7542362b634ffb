//! `cargo bench --bench training [-- MODEL...]`: samples/s of gantry's training runtime against PyTorch on
//! the same model, data set and batch size, in the same run, on this machine's CPU. PyTorch runs
//! `benches/pytorch_reference.py` where `python3 -c "import torch"` works; otherwise its rows
//! say it was skipped. One JSON object per line.
//!
//! Both sides time only the training loop of an epoch (evaluation excluded). Each figure is the
//! median over runs that alternate between the two, and within a run over its epochs after
//! the first (which pays for warm-up) where there are several.

use std::path::{Path, PathBuf};
use std::process::Command;

use gantry_core::spec::TrainSpec;
use gantry_jobs::{RunEnv, train};

const RUNS: usize = 3;

struct Case {
    model: &'static str,
    dataset: &'static str,
    epochs: u32,
    batch_size: u32,
    goal_ratio: Option<f64>,
}

const CASES: [Case; 3] = [
    Case { model: "mlp", dataset: "digits", epochs: 20, batch_size: 64, goal_ratio: Some(1.5) },
    Case { model: "cnn", dataset: "digits", epochs: 10, batch_size: 64, goal_ratio: Some(1.0) },
    Case { model: "transformer", dataset: "genesis", epochs: 1, batch_size: 32, goal_ratio: None },
];

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Epochs after the first, or the only one.
fn steady(rates: Vec<f64>) -> f64 {
    median(if rates.len() > 1 { rates[1..].to_vec() } else { rates })
}

fn gantry(case: &Case) -> f64 {
    let spec = TrainSpec {
        model: case.model.into(),
        dataset: case.dataset.into(),
        epochs: case.epochs,
        batch_size: case.batch_size,
        checkpoint_every_steps: u64::MAX,
        ..TrainSpec::default()
    };
    let mut out = Vec::new();
    train(&spec, &RunEnv::default(), &mut out).expect("training runs");
    let rates = String::from_utf8(out)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("epoch="))
        .map(|l| {
            let v = l.split(' ').find_map(|kv| kv.strip_prefix("samples_per_s=")).expect("samples_per_s");
            v.parse().unwrap()
        })
        .collect();
    steady(rates)
}

/// PyTorch's samples/s and thread count, or why there are none.
fn pytorch(case: &Case, root: &Path) -> Result<(f64, u64, String), String> {
    let script = root.join("jobs/benches/pytorch_reference.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([case.model, &case.epochs.to_string(), &case.batch_size.to_string()])
        .arg(root)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("python3 failed").to_string());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    let rates = v["samples_per_s"].as_array().unwrap().iter().map(|r| r.as_f64().unwrap()).collect();
    Ok((steady(rates), v["threads"].as_u64().unwrap_or(0), v["torch"].as_str().unwrap_or("").to_string()))
}

fn main() {
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let torch_present = Command::new("python3").args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // Model names after `--` pick cases; cargo's own flags (--bench) are not names.
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    for case in CASES.iter().filter(|c| wanted.is_empty() || wanted.iter().any(|w| w == c.model)) {
        let (mut ours, mut theirs, mut threads, mut version) = (Vec::new(), Vec::new(), 0, String::new());
        let mut skipped = (!torch_present).then(|| "PyTorch is not installed (import torch failed)".to_string());
        for _ in 0..RUNS {
            ours.push(gantry(case));
            if skipped.is_none() {
                match pytorch(case, &root) {
                    Ok((rate, t, v)) => {
                        theirs.push(rate);
                        (threads, version) = (t, v);
                    }
                    Err(why) => skipped = Some(why),
                }
            }
        }
        let ours = median(ours);
        let mut line = serde_json::json!({
            "bench": "training", "device": "cpu", "cores": cores, "model": case.model,
            "dataset": case.dataset, "batch_size": case.batch_size, "runs": RUNS,
            "gantry_samples_per_s": ours.round(),
        });
        match skipped {
            Some(why) => line["pytorch_skipped"] = why.into(),
            None => {
                let torch = median(theirs);
                line["pytorch_samples_per_s"] = torch.round().into();
                line["pytorch_threads"] = threads.into();
                line["pytorch_version"] = version.into();
                line["vs_pytorch"] = ((ours / torch * 100.0).round() / 100.0).into();
            }
        }
        if let Some(goal) = case.goal_ratio {
            line["goal_vs_pytorch"] = goal.into();
        }
        println!("{line}");
    }
}
