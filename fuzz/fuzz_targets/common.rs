//! A coordinator on its own data directory, with one agent registered and one job placed on it:
//! what an agent's messages and uploads act on. One per process, made once: opening a store and
//! placing a job cost fsyncs, and a fresh one per input ran 80 inputs a second. Inputs see what
//! earlier ones left, as a long-lived coordinator does.

use gantry_coordinator::{Coordinator, Settings};
use gantry_proto::v1;

pub const AGENT: &str = "node-1";

pub struct World {
    /// Holds `data/` and nothing else: anything else in it escaped the data directory.
    pub root: tempfile::TempDir,
    pub coordinator: Coordinator,
    pub job_id: String,
    /// What the coordinator sends the agent: kept open, as a connected agent's would be.
    pub _to_agent: tokio::sync::mpsc::Receiver<v1::CoordinatorMessage>,
}

pub fn world() -> &'static World {
    static WORLD: std::sync::OnceLock<World> = std::sync::OnceLock::new();
    WORLD.get_or_init(make)
}

fn make() -> World {
    let root = tempfile::tempdir().unwrap();
    let settings = Settings { auth: false, ..Settings::default() };
    let coordinator = Coordinator::open(&root.path().join("data"), settings).unwrap();
    let gpu = v1::GpuInfo { uuid: "GPU-0".into(), name: "fuzz".into(), healthy: true, ..Default::default() };
    let inventory = v1::Inventory {
        hostname: AGENT.into(),
        cpus: 8,
        memory_bytes: 64 << 30,
        gpus: vec![gpu],
        ..Default::default()
    };
    coordinator.register_agent(AGENT, inventory, "127.0.0.1".into()).unwrap();
    let (tx, to_agent) = tokio::sync::mpsc::channel(1024);
    coordinator.attach_session(AGENT, v1::Heartbeat::default(), tx).unwrap();
    let spec = gantry_core::JobSpec::from_yaml("name: fuzz\nresources: {gpus: 1}\ncommand: [\"true\"]\n").unwrap();
    let job_id = coordinator.submit(spec, "fuzz").unwrap().id;
    coordinator.schedule_pass().unwrap();
    World { root, coordinator, job_id, _to_agent: to_agent }
}

/// `data` as length-delimited protobuf messages, up to the first that does not decode.
pub fn messages<M: prost::Message + Default>(mut data: &[u8]) -> Vec<M> {
    let mut out = Vec::new();
    while !data.is_empty() {
        match M::decode_length_delimited(&mut data) {
            Ok(m) => out.push(m),
            Err(_) => break,
        }
    }
    out
}

/// Every entry of the root but `data/`: files an input wrote outside the data directory.
pub fn escaped(world: &World) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(world.root.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_none_or(|n| n != "data"))
        .collect()
}
