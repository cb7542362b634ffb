//! `nodes` and `gpus`: the fleet as the coordinator sees it.

use gantry_proto::v1;

use crate::client::{self, Target, connect};
use crate::output::{GpuView, NodeView, bytes, outln, print_json, print_table};

pub async fn nodes(url: &Target, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let nodes = c.list_nodes(v1::ListNodesRequest {}).await.map_err(client::status)?.into_inner().nodes;
    let views: Vec<NodeView> = nodes.iter().map(node_view).collect();
    if json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|n| {
            let status = match (n.connected, n.drained) {
                (false, _) => "disconnected",
                (true, true) => "drained",
                (true, false) => "ready",
            };
            vec![
                n.name.clone(),
                status.into(),
                format!("{}/{}", n.cpus_used, n.cpus),
                format!("{}/{}", bytes(n.memory_used_bytes), bytes(n.memory_bytes)),
                n.gpus.to_string(),
                n.jobs.join(","),
            ]
        })
        .collect();
    print_table(&["NODE", "STATUS", "CPUS", "MEMORY", "GPUS", "JOBS"], &rows)?;
    Ok(())
}

pub async fn drain(url: &Target, node: &str, drain: bool, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let req = v1::DrainNodeRequest { node: node.to_string(), drain };
    let n = c.drain_node(req).await.map_err(client::status)?.into_inner();
    if json {
        return print_json(&node_view(&n));
    }
    if drain {
        outln!("node {node} drained: it keeps its {} running job(s) and takes no new ones", n.jobs.len())?;
    } else {
        outln!("node {node} takes new jobs again")?;
    }
    Ok(())
}

pub async fn remove(url: &Target, node: &str, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let req = v1::RemoveNodeRequest { node: node.to_string() };
    let certificates = c.remove_node(req).await.map_err(client::status)?.into_inner().certificates;
    if json {
        return print_json(&serde_json::json!({ "removed": node, "certificates": certificates }));
    }
    outln!(
        "node {node} removed: {certificates} agent certificate(s) ended, its jobs are requeued; an agent with a valid join token may join again (revoke the token to keep it out)"
    )?;
    Ok(())
}

fn node_view(n: &v1::Node) -> NodeView {
    let inv = n.inventory.clone().unwrap_or_default();
    NodeView {
        name: n.name.clone(),
        connected: n.connected,
        drained: n.drained,
        cpus: inv.cpus,
        cpus_used: n.cpus_used,
        memory_bytes: inv.memory_bytes,
        memory_used_bytes: n.memory_used_bytes,
        gpus: inv.gpus.len(),
        gpu_driver: inv.gpu_driver,
        images: inv.images,
        jobs: n.jobs.clone(),
        last_seen_ms: n.last_seen_ms,
    }
}

pub async fn gpus(url: &Target, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let gpus = c.list_gpus(v1::ListGpusRequest {}).await.map_err(client::status)?.into_inner().gpus;
    let views: Vec<GpuView> = gpus
        .iter()
        .map(|g| {
            let i = g.info.clone().unwrap_or_default();
            GpuView {
                uuid: i.uuid,
                name: i.name,
                memory_total_bytes: i.memory_total_bytes,
                node: g.node.clone(),
                index: i.index,
                memory_used_bytes: i.memory_used_bytes,
                utilization_percent: i.utilization_percent,
                temperature_c: i.temperature_c,
                power_mw: i.power_mw,
                healthy: i.healthy,
                health_reason: i.health_reason,
                job_id: (!g.job_id.is_empty()).then(|| g.job_id.clone()),
                serial: i.serial,
                compute_capability: i.compute_capability,
                sm_clock_mhz: i.sm_clock_mhz,
                power_limit_mw: i.power_limit_mw,
                ecc_uncorrected: i.ecc_uncorrected,
                pci_bus_id: i.pci_bus_id,
                mig_enabled: i.mig_enabled,
                throttle_reasons: i.throttle_reasons,
                numa_node: i.numa_node,
                processes: i
                    .processes
                    .iter()
                    .map(|p| serde_json::json!({"pid": p.pid, "used_memory_bytes": p.used_memory_bytes}))
                    .collect(),
                nvlink_peers: i.nvlink_peers,
                cpu_affinity: i.cpu_affinity,
                mig_instances: i
                    .mig_instances
                    .iter()
                    .map(|m| serde_json::json!({"uuid": m.uuid, "name": m.name, "memory_total_bytes": m.memory_total_bytes}))
                    .collect(),
                xid_errors: i.xid_errors,
            }
        })
        .collect();
    if json {
        return print_json(&views);
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|g| {
            vec![
                g.node.clone(),
                g.index.to_string(),
                g.name.clone(),
                format!("{}/{}", opt(g.memory_used_bytes.map(bytes)), bytes(g.memory_total_bytes)),
                opt(g.utilization_percent.map(|u| format!("{u}%"))),
                opt(g.temperature_c.map(|t| format!("{t}C"))),
                opt(g.power_mw.map(|p| format!("{:.0}W", p as f64 / 1000.0))),
                if g.healthy { "ok".into() } else { format!("unhealthy: {}", g.health_reason) },
                g.job_id.clone().unwrap_or_default(),
                topology(g),
                g.uuid.clone(),
            ]
        })
        .collect();
    print_table(
        &["NODE", "GPU", "NAME", "MEMORY", "UTIL", "TEMP", "POWER", "HEALTH", "JOB", "TOPOLOGY", "UUID"],
        &rows,
    )?;
    Ok(())
}

/// "numa 0, nvlink 3 peers, cpus 0-23, mig 2": what the inventory says of how a GPU is wired.
fn topology(g: &GpuView) -> String {
    let mut parts = Vec::new();
    if let Some(n) = g.numa_node {
        parts.push(format!("numa {n}"));
    }
    if !g.nvlink_peers.is_empty() {
        parts.push(format!("nvlink {} peers", g.nvlink_peers.len()));
    }
    if !g.cpu_affinity.is_empty() {
        parts.push(format!("cpus {}", g.cpu_affinity));
    }
    if !g.mig_instances.is_empty() {
        parts.push(format!("mig {}", g.mig_instances.len()));
    }
    if parts.is_empty() { "-".into() } else { parts.join(", ") }
}
