//! How things look: JSON views with the names scripts rely on, and plain tables for people;
//! and where they go: [`Stdout`], which reports a reader that went away instead of panicking.

use std::io::{self, Write};

use gantry_proto::{job_state_name, v1};
use serde::Serialize;

/// Standard output for everything the CLI prints. `println!` panics when the reader has gone
/// away (`gantry jobs | head -1`); this returns the error, and a closed pipe comes back as
/// [`StdoutClosed`], on which `main` ends quietly as Unix tools do.
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().write(buf).map_err(closed)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush().map_err(closed)
    }
}

/// The reader of stdout went away (EPIPE): nobody wants the rest of the output.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the reader of standard output went away")
    }
}

impl std::error::Error for StdoutClosed {}

fn closed(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe { io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed) } else { e }
}

/// Whether `e` is, or was caused by, a write to [`Stdout`] that found its reader gone.
pub fn stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().and_then(|io| io.get_ref()).is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

/// `println!` through [`Stdout`]: returns `io::Result<()>` instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!($crate::output::Stdout, $($arg)*)
    }};
}
pub(crate) use outln;

/// `eprintln!` that drops the message when stderr is gone instead of panicking: nobody can read
/// it, and the exit status still tells how the command ended.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use errln;

#[derive(Serialize)]
pub struct JobView {
    pub id: String,
    pub name: String,
    /// Who submitted it: the name of its token.
    pub owner: String,
    pub state: &'static str,
    pub attempt: u32,
    pub queue: String,
    pub priority: u32,
    pub submitted_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
    /// The kind of `pending_reason`, for scripts (`quota`, `no_room`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_start_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preempted_by: Option<String>,
    /// Why a running job is being stopped, and its kind (`preempted`, `gpu_unhealthy`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_code: Option<String>,
    pub nodes: Vec<String>,
    pub message: String,
    pub attempts: Vec<AttemptView>,
    /// Steps its attempts ran past the checkpoint the next one resumed from: work done again.
    pub steps_lost: u64,
    /// A failed attempt's retry waits until then (`retry.backoff`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<i64>,
    /// Nodes it avoids: two of its attempts failed on each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub avoided_nodes: Vec<String>,
    /// The latest point each rank reported: `{"rank": 0, "step": 300, "values": {"loss": 0.1}}`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<MetricsView>,
    /// A serve job's replicas, newest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaView>,
    /// A replica: the serve job it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<String>,
    /// The pushed data sets and S3 objects it reads, pinned to their versions:
    /// `dataset://NAME@SHA256/PATH`, `s3://BUCKET/KEY@SHA256`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<String>,
}

/// A spec's `dataset://` and `s3://` references, as the coordinator pinned them.
fn pushed_datasets(spec: &v1::JobSpec) -> Vec<String> {
    let Ok(mut spec) = gantry_core::JobSpec::try_from(spec.clone()) else { return Vec::new() };
    spec.fetched_paths_mut()
        .into_iter()
        .filter(|(_, p)| gantry_core::spec::Fetched::parse(p).is_some())
        .map(|(_, p)| p.clone())
        .collect()
}

/// One copy of a serve job: `{"job_id": "7", "state": "ready", "node": "n1", "url": "http://...", "from": "3@690"}`.
#[derive(Serialize)]
pub struct ReplicaView {
    pub job_id: String,
    /// queued, starting, ready, stopping, or how it ended.
    pub state: String,
    pub node: String,
    pub url: String,
    pub from: String,
}

impl From<&v1::Replica> for ReplicaView {
    fn from(r: &v1::Replica) -> Self {
        ReplicaView {
            job_id: r.job_id.clone(),
            state: r.state.clone(),
            node: r.node.clone(),
            url: r.url.clone(),
            from: r.from.clone(),
        }
    }
}

#[derive(Serialize)]
pub struct MetricsView {
    pub rank: u32,
    pub step: u64,
    pub values: std::collections::BTreeMap<String, f64>,
    /// Its step time is far above the other ranks'.
    pub straggler: bool,
}

#[derive(Serialize)]
pub struct AttemptView {
    pub attempt: u32,
    pub nodes: Vec<String>,
    pub gpus: Vec<String>,
    pub started_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_lost: Option<u64>,
}

pub fn state(job: &v1::Job) -> &'static str {
    job_state_name(v1::JobState::try_from(job.state).unwrap_or(v1::JobState::Unspecified))
}

impl From<&v1::Job> for JobView {
    fn from(job: &v1::Job) -> Self {
        let spec = job.spec.clone().unwrap_or_default();
        let datasets = pushed_datasets(&spec);
        let queued = state(job) == "queued";
        let attempts: Vec<AttemptView> = job
            .attempts
            .iter()
            .map(|a| AttemptView {
                attempt: a.attempt,
                nodes: a.placement.iter().map(|p| p.node.clone()).collect(),
                gpus: a.placement.iter().flat_map(|p| p.gpu_uuids.clone()).collect(),
                started_at_ms: a.started_at_ms,
                ended_at_ms: a.ended_at_ms,
                exit_code: a.exit_code,
                outcome: a.outcome.clone(),
                resumed_from_step: a.resumed_from_step,
                steps_lost: a.steps_lost,
            })
            .collect();
        JobView {
            id: job.id.clone(),
            name: job.name.clone(),
            owner: job.owner.clone(),
            state: state(job),
            attempt: job.attempt,
            queue: spec.queue,
            priority: spec.priority,
            submitted_at_ms: job.submitted_at_ms,
            ended_at_ms: job.ended_at_ms,
            pending_reason: queued.then(|| job.pending_reason.clone()),
            pending_code: (queued && !job.pending_code.is_empty()).then(|| job.pending_code.clone()),
            queue_position: (queued && job.queue_position > 0).then_some(job.queue_position),
            estimated_start_ms: job.estimated_start_ms,
            preempted_by: (!job.preempted_by.is_empty()).then(|| job.preempted_by.clone()),
            stop_reason: (!job.stop_reason.is_empty()).then(|| job.stop_reason.clone()),
            stop_code: (!job.stop_code.is_empty()).then(|| job.stop_code.clone()),
            nodes: attempts.last().map(|a| a.nodes.clone()).unwrap_or_default(),
            message: job.message.clone(),
            attempts,
            steps_lost: job.steps_lost,
            retry_at_ms: job.retry_at_ms,
            avoided_nodes: job.avoided_nodes.clone(),
            metrics: job
                .metrics
                .iter()
                .filter_map(|r| {
                    let p = r.points.last()?;
                    Some(MetricsView {
                        rank: r.rank,
                        step: p.step,
                        values: p.values.clone().into_iter().collect(),
                        straggler: r.straggler,
                    })
                })
                .collect(),
            replicas: job.replicas.iter().map(ReplicaView::from).collect(),
            replica_of: (!job.replica_of.is_empty()).then(|| job.replica_of.clone()),
            datasets,
        }
    }
}

#[derive(Serialize)]
pub struct CheckpointView {
    pub job_id: String,
    pub step: u64,
    pub bytes: u64,
    pub sha256: String,
    pub attempt: u32,
    pub committed_at_ms: i64,
    pub files: Vec<FileView>,
}

#[derive(Serialize)]
pub struct FileView {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

impl From<&v1::Checkpoint> for CheckpointView {
    fn from(c: &v1::Checkpoint) -> Self {
        CheckpointView {
            job_id: c.job_id.clone(),
            step: c.step,
            bytes: c.bytes,
            sha256: c.sha256.clone(),
            attempt: c.attempt,
            committed_at_ms: c.committed_at_ms,
            files: c
                .files
                .iter()
                .map(|f| FileView { path: f.path.clone(), size: f.size, sha256: f.sha256.clone() })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub struct GpuView {
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    pub node: String,
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_mw: Option<u32>,
    pub healthy: bool,
    pub health_reason: String,
    pub job_id: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub serial: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub compute_capability: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_limit_mw: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub pci_bus_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub throttle_reasons: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Compute processes: pid and bytes used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nvlink_peers: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cpu_affinity: String,
    /// MIG instances: uuid, name, memory_total_bytes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mig_instances: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub xid_errors: Vec<u64>,
}

#[derive(Serialize)]
pub struct NodeView {
    pub name: String,
    pub connected: bool,
    pub drained: bool,
    pub cpus: u32,
    pub cpus_used: f64,
    pub memory_bytes: u64,
    pub memory_used_bytes: u64,
    pub gpus: usize,
    pub gpu_driver: String,
    pub jobs: Vec<String>,
    pub last_seen_ms: i64,
    /// The container images its engine holds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
}

pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// Left-aligned columns, two spaces apart.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        outln!("{}", parts.join("  ").trim_end())
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
    for row in rows {
        line(row)?;
    }
    Ok(())
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// Milliseconds since the epoch as a UTC time, `2026-12-05 14:03Z`.
pub fn timestamp(ms: i64) -> String {
    let (days, secs) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000) / 1000);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}Z", secs / 3600, secs % 3600 / 60)
}

#[cfg(test)]
mod timestamp_tests {
    #[test]
    fn timestamps_are_utc_calendar_times() {
        assert_eq!(super::timestamp(0), "1970-01-01 00:00Z");
        // 2026-12-05 14:03:20 UTC.
        assert_eq!(super::timestamp(1_796_479_400_000), "2026-12-05 14:03Z");
        assert_eq!(super::timestamp(951_782_400_000), "2000-02-29 00:00Z");
    }
}
