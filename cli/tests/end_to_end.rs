//! The whole path with separate processes: `gantry coordinator`, `gantry agent` and the CLI on
//! free loopback ports.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{Fleet, free_port, processes_in_group, repo_root, sha256_file};

#[test]
fn digits_job_trains_to_93_percent_and_its_checkpoint_downloads_intact() {
    let fleet = Fleet::start();
    let id = fleet.submit_file(&repo_root().join("examples/digits-mlp.yaml"));
    fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(300));
    assert_eq!(fleet.state(&id), "succeeded", "{}", fleet.ok(&["logs", &id]));

    let logs = fleet.ok(&["logs", &id]);
    let epochs: Vec<&str> = logs.lines().filter(|l| l.starts_with("epoch=")).collect();
    assert_eq!(epochs.len(), 30, "one line per epoch:\n{logs}");
    let done = logs.lines().find(|l| l.starts_with("done ")).expect("a final line");
    let accuracy: f64 = done
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("test_accuracy="))
        .and_then(|v| v.parse().ok())
        .expect("test_accuracy in the final line");
    println!("digits test accuracy: {accuracy}");
    assert!(accuracy >= 0.93, "accuracy {accuracy}");
    // The last epoch's figures reached the coordinator through GANTRY_METRICS_FILE.
    let metrics = &fleet.json(&["job", &id])["metrics"][0];
    assert_eq!(metrics["step"], 690, "{metrics}");
    let reported = metrics["values"]["test_accuracy"].as_f64().unwrap();
    assert!((reported - accuracy).abs() <= 5e-5, "the log rounds to 4 places: {metrics}");
    for name in ["loss", "samples_per_s", "step_time_ms", "epoch"] {
        assert!(metrics["values"][name].as_f64().is_some(), "{name} in {metrics}");
    }

    let checkpoints = fleet.json(&["checkpoints", &id]);
    let list = checkpoints.as_array().unwrap();
    assert!(!list.is_empty());
    let latest = list.last().unwrap();
    assert_eq!(latest["step"], 690);
    let out = fleet.dir.path().join("download");
    fleet.ok(&["checkpoint", "download", &id, "--out", out.to_str().unwrap()]);
    let files = latest["files"].as_array().unwrap();
    assert!(files.len() >= 3, "model, optimizer and state: {files:?}");
    for f in files {
        let path = out.join(f["path"].as_str().unwrap());
        assert_eq!(sha256_file(&path), f["sha256"].as_str().unwrap(), "{}", path.display());
    }
    let total: u64 = files.iter().map(|f| f["size"].as_u64().unwrap()).sum();
    assert_eq!(latest["bytes"].as_u64().unwrap(), total);

    // The weights leave gantry as SafeTensors: Hugging Face's own reader loads them, and a
    // NumPy forward pass in PyTorch's layout classifies the digits as well as the runtime does.
    let check = r#"
import sys, numpy as np
from safetensors.numpy import load_file
w = load_file(sys.argv[1])
assert w["fc1.weight"].shape == (128, 64) and w["fc1.weight"].dtype == np.float32
data = np.loadtxt(sys.argv[2], delimiter=",")
x, y = data[:, :64] / 16.0, data[:, 64]
h = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
print((np.argmax(h @ w["fc2.weight"].T + w["fc2.bias"], axis=1) == y).mean())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", check])
        .arg(out.join("model.safetensors"))
        .arg(repo_root().join("jobs/data/digits.csv"))
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let numpy_accuracy: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    println!("accuracy of the exported weights in NumPy, all 1,797 digits: {numpy_accuracy:.4}");
    assert!(numpy_accuracy >= 0.95, "{numpy_accuracy}");
}

#[test]
fn command_job_output_arrives_whole_and_in_order_with_a_50mb_checkpoint() {
    let fleet = Fleet::start();
    let script = r#"
i=0
while [ $i -lt 10000 ]; do echo "line $i"; i=$((i+1)); done
mkdir -p "$GANTRY_CHECKPOINT_DIR/.tmp"
head -c 52428800 /dev/urandom > "$GANTRY_CHECKPOINT_DIR/.tmp/weights.bin"
echo "{\"job\": \"$GANTRY_JOB_ID\", \"attempt\": $GANTRY_ATTEMPT, \"rank\": $RANK, \"world\": $WORLD_SIZE}" > "$GANTRY_CHECKPOINT_DIR/.tmp/state.json"
mv "$GANTRY_CHECKPOINT_DIR/.tmp" "$GANTRY_CHECKPOINT_DIR/step-1"
echo "cuda=[$CUDA_VISIBLE_DEVICES] resume=[${GANTRY_RESUME_DIR:-unset}]"
echo "kernel_cache=[$GANTRY_KERNEL_CACHE]"
"#;
    let spec = format!("name: lines\ncommand: [\"bash\", \"-c\", {}]\n", serde_json::to_string(script).unwrap());
    let id = fleet.submit(&spec);
    assert_eq!(fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(120)), "succeeded");

    let logs = fleet.ok(&["logs", &id]);
    let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with("line ")).collect();
    let expected: Vec<String> = (0..10000).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected, "every line, once, in order");
    assert!(
        logs.contains("cuda=[] resume=[unset]"),
        "a CPU job sees no GPU and no resume dir:\n{}",
        &logs[logs.len().saturating_sub(300)..]
    );
    // The agent's GPU kernel cache, shared by its jobs.
    let cache = fleet.work_dir("node-a").join("kernel-cache");
    assert!(
        logs.contains(&format!("kernel_cache=[{}]", cache.display())),
        "{}",
        &logs[logs.len().saturating_sub(300)..]
    );

    let listed = fleet.json(&["checkpoints", &id]);
    let ckpt = &listed.as_array().unwrap()[0];
    assert_eq!(ckpt["step"], 1);
    let out = fleet.dir.path().join("download");
    fleet.ok(&["checkpoint", "download", &id, "--step", "1", "--out", out.to_str().unwrap()]);
    let original = fleet.work_dir("node-a").join(format!("jobs/{id}/attempt-1-rank-0/checkpoints/step-1"));
    for name in ["weights.bin", "state.json"] {
        assert_eq!(sha256_file(&out.join(name)), sha256_file(&original.join(name)), "{name}");
    }
    assert_eq!(std::fs::metadata(out.join("weights.bin")).unwrap().len(), 52428800);
    let state = std::fs::read_to_string(out.join("state.json")).unwrap();
    assert!(state.contains(&format!("\"job\": \"{id}\"")) && state.contains("\"world\": 1"), "{state}");
}

#[test]
fn cancel_stops_the_whole_process_group_within_the_grace_period() {
    let fleet = Fleet::start();
    // The job and its child ignore SIGTERM: only the SIGKILL after the grace period stops them.
    let script = r#"trap '' TERM; sleep 1000 & echo "pgid $(cut -d' ' -f5 /proc/$$/stat)"; echo started; wait"#;
    let spec = format!("name: stubborn\ncommand: [\"bash\", \"-c\", {}]\n", serde_json::to_string(script).unwrap());
    let id = fleet.submit(&spec);
    fleet.wait_state(&id, &["running"], Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    let pgid: i32 = loop {
        let logs = fleet.ok(&["logs", &id]);
        if let Some(p) = logs.lines().find_map(|l| l.strip_prefix("pgid ")) {
            break p.trim().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "job did not start: {logs}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(processes_in_group(pgid).len() >= 2, "bash and sleep run in the job's group");

    let asked = Instant::now();
    fleet.ok(&["cancel", &id]);
    assert_eq!(fleet.wait_state(&id, &["cancelled"], Duration::from_secs(30)), "cancelled");
    let took = asked.elapsed();
    assert!(processes_in_group(pgid).is_empty(), "group {pgid} still has {:?}", processes_in_group(pgid));
    println!("cancel to cancelled, group gone: {took:?} (grace period {})", fleet.grace);
    // Grace period (3 s) plus the time to notice; far below the 1000 s the job would run.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let job = fleet.json(&["job", &id]);
    assert_eq!(job["attempt"], 1);
}

#[test]
fn kill_9_of_the_coordinator_loses_no_job_and_running_work_continues() {
    // The default timeout: agents keep their jobs through 7 s without a coordinator.
    let mut fleet = Fleet::with_timeouts("3s", "10s");
    let ticker = r#"for i in $(seq 1 30); do echo "tick $i"; sleep 0.2; done"#;
    let spec = format!(
        "name: ticker\nresources: {{cpus: 1}}\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(ticker).unwrap()
    );
    let ids: Vec<String> = (0..4).map(|_| fleet.submit(&spec)).collect();
    fleet.wait_state(&ids[0], &["running"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));

    fleet.kill_coordinator();
    // Work goes on while the coordinator is away.
    std::thread::sleep(Duration::from_secs(2));
    fleet.start_coordinator();
    fleet.wait_for_nodes(1);

    let listed = fleet.json(&["jobs"]);
    let mut listed_ids: Vec<String> =
        listed.as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    listed_ids.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed_ids, want, "every acknowledged submit survived");

    for id in &ids {
        assert_eq!(fleet.wait_state(id, &["succeeded", "failed"], Duration::from_secs(90)), "succeeded", "job {id}");
        let logs = fleet.ok(&["logs", id]);
        let ticks: Vec<&str> = logs.lines().filter(|l| l.starts_with("tick ")).collect();
        let expected: Vec<String> = (1..=30).map(|i| format!("tick {i}")).collect();
        assert_eq!(ticks, expected, "job {id}: all output, once, in order");
    }
    // The job that ran through the crash was not restarted: one attempt.
    assert_eq!(fleet.json(&["job", &ids[0]])["attempt"], 1);
}

#[test]
fn bad_specs_are_refused_with_the_field_and_nothing_is_queued() {
    let fleet = Fleet::start();
    let cases = [
        ("name: x\ncommand: [true]\nresources:\n  gpuz: 1\n", "unknown field `gpuz`"),
        ("name: x\ncommand: [true]\nresources:\n  gpus: -1\n", "resources.gpus"),
        ("name: x\ncommand: [true]\ntrain: {}\n", "not several"),
        ("name: x\n", "exactly one of `train`, `command` and `serve`"),
        ("name: x\ncommand: [true\n", "broken YAML"),
        ("name: x\npriority: 101\ncommand: [true]\n", "priority"),
    ];
    for (spec, want) in cases {
        let file = fleet.dir.path().join("bad.yaml");
        std::fs::write(&file, spec).unwrap();
        let out = fleet.gantry(&["submit", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{spec:?} was accepted");
        assert!(stderr.contains(want), "{spec:?}: stderr {stderr:?} lacks {want:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr:?}");
        assert!(out.stdout.is_empty(), "no job id printed");
    }
    assert_eq!(fleet.json(&["jobs"]), serde_json::json!([]), "nothing was queued");
}

#[test]
fn cli_without_a_coordinator_says_so_in_one_line() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = std::process::Command::new(support::GANTRY).args(["jobs", "--coordinator", &url]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot reach the coordinator") && stderr.contains(&url), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn an_agent_of_another_protocol_version_is_refused_at_registration() {
    use gantry_proto::v1;
    let fleet = Fleet::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let tls = fleet.join_as("future").await;
        let channel = gantry_proto::endpoint(&fleet.url(), &tls).unwrap().connect().await.unwrap();
        let mut client = v1::agents_client::AgentsClient::new(channel);
        let req = v1::RegisterRequest {
            protocol_version: gantry_proto::PROTOCOL_VERSION + 1,
            name: "future".into(),
            inventory: Some(v1::Inventory::default()),
            ..Default::default()
        };
        client.register(req).await.unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("protocol version"), "{}", status.message());
    // And the real agent's own version is accepted: it is connected.
    fleet.wait_for_nodes(1);
}

#[test]
fn a_failed_attempt_restarts_from_its_latest_checkpoint() {
    let fleet = Fleet::start();
    // Attempt 1 commits step-5 and fails; attempt 2 must find it in GANTRY_RESUME_DIR.
    let script = r#"
if [ -z "${GANTRY_RESUME_DIR:-}" ]; then
  mkdir -p "$GANTRY_CHECKPOINT_DIR/.tmp" && echo "weights from attempt $GANTRY_ATTEMPT" > "$GANTRY_CHECKPOINT_DIR/.tmp/w.txt"
  mv "$GANTRY_CHECKPOINT_DIR/.tmp" "$GANTRY_CHECKPOINT_DIR/step-5"
  echo "failing on purpose"; exit 3
fi
echo "attempt $GANTRY_ATTEMPT resumed with: $(cat "$GANTRY_RESUME_DIR/w.txt")"
"#;
    let spec = format!(
        "name: flaky\nmax_restarts: 1\nretry: {{backoff: 1s}}\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    );
    let id = fleet.submit(&spec);
    assert_eq!(fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(60)), "succeeded");
    let job = fleet.json(&["job", &id]);
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["attempts"][0]["exit_code"], 3);
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains("attempt 2 resumed with: weights from attempt 1"), "{logs}");
    let failing = logs.find("failing on purpose").unwrap();
    assert!(logs[failing..].contains("--- attempt 2 ---"), "attempts in order:\n{logs}");
}

#[test]
fn a_train_job_can_start_from_another_jobs_checkpoint() {
    let fleet = Fleet::start();
    let pretrain = fleet.submit("name: pretrain\ntrain: {epochs: 2}\n");
    assert_eq!(fleet.wait_state(&pretrain, &["succeeded", "failed"], Duration::from_secs(120)), "succeeded");
    let finetune = fleet.submit(&format!("name: finetune\ntrain: {{epochs: 1, init_from: \"{pretrain}@46\"}}\n"));
    assert_eq!(fleet.wait_state(&finetune, &["succeeded", "failed"], Duration::from_secs(120)), "succeeded");
    let logs = fleet.ok(&["logs", &finetune]);
    assert!(logs.contains(&format!("resuming from job {pretrain} step 46")), "{logs}");
    assert!(logs.contains("initialised weights from="), "weights only, a fresh run:\n{logs}");
    // A reference to a job that does not exist is refused at submit.
    let file = fleet.dir.path().join("bad-init.yaml");
    std::fs::write(&file, "name: x\ntrain: {init_from: \"999\"}\n").unwrap();
    let out = fleet.gantry(&["submit", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("job 999 does not exist"));
}

#[test]
fn a_preempted_job_checkpoints_requeues_and_resumes_without_a_new_attempt() {
    let fleet = Fleet::start();
    // Each job asks for every CPU of the only node, so the urgent one must preempt.
    let cpus = fleet.json(&["nodes"])[0]["cpus"].as_u64().unwrap();
    let victim = r#"
if [ -n "${GANTRY_RESUME_DIR:-}" ]; then echo "resumed from $(cat "$GANTRY_RESUME_DIR/state")"; exit 0; fi
trap 'mkdir -p "$GANTRY_CHECKPOINT_DIR/.tmp"; echo "step 7" > "$GANTRY_CHECKPOINT_DIR/.tmp/state"; mv "$GANTRY_CHECKPOINT_DIR/.tmp" "$GANTRY_CHECKPOINT_DIR/step-7"; exit 143' TERM
echo started
while true; do sleep 0.1; done
"#;
    let low = fleet.submit(&format!(
        "name: low\npriority: 10\nresources: {{cpus: {cpus}}}\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(victim).unwrap()
    ));
    fleet.wait_state(&low, &["running"], Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fleet.ok(&["logs", &low]).contains("started") {
        assert!(Instant::now() < deadline, "the low-priority job did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let high = fleet.submit(&format!(
        "name: urgent\npriority: 90\nresources: {{cpus: {cpus}}}\ncommand: [\"bash\", \"-c\", \"echo urgent work done\"]\n"
    ));
    assert_eq!(fleet.wait_state(&high, &["succeeded", "failed"], Duration::from_secs(60)), "succeeded");
    assert_eq!(fleet.wait_state(&low, &["succeeded", "failed"], Duration::from_secs(60)), "succeeded");
    let logs = fleet.ok(&["logs", &low]);
    assert!(logs.contains("resumed from step 7"), "{logs}");
    let job = fleet.json(&["job", &low]);
    assert_eq!(job["attempt"], 1, "a preemption is not a failed attempt: {job}");
    assert_eq!(fleet.json(&["checkpoints", &low])[0]["step"], 7);
}

#[test]
fn a_gang_is_requeued_only_after_every_rank_of_the_failed_attempt_has_stopped() {
    let mut fleet = Fleet::start();
    fleet.start_agent("node-b");
    fleet.wait_for_nodes(2);
    let marks = fleet.dir.path().join("marks");
    support::job_writable_dir(&marks);
    // Attempt 1: rank 1 fails at once; rank 0 takes a second to stop. Attempt 2 must start after.
    let script = format!(
        r#"
if [ "$GANTRY_ATTEMPT" = 1 ]; then
  if [ "$RANK" = 1 ]; then
    # Fail only once rank 0 is ready for its SIGTERM, so the test does not race its trap.
    while [ ! -e {m}/attempt1-rank0-ready ]; do sleep 0.05; done
    echo "rank 1 failing"; exit 1
  fi
  trap 'sleep 1; date +%s%N > {m}/attempt1-rank0-end; exit 143' TERM
  touch {m}/attempt1-rank0-ready
  while true; do sleep 0.1; done
fi
date +%s%N > {m}/attempt2-rank$RANK-start
echo "attempt 2 rank $RANK of $WORLD_SIZE"
"#,
        m = marks.display()
    );
    let spec = format!(
        "name: gang\nmax_restarts: 1\nretry: {{backoff: 1s}}\nresources: {{nodes: 2, cpus: 1}}\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(&script).unwrap()
    );
    let id = fleet.submit(&spec);
    assert_eq!(fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(60)), "succeeded");
    assert_eq!(fleet.json(&["job", &id])["attempt"], 2);
    let read = |name: &str| -> u128 { std::fs::read_to_string(marks.join(name)).unwrap().trim().parse().unwrap() };
    let ended = read("attempt1-rank0-end");
    for rank in 0..2 {
        let started = read(&format!("attempt2-rank{rank}-start"));
        assert!(started > ended, "rank {rank} of attempt 2 started before attempt 1 had stopped");
    }
}

/// An agent that goes silent without closing its connection (frozen here; a cut-off network
/// does the same) is shown disconnected after the agent timeout, its job runs elsewhere, and it
/// rejoins when it wakes.
#[test]
fn a_frozen_agent_is_shown_disconnected_its_job_moves_and_it_rejoins_when_it_wakes() {
    let mut fleet = Fleet::start();
    fleet.start_agent("node-b");
    fleet.wait_for_nodes(2);
    let job = fleet.submit("name: sleeper\nresources: {cpus: 1}\ncommand: [\"sleep\", \"600\"]\n");
    fleet.wait_state(&job, &["running"], Duration::from_secs(30));
    let first = fleet.json(&["job", &job])["nodes"][0].as_str().unwrap().to_string();
    let index = if first == "node-a" { 0 } else { 1 };
    let pid = fleet.agents[index].id().to_string();
    let connected = |fleet: &Fleet| {
        let nodes = fleet.json(&["nodes"]);
        nodes.as_array().unwrap().iter().find(|n| n["name"] == first.as_str()).unwrap()["connected"] == true
    };
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected(&fleet) {
        assert!(Instant::now() < deadline, "the frozen agent {first} is still shown connected");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.json(&["job", &job])["nodes"][0] == first.as_str() || fleet.state(&job) != "running" {
        assert!(Instant::now() < deadline, "the job did not move: {}", fleet.json(&["job", &job]));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !connected(&fleet) {
        assert!(Instant::now() < deadline, "the woken agent {first} did not rejoin");
        std::thread::sleep(Duration::from_millis(200));
    }
    fleet.ok(&["cancel", &job]);
}

/// An agent told to stop (SIGTERM: the machine is leaving) stops its jobs and falls silent at
/// once, before they have exited: their exits (143) must not reach the coordinator as failures.
/// The job is lost with its agent and runs elsewhere, without counting against max_restarts.
#[test]
fn a_stopping_agent_falls_silent_before_its_jobs_exit_and_they_move_elsewhere() {
    let mut fleet = Fleet::start();
    fleet.start_agent("node-b");
    fleet.wait_for_nodes(2);
    // A job that takes 4 s to stop: the agent is still alive, stopping it, all that time.
    let slow = r#"trap 'sleep 4; exit 143' TERM; echo ready; sleep 600 & wait"#;
    let spec = format!(
        "name: slow-stop\nmax_restarts: 0\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(slow).unwrap()
    );
    let job = fleet.submit(&spec);
    fleet.wait_state(&job, &["running"], Duration::from_secs(30));
    let first = fleet.json(&["job", &job])["nodes"][0].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fleet.ok(&["logs", &job]).contains("ready") {
        assert!(Instant::now() < deadline, "the job never said it was ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let index = if first == "node-a" { 0 } else { 1 };
    assert!(Command::new("kill").arg(fleet.agents[index].id().to_string()).status().unwrap().success());

    let connected = |fleet: &Fleet| {
        let nodes = fleet.json(&["nodes"]);
        nodes.as_array().unwrap().iter().find(|n| n["name"] == first.as_str()).unwrap()["connected"] == true
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while connected(&fleet) {
        assert!(Instant::now() < deadline, "{first} still talks to the coordinator 3 s after it was told to stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(fleet.agents[index].try_wait().unwrap().is_none(), "{first} had exited already: silence proves nothing");

    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let view = fleet.json(&["job", &job]);
        assert_ne!(view["state"], "failed", "the stopped job's exit was reported as a failure: {view}");
        if view["state"] == "running" && view["nodes"][0] != first.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "the job did not move: {view}");
        std::thread::sleep(Duration::from_millis(200));
    }
    fleet.ok(&["cancel", &job]);
}

#[test]
fn a_drained_node_keeps_its_jobs_and_takes_no_new_ones_until_undrained() {
    let fleet = Fleet::start();
    let ticker = r#"for i in $(seq 1 20); do echo "tick $i"; sleep 0.1; done"#;
    let spec = format!("name: ticker\ncommand: [\"bash\", \"-c\", {}]\n", serde_json::to_string(ticker).unwrap());
    let running = fleet.submit(&spec);
    fleet.wait_state(&running, &["running", "succeeded"], Duration::from_secs(30));
    fleet.ok(&["drain", "node-a"]);
    assert_eq!(fleet.json(&["nodes"])[0]["drained"], true);
    let waiting = fleet.submit(&spec);
    // The running job finishes; the new one waits, and says why.
    assert_eq!(fleet.wait_state(&running, &["succeeded", "failed"], Duration::from_secs(30)), "succeeded");
    std::thread::sleep(Duration::from_millis(1500));
    let job = fleet.json(&["job", &waiting]);
    assert_eq!(job["state"], "queued");
    assert!(job["pending_reason"].as_str().unwrap().contains("drained"), "{job}");
    fleet.ok(&["undrain", "node-a"]);
    assert_eq!(fleet.wait_state(&waiting, &["succeeded", "failed"], Duration::from_secs(30)), "succeeded");
    // An unknown node is a clear error.
    let out = fleet.gantry(&["drain", "no-such-node"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named no-such-node"));
}

#[test]
fn a_rank_much_slower_than_the_others_is_flagged_as_a_straggler() {
    let mut fleet = Fleet::start();
    fleet.start_agent("node-b");
    fleet.wait_for_nodes(2);
    // Two ranks on two nodes; rank 1 reports steps three times as long as rank 0's.
    let script = r#"trap 'exit 143' TERM
for i in $(seq 1 600); do
  echo "{\"step\": $i, \"step_time_ms\": $(( RANK == 1 ? 300 : 100 ))}" >> "$GANTRY_METRICS_FILE"; sleep 0.1
done"#;
    let id = fleet.submit(&format!(
        "name: gang\nresources: {{nodes: 2, cpus: 0.5}}\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let job = fleet.json(&["job", &id]);
        if job["metrics"].as_array().is_some_and(|m| m.len() == 2) {
            break job["metrics"].clone();
        }
        assert!(Instant::now() < deadline, "no metrics from both ranks: {job}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!((metrics[0]["rank"].as_u64(), metrics[0]["straggler"].as_bool()), (Some(0), Some(false)));
    assert_eq!((metrics[1]["rank"].as_u64(), metrics[1]["straggler"].as_bool()), (Some(1), Some(true)));
    assert!(fleet.ok(&["job", &id]).contains("rank 1 step"));
    assert!(fleet.ok(&["job", &id]).contains("straggler"));
    let (_, text) = support::http_get_as(&fleet.web(), "/metrics", &fleet.admin_token).unwrap();
    assert!(text.contains(&format!("gantry_job_straggler{{job=\"{id}\",rank=\"1\"}} 1")), "{text}");
    fleet.ok(&["cancel", &id]);
}

/// A data-parallel gang of 2 nodes x 1 rank, through gantry on two agents, trains the same
/// weights as one process on one node: the ranks find each other from MASTER_ADDR and
/// MASTER_PORT and average gradients every step.
#[test]
fn a_two_node_data_parallel_gang_matches_the_single_node_run() {
    let mut fleet = Fleet::start();
    fleet.start_agent("node-b");
    fleet.wait_for_nodes(2);
    let train = "train: {model: mlp, epochs: 3, checkpoint_every_steps: 1000}";
    let gang = fleet.submit(&format!("name: dp-gang\nresources: {{nodes: 2, cpus: 1}}\n{train}\n"));
    let single = fleet.submit(&format!("name: dp-single\nresources: {{nodes: 1, cpus: 1}}\n{train}\n"));
    for id in [&gang, &single] {
        let state = fleet.wait_state(id, &["succeeded", "failed"], Duration::from_secs(180));
        assert_eq!(state, "succeeded", "{}", fleet.ok(&["logs", id]));
    }
    let job = fleet.json(&["job", &gang]);
    let nodes: std::collections::BTreeSet<&str> =
        job["nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 2, "one rank per node: {job}");
    let logs = fleet.ok(&["logs", &gang]);
    for rank in 0..2 {
        assert!(logs.contains(&format!("joined rank={rank} world_size=2")), "{logs}");
    }

    let download = |id: &str| {
        let out = fleet.dir.path().join(format!("download-{id}"));
        fleet.ok(&["checkpoint", "download", id, "--out", out.to_str().unwrap()]);
        out.join("model.safetensors")
    };
    let compare = r#"
import sys
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys(), (a.keys(), b.keys())
print(max(float(abs(a[k] - b[k]).max()) for k in a))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", compare])
        .arg(download(&gang))
        .arg(download(&single))
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let diff: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    println!("2 nodes x 1 rank vs 1 node: max weight difference {diff:e}");
    assert!(diff < 1e-4, "the gang's weights differ from the single run's by {diff}");
}
