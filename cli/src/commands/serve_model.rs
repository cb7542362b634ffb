//! `gantry serve-model --checkpoint DIR`: serves a trained checkpoint over the Open Inference
//! Protocol (KServe v2, HTTP/JSON) with dynamic batching on the CPU, until SIGTERM or ctrl-c.
//! Agents run it for a `serve:` job's replicas, with the settings in the environment.
//!
//! It prints one line once listening, flushed:
//!
//! ```text
//! serving model=mlp version=690 listen=127.0.0.1:8000 max_batch_size=32 max_batch_delay_ms=2 max_queue=1024
//! ```
//!
//! and, with `GANTRY_METRICS_FILE` set, appends a line of flat numbers to it every second (what
//! an agent ships as the replica's metrics, and the coordinator shows in `/metrics`):
//! `serve_requests`, `serve_queue_depth`, `serve_batches`, `serve_batch_rows` and the batch-size
//! histogram's cumulative buckets `serve_batch_le_1` ... `serve_batch_le_256`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gantry_jobs::Predictor;
use gantry_serve::protocol::{BYTES, FP32, PREDICTIONS, PROBABILITIES};
use gantry_serve::{Input, Model, ModelMetadata, ServeConfig, Settings, Stats, TensorMetadata};

use crate::output::outln;

#[derive(clap::Args)]
pub struct ServeModelArgs {
    /// The checkpoint directory to serve (a `step-<N>` written by training).
    #[arg(long, env = "GANTRY_RESUME_DIR")]
    checkpoint: PathBuf,
    /// Address to listen on for HTTP.
    #[arg(long, env = "GANTRY_SERVE_ADDR", default_value = "127.0.0.1:8000")]
    listen: String,
    /// The model's name in the URLs [default: the model kind: mlp, cnn or transformer].
    #[arg(long, env = "GANTRY_SERVE_NAME")]
    name: Option<String>,
    /// The most rows in one forward pass (1: no batching).
    #[arg(long, env = "GANTRY_SERVE_MAX_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    max_batch_size: u32,
    /// The longest a request waits for others to batch with.
    #[arg(long, env = "GANTRY_SERVE_MAX_BATCH_DELAY_MS", default_value_t = 2)]
    max_batch_delay_ms: u64,
    /// The most requests waiting for the model; more are refused with 503.
    #[arg(long, env = "GANTRY_SERVE_MAX_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_queue: u32,
    /// Threads answering HTTP (the model has a thread of its own).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
}

/// Serves until SIGTERM or ctrl-c, then finishes the requests under way; exit status 0.
pub fn run(args: ServeModelArgs) -> anyhow::Result<i32> {
    let predictor = Predictor::load(&args.checkpoint)
        .with_context(|| format!("cannot load checkpoint {}", args.checkpoint.display()))?;
    let name = args.name.clone().unwrap_or_else(|| predictor.model_name().to_string());
    let version = predictor.step().to_string();
    let batching = Settings {
        max_batch_size: args.max_batch_size as usize,
        max_batch_delay: Duration::from_millis(args.max_batch_delay_ms),
        max_queue: args.max_queue as usize,
    };
    let config = ServeConfig::new(&name, &version, batching);
    let metrics_file = std::env::var_os(gantry_jobs::METRICS_FILE_VAR).map(PathBuf::from);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads.into()).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        outln!(
            "serving model={name} version={version} listen={addr} max_batch_size={} max_batch_delay_ms={} max_queue={}",
            args.max_batch_size,
            args.max_batch_delay_ms,
            args.max_queue
        )?;
        crate::output::Stdout.flush()?;
        let writer = metrics_file.map(|file| tokio::spawn(write_metrics(file, config.stats.clone())));
        let served = gantry_serve::serve(listener, Box::new(Served(predictor)), config.clone(), shutdown()).await;
        if let Some(writer) = writer {
            writer.abort();
        }
        served?;
        Ok(0)
    })
}

/// SIGTERM (the agent stopping the replica) or ctrl-c.
async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The metrics line of `snapshot`: numbers at the top level, as agents read metrics files.
fn metrics_line(snapshot: &gantry_serve::StatsSnapshot) -> String {
    let mut line = serde_json::Map::new();
    let mut put = |k: String, v: f64| line.insert(k, serde_json::json!(v));
    put("serve_requests".into(), snapshot.requests.values().sum::<u64>() as f64);
    put("serve_queue_depth".into(), snapshot.queue_depth as f64);
    put("serve_batches".into(), snapshot.batch_size.count as f64);
    put("serve_batch_rows".into(), snapshot.batch_size.sum);
    for b in snapshot.batch_size.buckets.iter().filter(|b| b.le != "+Inf") {
        put(format!("serve_batch_le_{}", b.le), b.count as f64);
    }
    serde_json::Value::Object(line).to_string()
}

/// Appends [`metrics_line`] to `file` every second; a failed write is reported once.
async fn write_metrics(file: PathBuf, stats: Arc<Stats>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = false;
    loop {
        tick.tick().await;
        let line = metrics_line(&stats.snapshot());
        let path = file.clone();
        let written = tokio::task::spawn_blocking(move || append_line(&path, &line)).await;
        if let Ok(Err(e)) = written
            && !reported
        {
            reported = true;
            crate::output::errln!("cannot write metrics to {}: {e}", file.display());
        }
    }
}

/// The whole line in one write, so a reader never sees half of it.
fn append_line(file: &Path, line: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file)?;
    f.write_all(format!("{line}\n").as_bytes())
}

/// A checkpoint's model as the server runs it: digits as FP32 `pixels` `[-1, 64]` (0..=1, as
/// in training), text as BYTES `text` `[-1]`; `probabilities` out (a regression's
/// `predictions`, `[-1, 1]`).
struct Served(Predictor);

impl Model for Served {
    fn metadata(&self) -> ModelMetadata {
        let input = match self.0.input_width() {
            Some(width) => {
                TensorMetadata { name: "pixels".into(), datatype: FP32.into(), shape: vec![-1, width as i64] }
            }
            None => TensorMetadata { name: "text".into(), datatype: BYTES.into(), shape: vec![-1] },
        };
        ModelMetadata {
            name: self.0.model_name().into(),
            versions: vec![self.0.step().to_string()],
            platform: "gantry".into(),
            inputs: vec![input],
            outputs: vec![TensorMetadata {
                name: if self.0.is_regression() { PREDICTIONS } else { PROBABILITIES }.into(),
                datatype: FP32.into(),
                shape: vec![-1, self.0.classes() as i64],
            }],
        }
    }

    /// Prompts with characters the model has no token for get a 400 of their own.
    fn validate(&self, input: &Input) -> Result<(), String> {
        match input {
            Input::Text(prompts) => Predictor::check_prompts(prompts).map_err(|e| e.to_string()),
            Input::Floats { .. } => Ok(()),
        }
    }

    fn forward(&mut self, input: Input) -> Result<Vec<f32>, String> {
        let probabilities = match input {
            Input::Floats { rows, data } => self.0.predict_pixels(rows, &data),
            Input::Text(prompts) => self.0.predict_text(&prompts),
        };
        probabilities.map_err(|e| e.to_string())
    }

    fn continue_text(&mut self, prompts: &[String], chars: usize) -> Result<Vec<String>, String> {
        prompts.iter().map(|p| self.0.continue_text(p, chars).map_err(|e| e.to_string())).collect()
    }
}
