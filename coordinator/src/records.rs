//! What the coordinator keeps durably, in domain terms.

use std::collections::BTreeMap;

use gantry_core::JobSpec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    /// Submit order, also the store key.
    pub seq: u64,
    pub spec: JobSpec,
    /// The name of the token that submitted it (`auth::DEV_OWNER` without auth; records from
    /// before owners read as that too).
    #[serde(default = "dev_owner")]
    pub owner: String,
    pub state: JobState,
    /// The current (or last) attempt, 0 before the first start.
    pub attempt: u32,
    pub submitted_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub attempts: Vec<AttemptRecord>,
    pub cancel_requested: bool,
    /// Why it ended, for failed and cancelled jobs; why it was requeued otherwise.
    pub message: String,
    /// Bumped on every change: a plan computed from an older version is refused.
    pub version: u64,
    /// Why the current attempt is being stopped, while it is; cleared when it has ended.
    /// (Records written before this field named a preempting job or a GPU in `preempted_by`.)
    #[serde(default, alias = "preempted_by", deserialize_with = "crate::lifecycle::stop_reason_compat")]
    pub stopping: Option<StopReason>,
    /// Runs ended by preemption: they do not count as attempts.
    #[serde(default)]
    pub preemptions: u32,
    /// Runs its nodes could not carry out (their container engine did not answer): they do not
    /// count as attempts either.
    #[serde(default)]
    pub node_faults: u32,
    /// After a failed attempt the job waits until then before it may start again (`retry.backoff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at_ms: Option<i64>,
    /// A replica of the serve job with this id: a job of its own, created and stopped by that
    /// job's rollout (`crate::serving`), never by a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<String>,
}

fn dev_owner() -> String {
    crate::auth::DEV_OWNER.to_string()
}

impl JobRecord {
    /// A serve job itself, as submitted: it runs no process and is never placed; its replicas
    /// are (see [`JobRecord::replica_of`]).
    pub fn is_serving(&self) -> bool {
        self.spec.serve.is_some() && self.replica_of.is_none()
    }

    /// The attempt users see: starts, less those ended by preemption or by a node's fault.
    /// (`attempt` itself numbers every run, so logs and agents keep distinct runs apart.)
    pub fn user_attempt(&self) -> u32 {
        self.attempt.saturating_sub(self.preemptions).saturating_sub(self.node_faults)
    }

    pub fn current_attempt(&self) -> Option<&AttemptRecord> {
        self.attempts.iter().rev().find(|a| a.attempt == self.attempt)
    }
    pub fn current_attempt_mut(&mut self) -> Option<&mut AttemptRecord> {
        let attempt = self.attempt;
        self.attempts.iter_mut().rev().find(|a| a.attempt == attempt)
    }
}

/// Why a running attempt is being stopped. Data, turned into words (its `Display`) only where
/// people read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// Someone cancelled the job.
    Cancelled,
    /// A higher-priority job needs its room; `nodes` are held for that job meanwhile. Requeued,
    /// and not counted as an attempt.
    Preempted { for_job: String, nodes: Vec<String> },
    /// A GPU it runs on turned unhealthy: requeued elsewhere, not counted as an attempt.
    GpuUnhealthy { node: String, gpu: String, why: String },
    /// The node of one of its ranks was lost: the other ranks stop, the job is requeued.
    AgentLost { node: String },
    /// One of its ranks failed: the other ranks stop.
    RankFailed { rank: u32, why: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub placement: Vec<RankPlacement>,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub exit_code: Option<i32>,
    pub outcome: String,
    /// The attempt ended because a node was lost (not counted against max_restarts).
    #[serde(default)]
    pub lost: bool,
    /// Exit status of each rank that has ended: rank -> exit code (negative: killed by signal).
    pub rank_exits: BTreeMap<u32, i32>,
    /// Ranks whose node was declared lost: whatever a copy of them still sends is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_ranks: Vec<u32>,
    /// It ended because its node could not run it (not counted against max_restarts).
    #[serde(default)]
    pub node_fault: bool,
    /// The node of the rank whose exit failed the attempt (not a lost node): a job avoids a node
    /// that two of its attempts failed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_on: Option<String>,
    /// The step of the job's own checkpoint it resumed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
    /// Steps it ran past the job's latest checkpoint, when it ended without success: work the
    /// next attempt does again. None where the job reported no steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_lost: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankPlacement {
    pub rank: u32,
    pub node: String,
    pub gpu_uuids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub job_id: String,
    pub attempt: u32,
    pub step: u64,
    pub bytes: u64,
    pub sha256: String,
    pub files: Vec<FileRecord>,
    pub committed_at_ms: i64,
    /// Where its files are in object storage; none for the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// One version of a pushed data set. Each version is a record of its own (keyed by name and
/// sha256), so no record grows with a name's history; the newest is the one pushed last. Jobs
/// are pinned to a version's `sha256` when accepted, so a version stays readable after newer ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRecord {
    /// The pushed name, or the `s3://BUCKET/KEY` a job's spec named (see [`Self::is_s3_read`]).
    pub name: String,
    /// Who pushed the name first: only they (and admins) push new versions. For an S3 read, who
    /// submitted the job that read it first.
    pub owner: String,
    #[serde(flatten)]
    pub version: DatasetVersion,
}

impl DatasetRecord {
    /// Objects a spec named by `s3://`, read where they are (`control/s3_paths.rs`): not a pushed
    /// data set, and no copy of their own, since the bucket's owner may change or delete them.
    pub fn is_s3_read(&self) -> bool {
        self.name.starts_with("s3://")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetVersion {
    /// Over the sorted (path, file sha256) list: the version's name, and its cache key on agents.
    pub sha256: String,
    pub bytes: u64,
    pub files: Vec<FileRecord>,
    pub pushed_at_ms: i64,
    /// Where its files are in object storage; none for the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// An agent as last registered; survives restarts so `gantry nodes` knows who to expect back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    /// The agent's inventory as protobuf bytes: the wire format is already versioned.
    pub inventory: Vec<u8>,
    pub registered_at_ms: i64,
    /// Drained by an operator: keeps its jobs, receives nothing new.
    #[serde(default)]
    pub drained: bool,
}
