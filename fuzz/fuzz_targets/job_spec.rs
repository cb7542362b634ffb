//! The job-spec parser: whatever a user submits, it answers with a spec or an error, never a
//! panic; and a spec it accepts crosses the wire unchanged (what the coordinator re-validates is
//! what the user wrote).
#![no_main]

use gantry_core::JobSpec;
use gantry_proto::v1;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(spec) = JobSpec::from_yaml(text) else { return };
    let wire = v1::JobSpec::from(&spec);
    let back = JobSpec::try_from(wire).expect("a spec that parsed must convert back from the wire");
    assert_eq!(back, spec, "the spec changed crossing the wire");
});
