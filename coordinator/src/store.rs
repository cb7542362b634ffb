//! The embedded durable store (redb): jobs, attempts, agents and checkpoint records.
//!
//! Every method is one transaction, committed durably (fsync) before it returns, so whatever the
//! coordinator acknowledges survives `kill -9`. Methods speak the domain (submit, start an
//! attempt, record an exit), not get/put, so a second backend can keep the same promises.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Error, Result};
use crate::records::{AgentRecord, AttemptRecord, CheckpointRecord, JobRecord, JobState, RankPlacement};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const CHECKPOINTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("checkpoints");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub struct Store {
    db: Database,
}

fn job_key(id: &str) -> Result<u64> {
    id.parse::<u64>().map_err(|_| Error::JobNotFound(id.to_string()))
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let db = Database::create(path)?;
        // Create the tables up front so readers never meet a missing table.
        let txn = db.begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(CHECKPOINTS)?;
        txn.open_table(AGENTS)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(Store { db })
    }

    /// Queues a new job and returns its id (1, 2, 3, ...: short enough to type).
    pub fn submit(&self, spec: gantry_core::JobSpec, now_ms: i64) -> Result<JobRecord> {
        let txn = self.db.begin_write()?;
        let job = {
            let mut meta = txn.open_table(META)?;
            let seq = meta.get("next_job")?.map(|v| v.value()).unwrap_or(1);
            meta.insert("next_job", seq + 1)?;
            let job = JobRecord {
                id: seq.to_string(),
                seq,
                spec,
                state: JobState::Queued,
                attempt: 0,
                submitted_at_ms: now_ms,
                ended_at_ms: None,
                attempts: Vec::new(),
                cancel_requested: false,
                message: String::new(),
                version: 1,
                preempted_by: None,
                preempted_for_nodes: Vec::new(),
                preemptions: 0,
            };
            txn.open_table(JOBS)?.insert(seq, serde_json::to_vec(&job)?.as_slice())?;
            job
        };
        txn.commit()?;
        Ok(job)
    }

    pub fn job(&self, id: &str) -> Result<JobRecord> {
        let key = job_key(id)?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(JOBS)?;
        let value = table.get(key)?.ok_or_else(|| Error::JobNotFound(id.to_string()))?;
        Ok(serde_json::from_slice(value.value())?)
    }

    /// Every job, in submit order.
    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    /// Changes one job in a transaction. `change` returns false to leave it untouched (and the
    /// method then returns `None`); otherwise the job's version is bumped and it is committed.
    pub fn update_job(&self, id: &str, change: impl FnOnce(&mut JobRecord) -> bool) -> Result<Option<JobRecord>> {
        let key = job_key(id)?;
        let txn = self.db.begin_write()?;
        let updated = {
            let mut table = txn.open_table(JOBS)?;
            let mut job: JobRecord = {
                let value = table.get(key)?.ok_or_else(|| Error::JobNotFound(id.to_string()))?;
                serde_json::from_slice(value.value())?
            };
            if !change(&mut job) {
                None
            } else {
                job.version += 1;
                table.insert(key, serde_json::to_vec(&job)?.as_slice())?;
                Some(job)
            }
        };
        if updated.is_some() {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(updated)
    }

    /// Starts the next attempt of a queued job, only if the job is unchanged since `version`
    /// (the version the plan was computed from). Returns the started job, or `None` on conflict.
    pub fn start_attempt(
        &self,
        id: &str,
        version: u64,
        placement: Vec<RankPlacement>,
        now_ms: i64,
    ) -> Result<Option<JobRecord>> {
        self.update_job(id, |job| {
            if job.version != version || job.state != JobState::Queued || job.cancel_requested {
                return false;
            }
            job.attempt += 1;
            job.state = JobState::Running;
            job.attempts.push(AttemptRecord {
                attempt: job.attempt,
                placement,
                started_at_ms: now_ms,
                ended_at_ms: None,
                exit_code: None,
                outcome: String::new(),
                lost: false,
                rank_exits: Default::default(),
            });
            true
        })
    }

    pub fn put_checkpoint(&self, record: &CheckpointRecord) -> Result<()> {
        let key = (job_key(&record.job_id)?, record.step);
        let txn = self.db.begin_write()?;
        txn.open_table(CHECKPOINTS)?.insert(key, serde_json::to_vec(record)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// A job's committed checkpoints, oldest step first.
    pub fn checkpoints(&self, job_id: &str) -> Result<Vec<CheckpointRecord>> {
        let key = job_key(job_id)?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CHECKPOINTS)?;
        let mut out = Vec::new();
        for entry in table.range((key, 0)..=(key, u64::MAX))? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    pub fn put_agent(&self, record: &AgentRecord) -> Result<()> {
        let txn = self.db.begin_write()?;
        txn.open_table(AGENTS)?.insert(record.name.as_str(), serde_json::to_vec(record)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Marks an agent drained or not; false if no agent has that name.
    pub fn set_drained(&self, name: &str, drained: bool) -> Result<bool> {
        let txn = self.db.begin_write()?;
        let found = {
            let mut table = txn.open_table(AGENTS)?;
            let record: Option<AgentRecord> = match table.get(name)? {
                Some(v) => Some(serde_json::from_slice(v.value())?),
                None => None,
            };
            match record {
                Some(mut r) => {
                    r.drained = drained;
                    table.insert(name, serde_json::to_vec(&r)?.as_slice())?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(found)
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> gantry_core::JobSpec {
        gantry_core::JobSpec::from_yaml("name: t\ncommand: [true]\n").unwrap()
    }

    #[test]
    fn submitted_jobs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let ids: Vec<String> = {
            let store = Store::open(&path).unwrap();
            (0..3).map(|_| store.submit(spec(), 0).unwrap().id).collect()
        };
        let store = Store::open(&path).unwrap();
        let jobs = store.jobs().unwrap();
        assert_eq!(jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), ids);
        assert_eq!(store.submit(spec(), 0).unwrap().id, "4");
    }

    #[test]
    fn a_stale_plan_does_not_start_an_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let job = store.submit(spec(), 0).unwrap();
        store
            .update_job(&job.id, |j| {
                j.message = "touched".into();
                true
            })
            .unwrap();
        assert!(store.start_attempt(&job.id, job.version, vec![], 1).unwrap().is_none());
        let fresh = store.job(&job.id).unwrap();
        let started = store.start_attempt(&job.id, fresh.version, vec![], 1).unwrap().unwrap();
        assert_eq!((started.state, started.attempt), (JobState::Running, 1));
    }

    #[test]
    fn unknown_job_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        assert!(matches!(store.job("99"), Err(Error::JobNotFound(_))));
        assert!(matches!(store.job("abc"), Err(Error::JobNotFound(_))));
    }
}
