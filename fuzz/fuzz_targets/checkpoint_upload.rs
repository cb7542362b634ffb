//! The checkpoint upload path: a header and chunks from an agent. Whatever they say, nothing is
//! written outside the job's own directory, nothing panics, and an upload is recorded only if
//! every file's path is a plain relative one.
#![no_main]

#[path = "common.rs"]
mod common;

use gantry_proto::v1;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fn plain_relative(path: &str) -> bool {
    !path.is_empty() && std::path::Path::new(path).components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

fuzz_target!(|data: &[u8]| {
    let world = common::world();
    let mut parts = common::messages::<v1::CheckpointUpload>(data);
    // The fuzzer need not guess the job's id: a header names the job that exists.
    if let Some(v1::CheckpointUpload { part: Some(v1::checkpoint_upload::Part::Header(h)) }) = parts.first_mut() {
        h.job_id = world.job_id.clone();
    }
    let paths: Vec<String> = match parts.first() {
        Some(v1::CheckpointUpload { part: Some(v1::checkpoint_upload::Part::Header(h)) }) => {
            h.files.iter().map(|f| f.path.clone()).collect()
        }
        _ => Vec::new(),
    };
    let result = runtime().block_on(gantry_coordinator::fuzzing::upload_checkpoint(&world.coordinator, parts));
    if result.is_ok() {
        assert!(paths.iter().all(|p| plain_relative(p)), "an upload with an unsafe path was recorded: {paths:?}");
    }
    assert!(common::escaped(world).is_empty(), "files outside the data directory: {:?}", common::escaped(world));
});
