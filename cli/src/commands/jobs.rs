//! `submit`, `jobs`, `job`, `cancel`, `logs`, and `dev --run`'s follow-to-the-end.

use std::path::Path;

use anyhow::Context;
use gantry_core::JobSpec;
use gantry_proto::v1;
use tokio_stream::StreamExt;

use crate::client::{self, Target, connect};
use crate::output::{self, JobView, errln, outln, print_json, print_table};

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The spec in `file`, with the paths of its data and weights made absolute from the file's
/// directory (the job reads them on an agent, in a directory of its own).
fn read_spec(file: &Path) -> anyhow::Result<JobSpec> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut spec =
        JobSpec::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: invalid job spec: {e}", file.display()))?;
    if let Some(train) = spec.train.as_mut() {
        let dir = std::path::absolute(file)?.parent().map(Path::to_path_buf).unwrap_or_default();
        train.anchor_paths(&dir);
    }
    Ok(spec)
}

pub async fn submit(url: &Target, file: &Path, follow: bool, json: bool) -> anyhow::Result<i32> {
    // The spec is checked before connecting: a bad file is refused even with no coordinator.
    let spec = read_spec(file)?;
    let mut c = connect(url).await?;
    let reply = c.submit(v1::SubmitRequest { spec: Some(v1::JobSpec::from(&spec)) }).await.map_err(client::status)?;
    let id = reply.into_inner().job_id;
    outln!("{id}")?;
    if !follow {
        return Ok(0);
    }
    stream_logs(url, &id, true, json).await?;
    let job = c.get_job(v1::GetJobRequest { job_id: id.clone() }).await.map_err(client::status)?.into_inner();
    let state = output::state(&job);
    errln!("job {id} {state}{}", if job.message.is_empty() { String::new() } else { format!(": {}", job.message) });
    Ok(if state == "succeeded" { 0 } else { 1 })
}

pub async fn list(url: &Target, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    // In the coordinator's order: the queue as it will run, then running jobs, then the rest.
    let jobs = c.list_jobs(v1::ListJobsRequest {}).await.map_err(client::status)?.into_inner().jobs;
    let views: Vec<JobView> = jobs.iter().map(JobView::from).collect();
    if json {
        return print_json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.name.clone(),
                j.owner.clone(),
                j.state.to_string(),
                j.attempt.to_string(),
                j.queue.clone(),
                j.priority.to_string(),
                j.nodes.join(","),
                j.pending_reason
                    .clone()
                    .or_else(|| j.stop_reason.as_ref().map(|s| format!("stopping: {s}")))
                    .unwrap_or_else(|| j.message.clone()),
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "OWNER", "STATE", "ATTEMPT", "QUEUE", "PRIO", "NODES", "REASON"], &rows)?;
    Ok(())
}

pub async fn describe(url: &Target, id: &str, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let job = c.get_job(v1::GetJobRequest { job_id: id.to_string() }).await.map_err(client::status)?.into_inner();
    let view = JobView::from(&job);
    if json {
        return print_json(&view);
    }
    outln!("id:        {}", view.id)?;
    outln!("name:      {}", view.name)?;
    outln!("owner:     {}", view.owner)?;
    outln!("state:     {}", view.state)?;
    outln!("queue:     {} (priority {})", view.queue, view.priority)?;
    outln!("attempt:   {}", view.attempt)?;
    if let Some(reason) = &view.pending_reason {
        outln!("pending:   {reason}")?;
    }
    if let Some(pos) = view.queue_position {
        outln!("position:  {pos} in the queue")?;
    }
    if let Some(at) = view.estimated_start_ms {
        let secs = ((at - now_ms()) / 1000).max(0) as u64;
        outln!("estimated: starts in about {} (backfill reservation)", gantry_core::spec::format_duration(secs))?;
    }
    if let Some(why) = &view.stop_reason {
        outln!("stopping:  {why}")?;
    }
    if !view.message.is_empty() {
        outln!("message:   {}", view.message)?;
    }
    for data in &view.datasets {
        outln!("data:      {data}")?;
    }
    for m in &view.metrics {
        let values: Vec<String> = m.values.iter().map(|(k, v)| format!("{k}={}", format_metric(*v))).collect();
        let straggler =
            if m.straggler { "  <- straggler: its steps take far longer than the other ranks'" } else { "" };
        outln!("metrics:   rank {} step {}: {}{straggler}", m.rank, m.step, values.join(" "))?;
    }
    if !view.avoided_nodes.is_empty() {
        outln!("avoids:    {} (two of its attempts failed on each)", view.avoided_nodes.join(", "))?;
    }
    if view.steps_lost > 0 {
        outln!("lost:      {} steps redone after failures and lost nodes", view.steps_lost)?;
    }
    if let Some(of) = &view.replica_of {
        outln!("replica:   of serve job {of}")?;
    }
    for r in view.replicas.iter().filter(|r| ["queued", "starting", "ready", "stopping"].contains(&r.state.as_str())) {
        let on = if r.node.is_empty() { String::new() } else { format!(" on {}", r.node) };
        let url = if r.url.is_empty() { String::new() } else { format!(" at {}", r.url) };
        outln!("replica {}: {}{on}{url}, serving {}", r.job_id, r.state, r.from)?;
    }
    for a in &view.attempts {
        let gpus = if a.gpus.is_empty() { "no GPU".to_string() } else { a.gpus.join(",") };
        let exit = a.exit_code.map(|c| format!(", exit {c}")).unwrap_or_default();
        let outcome = if a.outcome.is_empty() { "running".to_string() } else { a.outcome.clone() };
        let from = a.resumed_from_step.map(|s| format!(" from step {s}")).unwrap_or_default();
        let lost = a.steps_lost.map(|s| format!(", {s} steps lost")).unwrap_or_default();
        outln!("attempt {}: on {} ({gpus}){from}: {outcome}{exit}{lost}", a.attempt, a.nodes.join(","))?;
    }
    Ok(())
}

pub async fn cancel(url: &Target, id: &str, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let job = c.cancel_job(v1::CancelJobRequest { job_id: id.to_string() }).await.map_err(client::status)?.into_inner();
    let view = JobView::from(&job);
    if json {
        return print_json(&view);
    }
    if view.state == "running" {
        outln!("job {id}: cancel requested; it gets SIGTERM and a grace period to checkpoint")?;
    } else {
        outln!("job {id}: {}", view.state)?;
    }
    Ok(())
}

pub async fn logs(url: &Target, id: &str, follow: bool, json: bool) -> anyhow::Result<()> {
    stream_logs(url, id, follow, json).await
}

async fn stream_logs(url: &Target, id: &str, follow: bool, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut c = connect(url).await?;
    let req = v1::LogsRequest { job_id: id.to_string(), follow };
    let mut stream = c.logs(req).await.map_err(client::status)?.into_inner();
    let mut last_attempt = None;
    let mut out = output::Stdout;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(client::status)?;
        for line in batch.lines {
            if json {
                let value = serde_json::json!({"attempt": line.attempt, "rank": line.rank, "text": line.text});
                writeln!(out, "{value}")?;
                continue;
            }
            if last_attempt.is_some_and(|a| a != line.attempt) {
                writeln!(out, "--- attempt {} ---", line.attempt)?;
            }
            last_attempt = Some(line.attempt);
            if line.rank > 0 {
                writeln!(out, "[rank {}] {}", line.rank, line.text)?;
            } else {
                writeln!(out, "{}", line.text)?;
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// `gantry dev --run FILE`: submit, follow to the end, then say how it ended and where the
/// latest checkpoint is. Returns 0 only if the job succeeded.
pub async fn run_to_end(url: &Target, file: &Path, data_dir: &Path) -> anyhow::Result<i32> {
    let spec = read_spec(file)?;
    // The coordinator in this process is starting: wait for it to answer.
    let mut c = None;
    for _ in 0..50 {
        if let Ok(client) = connect(url).await {
            c = Some(client);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut c = c.context("the local coordinator did not start")?;
    let id = c
        .submit(v1::SubmitRequest { spec: Some(v1::JobSpec::from(&spec)) })
        .await
        .map_err(client::status)?
        .into_inner()
        .job_id;
    errln!("submitted job {id} ({})", spec.name);
    stream_logs(url, &id, true, false).await?;
    let job = c.get_job(v1::GetJobRequest { job_id: id.clone() }).await.map_err(client::status)?.into_inner();
    let checkpoints = c
        .list_checkpoints(v1::ListCheckpointsRequest { job_id: id.clone() })
        .await
        .map_err(client::status)?
        .into_inner();
    let state = output::state(&job);
    outln!()?;
    outln!("job {id} {state}{}", if job.message.is_empty() { String::new() } else { format!(": {}", job.message) })?;
    if let Some(latest) = checkpoints.checkpoints.last() {
        let dir = data_dir.join("jobs").join(&id).join("checkpoints").join(format!("step-{}", latest.step));
        outln!(
            "latest checkpoint: step {} ({}), stored at {}",
            latest.step,
            output::bytes(latest.bytes),
            dir.display()
        )?;
        outln!("download it with:  gantry checkpoint download {id} --out ./checkpoint-{id}")?;
    }
    Ok(if state == "succeeded" { 0 } else { 1 })
}

/// Five significant digits, without trailing noise: 0.12346, 12346, 1.5e-7.
fn format_metric(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-4) {
        format!("{v:.4e}")
    } else {
        let digits = (4 - v.abs().log10().floor() as i32).clamp(0, 10) as usize;
        let s = format!("{v:.digits$}");
        if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
    }
}
