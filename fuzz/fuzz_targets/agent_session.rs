//! An agent's session: whatever an agent (or something holding an agent's certificate) sends
//! after its first heartbeat, the coordinator records or refuses it, and never panics.
#![no_main]

#[path = "common.rs"]
mod common;

use gantry_proto::v1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let world = common::world();
    for msg in common::messages::<v1::AgentMessage>(data) {
        let _ = gantry_coordinator::fuzzing::session_message(&world.coordinator, common::AGENT, msg);
    }
    // Whatever it was told, the coordinator can still plan and answer.
    world.coordinator.schedule_pass().unwrap();
    assert!(common::escaped(world).is_empty());
});
