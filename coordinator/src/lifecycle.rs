//! The job lifecycle as pure transitions on a [`JobRecord`]: no store, no clock, no network.
//! The coordinator reads a record, calls one of these inside the store's atomic update, and then
//! does what the returned [`Transition`] asks (stop ranks, wake the scheduler). Each rule has a
//! unit test named for it below.
//!
//! queued -> running (start) -> queued again (requeued: preempted, GPU unhealthy, node lost, a
//! failure within `max_restarts`) or succeeded | failed | cancelled.

use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::records::{AttemptRecord, JobRecord, JobState, RankPlacement, StopReason};

/// What a transition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing: the record is left as it was (and not written).
    Unchanged,
    /// The record changed; `stop_ranks`: the ranks of the current attempt still running must be
    /// told to stop (SIGTERM, then SIGKILL after the grace period).
    Changed { stop_ranks: bool },
}

impl Transition {
    pub fn changed(self) -> bool {
        self != Transition::Unchanged
    }
    pub fn stops_ranks(self) -> bool {
        self == Transition::Changed { stop_ranks: true }
    }
}

/// How one rank of an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RankEnd {
    /// The process exited: its code (negative: killed by that signal), and the agent's words.
    Exited { code: i32, why: String },
    /// Its node was lost, or no longer had it.
    Lost { why: String },
    /// Its node could not run it (its container engine did not answer): no failure of the job.
    NodeFault { why: String },
}

/// What to do with an agent's report about one attempt of a job.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportAction {
    /// It ended: record the rank's end (idempotent), then release it.
    End,
    /// It ended, but the coordinator moved on from that attempt: release it only.
    Release,
    /// It runs an attempt the coordinator moved on from (requeued while the agent was away): stop it.
    StopStale,
    /// It runs, but was told to stop: say so again, in case the agent was away when it was sent.
    RepeatStop,
    /// It runs as expected.
    Nothing,
}

/// Why the coordinator no longer takes output from an attempt, or from one rank of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MovedOn {
    /// Another attempt is the job's current one.
    Attempt { current: u32 },
    /// The rank's node was declared lost.
    RankLost,
}

impl fmt::Display for MovedOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MovedOn::Attempt { current } => write!(f, "the job is on attempt {current}"),
            MovedOn::RankLost => write!(f, "its node was declared lost"),
        }
    }
}

impl JobRecord {
    /// A queued job ends at once; a running one is told to stop and ends when its ranks have.
    pub fn cancel(&mut self, now_ms: i64) -> Transition {
        if self.state.is_terminal() || self.cancel_requested {
            return Transition::Unchanged;
        }
        self.cancel_requested = true;
        match self.state {
            JobState::Queued => {
                self.state = JobState::Cancelled;
                self.ended_at_ms = Some(now_ms);
                self.message = "cancelled before it started".into();
                Transition::Changed { stop_ranks: false }
            }
            _ => {
                self.stopping = Some(StopReason::Cancelled);
                Transition::Changed { stop_ranks: true }
            }
        }
    }

    /// Stops a running job that is not already stopping, to requeue it (preempted for a job, or
    /// on an unhealthy GPU). Its ranks are told to stop; it does not count as a failed attempt.
    pub fn requeue_for(&mut self, reason: StopReason) -> Transition {
        if self.state != JobState::Running || self.stopping.is_some() || self.cancel_requested {
            return Transition::Unchanged;
        }
        self.stopping = Some(reason);
        Transition::Changed { stop_ranks: true }
    }

    /// Starts the next attempt on `placement`, if the job is still queued and unchanged since
    /// `version`, the version the plan was computed from.
    pub fn start_attempt(&mut self, version: u64, placement: Vec<RankPlacement>, now_ms: i64) -> Transition {
        if self.version != version || self.state != JobState::Queued || self.cancel_requested {
            return Transition::Unchanged;
        }
        self.attempt += 1;
        self.state = JobState::Running;
        self.retry_at_ms = None;
        self.attempts.push(AttemptRecord {
            attempt: self.attempt,
            placement,
            started_at_ms: now_ms,
            ended_at_ms: None,
            exit_code: None,
            outcome: String::new(),
            lost: false,
            rank_exits: Default::default(),
            lost_ranks: Vec::new(),
            node_fault: false,
            failed_on: None,
            resumed_from_step: None,
            steps_lost: None,
        });
        Transition::Changed { stop_ranks: false }
    }

    /// A serve job counts as running from its submission until cancelled: its replicas are
    /// jobs of their own, so it has no attempt of its own.
    pub fn start_serving(&mut self) -> Transition {
        if !self.is_serving() || self.state != JobState::Queued || self.cancel_requested {
            return Transition::Unchanged;
        }
        self.state = JobState::Running;
        Transition::Changed { stop_ranks: false }
    }

    /// A serve job whose replicas have all ended ends: cancelled if asked, else failed with `why`
    /// (its replicas kept failing).
    pub fn end_serving(&mut self, why: Option<&str>, now_ms: i64) -> Transition {
        if !self.is_serving() || self.state.is_terminal() {
            return Transition::Unchanged;
        }
        let (state, message) = match (self.cancel_requested, why) {
            (true, _) => (JobState::Cancelled, "cancelled".to_string()),
            (false, Some(why)) => (JobState::Failed, why.to_string()),
            (false, None) => return Transition::Unchanged,
        };
        self.state = state;
        self.message = message;
        self.stopping = None;
        self.ended_at_ms = Some(now_ms);
        Transition::Changed { stop_ranks: false }
    }

    /// A queued job that cannot start (its `init_from` checkpoint is missing, say) fails.
    pub fn fail_before_start(&mut self, why: &str, now_ms: i64) -> Transition {
        if self.state != JobState::Queued {
            return Transition::Unchanged;
        }
        self.state = JobState::Failed;
        self.message = why.to_string();
        self.ended_at_ms = Some(now_ms);
        Transition::Changed { stop_ranks: false }
    }

    /// Records that `rank` of `attempt` ended. The first rank to fail decides the attempt's
    /// outcome and the others are stopped; the attempt ends only once every rank has ended, so a
    /// requeued job never starts while ranks of its last attempt still run. Then:
    /// cancelled -> `cancelled`; stopped to requeue -> `queued`, not counted; all ranks exited 0
    /// -> `succeeded`; a lost node -> `queued`; a failure within `max_restarts` -> `queued` after
    /// `retry`'s backoff, unless its exit code is one never retried; else `failed`.
    /// Idempotent: a rank's second report changes nothing.
    pub fn on_rank_exit(&mut self, attempt: u32, rank: u32, end: RankEnd, now_ms: i64) -> Transition {
        if self.state != JobState::Running || self.attempt != attempt {
            return Transition::Unchanged;
        }
        // A rank that exits while its attempt is being stopped for another reason did not fail
        // on its node.
        let told_to_stop = self.stopping.is_some() || self.cancel_requested;
        let Some(current) = self.current_attempt_mut() else { return Transition::Unchanged };
        if current.rank_exits.contains_key(&rank) || !current.placement.iter().any(|r| r.rank == rank) {
            return Transition::Unchanged;
        }
        let (code, why) = match &end {
            RankEnd::Exited { code, why } => (Some(*code), why.clone()),
            RankEnd::Lost { why } | RankEnd::NodeFault { why } => (None, why.clone()),
        };
        let lost = matches!(end, RankEnd::Lost { .. });
        let node_fault = matches!(end, RankEnd::NodeFault { .. });
        current.rank_exits.insert(rank, code.unwrap_or(-1));
        if lost {
            current.lost_ranks.push(rank);
        }
        let world = current.placement.len();
        let node_of = |rank: u32| current.placement.iter().find(|r| r.rank == rank).map(|r| r.node.clone());
        let mut first_failure = false;
        if code != Some(0) && current.outcome.is_empty() {
            current.failed_on = if !lost && !told_to_stop { node_of(rank) } else { None };
            current.outcome = why.clone();
            current.exit_code = code;
            current.lost = lost;
            current.node_fault = node_fault;
            first_failure = true;
        }
        if current.rank_exits.len() < world {
            // Other ranks still run (or are being stopped): a first failure stops them.
            let node = node_of(rank).unwrap_or_default();
            let stop = first_failure && self.stopping.is_none();
            if stop {
                self.stopping = Some(match end {
                    RankEnd::Lost { .. } => StopReason::AgentLost { node },
                    RankEnd::Exited { .. } | RankEnd::NodeFault { .. } => StopReason::RankFailed { rank, why },
                });
            }
            return Transition::Changed { stop_ranks: first_failure };
        }
        current.ended_at_ms = Some(now_ms);
        let all_ok = current.outcome.is_empty();
        if all_ok {
            current.outcome = "succeeded".into();
            current.exit_code = Some(0);
        }
        let (lost, node_fault, outcome, exit_code) =
            (current.lost, current.node_fault, current.outcome.clone(), current.exit_code);
        let stopping = self.stopping.take();
        let never_retried = exit_code.filter(|c| !lost && self.spec.retry.never_on_exit_codes.contains(c));
        if self.cancel_requested {
            self.state = JobState::Cancelled;
            self.message = "cancelled".into();
        } else if let Some(reason @ (StopReason::Preempted { .. } | StopReason::GpuUnhealthy { .. })) = stopping {
            // Whatever the exit (a job may save and exit 0 on SIGTERM), a run stopped to requeue
            // is not a failed attempt.
            self.preemptions += 1;
            self.state = JobState::Queued;
            self.message = format!("{reason}; requeued to resume from its latest checkpoint");
            return Transition::Changed { stop_ranks: false };
        } else if all_ok {
            self.state = JobState::Succeeded;
            self.message.clear();
        } else if let Some(code) = never_retried {
            self.state = JobState::Failed;
            self.message = format!("{outcome}; exit code {code} is in retry.never_on_exit_codes, so it is not retried");
        } else if lost {
            // A lost node is no failure of the job: it runs again at once, elsewhere.
            self.state = JobState::Queued;
            self.message = format!("attempt {attempt} ended ({outcome}); requeued");
            return Transition::Changed { stop_ranks: false };
        } else if node_fault || self.user_attempt() <= self.spec.max_restarts {
            // Failures count against max_restarts (the node's own do not), and wait longer
            // after each.
            if node_fault {
                self.node_faults += 1;
            }
            let failures = self.attempts.iter().filter(|a| a.failed_on.is_some()).count();
            let wait_ms = self.spec.retry.backoff_ms(failures as u32);
            self.retry_at_ms = Some(now_ms + wait_ms as i64);
            self.state = JobState::Queued;
            let wait = gantry_core::spec::format_duration(wait_ms.div_ceil(1000));
            self.message = format!("attempt {attempt} ended ({outcome}); retrying in {wait}");
            return Transition::Changed { stop_ranks: false };
        } else {
            self.state = JobState::Failed;
            self.message = format!("{outcome} (attempt {} of {})", self.user_attempt(), self.spec.max_restarts + 1);
        }
        self.ended_at_ms = Some(now_ms);
        Transition::Changed { stop_ranks: false }
    }

    /// What to do with a report from `node` about `rank` of `attempt` (`exited`: it ended).
    pub fn on_report(&self, node: &str, attempt: u32, rank: u32, exited: bool) -> ReportAction {
        let expected = self.state == JobState::Running
            && self.attempt == attempt
            && self.current_attempt().is_some_and(|a| a.placement.iter().any(|r| r.rank == rank && r.node == node));
        match (exited, expected) {
            (true, true) => ReportAction::End,
            (true, false) => ReportAction::Release,
            (false, false) => ReportAction::StopStale,
            (false, true) if self.is_stopping() => ReportAction::RepeatStop,
            (false, true) => ReportAction::Nothing,
        }
    }

    /// Why output of `attempt` (logs, checkpoints; of `rank`, where the sender says which) is no
    /// longer taken, if it is not. The coordinator moves on from an attempt when it starts a newer one, and
    /// from a rank once it declared that rank's node lost: what a copy of either still sends
    /// comes from a copy that should no longer run, and would mix with the new attempt's.
    pub fn moved_on_from(&self, attempt: u32, rank: Option<u32>) -> Option<MovedOn> {
        if attempt != self.attempt {
            return Some(MovedOn::Attempt { current: self.attempt });
        }
        let lost = rank.is_some_and(|r| self.current_attempt().is_some_and(|a| a.lost_ranks.contains(&r)));
        lost.then_some(MovedOn::RankLost)
    }

    /// Nodes two or more of its attempts failed on: it is placed elsewhere while it can be.
    pub fn avoided_nodes(&self) -> Vec<String> {
        let mut counts: std::collections::BTreeMap<&str, u32> = Default::default();
        for node in self.attempts.iter().filter_map(|a| a.failed_on.as_deref()) {
            *counts.entry(node).or_default() += 1;
        }
        counts.into_iter().filter(|(_, n)| *n >= 2).map(|(node, _)| node.to_string()).collect()
    }

    /// Records the work an ended, unsuccessful `attempt` lost: the steps it ran (`last_step`, the
    /// furthest any rank reported) past the job's latest checkpoint, where the next attempt
    /// resumes. Unknown (left unset) when the attempt reported no step.
    pub fn note_lost_work(&mut self, attempt: u32, last_step: Option<u64>, checkpoint_step: Option<u64>) {
        let Some(a) = self.attempts.iter_mut().find(|a| a.attempt == attempt) else { return };
        if a.ended_at_ms.is_none() || a.outcome == "succeeded" || a.steps_lost.is_some() {
            return;
        }
        a.steps_lost = last_step.map(|last| last.saturating_sub(checkpoint_step.unwrap_or(0)));
    }

    /// Steps lost over all attempts.
    pub fn steps_lost(&self) -> u64 {
        self.attempts.iter().filter_map(|a| a.steps_lost).sum()
    }

    /// Whether the current attempt has been told to stop (cancelled, requeued, or ending after a
    /// rank failed): its resources free up soon.
    pub fn is_stopping(&self) -> bool {
        self.cancel_requested
            || self.stopping.is_some()
            || self.current_attempt().is_some_and(|a| !a.outcome.is_empty() && a.ended_at_ms.is_none())
    }

    /// Ranks of the current attempt that have not ended and whose node is `lost`.
    pub fn ranks_on(&self, lost: impl Fn(&str) -> bool) -> Vec<(u32, String)> {
        if self.state != JobState::Running {
            return Vec::new();
        }
        let Some(attempt) = self.current_attempt() else { return Vec::new() };
        attempt
            .placement
            .iter()
            .filter(|r| !attempt.rank_exits.contains_key(&r.rank) && lost(&r.node))
            .map(|r| (r.rank, r.node.clone()))
            .collect()
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::Cancelled => write!(f, "cancelled"),
            StopReason::Preempted { for_job, .. } => write!(f, "preempted by job {for_job}"),
            StopReason::GpuUnhealthy { gpu, why, .. } => write!(f, "GPU {gpu} unhealthy ({why})"),
            StopReason::AgentLost { node } => write!(f, "agent {node} lost"),
            StopReason::RankFailed { rank, why } => write!(f, "rank {rank} failed ({why})"),
        }
    }
}

impl StopReason {
    /// The stable name of its kind, for scripts and Prometheus labels.
    pub fn code(&self) -> &'static str {
        match self {
            StopReason::Cancelled => "cancelled",
            StopReason::Preempted { .. } => "preempted",
            StopReason::GpuUnhealthy { .. } => "gpu_unhealthy",
            StopReason::AgentLost { .. } => "agent_lost",
            StopReason::RankFailed { .. } => "rank_failed",
        }
    }
}

/// Reads `stopping`, or the `preempted_by` text of records written before it: a job id, or
/// "GPU <uuid> unhealthy (<why>)".
pub(crate) fn stop_reason_compat<'de, D: Deserializer<'de>>(d: D) -> Result<Option<StopReason>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Typed(StopReason),
        Legacy(String),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        None => None,
        Some(Either::Typed(reason)) => Some(reason),
        Some(Either::Legacy(text)) => Some(match text.strip_prefix("GPU ") {
            Some(rest) => {
                let (gpu, why) = rest.split_once(" unhealthy").unwrap_or((rest, ""));
                let why = why.trim().trim_start_matches('(').trim_end_matches(')');
                StopReason::GpuUnhealthy { node: String::new(), gpu: gpu.to_string(), why: why.to_string() }
            }
            None => StopReason::Preempted { for_job: text, nodes: Vec::new() },
        }),
    })
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
