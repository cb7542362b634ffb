//! Durable state: jobs and their attempts, checkpoint records, agents, tokens. One contract, two
//! backends: [`EmbeddedStore`] (redb, one machine) and, with the `etcd` feature, `EtcdStore`
//! (a highly available control plane).
//!
//! The contract speaks the domain (submit a job, change a job, start an attempt if the plan is
//! still current), not get/put: as Apache Ballista learned, a generic key-value layer is too low
//! to carry the promises. Every method commits durably before it returns, so whatever the
//! coordinator acknowledges survives `kill -9`; and a backend that can have a second writer
//! refuses a deposed one's writes (fencing). Heartbeats and telemetry never come here.
//! `tests/store_conformance.rs` holds both backends to the same promises.

mod embedded;
#[cfg(feature = "etcd")]
mod etcd;

pub use embedded::EmbeddedStore;
#[cfg(feature = "etcd")]
pub use etcd::{EtcdOptions, EtcdStore, leader_of};

use crate::auth::TokenRecord;
use crate::error::{Error, Result};
use crate::records::{AgentRecord, CheckpointRecord, DatasetRecord, JobRecord, JobState};

pub trait StateStore: Send + Sync {
    /// Stores a new job, `make(seq)` given the next sequence number, in one write, and returns
    /// it. Ids are that number (1, 2, 3, ...: short enough to type).
    fn insert_job(&self, make: &mut dyn FnMut(u64) -> JobRecord) -> Result<JobRecord>;

    /// Queues a new job of `owner` (a token's name) and returns it.
    fn submit(&self, spec: gantry_core::JobSpec, owner: &str, now_ms: i64) -> Result<JobRecord> {
        self.insert_job(&mut |seq| new_job(seq, spec.clone(), owner, now_ms))
    }

    /// Queues a replica of serve job `of`: one write, so no replica is ever stored without
    /// knowing whose it is.
    fn submit_replica(&self, spec: gantry_core::JobSpec, owner: &str, of: &str, now_ms: i64) -> Result<JobRecord> {
        self.insert_job(&mut |seq| JobRecord {
            replica_of: Some(of.to_string()),
            ..new_job(seq, spec.clone(), owner, now_ms)
        })
    }

    fn job(&self, id: &str) -> Result<JobRecord>;

    /// Every job, in submit order.
    fn jobs(&self) -> Result<Vec<JobRecord>>;

    /// Changes one job atomically. `change` returns false to leave it untouched (the method then
    /// returns `None`); otherwise the job's version is bumped and the change committed. A backend
    /// may call `change` again on a fresher copy if the job changed underneath it.
    fn update_job(&self, id: &str, change: &mut dyn FnMut(&mut JobRecord) -> bool) -> Result<Option<JobRecord>>;

    /// Records a verified checkpoint.
    fn put_checkpoint(&self, record: &CheckpointRecord) -> Result<()>;

    /// A job's committed checkpoints, oldest step first.
    fn checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>>;

    /// Registers (or re-registers) an agent.
    fn put_agent(&self, record: &AgentRecord) -> Result<()>;

    /// Marks an agent drained or not; false if no agent has that name.
    fn set_drained(&self, name: &str, drained: bool) -> Result<bool>;

    fn agents(&self) -> Result<Vec<AgentRecord>>;

    /// Deletes an agent's record (a removed node); false if no agent has that name.
    fn delete_agent(&self, name: &str) -> Result<bool>;

    /// Records (or replaces) a token: its name, role and hash, never the secret.
    fn put_token(&self, record: &TokenRecord) -> Result<()>;

    /// Deletes a token; false if none has that name.
    fn delete_token(&self, name: &str) -> Result<bool>;

    /// Every token, by name.
    fn tokens(&self) -> Result<Vec<TokenRecord>>;

    /// Stores a data set version's record, replacing the one of the same name and sha256.
    fn put_dataset(&self, record: &DatasetRecord) -> Result<()>;

    /// Deletes one version's record; false if there was none.
    fn delete_dataset(&self, name: &str, sha256: &str) -> Result<bool>;

    /// Makes `owner` the owner of data set name `name` unless someone already is, atomically
    /// (two first pushes of a name can race); returns who owns it now.
    fn claim_dataset(&self, name: &str, owner: &str) -> Result<String>;

    /// Frees name `name` (its last version was deleted) for anyone's next first push.
    fn release_dataset(&self, name: &str) -> Result<()>;

    /// Every version of every data set.
    fn datasets(&self) -> Result<Vec<DatasetRecord>>;

    /// The versions of data set `name`, the one pushed last last (none: never pushed).
    fn dataset_versions(&self, name: &str) -> Result<Vec<DatasetRecord>> {
        let mut versions: Vec<DatasetRecord> = self.datasets()?.into_iter().filter(|d| d.name == name).collect();
        versions.sort_by_key(|d| d.version.pushed_at_ms);
        Ok(versions)
    }

    /// True once this store may no longer write (another coordinator leads).
    fn deposed(&self) -> bool {
        false
    }
}

impl dyn StateStore {
    /// [`StateStore::update_job`] with any closure.
    pub fn update(&self, id: &str, mut change: impl FnMut(&mut JobRecord) -> bool) -> Result<Option<JobRecord>> {
        self.update_job(id, &mut change)
    }

    /// Starts the next attempt of a queued job, only if the job is unchanged since `version`
    /// (see [`JobRecord::start_attempt`]). Returns the started job, or `None` on conflict.
    pub fn start_attempt(
        &self,
        id: &str,
        version: u64,
        placement: Vec<crate::records::RankPlacement>,
        now_ms: i64,
    ) -> Result<Option<JobRecord>> {
        self.update(id, |job| job.start_attempt(version, placement.clone(), now_ms).changed())
    }
}

/// Job ids are decimal sequence numbers; anything else names no job.
fn job_key(id: &str) -> Result<u64> {
    id.parse::<u64>().map_err(|_| Error::JobNotFound(id.to_string()))
}

pub(crate) fn new_job(seq: u64, spec: gantry_core::JobSpec, owner: &str, now_ms: i64) -> JobRecord {
    JobRecord {
        id: seq.to_string(),
        seq,
        spec,
        owner: owner.to_string(),
        state: JobState::Queued,
        attempt: 0,
        submitted_at_ms: now_ms,
        ended_at_ms: None,
        attempts: Vec::new(),
        cancel_requested: false,
        message: String::new(),
        version: 1,
        stopping: None,
        preemptions: 0,
        node_faults: 0,
        retry_at_ms: None,
        replica_of: None,
    }
}
