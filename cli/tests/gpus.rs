//! GPUs through the agent's real NVML code path (nvml-wrapper), served by the fake library.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Fleet, fake_nvml, set_devices};

fn h100(i: u32, util: u32) -> serde_json::Value {
    json!({
        "uuid": format!("GPU-fake-{i}"),
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 85_899_345_920u64,
        "memory_used_bytes": 1_073_741_824u64,
        "utilization_percent": util,
        "temperature_c": 40 + i,
        "power_mw": 120_000,
        "serial": format!("165{i:07}"),
        "compute_capability": [9, 0],
        "sm_clock_mhz": 1980,
        "power_limit_mw": 700_000,
        "ecc_uncorrected": 0,
        "slowdown_temperature_c": 88,
        "pci_bus_id": format!("00000000:{:02X}:00.0", 0x18 + i),
        "mig_enabled": false,
        "throttle_reasons": 4,
        "numa_node": i,
        "processes": [[4242 + i, 2_147_483_648u64]],
        // Bridged to its neighbour by two links, one of them down.
        "nvlinks": [format!("00000000:{:02X}:00.0", 0x18 + (i ^ 1)), null, format!("00000000:{:02X}:00.0", 0x18 + (i ^ 1))],
        "cpu_affinity": [i * 4, i * 4 + 1, i * 4 + 2, i * 4 + 3],
        "xid_events": []
    })
}

/// An A100 in MIG mode, split into two instances.
fn a100_mig(i: u32) -> serde_json::Value {
    json!({
        "uuid": format!("GPU-fake-{i}"),
        "name": "NVIDIA A100-SXM4-80GB",
        "memory_total_bytes": 85_899_345_920u64,
        "mig_enabled": true,
        "mig_instances": [
            {"uuid": format!("MIG-fake-{i}-0"), "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "memory_total_bytes": 42_949_672_960u64},
            {"uuid": format!("MIG-fake-{i}-1"), "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "memory_total_bytes": 42_949_672_960u64}
        ]
    })
}

/// A coordinator with a CPU agent (node-a) and a GPU agent (gpu-node) on the fake NVML
/// library serving `devices`; returns the fleet and the library's directory.
fn gpu_fleet(devices: serde_json::Value) -> (Fleet, std::path::PathBuf) {
    let mut fleet = Fleet::start();
    let nvml_dir = fleet.dir.path().join("nvml");
    let lib = fake_nvml(&nvml_dir, &devices);
    fleet.start_agent_with("gpu-node", &["--nvml-lib", lib.to_str().unwrap()]);
    fleet.wait_for_nodes(2);
    (fleet, nvml_dir)
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn gpus_are_reported_scheduled_and_marked_unhealthy_when_lost() {
    // The second GPU does not report temperature or power: those fields are simply absent.
    let mut quiet = h100(1, 0);
    quiet.as_object_mut().unwrap().remove("temperature_c");
    quiet.as_object_mut().unwrap().remove("power_mw");
    let mig = a100_mig(2);
    let (fleet, nvml_dir) =
        gpu_fleet(json!({"driver": "580.65-fake", "devices": [h100(0, 7), quiet.clone(), mig.clone()]}));

    let gpus = fleet.json(&["gpus"]);
    let gpus = gpus.as_array().unwrap();
    assert_eq!(gpus.len(), 3, "{gpus:?}");
    assert_eq!(gpus[0]["uuid"], "GPU-fake-0");
    assert_eq!(gpus[0]["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(gpus[0]["memory_total_bytes"], 85_899_345_920u64);
    assert_eq!(gpus[0]["node"], "gpu-node");
    assert_eq!(gpus[0]["temperature_c"], 40);
    assert_eq!(gpus[0]["compute_capability"], "9.0");
    assert_eq!(gpus[0]["serial"], "1650000000");
    assert_eq!(gpus[0]["sm_clock_mhz"], 1980);
    assert_eq!(gpus[0]["healthy"], true);
    assert_eq!(gpus[0]["pci_bus_id"], "00000000:18:00.0");
    assert_eq!(gpus[0]["mig_enabled"], false);
    assert_eq!(gpus[0]["throttle_reasons"], json!(["sw_power_cap"]));
    assert_eq!(gpus[1]["numa_node"], 1);
    assert_eq!(gpus[0]["processes"], json!([{"pid": 4242, "used_memory_bytes": 2_147_483_648u64}]));
    assert!(gpus[1].get("temperature_c").is_none() && gpus[1].get("power_mw").is_none(), "{:?}", gpus[1]);
    // Topology: NVLink peers by UUID, the CPUs close to each GPU, MIG instances.
    assert_eq!(gpus[0]["nvlink_peers"], json!(["GPU-fake-1"]));
    assert_eq!(gpus[1]["nvlink_peers"], json!(["GPU-fake-0"]));
    assert_eq!(gpus[1]["cpu_affinity"], "4-7");
    assert!(gpus[2].get("nvlink_peers").is_none(), "no NVLink, no peers: {:?}", gpus[2]);
    assert_eq!(gpus[2]["mig_enabled"], true);
    let instances = gpus[2]["mig_instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "{:?}", gpus[2]);
    assert_eq!(instances[1]["uuid"], "MIG-fake-2-1");
    assert_eq!(instances[1]["memory_total_bytes"], 42_949_672_960u64);
    let table = fleet.ok(&["gpus"]);
    assert!(table.contains("numa 0, nvlink 1 peers, cpus 0-3"), "{table}");
    assert!(table.contains("mig 2"), "{table}");

    // Telemetry follows the device within a couple of heartbeats.
    set_devices(&nvml_dir, &json!({"devices": [h100(0, 93), quiet.clone(), mig.clone()]}));
    wait_for("utilisation 93%", || fleet.json(&["gpus"])[0]["utilization_percent"] == 93);

    // Uncorrectable ECC errors or a temperature at the slowdown threshold make a GPU unhealthy.
    let mut ecc = h100(0, 93);
    ecc["ecc_uncorrected"] = json!(2);
    let mut hot = quiet.clone();
    hot["temperature_c"] = json!(95);
    hot["slowdown_temperature_c"] = json!(88);
    set_devices(&nvml_dir, &json!({"devices": [ecc, hot, mig.clone()]}));
    wait_for("both GPUs unhealthy", || {
        fleet.json(&["gpus"]).as_array().unwrap()[..2].iter().all(|g| g["healthy"] == false)
    });
    let gpus = fleet.json(&["gpus"]);
    assert!(gpus[0]["health_reason"].as_str().unwrap().contains("2 uncorrectable ECC errors"), "{gpus}");
    assert!(gpus[1]["health_reason"].as_str().unwrap().contains("slowdown threshold 88C"), "{gpus}");
    set_devices(&nvml_dir, &json!({"devices": [h100(0, 93), quiet.clone(), mig.clone()]}));
    wait_for("the GPUs healthy again", || {
        fleet.json(&["gpus"]).as_array().unwrap().iter().all(|g| g["healthy"] == true)
    });

    // A GPU job gets exactly its GPU, by UUID; never a GPU in MIG mode, whose whole is not usable.
    let id = fleet.submit(
        "name: gpu-job\nresources: {gpus: 1, gpu_model: H100}\ncommand: [\"bash\", \"-c\", \"echo cuda=$CUDA_VISIBLE_DEVICES\"]\n",
    );
    assert_eq!(fleet.wait_state(&id, &["succeeded", "failed"], Duration::from_secs(30)), "succeeded");
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains("cuda=GPU-fake-0") || logs.contains("cuda=GPU-fake-1"), "{logs}");
    assert_eq!(fleet.json(&["job", &id])["nodes"][0], "gpu-node");

    // A lost GPU stays listed, unhealthy, with the reason; nothing new is placed on it.
    let mut lost = h100(0, 0);
    lost["lost"] = json!(true);
    set_devices(&nvml_dir, &json!({"devices": [lost, quiet, mig]}));
    wait_for("GPU 0 unhealthy", || fleet.json(&["gpus"])[0]["healthy"] == false);
    let gpu0 = &fleet.json(&["gpus"])[0];
    assert!(gpu0["health_reason"].as_str().unwrap().contains("NVML"), "{gpu0:?}");
    let two = fleet.submit("name: two-gpus\nresources: {gpus: 2}\ncommand: [\"true\"]\n");
    std::thread::sleep(Duration::from_secs(2));
    let job = fleet.json(&["job", &two]);
    assert_eq!(job["state"], "queued");
    assert!(job["pending_reason"].as_str().unwrap().contains("the most on one node is 1"), "{job}");
}

#[test]
fn prometheus_scrapes_dcgm_named_gpu_metrics_from_the_coordinator() {
    let (fleet, _) = gpu_fleet(json!({"devices": [h100(0, 42), h100(1, 17)]}));

    let (code, text) = support::http_get_as(&fleet.web(), "/metrics", &fleet.admin_token).unwrap();
    assert_eq!(code, 200);
    assert!(text.contains("DCGM_FI_DEV_GPU_UTIL{gpu=\"0\",UUID=\"GPU-fake-0\""), "{text}");
    assert!(text.contains("gantry_jobs{state=\"queued\"} 0"), "{text}");

    let prometheus = support::Prometheus::start(&fleet.web(), &fleet.admin_token);
    let deadline = Instant::now() + Duration::from_secs(30);
    let result = loop {
        let r = prometheus.query("DCGM_FI_DEV_GPU_UTIL");
        if r.len() == 2 {
            break r;
        }
        assert!(Instant::now() < deadline, "Prometheus did not scrape the GPU metrics: {r:?}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut seen: Vec<(String, String, String)> = result
        .iter()
        .map(|s| {
            let m = &s["metric"];
            (
                m["UUID"].as_str().unwrap().into(),
                m["Hostname"].as_str().unwrap().into(),
                s["value"][1].as_str().unwrap().into(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [("GPU-fake-0".into(), "gpu-node".into(), "42".into()), ("GPU-fake-1".into(), "gpu-node".into(), "17".into())]
    );
}

#[test]
fn a_job_on_a_gpu_with_a_critical_xid_is_stopped_and_requeued_on_a_healthy_one() {
    let (fleet, nvml_dir) = gpu_fleet(json!({"devices": [h100(0, 0), h100(1, 0)]}));
    let script =
        r#"trap 'echo stopping; exit 143' TERM; echo "on=$CUDA_VISIBLE_DEVICES"; while true; do sleep 0.1; done"#;
    let id = fleet.submit(&format!(
        "name: long\nresources: {{gpus: 1}}\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(script).unwrap()
    ));
    let mut first = String::new();
    wait_for("the job to start", || {
        first = fleet.ok(&["logs", &id]).lines().find_map(|l| l.strip_prefix("on=")).unwrap_or("").to_string();
        !first.is_empty()
    });
    let (bad, good) = if first == "GPU-fake-0" { (0, 1) } else { (1, 0) };
    // The driver reports XID 79 (fallen off the bus) through NVML's event set.
    let mut failing = h100(bad, 0);
    failing["xid_events"] = json!([79]);
    let devices = if bad == 0 { json!([failing, h100(1, 0)]) } else { json!([h100(0, 0), failing]) };
    set_devices(&nvml_dir, &json!({ "devices": devices }));
    wait_for("the job to run on the healthy GPU", || fleet.ok(&["logs", &id]).contains(&format!("on=GPU-fake-{good}")));
    let logs = fleet.ok(&["logs", &id]);
    assert!(logs.contains("stopping"), "the job had its SIGTERM: {logs}");
    let job = fleet.json(&["job", &id]);
    assert_eq!(job["state"], "running");
    assert_eq!(job["attempt"], 1, "an unhealthy GPU is not the job's failure: {job}");
    let gpus = fleet.json(&["gpus"]);
    assert_eq!(gpus[bad as usize]["health_reason"], "XID 79: GPU has fallen off the bus", "{gpus}");
    assert_eq!(gpus[bad as usize]["xid_errors"], json!([79]));
    fleet.ok(&["cancel", &id]);
}

#[test]
fn the_web_page_shows_the_fleet_the_queue_and_live_logs_in_a_real_browser() {
    let (fleet, _) = gpu_fleet(json!({"devices": [h100(0, 55), h100(1, 12)]}));
    let ticker = r#"for i in $(seq 1 600); do
        echo "tick $i"; echo "{\"step\": $i, \"loss\": 0.$((1000 - i))}" >> "$GANTRY_METRICS_FILE"; sleep 0.2
    done"#;
    let running = fleet.submit(&format!(
        "name: ticker\nresources: {{gpus: 1}}\ncommand: [\"bash\", \"-c\", {}]\n",
        serde_json::to_string(ticker).unwrap()
    ));
    let waiting = fleet.submit("name: too-big\nresources: {gpus: 8}\ncommand: [\"true\"]\n");
    fleet.wait_state(&running, &["running"], Duration::from_secs(30));
    wait_for("the first log lines", || fleet.ok(&["logs", &running]).contains("tick 2"));
    // The job's metrics reach `gantry job` and Prometheus' text.
    wait_for("metrics in gantry job", || fleet.json(&["job", &running])["metrics"][0]["step"].as_u64() >= Some(3));
    let metrics = &fleet.json(&["job", &running])["metrics"][0];
    assert_eq!(metrics["rank"], 0);
    assert!(metrics["values"]["loss"].as_f64().unwrap() < 1.0, "{metrics}");
    assert!(fleet.ok(&["job", &running]).contains("metrics:   rank 0 step "));
    let (_, text) = support::http_get_as(&fleet.web(), "/metrics", &fleet.admin_token).unwrap();
    assert!(text.contains(&format!("gantry_job_metric{{job=\"{running}\",rank=\"0\",name=\"loss\"}}")), "{text}");

    let url = fleet.web_url(&format!("/?job={running}"));
    let out = support::chromium(&["--dump-dom"], &url);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    for uuid in ["GPU-fake-0", "GPU-fake-1"] {
        assert!(dom.contains(&format!("data-uuid=\"{uuid}\"")), "GPU row {uuid} missing:\n{dom}");
    }
    assert!(dom.contains("55%"), "utilisation shown");
    assert!(dom.contains(&format!("data-id=\"{waiting}\"")), "the waiting job is listed");
    assert!(dom.contains("no node has that many matching GPUs"), "its pending reason is shown");
    assert!(dom.contains("<div class=\"log-line\">tick 1</div>"), "live log lines of the selected job:\n{dom}");
    assert!(dom.contains("<span class=\"metric\" data-name=\"loss\">"), "the job's metrics:\n{dom}");
    assert!(dom.contains("<polyline points="), "the loss chart is drawn:\n{dom}");

    // A screenshot, kept as a test artifact.
    let artifacts = support::repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let out = support::chromium(&[&format!("--screenshot={}", shot.display())], &url);
    assert!(out.status.success() && shot.exists(), "screenshot failed: {}", String::from_utf8_lossy(&out.stderr));
    fleet.ok(&["cancel", &running]);
}

#[test]
fn gantry_top_renders_the_fleet_and_the_queue_in_a_terminal() {
    let (fleet, _) = gpu_fleet(json!({"devices": [h100(0, 64)]}));
    let waiting = fleet.submit("name: needs-eight\nresources: {gpus: 8}\ncommand: [\"true\"]\n");

    // A private tmux server, so nothing else on the machine is touched.
    let socket = format!("gantry-test-{}", support::free_port());
    let tmux = |args: &[&str]| {
        std::process::Command::new("tmux").arg("-L").arg(&socket).args(args).output().expect("tmux is not installed")
    };
    let cmd = format!(
        "GANTRY_COORDINATOR={} GANTRY_CA={} GANTRY_TOKEN={} {} top",
        fleet.url(),
        fleet.ca().display(),
        fleet.admin_token,
        support::GANTRY
    );
    assert!(tmux(&["new-session", "-d", "-s", "top", "-x", "200", "-y", "40", &cmd]).status.success());
    let mut screen = String::new();
    wait_for("gantry top to draw", || {
        screen = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned();
        screen.contains("GPU-fake-0") && screen.contains("needs-eight")
    });
    assert!(screen.contains("64%"), "utilisation shown:\n{screen}");
    assert!(screen.contains("the most on one node is 1"), "the pending reason is shown:\n{screen}");
    assert!(screen.contains(&waiting));
    tmux(&["send-keys", "-t", "top", "q"]);
    wait_for("gantry top to quit on q", || !tmux(&["has-session", "-t", "top"]).status.success());
    tmux(&["kill-server"]);
}
