//! `gantry sim`: replay a job trace through the real scheduler in simulated time, FIFO beside
//! gantry's policy.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use gantry_core::sim::{self, Policy, Report};

use crate::output::outln;

#[derive(Args)]
pub struct SimArgs {
    /// A trace in the Helios CSV schema (job_id, user or vc, gpu_num, node_num, submit_time,
    /// duration). Without it, a synthetic trace is generated.
    trace: Option<PathBuf>,
    /// Jobs in the generated trace.
    #[arg(long, default_value_t = 2000)]
    generate: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the generated trace here (CSV).
    #[arg(long)]
    write_trace: Option<PathBuf>,
    /// Nodes in the simulated fleet.
    #[arg(long, default_value_t = 16)]
    nodes: usize,
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
}

pub fn run(args: SimArgs, json: bool) -> anyhow::Result<()> {
    let trace = match &args.trace {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            sim::parse_trace(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => sim::generate_trace(args.generate, args.seed),
    };
    if let Some(out) = &args.write_trace {
        std::fs::write(out, sim::trace_to_csv(&trace)).with_context(|| format!("cannot write {}", out.display()))?;
    }
    let reports: Vec<Report> = [Policy::Fifo, Policy::Gantry]
        .into_iter()
        .map(|p| sim::simulate(&trace, args.nodes, args.gpus_per_node, p))
        .collect();
    for r in &reports {
        if json {
            let queues: serde_json::Map<String, serde_json::Value> = r
                .queues
                .iter()
                .map(|(q, v)| {
                    let value =
                        serde_json::json!({"jobs": v.jobs, "gpu_hours": v.gpu_hours, "wait_median_s": v.wait_median_s});
                    (q.clone(), value)
                })
                .collect();
            let line = serde_json::json!({
                "policy": r.policy, "jobs": r.jobs, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
                "utilisation": r.utilisation, "wait_median_s": r.wait_median_s, "wait_p99_s": r.wait_p99_s,
                "jct_median_s": r.jct_median_s, "makespan_s": r.makespan_s, "queues": queues,
            });
            outln!("{line}")?;
            continue;
        }
        outln!(
            "{:<7} jobs {:>5}  utilisation {:>5.1}%  wait median {:>7}s  p99 {:>8}s  JCT median {:>7}s  makespan {}s",
            r.policy,
            r.jobs,
            r.utilisation * 100.0,
            r.wait_median_s,
            r.wait_p99_s,
            r.jct_median_s,
            r.makespan_s
        )?;
        for (q, v) in &r.queues {
            outln!(
                "        queue {q:<10} jobs {:>5}  GPU-hours {:>9.1}  wait median {:>7}s",
                v.jobs,
                v.gpu_hours,
                v.wait_median_s
            )?;
        }
    }
    Ok(())
}
