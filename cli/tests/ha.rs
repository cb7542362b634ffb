//! A highly available control plane of real processes: a real etcd, two `gantry coordinator
//! --store etcd` (one leads, the other forwards to it), an agent and the CLI given both
//! coordinators' URLs.
//! Needs the `etcd` feature (`.ci/run` builds with it) and Debian's etcd-server; the object
//! storage test also the `s3` feature and moto's S3 server.

#![cfg(feature = "etcd")]

mod support;

#[path = "../../coordinator/tests/support/etcd_server.rs"]
mod etcd_server;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(feature = "s3")]
#[path = "support/s3_server.rs"]
mod s3_server;

use etcd_server::EtcdServer;
use support::{Cli, GANTRY, free_port};

struct HaFleet {
    _etcd: EtcdServer,
    dir: tempfile::TempDir,
    etcd_url: String,
    ports: Vec<u16>,
    coordinators: Vec<Option<Child>>,
    agents: Vec<Child>,
    /// `--object-store` and the environment that reaches it. Without it the coordinators
    /// share one data directory (a shared volume in a real deployment); with it each has its own.
    object_store: Option<(String, Vec<(String, String)>)>,
    /// Given to every coordinator as files, as a Secret would be.
    admin_token: String,
    agent_token: String,
    /// The operator's CA (made with openssl), which every coordinator signs with.
    ca: PathBuf,
}

impl HaFleet {
    /// etcd and two coordinators with default leadership settings; the first leads.
    fn start() -> HaFleet {
        HaFleet::start_with(None)
    }

    fn start_with(object_store: Option<(String, Vec<(String, String)>)>) -> HaFleet {
        let etcd = EtcdServer::start();
        let etcd_url = etcd.url.clone();
        let mut fleet = HaFleet {
            _etcd: etcd,
            dir: support::job_visible_tempdir(),
            etcd_url,
            ports: vec![free_port(), free_port()],
            coordinators: vec![None, None],
            agents: Vec::new(),
            object_store,
            admin_token: support::test_secret(),
            agent_token: support::test_secret(),
            ca: PathBuf::new(),
        };
        fleet.ca = support::operator_ca(fleet.dir.path());
        std::fs::write(fleet.dir.path().join("admin-token"), &fleet.admin_token).unwrap();
        std::fs::write(fleet.dir.path().join("agent-token"), &fleet.agent_token).unwrap();
        fleet.start_coordinator(0);
        fleet.wait_leading(0, Duration::from_secs(20));
        fleet.start_coordinator(1);
        fleet.wait_listening(1, Duration::from_secs(20));
        fleet
    }

    fn start_coordinator(&mut self, i: usize) {
        let log = std::fs::File::create(self.log_path(&format!("coordinator-{i}"))).unwrap();
        let mut command = Command::new(GANTRY);
        command
            .args(["coordinator", "--store", "etcd", "--etcd", &self.etcd_url])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[i])])
            .args(["--http", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--agent-timeout", "10s", "--grace-period", "3s"])
            .arg("--admin-token-file")
            .arg(self.dir.path().join("admin-token"))
            .arg("--agent-token-file")
            .arg(self.dir.path().join("agent-token"))
            .arg("--ca-cert")
            .arg(&self.ca)
            .arg("--ca-key")
            .arg(self.ca.with_extension("key"));
        if let Some((url, env)) = &self.object_store {
            command.args(["--object-store", url]).envs(env.iter().map(|(k, v)| (k, v)));
        }
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.coordinators[i] = Some(child);
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        match self.object_store {
            Some(_) => self.dir.path().join(format!("data-{i}")),
            None => self.dir.path().join("shared"),
        }
    }

    fn start_agent(&mut self, name: &str) {
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        let child = Command::new(GANTRY)
            .args(["agent", "--coordinator", &self.urls(), "--name", name, "--work-dir"])
            .arg(self.dir.path().join(name))
            .env("GANTRY_JOIN_TOKEN", &self.agent_token)
            .env("GANTRY_CA", &self.ca)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push(child);
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn urls(&self) -> String {
        self.ports.iter().map(|p| format!("https://127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    fn listening(&self, i: usize) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.ports[i])).is_ok()
    }

    /// Until coordinator `i` leads and listens as the leader.
    fn wait_leading(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let name = format!("coordinator-{i}");
        while !self.log(&name).contains("coordinator listening") {
            assert!(Instant::now() < deadline, "coordinator {i} did not start leading:\n{}", self.log(&name));
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait_listening(i, timeout);
    }

    fn wait_listening(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.listening(i) {
            assert!(
                Instant::now() < deadline,
                "coordinator {i} does not listen:\n{}",
                self.log(&format!("coordinator-{i}"))
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The CLI against `urls` (some or all of the coordinators).
    fn cli(&self, urls: &str) -> Cli {
        let token = Some(self.admin_token.clone());
        Cli {
            url: urls.to_string(),
            dir: self.dir.path().to_path_buf(),
            log: None,
            token,
            ca: Some(self.ca.clone()),
            netns: None,
        }
    }

    fn gantry(&self, urls: &str, args: &[&str]) -> std::process::Output {
        self.cli(urls).gantry(args)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        self.cli(&self.urls()).json(args)
    }

    /// Submits `spec`; the id on success.
    fn submit(&self, urls: &str, spec: &str) -> Result<String, String> {
        self.cli(urls).try_submit(spec)
    }

    fn wait_connected(&self, agent: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.json(&["nodes"]).as_array().unwrap().iter().any(|n| n["name"] == agent && n["connected"] == true) {
            assert!(Instant::now() < deadline, "agent {agent} did not connect:\n{}", self.log(agent));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.coordinators[i].as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }
}

impl Drop for HaFleet {
    fn drop(&mut self) {
        for child in self.coordinators.iter_mut().flatten().chain(self.agents.iter_mut()) {
            if child.try_wait().ok().flatten().is_some() {
                continue;
            }
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
            let _ = Command::new("kill").arg(&pid).status();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for child in self.coordinators.iter_mut().flatten().chain(self.agents.iter_mut()) {
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A job that fails loudly if another instance of it runs at the same time.
fn exclusive_job(locks: &std::path::Path) -> String {
    let script = format!(
        r#"mkdir "{dir}/$GANTRY_JOB_ID" 2>/dev/null || {{ echo "DUPLICATE $GANTRY_JOB_ID"; exit 3; }}; sleep 0.3; rmdir "{dir}/$GANTRY_JOB_ID""#,
        dir = locks.display()
    );
    // Small, so that many run at once on the test machine's two cores.
    let resources = "resources: {cpus: 0.1, memory_gb: 0.1}";
    format!("name: storm\n{resources}\ncommand: [\"bash\", \"-c\", {}]\n", serde_json::to_string(&script).unwrap())
}

#[test]
fn killing_the_leader_during_a_storm_of_submits_loses_no_acknowledged_job() {
    let mut fleet = HaFleet::start();
    fleet.start_agent("node-a");
    let locks = fleet.dir.path().join("locks");
    support::job_writable_dir(&locks);
    let spec = exclusive_job(&locks);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.json(&["nodes"]).as_array().unwrap().iter().all(|n| n["connected"] != true) {
        assert!(Instant::now() < deadline, "the agent did not connect:\n{}", fleet.log("node-a"));
        std::thread::sleep(Duration::from_millis(100));
    }

    // Four submitters, each submitting one job after another, recording what was acknowledged.
    // (when the submit started, when it was acknowledged, the job id)
    let acked: Arc<Mutex<Vec<(Instant, Instant, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let urls = fleet.urls();
    let storm: Vec<_> = (0..4)
        .map(|_| {
            let (acked, stop, urls, spec) = (acked.clone(), stop.clone(), urls.clone(), spec.clone());
            let token = fleet.admin_token.clone();
            let ca = fleet.ca.clone();
            let dir = fleet.dir.path().to_path_buf();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let file = dir.join(format!("storm-{}.yaml", free_port()));
                    let started = Instant::now();
                    std::fs::write(&file, &spec).unwrap();
                    let out = Command::new(GANTRY)
                        .args(["submit", file.to_str().unwrap()])
                        .env("GANTRY_COORDINATOR", &urls)
                        .env("GANTRY_TOKEN", &token)
                        .env("GANTRY_CA", &ca)
                        .output()
                        .unwrap();
                    if out.status.success() {
                        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
                        acked.lock().unwrap().push((started, Instant::now(), id));
                    }
                    // About 40 submits a second in all: a storm the agent can also run.
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs(3));
    let before = acked.lock().unwrap().len();
    assert!(before > 0, "no submit was acknowledged before the kill");
    // kill -9 of the leader.
    let killed = Instant::now();
    let mut leader = fleet.coordinators[0].take().unwrap();
    leader.kill().unwrap();
    leader.wait().unwrap();
    // From the kill to the first acknowledgement of a submit sent after it.
    let recovered = loop {
        let first_after = acked.lock().unwrap().iter().find(|(sent, _, _)| *sent > killed).map(|(_, at, _)| *at);
        if let Some(at) = first_after {
            break at - killed;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no submit succeeded after the leader died");
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("failover: a submit succeeded again {:.2} s after kill -9 of the leader", recovered.as_secs_f64());
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in storm {
        t.join().unwrap();
    }
    let acked: BTreeSet<String> = acked.lock().unwrap().iter().map(|(_, _, id)| id.clone()).collect();
    println!("{} submits acknowledged, {before} of them before the kill", acked.len());

    // Every acknowledged job is there, and each ran to success exactly once at a time.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let jobs = fleet.json(&["jobs"]);
        let states: std::collections::HashMap<String, String> = jobs
            .as_array()
            .unwrap()
            .iter()
            .map(|j| (j["id"].as_str().unwrap().to_string(), j["state"].as_str().unwrap().to_string()))
            .collect();
        for id in &acked {
            assert!(states.contains_key(id), "acknowledged job {id} is lost");
            assert_ne!(states[id], "failed", "job {id} failed: {:?}", fleet.json(&["job", id]));
        }
        if acked.iter().all(|id| states[id] == "succeeded") {
            break;
        }
        let tail = |name: &str| fleet.log(name).lines().rev().take(30).collect::<Vec<_>>().join("\n");
        assert!(
            Instant::now() < deadline,
            "not every acknowledged job finished: {states:?}\nagent:\n{}\nnew leader:\n{}",
            tail("node-a"),
            tail("coordinator-1")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let sample = acked.iter().next().unwrap();
    let logs = fleet.gantry(&fleet.urls(), &["logs", sample]);
    assert!(!String::from_utf8_lossy(&logs.stdout).contains("DUPLICATE"));
}

/// Jobs run on agents, not on the leader: killing it must stop none of them. The agents reach
/// the new leader before their own fencing deadline, and it adopts what they hold.
#[test]
fn killing_the_leader_stops_and_restarts_no_running_job() {
    let mut fleet = HaFleet::start();
    fleet.start_agent("node-a");
    fleet.start_agent("node-b");
    fleet.wait_connected("node-a");
    fleet.wait_connected("node-b");
    let starts = fleet.dir.path().join("starts");
    support::job_writable_dir(&starts);
    // Each start leaves a mark; the job runs well past the failover.
    let script = format!(r#"touch "{}/$GANTRY_JOB_ID-$GANTRY_ATTEMPT-$RANK"; sleep 25"#, starts.display());
    let spec = |name: &str, nodes: u32| {
        format!(
            "name: {name}\nresources: {{cpus: 0.5, memory_gb: 0.1, nodes: {nodes}}}\nmax_restarts: 0\ncommand: [\"bash\", \"-c\", {}]\n",
            serde_json::to_string(&script).unwrap()
        )
    };
    let urls = fleet.urls();
    let ids: Vec<String> =
        [spec("one", 1), spec("two", 1), spec("gang", 2)].iter().map(|s| fleet.submit(&urls, s).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ids.iter().all(|id| fleet.json(&["job", id])["state"] == "running") {
        assert!(Instant::now() < deadline, "the jobs did not all start");
        std::thread::sleep(Duration::from_millis(200));
    }

    let killed = Instant::now();
    let mut leader = fleet.coordinators[0].take().unwrap();
    leader.kill().unwrap();
    leader.wait().unwrap();
    fleet.wait_leading(1, Duration::from_secs(30));
    println!("the follower led {:.2} s after kill -9 of the leader", killed.elapsed().as_secs_f64());

    let deadline = Instant::now() + Duration::from_secs(90);
    for id in &ids {
        let job = loop {
            let job = fleet.json(&["job", id]);
            if job["state"] != "running" && job["state"] != "queued" {
                break job;
            }
            assert!(Instant::now() < deadline, "job {id} did not end: {job:#}");
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(job["state"], "succeeded", "{job:#}");
        assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "job {id} was restarted: {job:#}");
    }
    let mut marks: Vec<String> =
        std::fs::read_dir(&starts).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    marks.sort();
    let want: Vec<String> = [(&ids[0], 0), (&ids[1], 0), (&ids[2], 0), (&ids[2], 1)]
        .iter()
        .map(|(id, rank)| format!("{id}-1-{rank}"))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(marks, want, "each rank started once");
    for agent in ["node-a", "node-b"] {
        let log = fleet.log(agent);
        assert!(!log.contains("stopping the job (fence)"), "{agent} fenced a job:\n{log}");
    }
}

#[test]
fn a_paused_leader_that_wakes_after_losing_its_lease_cannot_commit() {
    let mut fleet = HaFleet::start();
    let first = fleet.submit(&fleet.urls(), "name: before\nresources: {cpus: 1000}\ncommand: [\"true\"]\n").unwrap();
    // The follower forwards to the leader: it answers with the leader's jobs.
    let b_only = format!("https://127.0.0.1:{}", fleet.ports[1]);
    let via_follower = fleet.gantry(&b_only, &["job", &first]);
    assert!(via_follower.status.success(), "{}", String::from_utf8_lossy(&via_follower.stderr));
    assert!(!fleet.log("coordinator-1").contains("coordinator listening"), "only one leads");

    // SIGSTOP the leader: it stops renewing its lease, and the follower takes over.
    fleet.signal(0, "-STOP");
    let paused = Instant::now();
    fleet.wait_leading(1, Duration::from_secs(30));
    println!("the follower led {:.2} s after the leader was paused", paused.elapsed().as_secs_f64());
    let second = fleet.submit(&b_only, "name: after\nresources: {cpus: 1000}\ncommand: [\"true\"]\n").unwrap();

    // The old leader wakes still believing it leads. A submit sent to it alone is not committed.
    fleet.signal(0, "-CONT");
    let a_only = format!("https://127.0.0.1:{}", fleet.ports[0]);
    let refused = fleet.submit(&a_only, "name: stale\ncommand: [\"true\"]\n");
    assert!(refused.is_err(), "the deposed leader acknowledged a submit: {refused:?}");
    println!("the woken leader answered: {}", refused.unwrap_err());

    // It notices and stops by itself, with an error status.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = fleet.coordinators[0].as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the deposed leader kept running:\n{}", fleet.log("coordinator-0"));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = fleet.log("coordinator-0");
    assert!(log.contains("lost leadership") || log.contains("not the leader"), "{log}");

    let names: Vec<String> =
        fleet.json(&["jobs"]).as_array().unwrap().iter().map(|j| j["name"].as_str().unwrap().to_string()).collect();
    assert!(names.contains(&"before".to_string()) && names.contains(&"after".to_string()), "{names:?}");
    assert!(!names.contains(&"stale".to_string()), "the deposed leader's submit got in: {names:?}");
    assert!(!first.is_empty() && !second.is_empty());
}

/// Coordinators with their own data directories share checkpoints and logs through S3: a job
/// checkpoints through the leader, its agent stops, the leader is killed, and the job resumes on
/// another agent from the checkpoint the new leader reads back from S3, which also has the first
/// attempt's output.
#[cfg(feature = "s3")]
#[test]
fn with_checkpoints_in_s3_a_job_resumes_through_a_new_leader_with_its_own_data_dir() {
    let s3 = s3_server::S3Server::start("gantry-checkpoints");
    let mut fleet = HaFleet::start_with(Some(("s3://gantry-checkpoints/cluster-a".into(), s3.env())));
    fleet.start_agent("node-a");
    fleet.wait_connected("node-a");
    // A data set pushed through this leader goes to the bucket as well.
    let wine = support::repo_root().join("examples/wine/wine.csv");
    let pushed = fleet.cli(&fleet.urls()).json(&["dataset", "push", "wine", wine.to_str().unwrap()]);
    let sha = pushed["sha256"].as_str().unwrap().to_string();
    let stored = s3.objects(&format!("cluster-a/datasets/{sha}/"));
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].1, std::fs::metadata(&wine).unwrap().len());
    let job = fleet
        .submit(
            &fleet.urls(),
            "name: shared\nresources: {cpus: 1}\nmax_restarts: 0\n\
             train: {model: transformer, dataset: genesis, epochs: 1, batch_size: 32, checkpoint_every_steps: 10}\n",
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let listed = loop {
        let listed = fleet.json(&["checkpoints", &job]);
        if listed.as_array().is_some_and(|c| !c.is_empty()) {
            break listed;
        }
        assert!(Instant::now() < deadline, "no checkpoint of job {job}:\n{}", fleet.log("node-a"));
        std::thread::sleep(Duration::from_millis(300));
    };

    // The checkpoint is in the bucket, file for file, and in neither data directory.
    let first = &listed[0];
    let objects = s3.objects(&format!("cluster-a/jobs/{job}/checkpoints/step-{}/", first["step"]));
    let files = first["files"].as_array().unwrap();
    assert_eq!(objects.len(), files.len(), "{objects:?} against {first}");
    for file in files {
        let path = file["path"].as_str().unwrap();
        let (key, size) = objects.iter().find(|(k, _)| k.ends_with(&format!("/{path}"))).expect(path);
        assert_eq!(*size, file["size"].as_u64().unwrap(), "{key}");
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(s3.get(key)));
        assert_eq!(sha, file["sha256"].as_str().unwrap(), "{key}");
    }
    for i in 0..2 {
        let local = fleet.data_dir(i).join("jobs").join(&job).join("checkpoints");
        assert!(!local.exists(), "checkpoint files in {}", local.display());
    }

    // Its agent stops (the job is requeued), then the leader dies.
    let agent = fleet.agents[0].id().to_string();
    assert!(Command::new("kill").args(["-TERM", &agent]).status().unwrap().success());
    let state = fleet.cli(&fleet.urls()).wait_state(&job, &["queued"], Duration::from_secs(60));
    assert_eq!(state, "queued");
    // The leader ships the output it holds to S3 within a second or so.
    let before = fleet.cli(&fleet.urls()).ok(&["logs", &job]);
    let held = before.lines().count() as u64;
    assert!(held > 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let segments = s3.objects(&format!("cluster-a/jobs/{job}/logs/attempt-0001-rank-0000/"));
        let archived = segments
            .iter()
            .filter_map(|(key, _)| key.rsplit(['-', '/']).next()?.strip_suffix(".log")?.parse::<u64>().ok())
            .max();
        if archived == Some(held) {
            break;
        }
        assert!(Instant::now() < deadline, "{held} lines held, archived: {segments:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    fleet.signal(0, "-KILL");
    fleet.wait_leading(1, Duration::from_secs(30));

    // A new agent, with nothing of the job on disk, resumes it through the new leader.
    fleet.start_agent("node-b");
    let state = fleet.cli(&fleet.urls()).wait_state(&job, &["succeeded", "failed"], Duration::from_secs(240));
    let logs = fleet.cli(&fleet.urls()).ok(&["logs", &job]);
    assert_eq!(state, "succeeded", "{logs}\n{}", fleet.log("coordinator-1"));
    assert!(logs.contains("resumed step="), "it resumed from its checkpoint:\n{logs}");
    let shown = fleet.json(&["job", &job]);
    assert_eq!(shown["nodes"][0], "node-b", "{shown}");
    assert!(logs.starts_with(&before), "the first attempt's output, from S3:\n{before}\n---\n{logs}");

    // The new leader serves every checkpoint from the bucket, verified file by file.
    let out = fleet.dir.path().join("download");
    fleet.cli(&fleet.urls()).ok(&["checkpoint", "download", &job, "--out", out.to_str().unwrap()]);
    assert!(std::fs::read_dir(&out).unwrap().count() > 0);
    let local = fleet.data_dir(1).join("jobs").join(&job).join("checkpoints");
    assert!(!local.exists(), "checkpoint files in {}", local.display());

    // And the data set pushed through the old leader, to an agent that never had it.
    let spec = "name: wine\nresources: {cpus: 1}\nmax_restarts: 0\n\
                train: {model: mlp, dataset: {table: 'dataset://wine/wine.csv', label: cultivar}, epochs: 2}\n";
    let wine_job = fleet.submit(&fleet.urls(), spec).unwrap();
    let state = fleet.cli(&fleet.urls()).wait_state(&wine_job, &["succeeded", "failed"], Duration::from_secs(120));
    let logs = fleet.cli(&fleet.urls()).ok(&["logs", &wine_job]);
    assert_eq!(state, "succeeded", "{logs}");
    assert!(logs.contains(&format!("data set wine@{}: fetched", &sha[..12])), "{logs}");
    assert!(!fleet.data_dir(1).join("datasets").exists(), "data set files outside the bucket");
}
