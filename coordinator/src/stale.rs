//! Counts of what came from attempts the coordinator had moved on from: a copy of a job that
//! should no longer run (its node was declared lost, or a newer attempt started). Refused, and
//! counted, so an operator sees a fleet where that happens (`/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

/// What a stale attempt sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleKind {
    Logs,
    Checkpoint,
    Metrics,
    Exit,
    /// A report that such a copy still runs (it is told to stop).
    Running,
}

impl StaleKind {
    pub const ALL: [StaleKind; 5] =
        [StaleKind::Logs, StaleKind::Checkpoint, StaleKind::Metrics, StaleKind::Exit, StaleKind::Running];

    /// Its `kind` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            StaleKind::Logs => "logs",
            StaleKind::Checkpoint => "checkpoint",
            StaleKind::Metrics => "metrics",
            StaleKind::Exit => "exit",
            StaleKind::Running => "running",
        }
    }
}

#[derive(Default)]
pub struct StaleReports([AtomicU64; 5]);

impl StaleReports {
    pub fn count(&self, kind: StaleKind) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, kind: StaleKind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }
}
