//! `gantry train --spec FILE`: the training runtime in this process. Agents run it for `train:`
//! jobs, with the checkpoint and resume directories in the environment.

use std::path::Path;

use anyhow::Context;
use gantry_core::TrainSpec;

/// Exit status 143 (128 + SIGTERM) when stopped by SIGTERM after checkpointing, as a shell would.
pub fn run(spec_file: &Path) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(spec_file).with_context(|| format!("cannot read {}", spec_file.display()))?;
    let spec: TrainSpec =
        serde_json::from_str(&text).with_context(|| format!("{}: not a train spec (JSON)", spec_file.display()))?;
    spec.validate().map_err(|e| anyhow::anyhow!("{}: {e}", spec_file.display()))?;
    let env = gantry_jobs::RunEnv::from_env()?;
    gantry_jobs::install_sigterm_handler(env.stop.clone())?;
    // A stdout that reports a closed pipe as such, so `main` ends quietly on it.
    let mut out = crate::output::Stdout;
    let outcome = gantry_jobs::train(&spec, &env, &mut out)?;
    Ok(if outcome.stopped { 143 } else { 0 })
}
