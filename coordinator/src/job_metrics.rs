//! The numbers jobs report (loss, accuracy, samples/s, ...), per job and rank. Telemetry, like
//! GPU readings: kept in memory and bounded, never written to the store, so a restarted
//! coordinator starts with none and fills up again from the next heartbeats.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use gantry_proto::v1;

/// Points kept per rank; the oldest go first.
const MAX_POINTS_PER_RANK: usize = 2_000;
/// Jobs kept; the one updated longest ago goes first.
const MAX_JOBS: usize = 10_000;
/// A rank is a straggler when its latest step takes this many times the median of the other
/// ranks' (data-parallel ranks wait for the slowest at every step, so one slow rank slows all).
const STRAGGLER_FACTOR: f64 = 1.5;
/// The metric a straggler is judged by.
const STEP_TIME: &str = "step_time_ms";

#[derive(Default)]
pub struct JobMetrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Series>,
    /// Counts records: a series' `touched` is the count at its last update.
    clock: u64,
}

struct Series {
    attempt: u32,
    ranks: BTreeMap<u32, VecDeque<v1::MetricPoint>>,
    /// When it was last updated, in records: for eviction.
    touched: u64,
}

impl JobMetrics {
    /// Adds a rank's new points. A newer attempt starts the job's series afresh; points from an
    /// older attempt than the one kept are dropped.
    /// Whether they were kept: points of an older attempt are not.
    pub fn record(&self, m: v1::RankMetrics) -> bool {
        let mut inner = self.inner.lock().expect("metrics lock poisoned");
        inner.clock += 1;
        let clock = inner.clock;
        let jobs = &mut inner.jobs;
        if !jobs.contains_key(&m.job_id) && jobs.len() >= MAX_JOBS {
            let oldest = jobs.iter().min_by_key(|(_, s)| s.touched).map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                jobs.remove(&id);
            }
        }
        let series =
            jobs.entry(m.job_id).or_insert_with(|| Series { attempt: m.attempt, ranks: BTreeMap::new(), touched: 0 });
        if m.attempt < series.attempt {
            return false;
        }
        if m.attempt > series.attempt {
            *series = Series { attempt: m.attempt, ranks: BTreeMap::new(), touched: 0 };
        }
        series.touched = clock;
        let points = series.ranks.entry(m.rank).or_default();
        points.extend(m.points);
        let excess = points.len().saturating_sub(MAX_POINTS_PER_RANK);
        points.drain(..excess);
        true
    }

    /// Every rank's points for a job, oldest first.
    pub fn series(&self, job_id: &str) -> Vec<v1::RankMetrics> {
        self.collect(job_id, usize::MAX)
    }

    /// Each rank's latest point, stragglers marked.
    pub fn latest(&self, job_id: &str) -> Vec<v1::RankMetrics> {
        let mut ranks = self.collect(job_id, 1);
        let step_time = |r: &v1::RankMetrics| r.points.last().and_then(|p| p.values.get(STEP_TIME).copied());
        let times: Vec<Option<f64>> = ranks.iter().map(step_time).collect();
        for (i, rank) in ranks.iter_mut().enumerate() {
            let Some(mine) = times[i] else { continue };
            let mut others: Vec<f64> =
                times.iter().enumerate().filter(|(j, _)| *j != i).filter_map(|(_, t)| *t).collect();
            if others.is_empty() {
                continue;
            }
            others.sort_by(f64::total_cmp);
            let median = others[others.len() / 2];
            rank.straggler = median > 0.0 && mine > STRAGGLER_FACTOR * median;
        }
        ranks
    }

    /// The furthest step any rank of `attempt` reported, if that attempt's points are kept.
    pub fn last_step(&self, job_id: &str, attempt: u32) -> Option<u64> {
        let inner = self.inner.lock().expect("metrics lock poisoned");
        let series = inner.jobs.get(job_id).filter(|s| s.attempt == attempt)?;
        series.ranks.values().filter_map(|points| points.back().map(|p| p.step)).max()
    }

    fn collect(&self, job_id: &str, last: usize) -> Vec<v1::RankMetrics> {
        let inner = self.inner.lock().expect("metrics lock poisoned");
        let Some(series) = inner.jobs.get(job_id) else { return Vec::new() };
        series
            .ranks
            .iter()
            .map(|(rank, points)| v1::RankMetrics {
                job_id: job_id.to_string(),
                attempt: series.attempt,
                rank: *rank,
                points: points.iter().skip(points.len().saturating_sub(last)).cloned().collect(),
                straggler: false,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, loss: f64) -> v1::MetricPoint {
        v1::MetricPoint { step, time_ms: 0, values: [("loss".to_string(), loss)].into() }
    }

    fn metrics(attempt: u32, rank: u32, points: Vec<v1::MetricPoint>) -> v1::RankMetrics {
        v1::RankMetrics { job_id: "j".into(), attempt, rank, points, straggler: false }
    }

    #[test]
    fn latest_is_per_rank_and_a_new_attempt_starts_afresh() {
        let m = JobMetrics::default();
        m.record(metrics(1, 0, vec![point(1, 0.9), point(2, 0.8)]));
        m.record(metrics(1, 1, vec![point(2, 0.7)]));
        let latest = m.latest("j");
        assert_eq!(latest.len(), 2);
        assert_eq!(latest[0].points, vec![point(2, 0.8)]);
        assert_eq!(m.series("j")[0].points.len(), 2);
        m.record(metrics(2, 0, vec![point(3, 0.5)]));
        m.record(metrics(1, 1, vec![point(3, 0.6)]));
        let latest = m.latest("j");
        assert_eq!(latest.len(), 1, "attempt 1's ranks are gone and its late points dropped");
        assert_eq!((latest[0].attempt, latest[0].points[0].step), (2, 3));
    }

    #[test]
    fn the_last_step_is_the_furthest_rank_of_that_attempt() {
        let m = JobMetrics::default();
        m.record(metrics(1, 0, vec![point(10, 0.9), point(20, 0.8)]));
        m.record(metrics(1, 1, vec![point(30, 0.7)]));
        assert_eq!(m.last_step("j", 1), Some(30));
        assert_eq!(m.last_step("j", 2), None, "no point of attempt 2");
        assert_eq!(m.last_step("other", 1), None);
    }

    #[test]
    fn a_rank_far_slower_than_the_others_is_a_straggler() {
        let m = JobMetrics::default();
        let step = |ms: f64| v1::MetricPoint { step: 1, time_ms: 0, values: [(STEP_TIME.to_string(), ms)].into() };
        for (rank, ms) in [(0, 100.0), (1, 110.0), (2, 95.0), (3, 240.0)] {
            m.record(metrics(1, rank, vec![step(ms)]));
        }
        let flagged: Vec<u32> = m.latest("j").iter().filter(|r| r.straggler).map(|r| r.rank).collect();
        assert_eq!(flagged, [3]);
        // One rank alone is nobody's straggler.
        let alone = JobMetrics::default();
        alone.record(v1::RankMetrics {
            job_id: "k".into(),
            attempt: 1,
            rank: 0,
            points: vec![step(500.0)],
            straggler: false,
        });
        assert!(!alone.latest("k")[0].straggler);
    }

    #[test]
    fn a_rank_keeps_a_bounded_number_of_points() {
        let m = JobMetrics::default();
        let many: Vec<_> = (0..MAX_POINTS_PER_RANK as u64 + 10).map(|s| point(s, 0.0)).collect();
        m.record(metrics(1, 0, many));
        let series = m.series("j");
        assert_eq!(series[0].points.len(), MAX_POINTS_PER_RANK);
        assert_eq!(series[0].points[0].step, 10, "the oldest went first");
    }
}
