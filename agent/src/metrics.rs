//! A rank's metrics: JSON lines the job appends to `GANTRY_METRICS_FILE`, such as
//! `{"step": 100, "loss": 0.31, "accuracy": 0.92}`. Each heartbeat reads the lines completed
//! since the last one. Numbers are kept; anything else in a line is ignored, and a line that is
//! not a JSON object is skipped, so a job's mistake never stops its run.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use gantry_proto::v1;

/// Bounds on what one rank sends per heartbeat, so a job cannot flood the coordinator.
const MAX_BYTES_PER_READ: u64 = 1 << 20;
const MAX_VALUES: usize = 32;
const MAX_NAME: usize = 64;

pub struct MetricsTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// The step given to a line without one: one more than the last.
    next_step: u64,
}

impl MetricsTail {
    pub fn new(path: PathBuf) -> Self {
        MetricsTail { path, offset: 0, partial: Vec::new(), next_step: 0 }
    }

    /// The points completed since the last call (none while the file does not exist).
    pub fn read_new(&mut self, now_ms: i64) -> Vec<v1::MetricPoint> {
        // The job owns the file: a symlink in its place is not followed, and a pipe neither
        // blocks the agent's heartbeat nor is read (the job cannot replace its directory).
        let trusted = self.path.parent().unwrap_or(Path::new("/"));
        let opened = crate::checkpoints::open_below(trusted, &self.path, false).ok();
        let Some(mut file) = opened else { return Vec::new() };
        let mut chunk = Vec::new();
        let read =
            file.seek(SeekFrom::Start(self.offset)).and_then(|_| file.take(MAX_BYTES_PER_READ).read_to_end(&mut chunk));
        if read.is_err() || chunk.is_empty() {
            return Vec::new();
        }
        self.offset += chunk.len() as u64;
        self.partial.extend_from_slice(&chunk);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else { return Vec::new() };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        let mut points = Vec::new();
        for line in String::from_utf8_lossy(&complete).lines() {
            if let Some(point) = parse_line(line, self.next_step, now_ms) {
                self.next_step = point.step + 1;
                points.push(point);
            }
        }
        points
    }
}

fn parse_line(line: &str, default_step: u64, now_ms: i64) -> Option<v1::MetricPoint> {
    let serde_json::Value::Object(fields) = serde_json::from_str(line.trim()).ok()? else { return None };
    let step = fields.get("step").and_then(|s| s.as_u64()).unwrap_or(default_step);
    let values = fields
        .iter()
        .filter(|(name, _)| *name != "step" && !name.is_empty() && name.len() <= MAX_NAME)
        .filter_map(|(name, v)| Some((name.clone(), v.as_f64().filter(|x| x.is_finite())?)))
        .take(MAX_VALUES)
        .collect();
    Some(v1::MetricPoint { step, time_ms: now_ms, values })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn complete_lines_are_read_once_and_a_partial_line_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut tail = MetricsTail::new(path.clone());
        assert!(tail.read_new(0).is_empty(), "no file yet");
        let mut f = std::fs::File::create(&path).unwrap();
        write!(f, "{{\"step\": 10, \"loss\": 0.5, \"note\": \"text\"}}\nnot json\n{{\"loss\": 0.4").unwrap();
        let points = tail.read_new(7);
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].step, 10);
        assert_eq!(points[0].time_ms, 7);
        assert_eq!(points[0].values.get("loss"), Some(&0.5));
        assert!(!points[0].values.contains_key("note"), "only numbers are kept");
        writeln!(f, ", \"accuracy\": 0.9}}").unwrap();
        let points = tail.read_new(8);
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].step, 11, "a line without a step follows the last one");
        assert_eq!(points[0].values.len(), 2);
        assert!(tail.read_new(9).is_empty(), "nothing is read twice");
    }
}
