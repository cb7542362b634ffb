//! Jobs with an `image:` run in containers through the machine's real Docker engine, from an
//! image built here with Python in it (no registry is reachable: the machine's own python3,
//! bash and coreutils, with their libraries, imported as an image). Needs Docker.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{Fleet, fake_nvml};

const IMAGE: &str = "gantry-test-python:1";

fn sh(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(out.status.success(), "{script}:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Builds [`IMAGE`] once per test run.
fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = support::repo_root();
        let dest = tempfile::tempdir().unwrap();
        let rootfs = dest.path().join("rootfs");
        let stdlib = sh("/usr/bin/python3 -c 'import sysconfig; print(sysconfig.get_paths()[\"stdlib\"])'");
        let stdlib = stdlib.trim();
        let python = sh("readlink -f /usr/bin/python3");
        let tools = ["bash", "sh", "env", "cat", "ls", "mv", "mkdir", "sleep", "head", "chown"]
            .map(|t| sh(&format!("command -v {t}")).trim().to_string());
        // gantry's own libraries too (glibc's and libgcc_s, as any distribution's base has),
        // for the image-as-agent example built on this image.
        sh(&format!(
            "sh {stage} {python} {rootfs} {tools} {gantry} && rm {rootfs}/usr/local/bin/gantry && \
             ln -s {name} {rootfs}/usr/local/bin/python3 && \
             mkdir -p {rootfs}/usr/local/lib {rootfs}/bin && ln -s /usr/local/bin/sh {rootfs}/bin/sh && \
             cp -a {stdlib} {rootfs}/usr/local/lib/ && \
             rm -rf {rootfs}/usr/local/lib/*/test {rootfs}/usr/local/lib/*/idlelib && \
             tar -C {rootfs} -c . | docker import - {IMAGE} >/dev/null",
            stage = root.join("compose/stage-binaries").display(),
            python = python.trim(),
            name = Path::new(python.trim()).file_name().unwrap().to_string_lossy(),
            rootfs = rootfs.display(),
            tools = tools.join(" "),
            gantry = env!("CARGO_BIN_EXE_gantry"),
        ));
    });
    IMAGE
}

/// The label value that names an agent's containers: its work directory's key, as the agent
/// makes it (job ids repeat across the fleets of tests running at once; work directories do not).
fn agent_key(fleet: &Fleet, agent: &str) -> String {
    gantry_agent::agent_key(&fleet.work_dir(agent))
}

/// Containers of job `id` on `agent` (running or not), as the engine lists them.
fn containers_of(fleet: &Fleet, agent: &str, id: &str) -> Vec<String> {
    let key = agent_key(fleet, agent);
    sh(&format!("docker ps -a -q --filter label=gantry.agent={key} --filter label=gantry.job={id}"))
        .lines()
        .map(String::from)
        .collect()
}

fn python_job(name: &str, extra: &str, program: &str) -> String {
    format!(
        "name: {name}\nimage: {}\nimage_pull_policy: never\nmax_restarts: 0\n{extra}command: [\"python3\", \"-u\", \"-c\", {}]\n",
        image(),
        serde_json::to_string(program).unwrap()
    )
}

/// Waits for job `id` to end, and fails with its logs unless it succeeded.
fn succeeds(fleet: &Fleet, id: &str, secs: u64) {
    let state = fleet.wait_state(id, &["succeeded", "failed"], Duration::from_secs(secs));
    assert_eq!(state, "succeeded", "{}", fleet.ok(&["logs", id]));
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "waited {timeout:?} for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn gpu(i: u32) -> serde_json::Value {
    json!({
        "uuid": format!("GPU-box-{i}"), "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 85_899_345_920u64,
        "memory_used_bytes": 0, "utilization_percent": 0,
    })
}

#[test]
fn a_container_job_sees_its_environment_and_gpus_checkpoints_and_leaves_no_container() {
    let mut fleet = Fleet::start();
    let lib = fake_nvml(&fleet.dir.path().join("nvml"), &json!({"devices": [gpu(0), gpu(1)]}));
    // No NVIDIA toolkit here: the placed GPUs are named in CUDA_VISIBLE_DEVICES only.
    fleet.start_agent_with("gpu-box", &["--nvml-lib", lib.to_str().unwrap(), "--container-gpus", "none"]);
    fleet.wait_for_nodes(2);
    let program = r#"
import os, time
for k in ["GANTRY_JOB_ID", "GANTRY_ATTEMPT", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"]:
    print(f"{k}={os.environ[k]}")
print("uid=%d cwd=%s" % (os.getuid(), os.getcwd()))
print("notes:", open(os.environ["NOTES"]).read())
version = os.path.dirname(os.path.dirname(os.environ["NOTES"]))
print("version visible:", sorted(os.listdir(version)))
d = os.environ["GANTRY_CHECKPOINT_DIR"]
os.makedirs(d + "/.tmp")
with open(d + "/.tmp/w.txt", "w") as f:
    f.write("weights from a container\n")
os.rename(d + "/.tmp", d + "/step-7")
time.sleep(1.5)
print("done")
"#;
    // A pushed data set in `data:`: the node's copy, mounted read-only into the container.
    let notes = fleet.dir.path().join("notes.txt");
    std::fs::write(&notes, "pushed, fetched, mounted").unwrap();
    fleet.ok(&["dataset", "push", "notes", notes.to_str().unwrap()]);
    // Named twice: one version, one mount.
    let extra = "resources: {gpus: 1, cpus: 1}\ndata: {NOTES: 'dataset://notes', AGAIN: 'dataset://notes/notes.txt'}\n";
    let id = fleet.submit(&python_job("in-a-box", extra, program));
    succeeds(&fleet, &id, 60);
    let job = fleet.json(&["job", &id]);
    let placed: Vec<String> =
        job["attempts"][0]["gpus"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect();
    assert_eq!(placed.len(), 1);
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains(&format!("CUDA_VISIBLE_DEVICES={}\n", placed[0])), "exactly its GPU:\n{logs}");
    let read = "notes: pushed, fetched, mounted\n".to_string();
    // Its version's files only, not the cache around them (the host's folder also holds the
    // version's manifest.json).
    assert!(logs.contains("version visible: ['files']\n"), "{logs}");
    for want in [format!("GANTRY_JOB_ID={id}\n"), "RANK=0\n".into(), "WORLD_SIZE=1\n".into(), read, "done\n".into()] {
        assert!(logs.contains(&want), "{want}:\n{logs}");
    }
    assert!(!logs.contains("uid=0 "), "the job user, not root:\n{logs}");
    // The checkpoint it wrote by rename arrived, and downloads verified.
    let out = fleet.dir.path().join("ckpt");
    fleet.ok(&["checkpoint", "download", &id, "--step", "7", "--out", out.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(out.join("w.txt")).unwrap(), "weights from a container\n");
    assert!(containers_of(&fleet, "gpu-box", &id).is_empty(), "the container was removed");
}

#[test]
fn a_cancelled_container_job_stops_within_its_grace_and_a_missing_image_or_memory_says_why() {
    let fleet = Fleet::start();
    let program = r#"
import signal, sys, time
def stop(*_):
    print("got SIGTERM", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("ready")
time.sleep(600)
"#;
    let id = fleet.submit(&python_job("sleeper", "resources: {cpus: 0.5}\n", program));
    wait_until("the job to say ready", Duration::from_secs(60), || fleet.ok(&["logs", &id]).contains("ready"));
    assert_eq!(containers_of(&fleet, "node-a", &id).len(), 1);
    let cancelled = Instant::now();
    fleet.ok(&["cancel", &id]);
    assert_eq!(fleet.wait_state(&id, &["cancelled"], Duration::from_secs(30)), "cancelled");
    // Grace is 3 s; the rest is reporting.
    assert!(cancelled.elapsed() < Duration::from_secs(8), "took {:?}", cancelled.elapsed());
    assert!(fleet.ok(&["logs", &id]).contains("got SIGTERM"));
    assert!(containers_of(&fleet, "node-a", &id).is_empty(), "the container was removed");

    // Cancelled the moment it is placed, while its container is still being made: the stop
    // reaches the container as it starts, and its exit is not missed.
    for round in 0..3 {
        let id = fleet.submit(&python_job(
            &format!("early-{round}"),
            "resources: {cpus: 0.5}\n",
            "import time\ntime.sleep(600)",
        ));
        fleet.wait_state(&id, &["running"], Duration::from_secs(30));
        fleet.ok(&["cancel", &id]);
        assert_eq!(fleet.wait_state(&id, &["cancelled"], Duration::from_secs(20)), "cancelled");
        assert!(containers_of(&fleet, "node-a", &id).is_empty(), "the container was removed");
    }

    // An image the node does not hold, never to be pulled: failed, naming it.
    let missing = fleet.submit(
        "name: nope\nimage: gantry-no-such-image:0\nimage_pull_policy: never\nmax_restarts: 0\ncommand: [\"true\"]\n",
    );
    assert_eq!(fleet.wait_state(&missing, &["succeeded", "failed"], Duration::from_secs(30)), "failed");
    let message = fleet.json(&["job", &missing])["message"].as_str().unwrap().to_string();
    assert!(message.contains("image gantry-no-such-image:0 is not on this node"), "{message}");

    // Over its memory limit: the out-of-memory reason, as for a process.
    let hog = fleet.submit(&python_job(
        "hog",
        "resources: {cpus: 0.5, memory_gb: 0.125}\n",
        "b = bytearray(1 << 30)\nprint('survived')",
    ));
    assert_eq!(fleet.wait_state(&hog, &["succeeded", "failed"], Duration::from_secs(60)), "failed");
    let message = fleet.json(&["job", &hog])["message"].as_str().unwrap().to_string();
    assert!(message.contains("out of memory (memory_gb: 0.125)"), "{message}");
}

#[test]
fn an_agent_killed_and_restarted_leaves_no_container_and_runs_no_job_twice() {
    let mut fleet = Fleet::start();
    let id = fleet.submit(&python_job("long", "resources: {cpus: 0.5}\n", "import time\nprint('up')\ntime.sleep(600)"));
    wait_until("the job to run", Duration::from_secs(60), || fleet.ok(&["logs", &id]).contains("up"));
    // kill -9 of the agent: its container runs on, held by no one.
    let mut agent = fleet.agents.remove(0);
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert_eq!(containers_of(&fleet, "node-a", &id).len(), 1);
    fleet.start_agent("node-a");
    // The restarted agent removes it before it joins; the coordinator then places attempt 2.
    wait_until("attempt 2 to run", Duration::from_secs(60), || {
        fleet.json(&["job", &id])["attempts"].as_array().is_some_and(|a| a.len() == 2) && fleet.state(&id) == "running"
    });
    let key = agent_key(&fleet, "node-a");
    let attempts = sh(&format!(
        "docker ps -a --filter label=gantry.agent={key} --filter label=gantry.job={id} --format '{{{{.Label \"gantry.attempt\"}}}}'"
    ));
    assert_eq!(attempts.trim(), "2", "only attempt 2's container exists");
    fleet.ok(&["cancel", &id]);
    fleet.wait_state(&id, &["cancelled"], Duration::from_secs(30));
    assert!(containers_of(&fleet, "node-a", &id).is_empty());
}

#[test]
fn a_gang_of_container_ranks_rendezvous_through_master_addr() {
    let mut fleet = Fleet::start();
    fleet.start_agent("node-b");
    fleet.wait_for_nodes(2);
    let program = r#"
import os, socket, time
rank, addr, port = int(os.environ["RANK"]), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
if rank == 0:
    s = socket.create_server(("0.0.0.0", port))
    conn, _ = s.accept()
    print("rank 0 heard:", conn.recv(100).decode())
else:
    for _ in range(100):
        try:
            c = socket.create_connection((addr, port))
            break
        except OSError:
            time.sleep(0.2)
    c.sendall(b"hello from rank 1")
    print("rank 1 sent")
"#;
    let id = fleet.submit(&python_job("gang", "resources: {nodes: 2, cpus: 0.5}\n", program));
    succeeds(&fleet, &id, 60);
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains("rank 0 heard: hello from rank 1"), "{logs}");
}

#[test]
fn a_node_whose_engine_is_missing_is_not_the_jobs_failure_and_is_avoided() {
    let mut fleet = Fleet::start();
    fleet.start_agent_with("no-engine", &["--container-engine", "/nonexistent/docker.sock"]);
    fleet.wait_for_nodes(2);
    fleet.ok(&["drain", "node-a"]);
    let retry = "retry: {backoff: 1s}\nresources: {cpus: 0.5}\n";
    let id = fleet.submit(&python_job("elsewhere", retry, "print('ran here')"));
    // Twice on the node without an engine, and still queued though max_restarts is 0.
    wait_until("two attempts on no-engine", Duration::from_secs(60), || {
        fleet.json(&["job", &id])["attempts"].as_array().is_some_and(|a| a.len() >= 2 && a[1]["ended_at_ms"].is_i64())
    });
    let job = fleet.json(&["job", &id]);
    assert_ne!(job["state"], "failed", "{job:#}");
    assert!(job["attempts"][0]["outcome"].as_str().unwrap().contains("has no container engine"), "{job:#}");
    fleet.ok(&["undrain", "node-a"]);
    assert_eq!(fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(60)), "succeeded");
    let job = fleet.json(&["job", &id]);
    let last = job["attempts"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["nodes"], json!(["node-a"]), "{job:#}");
    assert_eq!(job["attempt"], 1, "the node's faults are not the job's attempts: {job:#}");
}

#[test]
fn nodes_report_their_images_and_a_job_goes_where_its_image_is() {
    let mut fleet = Fleet::start();
    let image = image();
    // Both fit every job below; only node-a's engine holds the image (no-engine sorts first,
    // so the usual choice would be it).
    fleet.start_agent_with("no-engine", &["--container-engine", "none"]);
    fleet.wait_for_nodes(2);
    wait_until("node-a to report the image", Duration::from_secs(30), || {
        let nodes = fleet.json(&["nodes"]);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "node-a" && n["images"].as_array().is_some_and(|i| i.iter().any(|i| i == image)))
    });
    for i in 0..3 {
        let id = fleet.submit(&python_job(&format!("warm-{i}"), "resources: {cpus: 0.5}\n", "print('hi')"));
        assert_eq!(fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(60)), "succeeded");
        assert_eq!(fleet.json(&["job", &id])["nodes"], json!(["node-a"]));
    }
}

/// The Helm chart's default way to run people's scripts: the agent inside their own image
/// (`examples/agent-in-your-image.Dockerfile`), running `command:` jobs with that image's Python.
#[test]
fn the_agent_built_into_a_users_image_runs_command_jobs_with_that_images_python() {
    let fleet = Fleet::start();
    let context = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(context.path().join("target/release")).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_gantry"), context.path().join("target/release/gantry")).unwrap();
    let dockerfile = support::repo_root().join("examples/agent-in-your-image.Dockerfile");
    let tag = "gantry-test-agent-in-image:1";
    sh(&format!(
        "docker build -q -f {} --build-arg BASE={} -t {tag} {} >/dev/null",
        dockerfile.display(),
        image(),
        context.path().display()
    ));
    let name = format!("gantry-test-agent-{}", std::process::id());
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
        }
    }
    let _gone = Gone(name.clone());
    sh(&format!(
        "docker run -d --name {name} --network host -v {ca}:/etc/gantry/ca.crt:ro -e GANTRY_JOIN_TOKEN={token} {tag} \
         agent --coordinator {url} --name in-image --ca /etc/gantry/ca.crt --work-dir /var/lib/gantry-agent \
         --container-engine none >/dev/null",
        ca = fleet.ca().display(),
        token = fleet.agent_token,
        url = fleet.url(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.json(&["nodes"]).as_array().unwrap().iter().filter(|n| n["connected"] == true).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the agent in the image did not join:\n{}",
            sh(&format!("docker logs {name} 2>&1"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    fleet.ok(&["drain", "node-a"]);
    let program = "import sys\nprint('python', sys.version.split()[0], 'from', sys.executable)";
    let spec = format!(
        "name: plain\nmax_restarts: 0\ncommand: [\"python3\", \"-c\", {}]\n",
        serde_json::to_string(program).unwrap()
    );
    let id = fleet.submit(&spec);
    assert_eq!(
        fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(60)),
        "succeeded",
        "{}",
        sh(&format!("docker logs {name} 2>&1"))
    );
    assert_eq!(fleet.json(&["job", &id])["nodes"], json!(["in-image"]));
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains("from /usr/local/bin/python3"), "the image's python:\n{logs}");
}

/// A `train:` job in an image runs gantry's own runtime, the agent's binary mounted in.
#[test]
fn a_train_job_in_an_image_runs_the_agents_runtime_inside_it() {
    let fleet = Fleet::start();
    let spec = format!(
        "name: boxed-train\nimage: {}\nimage_pull_policy: never\nmax_restarts: 0\nresources: {{cpus: 1}}\ntrain: {{epochs: 1}}\n",
        image()
    );
    let id = fleet.submit(&spec);
    succeeds(&fleet, &id, 120);
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains("test_accuracy"), "{logs}");
    let agent = std::fs::read_to_string(fleet.dir.path().join("node-a.log")).unwrap();
    let started: Vec<&str> = agent.lines().filter(|l| l.contains("job started")).collect();
    assert!(started.iter().any(|l| l.contains(image())), "it ran in a container: {started:?}");
    assert!(containers_of(&fleet, "node-a", &id).is_empty());
}
