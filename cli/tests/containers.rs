//! The compose fleet (`compose/compose.yaml`) on the Docker engine, with images built offline
//! from this build's `gantry` binary: etcd, two coordinators, three agents with fake GPUs, each
//! in its own container, each agent on its own network with the coordinators and on a shared
//! fabric network for gangs. A 2-node data-parallel gang and a GPU job run across the
//! containers; stopping the container of a running job's agent, or cutting it off its network,
//! moves the job to another one.
//! The coordinators share etcd, so the binary must be built with the `etcd` feature.
#![cfg(feature = "etcd")]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Cli, fake_nvml, repo_root};

fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Builds `gantry:VERSION` and `gantry-etcd:VERSION` as the Dockerfiles say to offline.
fn build_images(root: &Path) {
    let stage = root.join("compose/stage-binaries");
    let stage = stage.to_str().unwrap();
    let docker = root.join("target/docker");
    run("sh", &[stage, env!("CARGO_BIN_EXE_gantry"), docker.to_str().unwrap()], root);
    let etcd = run("sh", &["-c", "command -v etcd"], root);
    run("sh", &[stage, etcd.trim(), root.join("target/docker-etcd").to_str().unwrap()], root);
    // The tags compose.yaml and the Helm chart name (helm_chart.rs checks the chart's).
    let version = env!("CARGO_PKG_VERSION");
    run("docker", &["build", "-q", "--target", "runtime", "-t", &format!("gantry:{version}"), "."], root);
    let etcd_tag = format!("gantry-etcd:{version}");
    run("docker", &["build", "-q", "-f", "compose/etcd.Dockerfile", "-t", &etcd_tag, "."], root);
}

/// A running compose project, taken down (with its networks and volumes) on drop.
struct Project {
    name: String,
    dir: tempfile::TempDir,
}

impl Project {
    fn compose(&self, args: &[&str]) -> String {
        let file = self.dir.path().join("compose.yaml");
        let mut all = vec!["-p", &self.name, "-f", file.to_str().unwrap()];
        all.extend(args);
        run("docker-compose", &all, self.dir.path())
    }

    /// The host address of a service's published port.
    fn port(&self, service: &str, port: &str) -> String {
        self.compose(&["port", service, port]).trim().to_string()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let file = self.dir.path().join("compose.yaml");
        let _ = Command::new("docker-compose")
            .args(["-p", &self.name, "-f", file.to_str().unwrap(), "down", "-v", "-t", "2"])
            .output();
    }
}

fn gpu(agent: usize, index: usize) -> serde_json::Value {
    serde_json::json!({
        "uuid": format!("GPU-{agent}0000000-0000-0000-0000-00000000000{index}"),
        "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 85_899_345_920u64,
        "memory_used_bytes": 0, "utilization_percent": 0,
    })
}

#[test]
fn the_compose_fleet_runs_a_gang_and_a_gpu_job_and_moves_a_stopped_agents_job() {
    let root = repo_root();
    build_images(&root);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(root.join("compose/compose.yaml"), dir.path().join("compose.yaml")).unwrap();
    for agent in 1..=3 {
        fake_nvml(
            &dir.path().join(format!("fake-gpu/agent-{agent}")),
            &serde_json::json!({"devices": [gpu(agent, 0), gpu(agent, 1)]}),
        );
    }
    // The fleet's tokens, as an operator would make them.
    let admin_token = support::test_secret();
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/admin-token"), &admin_token).unwrap();
    std::fs::write(dir.path().join("secrets/agent-token"), support::test_secret()).unwrap();
    let ca = support::operator_ca(&dir.path().join("secrets"));
    // Read by the containers' user, as compose/README.md does.
    use std::os::unix::fs::PermissionsExt;
    let key = dir.path().join("secrets/ca.key");
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o644)).unwrap();
    // agent-3 runs container jobs through this machine's engine (compose.yaml says why).
    let agent3_dir = dir.path().join("agent-3-work");
    support::job_writable_dir(&agent3_dir);
    let docker_gid = run("stat", &["-c", "%g", "/var/run/docker.sock"], &root);
    let env = format!("GANTRY_AGENT3_DIR={}\nDOCKER_GID={}\n", agent3_dir.display(), docker_gid.trim());
    std::fs::write(dir.path().join(".env"), env).unwrap();
    let project = Project { name: format!("gantrytest{}", std::process::id()), dir };
    project.compose(&["up", "-d"]);

    let urls: Vec<String> =
        ["coordinator-1", "coordinator-2"].iter().map(|s| format!("https://{}", project.port(s, "7070"))).collect();
    let dir = project.dir.path().to_path_buf();
    let cli = Cli { url: urls.join(","), dir, log: None, token: Some(admin_token), ca: Some(ca), netns: None };
    cli.wait_for_nodes(3, Duration::from_secs(90));
    let gpus = cli.json(&["gpus"]);
    assert_eq!(gpus.as_array().unwrap().len(), 6, "{gpus}");

    // A data-parallel gang across two agent containers, and a job on one fake GPU.
    let gang = cli.submit("name: gang\nresources: {nodes: 2, cpus: 1}\ntrain: {epochs: 3}\n");
    let on_gpu = cli.submit("name: on-gpu\nresources: {gpus: 1, cpus: 1}\ntrain: {epochs: 3}\n");
    for id in [&gang, &on_gpu] {
        let state = cli.wait_state(id, &["succeeded", "failed"], Duration::from_secs(180));
        assert_eq!(state, "succeeded", "{}", String::from_utf8_lossy(&cli.gantry(&["logs", id]).stdout));
    }
    let logs = cli.ok(&["logs", &gang]);
    assert!(logs.contains("joined rank=1 world_size=2"), "{logs}");
    let job = cli.json(&["job", &gang]);
    assert_eq!(job["nodes"].as_array().unwrap().len(), 2, "{job}");
    let job = cli.json(&["job", &on_gpu]);
    let placed = &job["attempts"][0]["gpus"];
    assert!(placed.as_array().unwrap().len() == 1 && placed[0].as_str().unwrap().starts_with("GPU-"), "{job}");

    // A job in a container of its own image (gantry's, the one image this machine holds): it
    // goes to agent-3, the agent whose engine holds it.
    let version = env!("CARGO_PKG_VERSION");
    let boxed = cli.submit(&format!(
        "name: boxed\nimage: gantry:{version}\nimage_pull_policy: never\nresources: {{cpus: 1}}\nmax_restarts: 0\n\
         command: [\"/usr/local/bin/gantry\", \"--version\"]\n"
    ));
    let state = cli.wait_state(&boxed, &["succeeded", "failed"], Duration::from_secs(120));
    let job = cli.json(&["job", &boxed]);
    assert_eq!(state, "succeeded", "{job}");
    assert_eq!(job["nodes"], serde_json::json!(["agent-3"]), "{job}");
    assert!(cli.ok(&["logs", &boxed]).contains(&format!("gantry {version}")));

    // A longer job; stop its agent's container: it is noticed, and the job runs elsewhere.
    let long = cli.submit(
        "name: long\nresources: {cpus: 1}\nmax_restarts: 0\n\
         train: {model: transformer, dataset: genesis, epochs: 1, batch_size: 32, checkpoint_every_steps: 10}\n",
    );
    cli.wait_state(&long, &["running"], Duration::from_secs(60));
    let first = cli.json(&["job", &long])["nodes"][0].as_str().unwrap().to_string();
    // Let it commit a checkpoint first, so the next attempt resumes.
    let deadline = Instant::now() + Duration::from_secs(90);
    while cli.json(&["checkpoints", &long]).as_array().is_none_or(|c| c.is_empty()) {
        assert!(Instant::now() < deadline, "no checkpoint of job {long}");
        std::thread::sleep(Duration::from_millis(300));
    }
    project.compose(&["stop", "-t", "1", &first]);
    wait_connected(&cli, &first, false);
    let state = cli.wait_state(&long, &["succeeded", "failed"], Duration::from_secs(240));
    let job = cli.json(&["job", &long]);
    assert_eq!(state, "succeeded", "{job}");
    let last = job["nodes"][0].as_str().unwrap();
    assert_ne!(last, first, "the job ran again on another agent: {job}");
    let logs = cli.ok(&["logs", &long]);
    assert!(logs.contains("resumed step="), "it resumed from its checkpoint:\n{logs}");

    // Cut a running job's agent off its network (it and the coordinators no longer reach each
    // other; it keeps its fabric): it is noticed and the job runs on the last agent. Connected
    // again, the agent rejoins.
    let cut = cli.submit(
        "name: cut\nresources: {cpus: 1}\nmax_restarts: 0\n\
         train: {model: transformer, dataset: genesis, epochs: 1, batch_size: 32, checkpoint_every_steps: 10}\n",
    );
    cli.wait_state(&cut, &["running"], Duration::from_secs(60));
    let node = cli.json(&["job", &cut])["nodes"][0].as_str().unwrap().to_string();
    let container = project.compose(&["ps", "-q", &node]).trim().to_string();
    let rack = format!("{}_rack-{}", project.name, node.trim_start_matches("agent-"));
    let networks = run(
        "docker",
        &["inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", &container],
        &root,
    );
    let mut networks: Vec<&str> = networks.split_whitespace().collect();
    networks.sort();
    assert_eq!(networks, [format!("{}_fabric", project.name), rack.clone()], "{node}'s networks");
    run("docker", &["network", "disconnect", &rack, &container], &root);
    wait_connected(&cli, &node, false);
    let state = cli.wait_state(&cut, &["succeeded", "failed"], Duration::from_secs(240));
    let job = cli.json(&["job", &cut]);
    assert_eq!(state, "succeeded", "{job}");
    assert_ne!(job["nodes"][0].as_str().unwrap(), node, "the job ran again on another agent: {job}");
    run("docker", &["network", "connect", &rack, &container], &root);
    wait_connected(&cli, &node, true);
}

/// Until the coordinators see `node` connected (or not).
fn wait_connected(cli: &Cli, node: &str, connected: bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = cli.json(&["nodes"]);
        if nodes.as_array().unwrap().iter().any(|n| n["name"] == node && n["connected"] == connected) {
            return;
        }
        assert!(Instant::now() < deadline, "{node} not seen with connected={connected}: {nodes}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The GPU image (`compose/gpu.Dockerfile`) holds what the CUDA backend loads besides the
/// driver. On this machine, with no GPU and no driver, a `train` job in it that is told to use
/// GPU 0 must find NVRTC and the CUDA headers, report only the driver missing, and train on the
/// CPU. It needs a `gantry` built with `--features cuda` (`GANTRY_CUDA_BIN`, a file named
/// `gantry`), which `.ci/run` builds before running this test.
#[test]
#[ignore = "needs GANTRY_CUDA_BIN, a gantry built with --features cuda (.ci/run provides it)"]
fn the_gpu_image_holds_nvrtc_and_the_cuda_headers() {
    let bin = std::env::var("GANTRY_CUDA_BIN").expect("GANTRY_CUDA_BIN: a gantry built with --features cuda");
    let root = repo_root();
    let staged = root.join("target/docker-gpu");
    let staged = staged.to_str().unwrap();
    run("sh", &[root.join("compose/stage-binaries").to_str().unwrap(), &bin, staged], &root);
    run("sh", &[root.join("compose/stage-cuda-runtime").to_str().unwrap(), staged], &root);
    let tag = format!("gantry:{}-cuda", env!("CARGO_PKG_VERSION"));
    run("docker", &["build", "-q", "-f", "compose/gpu.Dockerfile", "-t", &tag, "."], &root);

    let spec = tempfile::tempdir().unwrap();
    std::fs::write(spec.path().join("train.json"), r#"{"model": "mlp", "dataset": "digits", "epochs": 1}"#).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(spec.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mount = format!("{}:/spec:ro", spec.path().display());
    let args = ["run", "--pull", "never", "--rm", "--network", "none", "-e", "CUDA_VISIBLE_DEVICES=0", "-v", &mount];
    let out = run("docker", &[&args[..], &[tag.as_str(), "train", "--spec", "/spec/train.json"]].concat(), &root);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "[gantry] CUDA_VISIBLE_DEVICES names 0 but the GPU did not answer (missing the NVIDIA driver's libcuda.so.1): \
         training on the CPU",
        "{out}"
    );
    assert!(lines[1].ends_with(" device=cpu"), "{out}");
    assert!(out.contains("\ndone steps=23 "), "{out}");
}
