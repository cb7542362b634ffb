//! `cargo bench --bench serving`: a trained model served by one replica on one core, under a
//! closed-loop load of one-example requests at rising concurrency, with batching
//! (`max_batch_size: 32`) and without (`max_batch_size: 1`). The digits MLP (the model)
//! is measured straight to the replica and through the coordinator's route, and, where `torch`
//! imports, against the same weights in PyTorch behind a minimal Python HTTP server on the same
//! core; the CNN and the transformer straight to the replica, to show where batching pays.
//! First, each model's forward pass alone in this process, at batch 1 and 32: what batching
//! can save per example at most.
//!
//! Everything runs for real: `gantry dev` (a coordinator and an agent), `train:` jobs, `serve:`
//! jobs. The replicas and the PyTorch server are pinned to core 0; this process (the load) and
//! `gantry dev` to the other cores. One JSON object per line: a line per point, then the
//! goals. `GANTRY_BENCH_SECONDS` sets each point's length (default 3).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const GANTRY: &str = env!("CARGO_BIN_EXE_gantry");
const CONCURRENCY: [usize; 4] = [1, 4, 16, 64];

/// Stops what it started when the bench ends, however it ends.
struct Started(Vec<Child>);

impl Drop for Started {
    fn drop(&mut self) {
        // SIGTERM first: `gantry dev`'s agent then stops its jobs, the replicas among them
        // (a SIGKILL would leave them running).
        for c in &mut self.0 {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for c in &mut self.0 {
            while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `gantry ARGS -o json` against the dev coordinator.
fn gantry_json(grpc: u16, args: &[&str]) -> serde_json::Value {
    let out = Command::new(GANTRY)
        .args(args)
        .args(["-o", "json"])
        .env("GANTRY_COORDINATOR", format!("http://127.0.0.1:{grpc}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "gantry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn submit(grpc: u16, dir: &Path, name: &str, spec: &str) -> String {
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, spec).unwrap();
    let out = Command::new(GANTRY)
        .args(["submit", file.to_str().unwrap()])
        .env("GANTRY_COORDINATOR", format!("http://127.0.0.1:{grpc}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "gantry submit: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Pins every thread of `pid` to `cores` (a taskset list).
fn pin(pid: u32, cores: &str) {
    let ok = Command::new("taskset").args(["-a", "-cp", cores, &pid.to_string()]).stdout(Stdio::null()).status();
    assert!(ok.is_ok_and(|s| s.success()), "taskset of {pid}");
}

/// The pid of replica job `job_id` (`gantry serve-model` with that job id in its environment).
fn replica_pid(job_id: &str) -> Option<u32> {
    let want = format!("GANTRY_JOB_ID={job_id}");
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).find(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains("serve-model")
            && environ.split(|b| *b == 0).any(|v| v == want.as_bytes())
    })
}

/// One request and its answer on a kept-alive HTTP/1.1 connection; the status code.
async fn exchange(conn: &mut tokio::io::BufReader<tokio::net::TcpStream>, request: &[u8]) -> std::io::Result<u16> {
    conn.get_mut().write_all(request).await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0;
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await?;
    Ok(status)
}

struct Point {
    requests: usize,
    errors: usize,
    seconds: f64,
    latencies_ms: Vec<f64>,
}

impl Point {
    fn quantile(&self, q: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        self.latencies_ms[((self.latencies_ms.len() - 1) as f64 * q).round() as usize]
    }
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// `concurrency` connections each sending requests back to back for `seconds` (after a warm-up
/// of a quarter of that, not counted).
fn load(addr: &str, path: &str, body: &str, concurrency: usize, seconds: f64) -> Point {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let warm = Instant::now() + Duration::from_secs_f64(seconds / 4.0);
        let end = warm + Duration::from_secs_f64(seconds);
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (request, addr) = (request.clone(), addr.to_string());
                tokio::spawn(async move {
                    let (mut latencies, mut errors) = (Vec::new(), 0);
                    let mut conn = None;
                    loop {
                        let began = Instant::now();
                        if began >= end {
                            break;
                        }
                        if conn.is_none() {
                            match tokio::net::TcpStream::connect(&addr).await {
                                Ok(s) => {
                                    let _ = s.set_nodelay(true);
                                    conn = Some(tokio::io::BufReader::new(s));
                                }
                                Err(_) => {
                                    errors += 1;
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                    continue;
                                }
                            }
                        }
                        let result = exchange(conn.as_mut().unwrap(), &request).await;
                        let counted = began >= warm;
                        match result {
                            Ok(200) if counted => latencies.push(began.elapsed().as_secs_f64() * 1000.0),
                            Ok(200) => {}
                            Ok(_) => errors += usize::from(counted),
                            Err(_) => {
                                errors += usize::from(counted);
                                conn = None;
                            }
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut point = Point { requests: 0, errors: 0, seconds, latencies_ms: Vec::new() };
        for t in tasks {
            let (latencies, errors) = t.await.unwrap();
            point.requests += latencies.len();
            point.errors += errors;
            point.latencies_ms.extend(latencies);
        }
        point.latencies_ms.sort_by(f64::total_cmp);
        point
    })
}

/// Serves `train`'s model twice, batched and not, on core 0; returns `(name, max_batch_size,
/// replica address, serve job id)` of each.
fn serve_pair(grpc: u16, dir: &Path, kind: &str, train: &str) -> Vec<(String, u32, String, String)> {
    let mut out = Vec::new();
    for (suffix, batch) in [("batched", 32), ("unbatched", 1)] {
        let model = format!("{kind}-{suffix}");
        let spec = format!(
            "name: {model}\nresources: {{cpus: 1}}\nserve: {{from: \"{train}\", max_batch_size: {batch}, max_batch_delay_ms: 2}}\n"
        );
        let job = submit(grpc, dir, &model, &spec);
        let mut replica = None;
        wait_for(&model, Duration::from_secs(60), || {
            let all = gantry_json(grpc, &["endpoints"]);
            let e = all.as_array().unwrap().iter().find(|e| e["model"] == model.as_str()).cloned();
            replica = e.and_then(|e| e["replicas"].as_array()?.iter().find(|r| r["state"] == "ready").cloned());
            replica.is_some()
        });
        let replica = replica.unwrap();
        let pid = replica_pid(replica["job_id"].as_str().unwrap()).expect("the replica's process");
        pin(pid, "0");
        let direct = replica["url"].as_str().unwrap().trim_start_matches("http://").to_string();
        out.push((model, batch, direct, job));
    }
    out
}

/// The forward pass alone, in this process: microseconds per call at batch 1 and 32 (median
/// of 200 calls each), what batching can save per example at most.
fn forward_alone(kind: &str, checkpoint: &Path) {
    let predictor = gantry_jobs::Predictor::load(checkpoint).unwrap();
    for rows in [1usize, 32] {
        let pixels: Vec<f32> = (0..rows * 64).map(|i| (i % 17) as f32 / 16.0).collect();
        let prompts = vec!["And God said, Let there be light: and there was light. And God saw".to_string(); rows];
        let mut times: Vec<f64> = (0..200)
            .map(|_| {
                let began = Instant::now();
                match predictor.input_width() {
                    Some(_) => std::hint::black_box(predictor.predict_pixels(rows, &pixels).unwrap()),
                    None => std::hint::black_box(predictor.predict_text(&prompts).unwrap()),
                };
                began.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "{}",
            json!({"bench": "serving", "forward_alone": kind, "batch": rows, "us_per_call": median,
                   "us_per_example": median / rows as f64})
        );
    }
}

/// One example as each model takes it: a digit's pixels, or 64 characters of text.
fn example(kind: &str) -> String {
    match kind {
        "transformer" => {
            let prompt = "And God said, Let there be light: and there was light. And God saw";
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [prompt]}]}).to_string()
        }
        _ => {
            let row: Vec<f32> = (0..64).map(|i| (i % 17) as f32 / 16.0).collect();
            json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": row}]}).to_string()
        }
    }
}

/// One line per point.
fn report(setup: &str, batch: u32, route: &str, concurrency: usize, p: &Point) {
    println!(
        "{}",
        json!({
            "bench": "serving", "setup": setup, "max_batch_size": batch, "route": route,
            "concurrency": concurrency, "seconds": p.seconds, "requests": p.requests, "errors": p.errors,
            "throughput_rps": p.throughput(), "p50_ms": p.quantile(0.5), "p99_ms": p.quantile(0.99),
        })
    );
}

fn main() {
    let seconds: f64 = std::env::var("GANTRY_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert!(cores >= 2, "the serving bench needs 2 cores: one for the replica, one for the load");
    let rest = format!("1-{}", cores - 1);
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let dev = Command::new(GANTRY)
        .args(["dev", "--listen", &format!("127.0.0.1:{grpc}"), "--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("dev.log")).unwrap())
        .spawn()
        .unwrap();
    let dev_pid = dev.id();
    let mut started = Started(vec![dev]);
    // This process, the load, runs beside the coordinator, away from the replicas' core (and
    // only now: what it starts inherits this, and the agent must count every CPU).
    pin(std::process::id(), &rest);
    wait_for("gantry dev", Duration::from_secs(30), || {
        Command::new(GANTRY)
            .args(["nodes"])
            .env("GANTRY_COORDINATOR", format!("http://127.0.0.1:{grpc}"))
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ready"))
    });

    let mut trained = Vec::new();
    for (kind, epochs) in [("mlp", 10), ("cnn", 3), ("transformer", 1)] {
        let dataset = if kind == "transformer" { "genesis" } else { "digits" };
        let spec =
            format!("name: {kind}\ntrain: {{model: {kind}, dataset: {dataset}, epochs: {epochs}}}\nmax_restarts: 0\n");
        let train = submit(grpc, dir.path(), &format!("train-{kind}"), &spec);
        wait_for("the train job", Duration::from_secs(300), || {
            gantry_json(grpc, &["job", &train])["state"] == "succeeded"
        });
        let weights = dir.path().join(format!("weights-{kind}"));
        let out = Command::new(GANTRY)
            .args(["checkpoint", "download", &train, "--out"])
            .arg(&weights)
            .env("GANTRY_COORDINATOR", format!("http://127.0.0.1:{grpc}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        forward_alone(kind, &weights);
        trained.push((kind, train, weights));
    }
    // Pinned only now: its agent counts the CPUs it may use when it starts, and the replicas
    // need both counted.
    pin(dev_pid, &rest);

    // The PyTorch baseline, where torch imports: the MLP's weights, on the replicas' core.
    let torch = Command::new("python3").args(["-c", "import torch, numpy"]).stderr(Stdio::null()).status();
    let mut torch_addr = None;
    if torch.is_ok_and(|s| s.success()) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/serving_torch.py");
        let port = free_port();
        let mut child = Command::new("taskset")
            .args(["-c", "0", "python3"])
            .arg(script)
            .arg(&trained[0].2)
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("listening"), "the PyTorch server: {line}");
        started.0.push(child);
        torch_addr = Some(format!("127.0.0.1:{port}"));
    } else {
        println!(
            "{}",
            json!({"bench": "serving", "setup": "pytorch", "skipped": "torch (and numpy) do not import here"})
        );
    }

    let via = format!("127.0.0.1:{http}");
    let mut results = std::collections::HashMap::new();
    for (kind, train, _) in &trained {
        // One model's replicas at a time, each alone on core 0.
        let pair = serve_pair(grpc, dir.path(), kind, train);
        for concurrency in CONCURRENCY {
            let mut points = Vec::new();
            for (model, batch, direct, _) in &pair {
                let path = format!("/v2/models/{model}/infer");
                points.push((model.clone(), *batch, "direct", direct.clone(), path.clone()));
                // Through the coordinator: the MLP only, the cheapest model, where its cost shows most.
                if *kind == "mlp" {
                    points.push((model.clone(), *batch, "coordinator", via.clone(), path));
                }
            }
            if let (Some(addr), "mlp") = (&torch_addr, *kind) {
                points.push(("pytorch".into(), 1, "direct", addr.clone(), "/v2/models/torch/infer".into()));
            }
            let body = example(kind);
            for (setup, batch, route, addr, path) in points {
                let p = load(&addr, &path, &body, concurrency, seconds);
                report(&setup, batch, route, concurrency, &p);
                results.insert((setup, route, concurrency), p);
            }
        }
        for (_, _, _, job) in &pair {
            gantry_json(grpc, &["cancel", job]);
        }
    }

    // The goals, from the points above.
    let at = |setup: &str, route: &'static str, c: usize| -> &Point { &results[&(setup.to_string(), route, c)] };
    for kind in ["mlp", "cnn", "transformer"] {
        let batched = at(&format!("{kind}-batched"), "direct", 64);
        let unbatched = at(&format!("{kind}-unbatched"), "direct", 64);
        let ratio = batched.throughput() / unbatched.throughput();
        println!(
            "{}",
            json!({"goal": "batching at concurrency 64, direct: >= 3x unbatched throughput with p99 < 10 ms",
                   "model": kind, "ratio": ratio, "p99_ms": batched.quantile(0.99),
                   "met": ratio >= 3.0 && batched.quantile(0.99) < 10.0})
        );
    }
    if torch_addr.is_some() {
        let (batched, torch) = (at("mlp-batched", "direct", 64), at("pytorch", "direct", 64));
        let ratio = batched.throughput() / torch.throughput();
        println!(
            "{}",
            json!({"goal": "batched MLP at concurrency 64: >= 5x the PyTorch server's throughput, at no worse p99",
                   "ratio": ratio, "p99_ms": batched.quantile(0.99), "pytorch_p99_ms": torch.quantile(0.99),
                   "met": ratio >= 5.0 && batched.quantile(0.99) <= torch.quantile(0.99)})
        );
    }
    for c in CONCURRENCY {
        let cost = at("mlp-batched", "coordinator", c).quantile(0.5) - at("mlp-batched", "direct", c).quantile(0.5);
        println!(
            "{}",
            json!({"goal": "the coordinator's route costs at most 1 ms of p50", "concurrency": c,
                   "p50_cost_ms": cost, "met": cost <= 1.0})
        );
    }
}
