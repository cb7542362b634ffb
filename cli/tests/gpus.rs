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
        "power_mw": 120_000
    })
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
    let mut fleet = Fleet::start();
    let nvml_dir = fleet.dir.path().join("nvml");
    // The second GPU does not report temperature or power: those fields are simply absent.
    let mut quiet = h100(1, 0);
    quiet.as_object_mut().unwrap().remove("temperature_c");
    quiet.as_object_mut().unwrap().remove("power_mw");
    let lib = fake_nvml(&nvml_dir, &json!({"driver": "580.65-fake", "devices": [h100(0, 7), quiet.clone()]}));
    fleet.start_agent_with("gpu-node", &["--nvml-lib", lib.to_str().unwrap()]);
    fleet.wait_for_nodes(2);

    let gpus = fleet.json(&["gpus"]);
    let gpus = gpus.as_array().unwrap();
    assert_eq!(gpus.len(), 2, "{gpus:?}");
    assert_eq!(gpus[0]["uuid"], "GPU-fake-0");
    assert_eq!(gpus[0]["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(gpus[0]["memory_total_bytes"], 85_899_345_920u64);
    assert_eq!(gpus[0]["node"], "gpu-node");
    assert_eq!(gpus[0]["temperature_c"], 40);
    assert!(gpus[1].get("temperature_c").is_none() && gpus[1].get("power_mw").is_none(), "{:?}", gpus[1]);

    // Telemetry follows the device within a couple of heartbeats.
    set_devices(&nvml_dir, &json!({"devices": [h100(0, 93), quiet.clone()]}));
    wait_for("utilisation 93%", || fleet.json(&["gpus"])[0]["utilization_percent"] == 93);

    // A GPU job gets exactly its GPU, by UUID.
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
    set_devices(&nvml_dir, &json!({"devices": [lost, quiet]}));
    wait_for("GPU 0 unhealthy", || fleet.json(&["gpus"])[0]["healthy"] == false);
    let gpu0 = &fleet.json(&["gpus"])[0];
    assert!(gpu0["health_reason"].as_str().unwrap().contains("NVML"), "{gpu0:?}");
    let two = fleet.submit("name: two-gpus\nresources: {gpus: 2}\ncommand: [\"true\"]\n");
    std::thread::sleep(Duration::from_secs(2));
    let job = fleet.json(&["job", &two]);
    assert_eq!(job["state"], "queued");
    assert!(job["pending_reason"].as_str().unwrap().contains("the most on one node is 1"), "{job}");
}
