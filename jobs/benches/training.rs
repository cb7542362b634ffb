//! `cargo bench --bench training [-- MODEL... | pipeline]`: samples/s of gantry's training runtime
//! against PyTorch on the same model, data set and batch size, in the same run, on this machine's
//! CPU (models: mlp, cnn, transformer, transformer-4x256). PyTorch runs
//! `benches/pytorch_reference.py` where `python3 -c "import torch"` works; otherwise its rows
//! say it was skipped. One JSON object per line. The `pipeline` row times an image folder:
//! decoding, augmentation, and the share of a CNN's step spent waiting for its batch.
//!
//! Built with `--features cuda` on a machine whose GPU answers, the same rows follow for GPU 0
//! (PyTorch on `cuda`, with its default precision settings), again in bf16 mixed precision
//! (`precision: bf16` against PyTorch's autocast to bfloat16), and for each model the time from
//! the start of a `train` call to the end of its first step in a fresh process: once with an
//! empty kernel cache, once with the cache that run left (`GANTRY_KERNEL_CACHE`).
//!
//! Both sides time only the training loop of an epoch (evaluation excluded). Each figure is the
//! median over runs that alternate between the two, and within a run over its epochs after
//! the first (which pays for warm-up) where there are several.

use std::path::{Path, PathBuf};
use std::process::Command;

use gantry_core::spec::{DatasetSpec, Holdout, ModelKind, ModelSpec, Precision, TrainSpec};
use gantry_jobs::{RunEnv, image_folder_rates, train};

const RUNS: usize = 3;
/// The flag of the child process that times one run's first step.
const FIRST_STEP: &str = "--first-step-of";

struct Case {
    model: &'static str,
    dataset: &'static str,
    epochs: u32,
    batch_size: u32,
    goal_ratio: Option<f64>,
}

const CASES: [Case; 4] = [
    Case { model: "mlp", dataset: "digits", epochs: 20, batch_size: 64, goal_ratio: Some(1.5) },
    Case { model: "cnn", dataset: "digits", epochs: 10, batch_size: 64, goal_ratio: Some(1.0) },
    Case { model: "transformer", dataset: "genesis", epochs: 1, batch_size: 32, goal_ratio: None },
    // Issue 21's sized transformer, sized for a 2-core machine.
    Case { model: "transformer-4x256", dataset: "genesis", epochs: 1, batch_size: 32, goal_ratio: Some(1.0) },
];

/// The model a case names: a short name, or `transformer-4x256` (4 layers of width 256, 4
/// heads, context 128).
fn model_spec(name: &str) -> ModelSpec {
    match name {
        "transformer-4x256" => ModelSpec {
            layers: Some(4),
            width: Some(256),
            heads: Some(4),
            context: Some(128),
            ..ModelSpec::of(ModelKind::Transformer)
        },
        short => ModelSpec::of(short.parse().expect("a model name")),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Epochs after the first, or the only one.
fn steady(rates: Vec<f64>) -> f64 {
    median(if rates.len() > 1 { rates[1..].to_vec() } else { rates })
}

fn spec(case: &Case, precision: Precision) -> TrainSpec {
    TrainSpec {
        precision,
        model: model_spec(case.model),
        dataset: DatasetSpec::Builtin(case.dataset.parse().expect("a dataset name")),
        epochs: case.epochs,
        batch_size: case.batch_size,
        checkpoint_every_steps: u64::MAX,
        ..TrainSpec::default()
    }
}

/// gantry's samples/s, or the note it printed when it did not train in `precision` (bf16 on a
/// GPU without it).
fn gantry(case: &Case, env: &RunEnv, precision: Precision) -> Result<f64, String> {
    let mut out = Vec::new();
    train(&spec(case, precision), env, &mut out).expect("training runs");
    let out = String::from_utf8(out).unwrap();
    let start = out.lines().find(|l| l.starts_with("start ")).expect("a start line");
    if !start.contains(&format!(" precision={precision} ")) {
        return Err(out.lines().find(|l| l.starts_with("[gantry]")).unwrap_or(start).to_string());
    }
    let rates = out
        .lines()
        .filter(|l| l.starts_with("epoch="))
        .map(|l| {
            let v = l.split(' ').find_map(|kv| kv.strip_prefix("samples_per_s=")).expect("samples_per_s");
            v.parse().unwrap()
        })
        .collect();
    Ok(steady(rates))
}

/// PyTorch's samples/s and thread count, or why there are none.
fn pytorch(case: &Case, root: &Path, device: &str, precision: Precision) -> Result<(f64, u64, String), String> {
    let script = root.join("jobs/benches/pytorch_reference.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([case.model, &case.epochs.to_string(), &case.batch_size.to_string()])
        .arg(root)
        .arg(device)
        .arg(precision.to_string())
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, model, cache] = &args[..]
        && flag == FIRST_STEP
    {
        return first_step_child(model, cache);
    }
    // The repository root: where the bench was built, or the current directory where it runs
    // as a copied binary (on a GPU machine, from `.ci/device-check`).
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let here = std::env::current_dir().unwrap_or_default();
    let root: PathBuf = if here.join("jobs/benches/pytorch_reference.py").exists() { here } else { built };
    let torch_present = Command::new("python3").args(["-c", "import torch"]).output().is_ok_and(|o| o.status.success());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // Model names after `--` pick cases; cargo's own flags (--bench) are not names.
    let wanted: Vec<String> = args.into_iter().filter(|a| !a.starts_with("--")).collect();
    let cases: Vec<&Case> = CASES.iter().filter(|c| wanted.is_empty() || wanted.iter().any(|w| w == c.model)).collect();
    for case in &cases {
        let mut line = compare(case, &root, torch_present, &RunEnv::default(), "cpu", Precision::F32);
        line["cores"] = cores.into();
        if let Some(goal) = case.goal_ratio {
            line["goal_vs_pytorch"] = goal.into();
        }
        println!("{line}");
    }
    if wanted.is_empty() || wanted.iter().any(|w| w == "pipeline") {
        println!("{}", pipeline_row());
    }
    gpu::rows(&cases, &root, torch_present);
}

/// The data pipeline on an image folder: images decoded and resized per second, augmented per
/// second, and how long the steps of a CNN trained on the folder (augmented) waited for their
/// batches, as a share of the step (goal: under 5%).
fn pipeline_row() -> serde_json::Value {
    const PER_CLASS: u32 = 500;
    const SIDE: u32 = 64;
    const SIZE: usize = 32;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let folder = dir.path().join("images");
    for class in 0..4u32 {
        let path = folder.join(format!("class-{class}"));
        std::fs::create_dir_all(&path).expect("a class folder");
        for i in 0..PER_CLASS {
            let img = image::RgbImage::from_fn(SIDE, SIDE, |x, y| {
                let v = ((x * (class + 1) + y * (i % 7 + 1)) % 256) as u8;
                image::Rgb([v, v.wrapping_mul(3), v ^ (class as u8 * 60)])
            });
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save(path.join(format!("{i}.{ext}"))).expect("an image written");
        }
    }
    let rates: Vec<_> =
        (0..RUNS).map(|_| image_folder_rates(&folder, [3, SIZE, SIZE]).expect("the folder reads")).collect();
    let decoded = median(rates.iter().map(|r| r.decoded_per_s).collect());
    let augmented = median(rates.iter().map(|r| r.augmented_per_s).collect());

    let metrics = dir.path().join("metrics.jsonl");
    let spec = TrainSpec {
        model: ModelSpec { channels: Some(vec![16, 32]), ..ModelSpec::of(ModelKind::Cnn) },
        dataset: DatasetSpec::Images {
            path: folder.display().to_string(),
            size: [SIZE as u32, SIZE as u32],
            augment: true,
            holdout: Holdout::Fraction(0.1),
        },
        epochs: 3,
        batch_size: 64,
        checkpoint_every_steps: u64::MAX,
        ..TrainSpec::default()
    };
    let env = RunEnv { metrics_file: Some(metrics.clone()), ..RunEnv::default() };
    train(&spec, &env, &mut Vec::new()).expect("training runs");
    let epochs: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .expect("metrics written")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let share = |m: &serde_json::Value| m["input_wait_ms"].as_f64().unwrap() / m["step_time_ms"].as_f64().unwrap();
    let waits: Vec<f64> = epochs.iter().map(share).collect();
    let wait_share = median(waits);
    serde_json::json!({
        "bench": "training", "device": "cpu", "row": "data pipeline", "images": rates[0].images,
        "image": format!("{SIDE}x{SIDE} PNG and JPEG to 3x{SIZE}x{SIZE}"), "runs": RUNS,
        "decoded_per_s": decoded.round(), "augmented_per_s": augmented.round(),
        "cnn_step_wait_share": (wait_share * 10_000.0).round() / 10_000.0, "goal_wait_share": 0.05,
        "steps_per_epoch": epochs[0]["step"], "cnn_samples_per_s": median(epochs.iter().map(|m| m["samples_per_s"].as_f64().unwrap()).collect()).round(),
    })
}

/// One row: gantry and PyTorch on `device` ("cpu" or "cuda") in `precision`, medians of
/// alternating runs.
fn compare(
    case: &Case,
    root: &Path,
    torch_present: bool,
    env: &RunEnv,
    device: &str,
    precision: Precision,
) -> serde_json::Value {
    let (mut ours, mut theirs, mut threads, mut version) = (Vec::new(), Vec::new(), 0, String::new());
    let mut skipped = (!torch_present).then(|| "PyTorch is not installed (import torch failed)".to_string());
    for _ in 0..RUNS {
        match gantry(case, env, precision) {
            Ok(rate) => ours.push(rate),
            Err(note) => {
                let line = serde_json::json!({
                    "bench": "training", "device": device, "precision": precision.to_string(),
                    "model": case.model, "skipped": note,
                });
                return line;
            }
        }
        if skipped.is_none() {
            match pytorch(case, root, device, precision) {
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
        "bench": "training", "device": device, "precision": precision.to_string(), "model": case.model,
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
    line
}

/// In a child process: a run of `model` with kernel cache `cache`, stopped after its first
/// step; prints the `first_step` line's seconds.
fn first_step_child(model: &str, cache: &str) {
    let case = CASES.iter().find(|c| c.model == model).expect("a bench model");
    let env = RunEnv { gpus: vec!["0".into()], kernel_cache: Some(cache.into()), ..RunEnv::default() };
    let mut out = StopAtFirstStep { text: Vec::new(), stop: env.stop.clone() };
    train(&TrainSpec { epochs: 1, ..spec(case, Precision::F32) }, &env, &mut out).expect("training runs");
    let out = String::from_utf8(out.text).unwrap();
    let line = out.lines().find(|l| l.starts_with("first_step ")).expect("a first_step line");
    assert!(out.lines().next().is_some_and(|l| l.ends_with("device=cuda:0")), "not on the GPU: {out}");
    println!("{}", line.rsplit_once("seconds=").unwrap().1);
}

/// Keeps a run's output and raises its stop flag once the first step is reported.
struct StopAtFirstStep {
    text: Vec<u8>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::io::Write for StopAtFirstStep {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.write(buf)
    }

    /// The runtime flushes after each line.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.text.windows(11).any(|w| w == b"first_step ") {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub fn rows(_: &[&super::Case], _: &std::path::Path, _: bool) {}
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::path::Path;
    use std::process::Command;

    use gantry_core::spec::Precision;
    use gantry_jobs::{RunEnv, train};

    use super::{Case, FIRST_STEP, compare, spec};

    /// GPU samples/s against PyTorch on the same GPU; the goal is 0.8x.
    const GOAL: f64 = 0.8;
    /// Seconds to the first step with a warm kernel cache; the goal is at most this.
    const GOAL_FIRST_STEP: f64 = 5.0;

    pub fn rows(cases: &[&Case], root: &Path, torch_present: bool) {
        let cache = tempfile::tempdir().expect("a temporary directory");
        let env =
            RunEnv { gpus: vec!["0".into()], kernel_cache: Some(cache.path().join("in-process")), ..RunEnv::default() };
        let mut out = Vec::new();
        let probe = super::Case { epochs: 1, ..*cases.first().copied().unwrap_or(&super::CASES[0]) };
        train(&spec(&probe, Precision::F32), &env, &mut out).expect("training runs");
        let first = String::from_utf8_lossy(&out).lines().find(|l| l.starts_with("start ")).unwrap_or("").to_string();
        if !first.ends_with("device=cuda:0") {
            let why =
                String::from_utf8_lossy(&out).lines().find(|l| l.starts_with("[gantry]")).unwrap_or("").to_string();
            println!("{}", serde_json::json!({"bench": "training", "device": "cuda", "skipped": why}));
            return;
        }
        for precision in [Precision::F32, Precision::Bf16] {
            for case in cases {
                let mut line = compare(case, root, torch_present, &env, "cuda", precision);
                line["goal_vs_pytorch"] = GOAL.into();
                println!("{line}");
            }
        }
        let exe = std::env::current_exe().expect("this bench's path");
        for case in cases {
            let dir = cache.path().join(format!("first-step-{}", case.model));
            let time = || -> f64 {
                let out = Command::new(&exe).args([FIRST_STEP, case.model]).arg(&dir).output().expect("the bench runs");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8_lossy(&out.stdout).trim().parse().expect("seconds")
            };
            let (cold, warm) = (time(), time());
            println!(
                "{}",
                serde_json::json!({
                    "bench": "training", "device": "cuda", "model": case.model, "batch_size": case.batch_size,
                    "first_step_s_empty_cache": cold, "first_step_s_warm_cache": warm,
                    "goal_first_step_s_warm_cache": GOAL_FIRST_STEP,
                })
            );
        }
    }
}
