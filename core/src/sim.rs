//! A trace-driven simulator: replays jobs (the Helios trace schema) through the real scheduler in
//! simulated time, and reports what a fleet operator asks of a policy: utilisation, queueing delay,
//! completion time, and how each queue fared. Pure: the trace and the fleet in, a report out.

use std::collections::BTreeMap;

use crate::error::ParseError;
use crate::scheduler::{self, Gpu, Node, NodeAssignment, PendingJob, RunningJob, Snapshot};
use crate::spec::Resources;

/// One job of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceJob {
    pub id: String,
    /// Becomes the job's queue: fair share is between users (or virtual clusters).
    pub user: String,
    pub gpus: u32,
    pub nodes: u32,
    pub submit_s: u64,
    pub duration_s: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Strict submit order: the first job that does not fit blocks everyone behind it.
    Fifo,
    /// gantry's scheduler: priority, fair share, best fit, backfill.
    Gantry,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub policy: &'static str,
    pub jobs: usize,
    pub makespan_s: u64,
    /// GPU-seconds used over GPU-seconds available until the last job ended.
    pub utilisation: f64,
    pub wait_median_s: u64,
    pub wait_p99_s: u64,
    pub jct_median_s: u64,
    /// Per queue: jobs, GPU-hours, median wait.
    pub queues: BTreeMap<String, QueueReport>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueReport {
    pub jobs: usize,
    pub gpu_hours: f64,
    pub wait_median_s: u64,
}

/// Parses a CSV with a header naming at least `job_id`, `user` (or `vc`), `gpu_num`,
/// `submit_time` and `duration` (`node_num` optional). Times are seconds; `submit_time` may
/// also be `YYYY-MM-DD HH:MM:SS`. Rows with zero duration are skipped.
pub fn parse_trace(text: &str) -> Result<Vec<TraceJob>, ParseError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines.next().ok_or(ParseError::EmptyTrace)?.split(',').map(str::trim).collect();
    let col = |names: &[&str]| header.iter().position(|h| names.contains(h));
    let need = |names: &[&'static str]| col(names).ok_or(ParseError::TraceColumn(names[0]));
    let (id, user, gpus, submit, duration) = (
        need(&["job_id", "jobid"])?,
        need(&["user", "vc"])?,
        need(&["gpu_num", "gpus"])?,
        need(&["submit_time", "submit"])?,
        need(&["duration"])?,
    );
    let nodes = col(&["node_num", "nodes"]);
    let mut out = Vec::new();
    let mut first_submit = None;
    for (n, line) in lines.enumerate() {
        let row = n + 2;
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let field = |i: usize| f.get(i).copied().ok_or(ParseError::TraceRowShort { row });
        let num = |i: usize| -> Result<u64, ParseError> {
            let v = field(i)?;
            v.parse::<f64>().map(|x| x as u64).map_err(|_| ParseError::TraceNumber { row, value: v.to_string() })
        };
        let submit_s = match field(submit)?.parse::<f64>() {
            Ok(s) => s as u64,
            Err(_) => parse_datetime(field(submit)?).ok_or(ParseError::TraceSubmitTime { row })?,
        };
        let duration_s = num(duration)?;
        if duration_s == 0 {
            continue;
        }
        let gpus = num(gpus)? as u32;
        let node_num = match nodes {
            Some(i) => num(i)?.max(1) as u32,
            None => gpus.div_ceil(8).max(1),
        };
        first_submit = Some(first_submit.map_or(submit_s, |f: u64| f.min(submit_s)));
        out.push(TraceJob {
            id: field(id)?.to_string(),
            user: field(user)?.to_string(),
            gpus,
            nodes: node_num,
            submit_s,
            duration_s,
        });
    }
    let first = first_submit.unwrap_or(0);
    for j in &mut out {
        j.submit_s -= first;
    }
    out.sort_by_key(|j| j.submit_s);
    Ok(out)
}

/// Seconds since 2000-01-01 (months of 31 days, years of 366: enough to order and subtract).
/// `None` for anything else, a month or day of 0 and numbers too large included.
fn parse_datetime(s: &str) -> Option<u64> {
    let (date, time) = s.split_once(' ')?;
    let d: Vec<u64> = date.split('-').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let t: Vec<u64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let (years, months, days) = (d.first()?.checked_sub(2000)?, d.get(1)?.checked_sub(1)?, d.get(2)?.checked_sub(1)?);
    let days = years.checked_mul(366)?.checked_add(months.checked_mul(31)?)?.checked_add(days)?;
    let seconds = t.first()?.checked_mul(3600)?.checked_add(t.get(1)?.checked_mul(60)?)?;
    days.checked_mul(86400)?.checked_add(seconds)?.checked_add(t.get(2).copied().unwrap_or(0))
}

/// A synthetic trace that looks like a shared GPU cluster: Poisson arrivals, mostly small jobs
/// (1 to 64 GPUs), long-tailed (log-normal) durations, a few users of different appetite.
pub fn generate_trace(jobs: usize, seed: u64) -> Vec<TraceJob> {
    let mut rng = SplitMix(seed);
    let sizes = [(1, 50), (2, 15), (4, 12), (8, 12), (16, 6), (32, 3), (64, 2)];
    let total: u32 = sizes.iter().map(|s| s.1).sum();
    let users = ["alice", "bob", "carol", "dave"];
    let mut t = 0.0f64;
    let mut trace: Vec<TraceJob> = (0..jobs)
        .map(|i| {
            t += -rng.unit().max(1e-12).ln() * 120.0; // mean 2 minutes between submits
            let mut pick = (rng.unit() * total as f64) as u32;
            let gpus = sizes.iter().find(|s| {
                if pick < s.1 {
                    return true;
                }
                pick -= s.1;
                false
            });
            let gpus = gpus.map_or(1, |s| s.0);
            // Log-normal: median about 20 minutes, a tail of many hours.
            let z = (-2.0 * rng.unit().max(1e-12).ln()).sqrt() * (2.0 * std::f64::consts::PI * rng.unit()).cos();
            let duration = (1200.0 * (1.5 * z).exp()).clamp(30.0, 7.0 * 86400.0);
            // Users differ in appetite: alice submits most.
            let user = users[((rng.unit().powi(2)) * users.len() as f64) as usize % users.len()];
            TraceJob {
                id: format!("{i}"),
                user: user.into(),
                gpus,
                nodes: gpus.div_ceil(8),
                submit_s: t as u64,
                duration_s: duration as u64,
            }
        })
        .collect();
    // Times count from the first submit, as parsed traces do.
    let first = trace.first().map_or(0, |j| j.submit_s);
    for j in &mut trace {
        j.submit_s -= first;
    }
    trace
}

pub fn trace_to_csv(trace: &[TraceJob]) -> String {
    let mut out = String::from("job_id,user,gpu_num,node_num,submit_time,duration\n");
    for j in trace {
        out += &format!("{},{},{},{},{},{}\n", j.id, j.user, j.gpus, j.nodes, j.submit_s, j.duration_s);
    }
    out
}

struct SplitMix(u64);
impl SplitMix {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs the trace on `nodes` nodes of `gpus_per_node` GPUs under `policy`. Jobs that could
/// never fit the fleet are dropped (and not counted).
pub fn simulate(trace: &[TraceJob], nodes: usize, gpus_per_node: u32, policy: Policy) -> Report {
    let fleet: Vec<Node> = (0..nodes)
        .map(|i| Node {
            name: format!("n{i:04}"),
            schedulable: true,
            cpus: 1e6,
            memory_bytes: u64::MAX / 4,
            gpus: (0..gpus_per_node)
                .map(|g| Gpu {
                    uuid: format!("n{i}-{g}"),
                    name: "GPU".into(),
                    memory_total_bytes: 80 << 30,
                    healthy: true,
                    ..Gpu::default()
                })
                .collect(),
        })
        .collect();
    let fits = |j: &TraceJob| j.nodes as usize <= nodes && j.gpus.div_ceil(j.nodes) <= gpus_per_node;
    let jobs: Vec<&TraceJob> = trace.iter().filter(|j| fits(j)).collect();
    let mut next_submit = 0;
    let mut pending: Vec<(&TraceJob, u64)> = Vec::new(); // (job, seq)
    let mut running: Vec<(RunningJob, u64)> = Vec::new(); // (job, end time)
    let mut started: BTreeMap<String, u64> = BTreeMap::new();
    let mut now = 0u64;
    let mut done = 0;
    // The jobs gantry's last pass kept ahead, carried into the next as the coordinator does.
    let mut ahead: Vec<String> = Vec::new();
    while done < jobs.len() {
        // Next event: a submit or an end, whichever is first.
        let next_end = running.iter().map(|r| r.1).min();
        let next_sub = jobs.get(next_submit).map(|j| j.submit_s);
        now = match (next_end, next_sub) {
            (Some(e), Some(s)) => e.min(s),
            (Some(e), None) => e,
            (None, Some(s)) => s,
            (None, None) => break,
        }
        .max(now);
        let before = running.len();
        running.retain(|r| r.1 > now);
        done += before - running.len();
        while next_submit < jobs.len() && jobs[next_submit].submit_s <= now {
            pending.push((jobs[next_submit], next_submit as u64));
            next_submit += 1;
        }
        let to_pending = |(j, seq): &(&TraceJob, u64)| PendingJob {
            id: j.id.clone(),
            priority: 50,
            seq: *seq,
            queue: j.user.clone(),
            resources: per_node(j),
            max_duration_ms: Some(j.duration_s * 1000),
        };
        let snapshot = |pend: Vec<PendingJob>| Snapshot {
            now_ms: now * 1000,
            nodes: fleet.clone(),
            running: running.iter().map(|r| r.0.clone()).collect(),
            pending: pend,
            queues: Vec::new(),
            ahead: Vec::new(),
            avoid: Default::default(),
            warm: Default::default(),
        };
        let placements = match policy {
            Policy::Gantry => {
                let mut snap = snapshot(pending.iter().map(to_pending).collect());
                snap.ahead = std::mem::take(&mut ahead);
                let plan = scheduler::schedule(&snap);
                ahead = plan.ahead;
                plan.placements
            }
            Policy::Fifo => {
                // The head only, one at a time, until it does not fit.
                let mut out = Vec::new();
                let mut taken = 0;
                while taken < pending.len() {
                    let mut snap = snapshot(vec![to_pending(&pending[taken])]);
                    for p in &out {
                        snap.running.push(as_running(p, &pending, now));
                    }
                    match scheduler::schedule(&snap).placements.pop() {
                        Some(p) => {
                            out.push(p);
                            taken += 1;
                        }
                        None => break,
                    }
                }
                out
            }
        };
        for p in placements {
            let pos = pending.iter().position(|(j, _)| j.id == p.job_id).expect("placed a pending job");
            let (job, _) = pending.remove(pos);
            started.insert(job.id.clone(), now);
            running.push((running_job(job, p.nodes, now), now + job.duration_s));
        }
    }
    report(policy, &jobs, &started, nodes as f64 * gpus_per_node as f64)
}

fn per_node(j: &TraceJob) -> Resources {
    Resources { nodes: j.nodes, gpus: j.gpus.div_ceil(j.nodes), cpus: 1.0, memory_gb: 0.0, ..Resources::default() }
}

fn running_job(j: &TraceJob, nodes: Vec<NodeAssignment>, now: u64) -> RunningJob {
    RunningJob {
        id: j.id.clone(),
        priority: 50,
        queue: j.user.clone(),
        resources: per_node(j),
        nodes,
        started_at_ms: now * 1000,
        max_duration_ms: Some(j.duration_s * 1000),
        stopping: false,
        stopping_for: None,
    }
}

fn as_running(p: &scheduler::Placement, pending: &[(&TraceJob, u64)], now: u64) -> RunningJob {
    let job = pending.iter().find(|(j, _)| j.id == p.job_id).expect("placed a pending job").0;
    running_job(job, p.nodes.clone(), now)
}

fn report(policy: Policy, jobs: &[&TraceJob], started: &BTreeMap<String, u64>, gpus: f64) -> Report {
    let mut waits = Vec::new();
    let mut jcts = Vec::new();
    let mut per_queue: BTreeMap<String, (usize, f64, Vec<u64>)> = BTreeMap::new();
    let mut end = 0;
    let mut gpu_seconds = 0.0;
    for j in jobs {
        let Some(&s) = started.get(&j.id) else { continue };
        let wait = s - j.submit_s;
        waits.push(wait);
        jcts.push(wait + j.duration_s);
        end = end.max(s + j.duration_s);
        let gs = (j.gpus.div_ceil(j.nodes) * j.nodes) as f64 * j.duration_s as f64;
        gpu_seconds += gs;
        let q = per_queue.entry(j.user.clone()).or_default();
        q.0 += 1;
        q.1 += gs / 3600.0;
        q.2.push(wait);
    }
    let start = jobs.first().map_or(0, |j| j.submit_s);
    Report {
        policy: match policy {
            Policy::Fifo => "fifo",
            Policy::Gantry => "gantry",
        },
        jobs: waits.len(),
        makespan_s: end - start,
        utilisation: gpu_seconds / (gpus * (end - start).max(1) as f64),
        wait_median_s: percentile(&mut waits.clone(), 0.5),
        wait_p99_s: percentile(&mut waits, 0.99),
        jct_median_s: percentile(&mut jcts, 0.5),
        queues: per_queue
            .into_iter()
            .map(|(q, (jobs, gpu_hours, mut w))| {
                (q, QueueReport { jobs, gpu_hours, wait_median_s: percentile(&mut w, 0.5) })
            })
            .collect(),
    }
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_round_trip_through_csv() {
        let trace = generate_trace(50, 7);
        assert_eq!(parse_trace(&trace_to_csv(&trace)).unwrap(), trace);
    }

    #[test]
    fn helios_style_rows_parse() {
        let csv = "job_id,user,vc,gpu_num,cpu_num,node_num,state,submit_time,start_time,end_time,duration\n\
                   a1,u1,vcA,8,16,1,COMPLETED,2020-04-01 00:00:10,x,y,600\n\
                   a2,u2,vcB,16,32,2,COMPLETED,2020-04-01 00:01:10,x,y,0\n";
        let jobs = parse_trace(csv).unwrap();
        assert_eq!(jobs.len(), 1, "zero-duration rows are skipped");
        assert_eq!((jobs[0].gpus, jobs[0].nodes, jobs[0].duration_s), (8, 1, 600));
    }

    #[test]
    fn a_broken_trace_is_an_error_naming_the_row() {
        let header = "job_id,user,gpu_num,submit_time,duration\n";
        assert_eq!(parse_trace(""), Err(ParseError::EmptyTrace));
        assert_eq!(parse_trace("job_id,user,gpu_num,duration\n"), Err(ParseError::TraceColumn("submit_time")));
        let err = parse_trace(&format!("{header}a,u,1,0,60\nb,u,two,0,60\n")).unwrap_err();
        assert_eq!(err.to_string(), "row 3: `two` is not a number");
        assert_eq!(parse_trace(&format!("{header}a,u,1\n")), Err(ParseError::TraceRowShort { row: 2 }));
    }

    /// A month or day of 0 underflowed (a panic in a debug build, a wild submit time in a
    /// release one), and so did a year too large to count in seconds.
    #[test]
    fn a_submit_time_out_of_range_is_an_error_not_a_panic() {
        let header = "job_id,user,gpu_num,submit_time,duration\n";
        for bad in
            ["2020-00-01 00:00:00", "2020-04-00 00:00:00", "99999999999999999-01-01 00:00:00", "1999-12-31 23:59:59"]
        {
            let err = parse_trace(&format!("{header}a,u,1,{bad},60\n")).unwrap_err();
            assert_eq!(err, ParseError::TraceSubmitTime { row: 2 }, "{bad}");
        }
        let ok = parse_trace(&format!("{header}a,u,1,2020-04-01 00:00:10,60\nb,u,1,2020-04-01 00:01:00,60\n"));
        assert_eq!(ok.unwrap().iter().map(|j| j.submit_s).collect::<Vec<_>>(), [0, 50]);
    }

    #[test]
    fn every_job_runs_once_and_backfill_beats_fifo() {
        let trace = generate_trace(300, 1);
        let fifo = simulate(&trace, 8, 8, Policy::Fifo);
        let gantry = simulate(&trace, 8, 8, Policy::Gantry);
        assert_eq!(fifo.jobs, gantry.jobs);
        assert!(gantry.wait_median_s <= fifo.wait_median_s, "{gantry:?}\n{fifo:?}");
        assert!(gantry.utilisation > 0.0 && gantry.utilisation <= 1.0 + 1e-9);
    }
}
