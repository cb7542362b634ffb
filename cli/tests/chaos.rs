//! Faults as real fleets meet them, on several hosts of one machine (network namespaces, see
//! `support/chaos.rs`): a host cut off, a node of a gang lost. Real processes throughout.
//! Needs root (namespaces) and nftables.

mod support;

use std::time::{Duration, Instant};

use support::chaos::{AgentEvent, Cluster};

/// A job that sums 1..=60, a step every 0.25 s, committing its running sum as a checkpoint every
/// 4 steps, and resuming from the checkpoint it is given: its answer is right only if every
/// step was counted once, whatever stopped it.
const SUMMER: &str = r#"
step=0; sum=0
if [ -n "${GANTRY_RESUME_DIR:-}" ]; then read step sum < "$GANTRY_RESUME_DIR/state"; echo "resumed at step $step"; fi
trap 'echo "SIGTERM at step $step"; exit 143' TERM
echo "attempt $GANTRY_ATTEMPT rank $RANK rendezvous $MASTER_ADDR:$MASTER_PORT"
while [ "$step" -lt 60 ]; do
  step=$((step + 1)); sum=$((sum + step))
  echo "attempt $GANTRY_ATTEMPT rank $RANK step $step"
  if [ $((step % 4)) -eq 0 ] && [ "$RANK" = 0 ]; then
    mkdir -p "$GANTRY_CHECKPOINT_DIR/.tmp" && echo "$step $sum" > "$GANTRY_CHECKPOINT_DIR/.tmp/state"
    mv "$GANTRY_CHECKPOINT_DIR/.tmp" "$GANTRY_CHECKPOINT_DIR/step-$step"
  fi
  sleep 0.25
done
echo "rank $RANK sum=$sum"
"#;

fn spec(name: &str, nodes: u32) -> String {
    format!(
        "name: {name}\nresources: {{cpus: 1, nodes: {nodes}}}\nmax_restarts: 0\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(SUMMER).unwrap()
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Waits until `pred` holds of `gantry job ID -o json`.
fn wait_job(
    cluster: &Cluster,
    id: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let job = cluster.cli().json(&["job", id]);
        if pred(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id}: {what} did not happen in {timeout:?}: {job:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first event of `job`'s `attempt` with `message` in the agent's own log.
fn event(events: &[AgentEvent], job: &str, attempt: u32, message: &str) -> Option<i64> {
    events.iter().find(|e| e.job == job && e.attempt == attempt && e.message == message).map(|e| e.at_ms)
}

#[test]
fn a_cut_off_host_stops_its_job_before_it_runs_elsewhere_and_its_late_output_is_refused() {
    // The default timeout: lost after 9 s silent, jobs stopped by their agent from 7 s.
    let mut cluster = Cluster::with_agents(&["ctl", "n1", "n2"], &["n1"], "9s");
    let id = cluster.cli().submit(&spec("summer", 1));
    wait_job(&cluster, &id, "running on n1", Duration::from_secs(30), |j| j["state"] == "running");
    cluster.start_agent("n2");
    cluster.cli().wait_for_nodes(2, Duration::from_secs(30));
    // A committed checkpoint, so the next attempt resumes past the start.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.cli().json(&["checkpoints", &id]).as_array().is_none_or(|c| c.is_empty()) {
        assert!(Instant::now() < deadline, "no checkpoint was committed");
        std::thread::sleep(Duration::from_millis(200));
    }

    let cut_at = now_ms();
    cluster.net.cut("n1");
    let job = wait_job(&cluster, &id, "a second attempt", Duration::from_secs(30), |j| j["attempt"] == 2);
    let attempts = job["attempts"].as_array().unwrap();
    let lost_at = attempts[0]["ended_at_ms"].as_i64().unwrap();
    let placed_at = attempts[1]["started_at_ms"].as_i64().unwrap();
    println!(
        "host cut: declared lost {:.1} s after the cut, placed again after {:.1} s",
        (lost_at - cut_at) as f64 / 1000.0,
        (placed_at - cut_at) as f64 / 1000.0
    );
    assert!(lost_at - cut_at <= 10_000, "the loss took {} ms to notice", lost_at - cut_at);
    assert_eq!(attempts[1]["nodes"], serde_json::json!(["n2"]), "{job:#}");

    // One running copy, by the agents' own records: n1 stopped attempt 1 (on its own, cut off)
    // before n2 started attempt 2.
    let stopped = event(&cluster.agent_events("n1"), &id, 1, "job processes ended")
        .expect("agent n1 recorded no stop of attempt 1");
    let started = wait_for(|| event(&cluster.agent_events("n2"), &id, 2, "job started"), "n2 to start attempt 2");
    println!("n1 stopped its copy {:.1} s before n2 started the next", (started - stopped) as f64 / 1000.0);
    assert!(stopped < started, "attempt 1 ran on n1 until {stopped}, attempt 2 started on n2 at {started}");
    assert!(stopped - cut_at < 9_000, "n1 stopped its copy {} ms after the cut", stopped - cut_at);

    let job = wait_job(&cluster, &id, "success", Duration::from_secs(60), |j| {
        j["state"] != "running" && j["state"] != "queued"
    });
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let logs = cluster.cli().ok(&["logs", &id]);
    assert!(logs.contains("rank 0 sum=1830"), "every step counted once:\n{logs}");
    let resumed: u32 = logs
        .lines()
        .find_map(|l| l.strip_prefix("resumed at step "))
        .expect("attempt 2 resumed from a checkpoint")
        .parse()
        .unwrap();
    assert!(resumed >= 4, "resumed at step {resumed}");

    // n1 comes back: what its copy wrote while cut off, and its exit, are refused as stale.
    cluster.net.heal("n1");
    cluster.cli().wait_for_nodes(2, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (logs, exits) = (
            cluster.metric(r#"gantry_stale_attempt_reports_total{kind="logs"}"#),
            cluster.metric(r#"gantry_stale_attempt_reports_total{kind="exit"}"#),
        );
        if logs >= 1.0 && exits >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "late output of attempt 1 was not refused: logs {logs}, exits {exits}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let logs = cluster.cli().ok(&["logs", &id]);
    assert!(!logs.contains("SIGTERM at step"), "the stale copy's last words were refused:\n{logs}");
}

#[test]
fn a_gang_that_loses_a_node_stops_every_rank_and_starts_again_together_elsewhere() {
    let cluster = Cluster::start(&["ctl", "n1", "n2", "n3"], "9s");
    // Two ranks, a node each (each agent has the machine's CPUs; a rank asks for all of them).
    let cpus = cluster.cli().json(&["nodes"])[0]["cpus"].as_u64().unwrap();
    let gang = spec("gang", 2).replace("cpus: 1,", &format!("cpus: {cpus},"));
    let id = cluster.cli().submit(&gang);
    let job = wait_job(&cluster, &id, "running", Duration::from_secs(30), |j| j["state"] == "running");
    let first: Vec<String> = job["nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.cli().json(&["checkpoints", &id]).as_array().is_none_or(|c| c.is_empty()) {
        assert!(Instant::now() < deadline, "no checkpoint was committed");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Rank 1's node is cut off.
    let (kept, cut) = (first[0].clone(), first[1].clone());
    let cut_at = now_ms();
    cluster.net.cut(&cut);
    let job = wait_job(&cluster, &id, "a second attempt", Duration::from_secs(40), |j| j["attempt"] == 2);
    let second: Vec<&str> = job["attempts"][1]["nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    println!("gang: rank on {cut} cut; attempt 2 placed on {second:?} {:.1} s after the cut", {
        (job["attempts"][1]["started_at_ms"].as_i64().unwrap() - cut_at) as f64 / 1000.0
    });
    assert!(!second.contains(&cut.as_str()), "placed again on the lost node: {job:#}");
    assert_eq!(job["attempts"][0]["outcome"], format!("agent {cut} lost"), "{job:#}");

    // Every rank of attempt 1 stopped before any rank of attempt 2 started, by the agents' records.
    let stopped_kept = wait_for(|| event(&cluster.agent_events(&kept), &id, 1, "job processes ended"), "rank 0 to stop");
    let stopped_cut = event(&cluster.agent_events(&cut), &id, 1, "job processes ended").expect("the cut node stopped rank 1");
    let started: Vec<i64> = second
        .iter()
        .map(|n| wait_for(|| event(&cluster.agent_events(n), &id, 2, "job started"), "attempt 2 to start"))
        .collect();
    let first_start = *started.iter().min().unwrap();
    assert!(stopped_kept < first_start && stopped_cut < first_start, "attempt 1 ranks still ran when attempt 2 started");

    let job = wait_job(&cluster, &id, "an end", Duration::from_secs(60), |j| {
        j["state"] != "running" && j["state"] != "queued"
    });
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let logs = cluster.cli().ok(&["logs", &id]);
    for rank in 0..2 {
        assert!(logs.contains(&format!("rank {rank} sum=1830")), "rank {rank} counted every step once:\n{logs}");
    }
    // Fresh rendezvous details: a new MASTER_PORT for attempt 2.
    let port = |attempt: u32| {
        let prefix = format!("attempt {attempt} rank 0 rendezvous ");
        logs.lines().find_map(|l| l.split_once(&prefix).map(|(_, r)| r.rsplit(':').next().unwrap().to_string())).unwrap()
    };
    assert_ne!(port(1), port(2), "attempt 2 rendezvoused on attempt 1's port");
}

fn wait_for<T>(mut f: impl FnMut() -> Option<T>, what: &str) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited 30 s for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
