//! Serve jobs end to end, with real processes: a coordinator, two agents, a `train:` job, and
//! the model it trained served by two replicas to a Python client over the coordinator's
//! HTTPS endpoint (the Open Inference Protocol), through a rolling update, a killed replica,
//! bad requests and more load than `max_queue` allows.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::*;

/// `gantry endpoints -o json`'s entry for `model`.
fn endpoint(fleet: &Fleet, model: &str) -> Option<serde_json::Value> {
    let all = fleet.json(&["endpoints"]);
    all.as_array().unwrap().iter().find(|e| e["model"] == model).cloned()
}

/// Waits until `model` has exactly `n` replicas, all ready and serving `from`.
fn wait_ready(fleet: &Fleet, model: &str, n: usize, from: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let e = endpoint(fleet, model);
        if let Some(e) = &e {
            let replicas = e["replicas"].as_array().unwrap();
            if replicas.len() == n && replicas.iter().all(|r| r["state"] == "ready" && r["from"] == from) {
                return e.clone();
            }
        }
        assert!(Instant::now() < deadline, "{model} not ready with {n} replicas of {from}: {e:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn python() -> Command {
    Command::new("python3")
}

fn client_script() -> PathBuf {
    repo_root().join("cli/tests/serving/client.py")
}

/// The Python client sending one-example requests from `threads` threads until stopped.
struct Load {
    child: Child,
    stop: PathBuf,
    out: PathBuf,
}

impl Load {
    fn start(fleet: &Fleet, dir: &Path, name: &str, url: &str, model: &str, threads: usize, token: &str) -> Load {
        let (stop, out) = (dir.join(format!("{name}.stop")), dir.join(format!("{name}.json")));
        let child = python()
            .arg(client_script())
            .args(["load", url, model])
            .arg(&stop)
            .arg(&out)
            .arg(threads.to_string())
            .env("TOKEN", token)
            .env("CA", fleet.ca())
            .spawn()
            .unwrap();
        Load { child, stop, out }
    }

    /// Stops it; the count of each status code (and of connection errors) it saw.
    fn finish(mut self) -> serde_json::Map<String, serde_json::Value> {
        std::fs::write(&self.stop, "").unwrap();
        assert!(self.child.wait().unwrap().success(), "the load client failed");
        serde_json::from_slice(&std::fs::read(&self.out).unwrap()).unwrap()
    }
}

/// Every request succeeded, and there were some.
fn all_ok(counts: &serde_json::Map<String, serde_json::Value>, what: &str) -> u64 {
    let ok = counts.get("200").and_then(|v| v.as_u64()).unwrap_or(0);
    let total: u64 = counts.values().filter_map(|v| v.as_u64()).sum();
    println!("{what}: {counts:?}");
    assert!(ok > 0 && ok == total, "{what}: requests failed: {counts:?}");
    ok
}

/// The pids of replica job `job_id`'s processes (`gantry serve-model` with that job id).
fn replica_pids(job_id: &str) -> Vec<i32> {
    let want = format!("GANTRY_JOB_ID={job_id}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("serve-model")
                && environ.split(|b| *b == 0).any(|v| v == want.as_bytes())
        })
        .collect()
}

/// `status` and body of a POST to the coordinator's HTTPS side.
fn post(fleet: &Fleet, path: &str, token: &str, body: &str) -> (u16, String) {
    let auth = format!("Authorization: Bearer {token}");
    http_request(&fleet.web(), "POST", path, &[&auth, "Content-Type: application/json"], body).unwrap()
}

#[test]
fn a_trained_model_is_served_batched_updated_and_replaced_without_dropping_requests() {
    let mut fleet = Fleet::start();
    fleet.start_agent("node-b");
    fleet.wait_for_nodes(2);
    let dir = fleet.data_dir().parent().unwrap().to_path_buf();

    // A model to serve, with checkpoints along the way.
    let train = fleet.submit(
        "name: digits\nresources: {cpus: 1}\ntrain: {model: mlp, epochs: 6, checkpoint_every_steps: 40}\nmax_restarts: 0\n",
    );
    fleet.wait_state(&train, &["succeeded"], Duration::from_secs(180));
    let logs = fleet.ok(&["logs", &train]);
    let done = logs.lines().find(|l| l.starts_with("done ")).expect("the job's final line");
    let job_accuracy: f64 = done
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("test_accuracy="))
        .expect("test_accuracy in the final line")
        .parse()
        .unwrap();
    let checkpoints = fleet.json(&["checkpoints", &train]);
    let steps: Vec<u64> = checkpoints.as_array().unwrap().iter().map(|c| c["step"].as_u64().unwrap()).collect();
    let (first, last) = (steps[0], *steps.last().unwrap());
    assert!(first < last, "checkpoints at {steps:?}");

    // Served from an early checkpoint by two replicas.
    let spec = |from: &str, replicas: u32| {
        format!(
            "name: digits-api\nreplicas: {replicas}\nresources: {{cpus: 0.5, memory_gb: 0.5}}\nretry: {{backoff: 1s}}\n\
             serve: {{from: \"{from}\", max_batch_size: 32, max_batch_delay_ms: 2}}\n"
        )
    };
    let serve = fleet.submit(&spec(&format!("{train}@{first}"), 2));
    assert_eq!(fleet.state(&serve), "running", "a serve job runs from its submission");
    let early = format!("{train}@{first}");
    wait_ready(&fleet, "digits-api", 2, &early, Duration::from_secs(60));
    let viewer = fleet.token("reader", "viewer");
    let url = format!("https://127.0.0.1:{}", fleet.web().port);

    // Updated to the final checkpoint under steady load: no request fails.
    let load = Load::start(&fleet, &dir, "update", &url, "digits-api", 4, &viewer);
    std::thread::sleep(Duration::from_secs(2));
    let updated = fleet.ok(&["serve", "update", "digits-api", "--from", &train]);
    assert!(updated.contains(&format!("job {serve}")), "{updated}");
    let latest = format!("{train}@{last}");
    let e = wait_ready(&fleet, "digits-api", 2, &latest, Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(1));
    let during_update = all_ok(&load.finish(), "requests during the rolling update");
    println!("rolling update to {latest}: {during_update} requests, none failed");
    let old: Vec<serde_json::Value> = fleet.json(&["job", &serve])["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["from"] == early.as_str())
        .cloned()
        .collect();
    assert_eq!(old.len(), 2, "both old replicas were replaced: {old:?}");
    assert!(old.iter().all(|r| r["state"] == "cancelled"), "{old:?}");

    // The served model answers a Python client with the job's own test accuracy.
    let (rows, labels) = gantry_jobs::digits_test_split().unwrap();
    let rows: Vec<&[f32]> = rows.chunks(64).collect();
    let split = dir.join("test-split.json");
    std::fs::write(&split, serde_json::to_vec(&serde_json::json!({ "rows": rows, "labels": labels })).unwrap())
        .unwrap();
    let answers = dir.join("answers.json");
    let status = python()
        .arg(client_script())
        .args(["accuracy", &url, "digits-api"])
        .arg(&split)
        .arg(&answers)
        .env("TOKEN", &viewer)
        .env("CA", fleet.ca())
        .status()
        .unwrap();
    assert!(status.success());
    let answers: serde_json::Value = serde_json::from_slice(&std::fs::read(&answers).unwrap()).unwrap();
    let served = answers["accuracy"].as_f64().unwrap();
    println!("test accuracy: the job's {job_accuracy}, served {served} ({} of {})", answers["right"], answers["total"]);
    assert_eq!(format!("{served:.4}"), format!("{job_accuracy:.4}"), "served predictions differ from the job's");

    // Each replica answers directly too, with the same probabilities.
    let one =
        serde_json::json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": rows[0]}]});
    let mut outputs = Vec::new();
    for r in e["replicas"].as_array().unwrap() {
        let direct = Web::plain(r["url"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap());
        let (code, body) = http_request(
            &direct,
            "POST",
            "/v2/models/digits-api/infer",
            &["Content-Type: application/json"],
            &one.to_string(),
        )
        .unwrap();
        assert_eq!(code, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        outputs.push(body["outputs"][0]["data"].clone());
    }
    assert_eq!(outputs[0], outputs[1]);

    // A replica killed: the other answers every request while it is replaced.
    let victim = e["replicas"][0]["job_id"].as_str().unwrap().to_string();
    let pids = replica_pids(&victim);
    assert_eq!(pids.len(), 1, "replica {victim}'s process: {pids:?}");
    let load = Load::start(&fleet, &dir, "kill", &url, "digits-api", 4, &viewer);
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill(2) of a process this test found by its job id.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let again = replica_pids(&victim);
        let e = endpoint(&fleet, "digits-api").unwrap();
        let ready = e["replicas"].as_array().unwrap().iter().filter(|r| r["state"] == "ready").count();
        if !again.is_empty() && again != pids && ready == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "replica {victim} was not restarted: {e}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    all_ok(&load.finish(), "requests while a replica was killed and restarted");
    let job = fleet.json(&["job", &victim]);
    assert_eq!(job["attempts"].as_array().unwrap().len(), 2, "restarted as its job's second attempt: {job}");

    // A node drained: its replica is replaced on the other node, with no request lost.
    let e = endpoint(&fleet, "digits-api").unwrap();
    let drained = e["replicas"][0]["node"].as_str().unwrap().to_string();
    let load = Load::start(&fleet, &dir, "drain", &url, "digits-api", 4, &viewer);
    std::thread::sleep(Duration::from_secs(1));
    fleet.ok(&["drain", &drained]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let e = endpoint(&fleet, "digits-api").unwrap();
        let replicas = e["replicas"].as_array().unwrap();
        if replicas.len() == 2 && replicas.iter().all(|r| r["state"] == "ready" && r["node"] != drained.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas still on drained {drained}: {e}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    all_ok(&load.finish(), "requests while a drained node's replica moved");
    fleet.ok(&["undrain", &drained]);

    // Bad requests: 4xx naming what is wrong.
    let infer = "/v2/models/digits-api/infer";
    let bad = [
        (r#"{"inputs": [{"name": "pixels", "shape": [1, 65], "datatype": "FP32", "data": []}]}"#, 400, "shape"),
        (r#"{"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "BYTES", "data": []}]}"#, 400, "datatype"),
        (r#"{"inputs": [{"name": "image", "shape": [1, 64], "datatype": "FP32", "data": []}]}"#, 400, "image"),
        (r#"{"inputs": [{"name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": [1, 2]}]}"#, 400, "data"),
        ("not json", 400, ""),
    ];
    for (body, code, field) in bad {
        let (got, text) = post(&fleet, infer, &viewer, body);
        assert_eq!(got, code, "{body}: {text}");
        assert!(text.contains("\"error\"") && text.contains(field), "{body}: {text}");
    }
    let (got, text) = post(&fleet, "/v2/models/no-such-model/infer", &viewer, "{}");
    assert!(got == 404 && text.contains("no-such-model"), "{got} {text}");
    let (got, _) = post(&fleet, infer, "not-a-token", &one.to_string());
    assert_eq!(got, 401);
    let (code, text) = http_get_as(&fleet.web(), "/v2/models/digits-api", &viewer).unwrap();
    assert_eq!(code, 200, "{text}");
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 64]), "{meta}");
    assert_eq!(http_get_as(&fleet.web(), "/v2/models/digits-api/ready", &viewer).unwrap().0, 200);

    // The coordinator counts what it routed; the replicas report their batches.
    let (_, metrics) = http_get_as(&fleet.web(), "/metrics", &viewer).unwrap();
    for want in [
        "gantry_serve_requests_total{model=\"digits-api\",code=\"200\"}",
        "gantry_serve_requests_total{model=\"digits-api\",code=\"400\"}",
        "gantry_serve_request_seconds_bucket{model=\"digits-api\",le=\"+Inf\"}",
        "gantry_serve_batch_size_bucket{model=\"digits-api\",replica=",
        "gantry_serve_queue_depth{model=\"digits-api\",replica=",
    ] {
        assert!(metrics.contains(want), "{want} missing from /metrics:\n{metrics}");
    }

    // The web page's view: each endpoint with its replicas, requests, errors and p99.
    let (code, text) = http_get_as(&fleet.web(), "/api/endpoints", &viewer).unwrap();
    assert_eq!(code, 200, "{text}");
    let page: serde_json::Value = serde_json::from_str(&text).unwrap();
    let api = page.as_array().unwrap().iter().find(|e| e["model"] == "digits-api").expect("digits-api on the page");
    assert_eq!(api["ready"], 2, "{api}");
    assert!(api["requests"].as_u64().unwrap() > during_update, "{api}");
    assert!(api["p99_seconds"].as_f64().is_some_and(|p| p > 0.0), "{api}");

    // More load than max_queue: refused at once with 503, not queued without bound. (Its name
    // has a space, as names may.)
    let tight = "name: tight one\nresources: {cpus: 0.5, memory_gb: 0.5}\n\
                 serve: {from: \"TRAIN\", max_batch_size: 1, max_batch_delay_ms: 0, max_queue: 1}\n"
        .replace("TRAIN", &train);
    let tight_id = fleet.submit(&tight);
    wait_ready(&fleet, "tight one", 1, &latest, Duration::from_secs(60));
    let load = Load::start(&fleet, &dir, "overload", &url, "tight one", 24, &viewer);
    std::thread::sleep(Duration::from_secs(3));
    let counts = load.finish();
    println!("24 clients against max_queue 1: {counts:?}");
    let count = |k: &str| counts.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(count("503") > 0 && count("200") > 0, "{counts:?}");
    assert_eq!(count("200") + count("503"), counts.values().filter_map(|v| v.as_u64()).sum::<u64>(), "{counts:?}");

    // Cancelled: its replicas stop and the model is gone.
    fleet.ok(&["cancel", &tight_id]);
    fleet.wait_state(&tight_id, &["cancelled"], Duration::from_secs(30));
    assert!(endpoint(&fleet, "tight one").is_none());
    let (got, _) = post(&fleet, "/v2/models/tight%20one/infer", &viewer, &one.to_string());
    assert_eq!(got, 404);
}
