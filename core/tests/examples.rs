//! Every job spec under `examples/` parses and passes the checks a submit makes, so the specs
//! the README points at do not rot as the spec grows.

use std::path::{Path, PathBuf};

use gantry_core::JobSpec;

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            found.push(path);
        }
    }
}

#[test]
fn every_example_spec_is_valid() {
    let mut files = Vec::new();
    yaml_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"), &mut files);
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let spec = JobSpec::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        spec.validate().unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}
