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
    let second: Vec<&str> =
        job["attempts"][1]["nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    println!("gang: rank on {cut} cut; attempt 2 placed on {second:?} {:.1} s after the cut", {
        (job["attempts"][1]["started_at_ms"].as_i64().unwrap() - cut_at) as f64 / 1000.0
    });
    assert!(!second.contains(&cut.as_str()), "placed again on the lost node: {job:#}");
    assert_eq!(job["attempts"][0]["outcome"], format!("agent {cut} lost"), "{job:#}");

    // Every rank of attempt 1 stopped before any rank of attempt 2 started, by the agents' records.
    let stopped_kept =
        wait_for(|| event(&cluster.agent_events(&kept), &id, 1, "job processes ended"), "rank 0 to stop");
    let stopped_cut =
        event(&cluster.agent_events(&cut), &id, 1, "job processes ended").expect("the cut node stopped rank 1");
    let started: Vec<i64> = second
        .iter()
        .map(|n| wait_for(|| event(&cluster.agent_events(n), &id, 2, "job started"), "attempt 2 to start"))
        .collect();
    let first_start = *started.iter().min().unwrap();
    assert!(
        stopped_kept < first_start && stopped_cut < first_start,
        "attempt 1 ranks still ran when attempt 2 started"
    );

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
        logs.lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, r)| r.rsplit(':').next().unwrap().to_string()))
            .unwrap()
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

/// splitmix64: a seeded schedule without a dependency, the same faults for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Milliseconds in `lo..hi` seconds.
    fn secs(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo * 1000 + self.below((hi - lo) * 1000))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// An agent host loses power: cut off, every process killed (-9); it boots again later.
    Crash,
    /// The agent frozen (SIGSTOP) for less than its fencing deadline, as a long pause.
    Freeze,
    /// An agent host cut off from every other.
    Cut,
    /// An agent host and the coordinator's cannot reach each other; the rest still can.
    Partition,
    /// kill -9 of the coordinator, started again on its data.
    RestartCoordinator,
}

/// One fault as it was applied: to which host, when (ms since the epoch) and for how long.
#[derive(Debug)]
struct Applied {
    fault: Fault,
    host: String,
    at_ms: i64,
    for_ms: i64,
}

/// One step line of the trail every running copy of a job writes: `ms job attempt rank step`.
#[derive(Debug)]
struct Step {
    at_ms: i64,
    job: String,
    attempt: u32,
    step: u32,
}

fn read_trail(path: &std::path::Path) -> Vec<Step> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Step {
                at_ms: f.first()?.parse().ok()?,
                job: f.get(1)?.to_string(),
                attempt: f.get(2)?.parse().ok()?,
                step: f.get(4)?.parse().ok()?,
            })
        })
        .collect()
}

fn median_max(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.sort_by(f64::total_cmp);
    format!("median {:.1}, max {:.1} (n={})", v[v.len() / 2], v[v.len() - 1], v.len())
}

/// A seeded random schedule of faults (crash, freeze, cut, partition, coordinator restart)
/// against a stream of jobs, gangs among them, for `GANTRY_CHAOS_SECS` (300 by default; the
/// README's soak runs longer) with `GANTRY_CHAOS_SEED` (printed; random when unset). At the end
/// every job succeeded with the right answer, failed for a recorded reason, or was cancelled;
/// none is lost; and by the trail the jobs' own processes wrote, no job ever had two attempts
/// running at once.
#[test]
fn a_seeded_random_fault_schedule_loses_no_job_and_never_runs_two_attempts_at_once() {
    let seed: u64 =
        std::env::var("GANTRY_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| now_ms() as u64);
    let secs: u64 = std::env::var("GANTRY_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    println!("chaos: seed {seed}, {secs} s (GANTRY_CHAOS_SEED={seed} GANTRY_CHAOS_SECS={secs} repeats this schedule)");
    // Faults draw from one stream and the job stream from another, so that a seed repeats the
    // same faults however the jobs went.
    let (mut rng, mut jobs_rng) = (Rng(seed), Rng(seed ^ 0x6a6f_6273));
    let agents = ["n1", "n2", "n3", "n4"];
    let mut cluster = Cluster::start(&["ctl", "n1", "n2", "n3", "n4"], "9s");
    let trail = cluster.dir.path().join("trail");
    std::fs::write(&trail, "").unwrap();
    std::fs::set_permissions(&trail, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    // SUMMER, each step also written to the trail.
    let script = SUMMER.replace(
        "  sleep 0.25\n",
        &format!(
            "  echo \"$(date +%s%3N) $GANTRY_JOB_ID $GANTRY_ATTEMPT $RANK $step\" >> {}\n  sleep 0.25\n",
            trail.display()
        ),
    );
    let job_spec = |name: &str, nodes: u32| {
        format!(
            "name: {name}\nresources: {{cpus: 0.5, memory_gb: 0.5, nodes: {nodes}}}\nmax_restarts: 2\nretry: {{backoff: 1s}}\ncommand: [\"bash\", \"-c\", {}]\n",
            serde_json::to_string(&script).unwrap()
        )
    };

    let mut submitted: Vec<(String, u32)> = Vec::new();
    let mut cancelled: Vec<String> = Vec::new();
    let mut applied: Vec<Applied> = Vec::new();
    let started = Instant::now();
    let mut next_fault = Instant::now() + rng.secs(5, 10);
    while started.elapsed() < Duration::from_secs(secs) {
        // Keep about six jobs queued or running; one in four a 2-node gang.
        let active = cluster
            .cli()
            .json(&["jobs"])
            .as_array()
            .map(|jobs| jobs.iter().filter(|j| j["state"] == "queued" || j["state"] == "running").count())
            .unwrap_or(6);
        for _ in active..6 {
            let nodes = if jobs_rng.below(4) == 0 { 2 } else { 1 };
            let id = cluster.cli().submit(&job_spec(&format!("chaos-{}", submitted.len()), nodes));
            // One in twelve is cancelled by its owner along the way.
            if jobs_rng.below(12) == 0 {
                cancelled.push(id.clone());
            }
            submitted.push((id, nodes));
        }
        if let Some(id) = cancelled.iter().find(|_| jobs_rng.below(20) == 0).cloned() {
            let _ = cluster.cli().gantry(&["cancel", &id]);
        }
        if Instant::now() < next_fault {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        let fault = match rng.below(10) {
            0..=1 => Fault::Crash,
            2..=3 => Fault::Freeze,
            4..=6 => Fault::Cut,
            7..=8 => Fault::Partition,
            _ => Fault::RestartCoordinator,
        };
        let host = match fault {
            Fault::RestartCoordinator => "ctl".to_string(),
            _ => agents[rng.below(agents.len() as u64) as usize].to_string(),
        };
        let at_ms = now_ms();
        let length = match fault {
            Fault::Crash => rng.secs(1, 20),
            Fault::Freeze => rng.secs(1, 6),
            Fault::Cut | Fault::Partition => rng.secs(2, 25),
            Fault::RestartCoordinator => rng.secs(0, 3),
        };
        println!(
            "chaos: t={:>5.1}s {fault:?} {host} for {:.1} s",
            started.elapsed().as_secs_f64(),
            length.as_secs_f64()
        );
        match fault {
            Fault::Crash => {
                // Power lost: silence first (no connection is closed), then nothing runs.
                cluster.net.cut(&host);
                cluster.net.crash(&host);
                std::thread::sleep(length);
                cluster.net.heal(&host);
                cluster.start_agent(&host);
            }
            Fault::Freeze => {
                let pid = cluster.agents[&host];
                support::chaos::signal(pid, "-STOP");
                std::thread::sleep(length);
                support::chaos::signal(pid, "-CONT");
            }
            Fault::Cut => {
                cluster.net.cut(&host);
                std::thread::sleep(length);
                cluster.net.heal(&host);
            }
            Fault::Partition => {
                cluster.net.partition(&host, "ctl");
                std::thread::sleep(length);
                cluster.net.unpartition(&host);
            }
            Fault::RestartCoordinator => cluster.restart_coordinator(length),
        }
        applied.push(Applied { fault, host, at_ms, for_ms: length.as_millis() as i64 });
        next_fault = Instant::now() + rng.secs(3, 12);
    }
    println!("chaos: faults over; waiting for {} jobs to end", submitted.len());

    // Every job ends: succeeded (with the right answer), failed for a reason, or cancelled.
    let deadline = Instant::now() + Duration::from_secs(240);
    let jobs: Vec<serde_json::Value> = submitted
        .iter()
        .map(|(id, _)| {
            wait_job(&cluster, id, "an end", deadline.saturating_duration_since(Instant::now()), |j| {
                j["state"] != "running" && j["state"] != "queued"
            })
        })
        .collect();
    let listed = cluster.cli().json(&["jobs"]);
    let mut by_state = std::collections::BTreeMap::<String, u32>::new();
    for ((id, nodes), job) in submitted.iter().zip(&jobs) {
        let state = job["state"].as_str().unwrap().to_string();
        *by_state.entry(state.clone()).or_default() += 1;
        assert!(
            listed.as_array().is_some_and(|l| l.iter().any(|j| j["id"] == id.as_str())),
            "job {id} is missing from gantry jobs"
        );
        match state.as_str() {
            "succeeded" => {
                let logs = cluster.cli().ok(&["logs", id]);
                for rank in 0..*nodes {
                    assert!(
                        logs.contains(&format!("rank {rank} sum=1830")),
                        "job {id} rank {rank}: wrong answer:\n{logs}"
                    );
                }
            }
            "failed" => assert!(!job["message"].as_str().unwrap_or("").is_empty(), "job {id} failed without a reason"),
            "cancelled" => assert!(cancelled.contains(id), "job {id} was cancelled by nobody: {job:#}"),
            other => panic!("job {id} ended {other}"),
        }
    }

    // One running copy: per job, the steps each attempt wrote span times that never overlap.
    let steps = read_trail(&trail);
    let mut spans: std::collections::BTreeMap<(String, u32), (i64, i64, u32, u32)> = Default::default();
    for s in &steps {
        let e = spans.entry((s.job.clone(), s.attempt)).or_insert((s.at_ms, s.at_ms, s.step, s.step));
        *e = (e.0.min(s.at_ms), e.1.max(s.at_ms), e.2.min(s.step), e.3.max(s.step));
    }
    let mut overlaps = Vec::new();
    for ((job, attempt), (_, last, _, _)) in &spans {
        if let Some((first_next, ..)) = spans.get(&(job.clone(), attempt + 1))
            && *first_next <= *last
        {
            overlaps.push(format!(
                "job {job}: attempt {attempt} wrote a step {} ms after attempt {} began",
                last - first_next,
                attempt + 1
            ));
        }
    }

    // Per fault that cost jobs their attempts: detection (its first loss recorded), re-placement
    // (the last of those jobs started again) and the work lost (steps redone, from the trail).
    // An attempt is charged to the latest fault on one of its nodes (or the coordinator) that
    // began before it ended.
    #[derive(Default)]
    struct Cost {
        first_loss_ms: Option<i64>,
        last_start_ms: i64,
        steps: u32,
        attempts: u32,
        outcomes: Vec<String>,
    }
    let mut costs: std::collections::BTreeMap<usize, Cost> = Default::default();
    for job in &jobs {
        let id = job["id"].as_str().unwrap();
        let attempts = job["attempts"].as_array().unwrap();
        for pair in attempts.windows(2) {
            let ended = pair[0]["ended_at_ms"].as_i64().unwrap();
            let nodes: Vec<&str> = pair[0]["nodes"].as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
            let Some(i) =
                applied.iter().rposition(|f| (f.host == "ctl" || nodes.contains(&f.host.as_str())) && f.at_ms <= ended)
            else {
                continue;
            };
            let cost = costs.entry(i).or_default();
            cost.first_loss_ms = Some(cost.first_loss_ms.map_or(ended, |t| t.min(ended)));
            cost.last_start_ms = cost.last_start_ms.max(pair[1]["started_at_ms"].as_i64().unwrap());
            cost.attempts += 1;
            cost.outcomes.push(pair[0]["outcome"].as_str().unwrap_or("").to_string());
            let (a, b) = (pair[0]["attempt"].as_u64().unwrap() as u32, pair[1]["attempt"].as_u64().unwrap() as u32);
            if let (Some(before), Some(after)) = (spans.get(&(id.to_string(), a)), spans.get(&(id.to_string(), b))) {
                // The next attempt's first step follows the step it resumed from.
                cost.steps += before.3.saturating_sub(after.2.saturating_sub(1));
            }
        }
    }
    let secs_after = |i: &usize, t: i64| (t - applied[*i].at_ms) as f64 / 1000.0;
    let detect: Vec<f64> = costs.iter().filter_map(|(i, c)| c.first_loss_ms.map(|t| secs_after(i, t))).collect();
    let replace: Vec<f64> = costs.iter().map(|(i, c)| secs_after(i, c.last_start_ms)).collect();
    let lost_steps: Vec<f64> = costs.values().map(|c| c.steps as f64).collect();
    for (i, c) in &costs {
        let f = &applied[*i];
        println!(
            "chaos: {:?} {} for {:.1} s: {} attempt(s) ended ({}), detected after {:.1} s, placed again by {:.1} s, {} steps redone",
            f.fault,
            f.host,
            f.for_ms as f64 / 1000.0,
            c.attempts,
            c.outcomes.join("; "),
            c.first_loss_ms.map_or(f64::NAN, |t| secs_after(i, t)),
            secs_after(i, c.last_start_ms),
            c.steps
        );
    }
    // False alarms: outages shorter than the agents' fencing deadline (7 s of 9) should cost
    // nothing; each that did stopped and restarted work that could have gone on.
    let short: Vec<usize> = (0..applied.len())
        .filter(|&i| {
            matches!(applied[i].fault, Fault::Freeze | Fault::Cut | Fault::Partition) && applied[i].for_ms < 7_000
        })
        .collect();
    let alarms = short.iter().filter(|i| costs.contains_key(i)).count();
    println!("chaos: outages under 7 s (freeze, cut, partition): {}, of which stopped work: {alarms}", short.len());
    let mut kinds = std::collections::BTreeMap::<String, u32>::new();
    for f in &applied {
        *kinds.entry(format!("{:?}", f.fault)).or_default() += 1;
    }
    println!("chaos: seed {seed}: {} faults {kinds:?}; {} jobs {by_state:?}", applied.len(), jobs.len());
    println!("chaos: per fault that cost work, loss detected after (s): {}", median_max(detect));
    println!("chaos: per fault that cost work, all its jobs placed again by (s): {}", median_max(replace));
    println!("chaos: per fault that cost work, steps redone (0.25 s each): {}", median_max(lost_steps));
    println!(
        "chaos: stale reports refused: {}",
        cluster
            .metrics()
            .lines()
            .filter(|l| l.starts_with("gantry_stale_attempt_reports_total"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(overlaps.is_empty(), "seed {seed}: two attempts ran at once:\n{}", overlaps.join("\n"));
}
